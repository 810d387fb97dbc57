"""The daemon: what runs inside ``devmapd serve``.

Owns the lifecycle (startup, serve, shutdown, signals), the registry of model records and their
state machine, the load queue, operator actions, the pressure loop, the watcher and model
naming, and the small state file.

May import: ``devmapd.engine``, ``devmapd.devices``, ``devmapd.planner``, ``devmapd.pressure``,
``devmapd.wire``, ``devmapd.service``, ``devmapd.gpu``, ``devmapd.config``, ``devmapd.textfmt``.
Nothing imports it except ``devmapd.cli``.
"""
