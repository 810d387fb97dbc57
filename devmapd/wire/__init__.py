"""The wire: frame format, the asyncio Unix-socket server, peer credentials.

``protocol`` is shared by the server and the client; ``server`` reaches the daemon only through
the small ``DaemonAPI`` interface it is handed, never by importing it.

May import: ``devmapd.engine`` (the manifest) and itself.
"""
