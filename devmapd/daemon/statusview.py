"""The status view: the ``status`` and ``model_detail`` dicts and the one-line summary.

:class:`StatusView` owns no state of its own; it reads the registry, the device view and the
watcher when asked and builds the documented status JSON (DESIGN.md contract), so every client
(``devmapd status``, the dashboard, the metrics) sees one picture. It is handed its sources;
it changes nothing.
"""

from __future__ import annotations

import os
import socket as socketlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from devmapd._version import __version__
from devmapd.config import Config
from devmapd.daemon.registry import STATES, Registry
from devmapd.daemon.statuscache import StatusCache
from devmapd.devices import Snapshot
from devmapd.engine import checkpoint
from devmapd.wire.protocol import ApiError


class DeviceView(Protocol):
    snapshot: Snapshot | None

    def device_status(self) -> list[dict[str, Any]]: ...


class StatusView:
    """Builds what ``status``, ``model`` and STATUS= say (see the module docstring)."""

    def __init__(self, registry: Registry, devices: DeviceView, config: Callable[[], Config], model_dir: Path, *,
                 watcher: Callable[[], Any], extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self._registry = registry
        self._devices = devices
        self._config = config
        self._model_dir = model_dir
        self._watcher = watcher  # a getter: the watcher starts after the server
        self._extra = extra  # more keys for the "daemon" section (resource use)
        # Each model's status dict as its last event built it: status costs O(changes), not O(models).
        self._models = StatusCache(registry)
        self.started_at = time.time()
        self.host = socketlib.gethostname()

    def status(self) -> dict[str, Any]:
        return {**self.status_head(), "models": self._models.models()}

    def status_json(self) -> bytes:
        """``status()`` as JSON, each model's part encoded once per change and spliced in."""
        return self._models.status_json(self.status_head())

    def status_head(self) -> dict[str, Any]:
        """The daemon and devices sections of the status (small, built per call)."""
        snap = self._devices.snapshot
        watcher = self._watcher()
        daemon = {
            "version": __version__, "pid": os.getpid(), "host": self.host,
            "socket": self._config().server.socket, "backend": snap.backend if snap else None,
            "model_dir": str(self._model_dir), "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 3),
            "warning": snap.warning if snap else None,
            "watcher": getattr(watcher, "backend", None),
            "watcher_fallback": getattr(watcher, "fallback_reason", None),
            # Files in the model dir that are not served, and why (escaping symlinks, FIFOs,
            # name clashes); HF directories still waiting for shards.
            "problems": dict(getattr(watcher, "problems", None) or {}),
            "pending": {str(k): str(v) for k, v in (getattr(watcher, "pending", None) or {}).items()},
        }
        if self._extra is not None:
            daemon.update(self._extra())
        # Start-up progress at a glance (kept as models change, not counted per call).
        daemon["models_by_state"] = {state: 0 for state in STATES} | self._models.counts()
        return {
            "daemon": daemon,
            "devices": self._devices.device_status(),
        }

    def model_detail(self, name: str) -> dict[str, Any]:
        rec = self._registry.get(name)
        if rec is None:
            raise ApiError("not_found", f"no model named {name!r} (see `devmapd status`)")
        detail = rec.to_status()
        insp = rec.inspection
        detail["inspection"] = insp.to_json() if insp is not None else None
        detail["summary"] = checkpoint.summary(insp) if insp is not None else None
        return detail

    def summary(self) -> str:
        counts = {state: 0 for state in STATES}
        counts.update(self._models.counts())
        snap = self._devices.snapshot
        gpus = len(snap.gpus) if snap else 0
        parts = [f"{counts['ready']} models ready"]
        for state in ("loading", "queued", "failed", "evicted"):
            if counts[state]:
                parts.append(f"{counts[state]} {state}")
        parts.append(f"{gpus} GPU{'s' if gpus != 1 else ''}")
        return ", ".join(parts)
