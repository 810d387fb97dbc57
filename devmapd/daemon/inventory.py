"""What the machine has and what devmapd holds on it: the capacity view every placement reads.

Owns the inventory backend (NVML, simulated or none) and its latest :class:`Snapshot`. It
answers, from that snapshot and the registry's placements, the questions the other parts ask:
how much each device has free and how much devmapd holds there (:meth:`Inventory.capacities`),
the planner's policy under the running config, the host memory cap, which devices exist, the
torch index of a real GPU, and the per-device rows of ``status``. It never decides where a
model goes (the planner does) nor moves one (the load queue does).

The load queue, the pressure controller, the actions and the status view depend on the small
:class:`Capacity` protocol below, not on this class, so each can be tested with a stand-in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from devmapd import planner
from devmapd.config import Config
from devmapd.daemon.holdings import Holdings
from devmapd.daemon.registry import ModelRecord, Registry
from devmapd.devices import InventoryBackend, Snapshot, open_backend

log = logging.getLogger("devmapd")

MIB = 1 << 20


class Capacity(Protocol):
    """The capacity questions a placement or a pressure decision asks."""

    def host_free(self) -> int: ...
    def held(self) -> dict[str, int]: ...
    def capacities(self) -> tuple[list[planner.DeviceCapacity], planner.DeviceCapacity]: ...
    def policy(self) -> planner.Policy: ...
    def gpu_ids(self) -> list[str]: ...
    def lost_gpus(self) -> dict[str, str]: ...
    def cuda_index_of(self, device_id: str) -> int | None: ...
    def holdings_changed(self) -> None: ...
    def occupied_by_others(self, rec: ModelRecord) -> dict[str, int]: ...
    def recount(self, rec: ModelRecord) -> None: ...


class Inventory:
    """The backend, its latest snapshot, and the capacity view built from it (see the module docstring)."""

    def __init__(self, registry: Registry, config: Callable[[], Config]) -> None:
        self._registry = registry
        self._config = config  # a getter: the config changes on SIGHUP
        # Per-device sums kept as records change: no load or poll re-sums every model.
        self.holdings = Holdings(registry)
        self.backend: InventoryBackend | None = None
        self.snapshot: Snapshot | None = None
        self.storages: Any = None  # engine.dedup.StorageStore when served versions share storages

    # ------------------------------------------------------------------ backend
    async def open(self) -> None:
        """Open the configured backend and take the first snapshot (NVML calls: off the loop)."""
        devices = self._config().devices
        kind = "simulated" if devices.simulate else devices.backend
        self.backend = open_backend(kind, devices.simulate or None)
        await self.refresh()
        if self.snapshot is not None and self.snapshot.backend == "nvml" and self.snapshot.gpus:
            await asyncio.to_thread(self._match_cuda_indices)

    async def refresh(self) -> None:
        """A new snapshot; simulated devices first learn what devmapd holds on them."""
        self.holdings_changed()
        assert self.backend is not None
        self.snapshot = await asyncio.to_thread(self.backend.snapshot)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def _match_cuda_indices(self) -> None:
        """Tell the NVML backend torch's CUDA numbering (by UUID: NVML order is not CUDA order)."""
        assert self.backend is not None
        try:
            import torch

            if not torch.cuda.is_available():
                log.warning("NVML sees GPUs but torch cannot use CUDA; models stay on the CPU")
                return
            uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
        except Exception as exc:  # a broken CUDA install must not stop the daemon
            log.warning("cannot match CUDA devices to NVML by UUID: %s", exc)
            return
        self.backend.match_torch_indices(uuids)  # type: ignore[attr-defined]
        self.snapshot = self.backend.snapshot()

    # ------------------------------------------------------------------ Capacity
    def host_free(self) -> int:
        snap = self.snapshot
        return snap.host.free if snap is not None else 0

    def host_cap(self) -> int:
        cap = self._config().placement.host_memory_cap_mib * MIB
        if cap:
            return cap
        total = self.snapshot.host.total if self.snapshot is not None else 0
        return total // 2

    def held(self) -> dict[str, int]:
        """Bytes devmapd's serving versions occupy per device (what the hardware sees)."""
        held = self.holdings.held()
        if self.storages is not None:
            shared = [rec.serving.generation for rec in self._registry.records()
                      if rec.serving is not None and getattr(rec.serving, "shared", None) is self.storages]
            # Storages several served versions share are in each one's placement: count them once.
            for device, nbytes in self.storages.savings(shared).items():
                held[device] = held.get(device, 0) - nbytes
        return held

    def occupied_by_others(self, rec: ModelRecord) -> dict[str, int]:
        """What every other model holds or is being loaded onto, per device (O(devices))."""
        return self.holdings.occupied_by_others(rec)

    def recount(self, rec: ModelRecord) -> None:
        """``rec``'s placement or planned bytes changed without an event: count them now."""
        self.holdings.update(rec)

    def capacities(self) -> tuple[list[planner.DeviceCapacity], planner.DeviceCapacity]:
        snap = self.snapshot
        assert snap is not None
        held = self.held()
        # A device whose NVML calls hang (error set) shows stale numbers: place nothing new there.
        gpus = [planner.DeviceCapacity(id=d.id, total=d.total, free=d.free, held=held.get(d.id, 0),
                                       lost=d.lost or d.error is not None)
                for d in snap.gpus]
        host = planner.DeviceCapacity(id="cpu", total=snap.host.total, free=snap.host.free, held=held.get("cpu", 0))
        return gpus, host

    def policy(self) -> planner.Policy:
        cfg = self._config()
        d, p = cfg.devices, cfg.placement
        return planner.Policy(mode=p.policy, reserve=d.reserve_mib * MIB, max_fraction=d.max_fraction,
                              overhead=d.overhead, host_cap=self.host_cap(), allow_split=p.allow_split)

    def gpu_ids(self) -> list[str]:
        return [d.id for d in (self.snapshot.gpus if self.snapshot else ())]

    def lost_gpus(self) -> dict[str, str]:
        """GPU id -> why, for the GPUs that fell off the bus."""
        return {d.id: d.error or "lost" for d in (self.snapshot.gpus if self.snapshot else ()) if d.lost}

    def cuda_index_of(self, device_id: str) -> int | None:
        """Torch index of a REAL GPU id; None for the CPU and simulated GPUs (they stay memfds)."""
        snap = self.snapshot
        if snap is None or snap.backend != "nvml" or device_id == "cpu":
            return None
        for dev in snap.gpus:
            if dev.id == device_id and not dev.simulated:
                return dev.index
        return None

    def holdings_changed(self) -> None:
        # Simulated "GPU" tensors live in host memory; tell the backend what we hold so its
        # free memory looks like what NVML would show.
        if self.backend is not None and hasattr(self.backend, "set_held"):
            self.backend.set_held(self.held())

    # ------------------------------------------------------------------ status rows
    def device_status(self) -> list[dict[str, Any]]:
        snap = self.snapshot
        if snap is None:
            return []
        held = self.held()
        reserve = self._config().devices.reserve_mib * MIB
        out = []
        for dev in (*snap.gpus, snap.host):
            out.append({
                "id": dev.id, "uuid": dev.uuid, "name": dev.name, "kind": dev.kind,
                "total": dev.total, "free": dev.free, "used": dev.used,
                "simulated": dev.simulated, "lost": dev.lost, "error": dev.error,
                "utilization": dev.utilization, "held": held.get(dev.id, 0),
                "reserve": reserve if dev.kind == "gpu" else 0,
                "processes": [{"pid": p.pid, "used": p.used, "name": p.name} for p in dev.processes],
            })
        return out
