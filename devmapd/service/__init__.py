"""Running as a system service: sd_notify, the systemd fd store, unit installation, metrics.

May import: the standard library and ``devmapd.engine`` for the segments parked in the fd
store. Nothing here knows about models or placements.
"""
