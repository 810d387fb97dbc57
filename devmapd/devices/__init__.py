"""Device inventory: what GPUs (and how much host memory) this machine has right now.

Three backends implement :class:`InventoryBackend`:

* ``nvml`` (:mod:`devmapd.devices.nvml`) - real GPUs through pynvml; the only module of
  devmapd that imports pynvml. Degrades to a CPU-only snapshot (with a warning saying why)
  when NVML is missing, mismatched or hung, and keeps retrying.
* ``simulated`` (:mod:`devmapd.devices.simulated`) - GPUs described by a JSON file that is
  re-read at every snapshot, so tests and demos can create pressure by editing it.
* ``none`` (:mod:`devmapd.devices.none`) - CPU only.

Every snapshot carries the host memory (``/proc/meminfo``: MemTotal / MemAvailable) as a
:class:`Device` with id ``"cpu"``. A backend's ``snapshot()`` never raises and never blocks for
longer than its call timeout: hardware calls run through :class:`TimedCaller`.

The shared data types live in :mod:`devmapd.devices.base` (re-exported here); the backends are
imported lazily by :func:`open_backend` so that importing the data types never loads pynvml.
"""
from __future__ import annotations

from typing import Any

from devmapd.devices.base import (
    MEMINFO_PATH,
    CallerBusy,
    CallTimeout,
    Device,
    GpuProcess,
    InventoryBackend,
    Snapshot,
    TimedCaller,
    read_host_memory,
)

__all__ = [
    "GpuProcess",
    "Device",
    "Snapshot",
    "InventoryBackend",
    "read_host_memory",
    "TimedCaller",
    "CallTimeout",
    "CallerBusy",
    "MEMINFO_PATH",
    "open_backend",
]


def open_backend(kind: str = "auto", simulate: str | None = None, **options: Any) -> InventoryBackend:
    """Open an inventory backend.

    ``kind``: ``"auto"`` (the simulate file when given, else NVML - which itself degrades to a
    CPU-only snapshot with a warning on a machine without a usable NVIDIA driver, and keeps
    retrying), ``"nvml"``, ``"simulated"`` (needs ``simulate``), or ``"none"`` (CPU only).
    Extra keyword ``options`` go to the backend's constructor (e.g. ``call_timeout_s``).
    """
    if kind == "auto":
        kind = "simulated" if simulate else "nvml"
    if kind == "simulated":
        if not simulate:
            raise ValueError("the simulated device backend needs a file: pass --simulate FILE")
        from .simulated import SimulatedBackend

        return SimulatedBackend(simulate, **options)
    if simulate:
        raise ValueError(f"--simulate {simulate} was given but the device backend is {kind!r}; use 'auto' or 'simulated'")
    if kind == "nvml":
        from .nvml import NvmlBackend

        return NvmlBackend(**options)
    if kind == "none":
        from .none import NoneBackend

        return NoneBackend(**options)
    raise ValueError(f"unknown device backend {kind!r}: use auto, nvml, simulated or none")
