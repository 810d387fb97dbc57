"""The daemon's load pipeline: queue, placement decision, read, swap.

A mixin of :class:`devmapd.daemon.Daemon` (it shares the daemon's registry,
config and inventory). The rules it keeps:

* one load of a model at a time: a request that arrives while the model is
  loading runs once more after it (``_rerun``), never beside it;
* every load attempt carries a token (``ModelRecord.attempt``); evicting or
  deleting a model bumps it, and an attempt that finds its token stale drops
  what it read instead of installing it;
* bytes a load has been planned onto count against that device at once
  (``ModelRecord.planned``), so parallel loads never over-commit a GPU;
* a failing attempt never kills a worker: it becomes the model's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from devmapd import planner
from devmapd.daemon import handoff
from devmapd.daemon.loader import ServedVersion, load_version
from devmapd.daemon.registry import ModelRecord, TransitionError
from devmapd.engine import checkpoint
from devmapd.textfmt import placement_text

log = logging.getLogger("devmapd")

MIB = 1 << 20


class LoadingMixin:
    """Queueing, placing and reading models (see the module docstring)."""

    # ------------------------------------------------------------------ queue
    def _enqueue(self, rec: ModelRecord, message: str) -> None:
        assert self._load_queue is not None
        if rec.state not in ("loading", "queued"):
            self.registry.transition(rec, "queued", message, progress=None)
        if rec.name not in self._queued:
            self._queued.add(rec.name)
            self._pending.setdefault(rec.name, asyncio.Event())
            self._load_queue.put_nowait((self._load_order(rec), rec.name))

    def _load_order(self, rec: ModelRecord) -> tuple:
        """Priority-queue key: bigger-first (sizes from the fingerprint, no I/O) or by name."""
        if self.cfg.placement.preload_order != "bigger-first":
            return (rec.name,)
        size = sum(int(f[1]) for f in rec.fingerprint) if rec.fingerprint else 0
        return (-size, rec.name)

    async def _load_worker(self) -> None:
        assert self._load_queue is not None
        while True:
            name = await self._next_to_load()
            self._queued.discard(name)
            if name in self._loading:
                self._rerun.add(name)  # another worker is on it: run once more after that one
                continue
            rec = self.registry.get(name)
            if rec is None or (rec.state == "evicted" and name not in self._on_demand):
                self._wake(name)  # evicted (or removed) while it waited in the queue
                continue
            self._loading.add(name)
            try:
                await self._load(rec)
            except Exception as exc:  # a bug in one load must not take a worker down
                log.exception("%s: unexpected error while loading", name)
                if self.registry.get(name) is rec and rec.state == "loading":
                    with contextlib.suppress(TransitionError):
                        self.registry.transition(rec, "ready" if rec.serving else "failed",
                                                 f"{name}: load failed: {exc}", error=str(exc), progress=None)
            finally:
                self._loading.discard(name)
                rec.planned = {}
                self._forced.pop(name, None)
                if name in self._rerun and self.registry.get(name) is rec:
                    self._rerun.discard(name)
                    self._enqueue(rec, f"{name}: loading again (asked for while it loaded)")
                self._rerun.discard(name)
                if name not in self._queued:
                    self._wake(name)
                    self._on_demand.discard(name)

    def _wake(self, name: str) -> None:
        """Release fetches waiting for ``name``'s load attempt."""
        done = self._pending.pop(name, None)
        if done is not None:
            done.set()

    async def _next_to_load(self) -> str:
        assert self._load_queue is not None
        _order, name = await self._load_queue.get()
        return name

    # ------------------------------------------------------------------ one load
    def _read_options(self, rec: ModelRecord) -> checkpoint.ReadOptions:
        rule = self.cfg.rule_for(rec.name)
        n, s = self.cfg.normalize, self.cfg.safety
        return checkpoint.ReadOptions(
            strip_prefixes=n.strip_prefixes,
            cpu_upcast_half=n.cpu_upcast_half,
            gpu_dtype=(rule.dtype if rule and rule.dtype else n.gpu_dtype) or None,
            max_header_bytes=s.max_header_mib * MIB,
            max_tensors=s.max_tensors,
            memory_limit=self._host_free(),
            root=str(self.model_dir),
        )

    def _still_wanted(self, rec: ModelRecord, attempt: int) -> bool:
        return self.registry.get(rec.name) is rec and rec.attempt == attempt and rec.state == "loading"

    async def _load(self, rec: ModelRecord) -> None:
        name = rec.name
        rec.attempt += 1
        attempt = rec.attempt
        self.registry.transition(rec, "loading", f"{name}: inspecting {rec.path}", progress=0.0)
        insp = await asyncio.to_thread(checkpoint.inspect, rec.source or rec.path, root=str(self.model_dir))
        if not self._still_wanted(rec, attempt):
            return  # evicted or removed while we inspected
        if insp.diagnosis is not None:
            self._fail(rec, insp.diagnosis)
            return
        rec.inspection = insp
        placement = self._place(rec, insp)
        if placement.kind == "deferred" and name in self._on_demand and insp.bytes < self._host_free():
            # "Beyond the host cap, models stay registered and load on first fetch": a fetch is waiting.
            placement = planner.Placement(name=name, kind="cpu", devices=(("cpu", insp.bytes),),
                                          reason=f"loaded on demand past the host memory cap ({placement.reason})")
        if placement.kind == "deferred":
            if rec.serving is not None:  # a move that cannot happen now: keep serving where it is
                self.registry.transition(rec, "ready", f"{name}: move deferred: {placement.reason}",
                                         progress=None, reason=f"move deferred: {placement.reason}")
            else:
                self.registry.transition(rec, "queued", f"{name}: not loaded now: {placement.reason}",
                                         reason=placement.reason, progress=None)
            return
        rec.planned = dict(placement.devices)
        generation = next(self._generation)
        loop = asyncio.get_running_loop()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            frac = done / total if total else 1.0
            if frac - last[0] >= 0.1 or frac >= 1.0:  # a few events per load, not thousands
                last[0] = frac
                loop.call_soon_threadsafe(self._progress, rec, attempt, frac)

        started = time.perf_counter()
        try:
            version = await asyncio.to_thread(
                load_version, rec.source, generation, self._read_options(rec), device_of=self._device_of(placement),
                cuda_index_of=self._cuda_index_of, keep_host_copy=self.cfg.placement.keep_host_copy,
                progress=progress)
        except checkpoint.CheckpointError as exc:
            if self._still_wanted(rec, attempt):
                self._fail(rec, exc.diagnosis)
            return
        if not self._still_wanted(rec, attempt):
            version.close()  # evicted, removed or superseded while we read: drop what we read
            return
        self._install(rec, version, placement, time.perf_counter() - started)

    def _install(self, rec: ModelRecord, version: ServedVersion, placement: planner.Placement,
                 elapsed: float) -> None:
        """Make ``version`` the one clients get; retire the previous one."""
        name = rec.name
        old = rec.serving
        rec.serving = version
        rec.generation = version.generation
        rec.fingerprint = version.fingerprint or rec.fingerprint
        rec.planned = {}
        if self.metrics is not None:
            self.metrics.observe_load(name, elapsed)
        reason = self._forced.get(name, (None, placement.reason))[1]  # a pressure move says why it moved
        where = placement_text(version.placement)
        self.registry.transition(rec, "ready", f"{name}: ready on {where} in {elapsed:.2f}s ({reason})",
                                 placement=dict(version.placement), load_time_s=elapsed, loaded_at=time.time(),
                                 progress=None, error=None, diagnosis=None, reason=reason)
        self.registry.decision(rec, "placed", f"{name}: placed on {where}: {reason}",
                               target=",".join(sorted(version.placement)))
        previously_parked, rec.stored = rec.stored, handoff.park(self.notifier, name, version)
        handoff.unpark(self.notifier, previously_parked)
        if old is not None:
            self._retire(old)
        self._update_simulated_held()

    def _retire(self, version: ServedVersion) -> None:
        if version.gpu_segments:
            self._gpu_released = True  # poll loop collects CUDA IPC blocks once importers let go
        version.close()

    def _drop_version(self, rec: ModelRecord) -> None:
        """Forget ``rec``'s memory (evict, delete): cancel its load, close its version, unpark it."""
        rec.attempt += 1  # an in-flight load of it now drops what it reads
        if rec.serving is not None:
            self._retire(rec.serving)
            rec.serving = None
        handoff.unpark(self.notifier, rec.stored)
        rec.stored = []
        rec.placement = {}
        self._forced.pop(rec.name, None)
        self._update_simulated_held()

    def _progress(self, rec: ModelRecord, attempt: int, frac: float) -> None:
        if self._still_wanted(rec, attempt):
            rec.progress = round(frac, 3)
            self.registry.changed(rec, f"{rec.name}: loading {frac:.0%}")

    def _fail(self, rec: ModelRecord, diagnosis: Any) -> None:
        if self.metrics is not None:
            self.metrics.count_failure(rec.name)
        if rec.serving is not None:
            # The previous version keeps serving; say why the new one was refused.
            self.registry.transition(rec, "ready", f"{rec.name}: new version refused, previous one keeps serving: "
                                     f"{diagnosis.message}", error=diagnosis.message, diagnosis=diagnosis, progress=None)
        else:
            if diagnosis.code == "outside_model_dir":
                rec.inspection = None  # never show what lies outside the model directory
            self.registry.transition(rec, "failed", f"{rec.name}: failed: {diagnosis.message}",
                                     error=diagnosis.message, diagnosis=diagnosis, progress=None, placement={})
        self.registry.decision(rec, "failed", f"{rec.name}: {diagnosis.code}: {diagnosis.message}")

    # ------------------------------------------------------------------ placement
    def _host_free(self) -> int:
        snap = self.snapshot
        return snap.host.free if snap is not None else 0

    def _host_cap(self) -> int:
        cap = self.cfg.placement.host_memory_cap_mib * MIB
        if cap:
            return cap
        total = self.snapshot.host.total if self.snapshot is not None else 0
        return total // 2

    def _held(self) -> dict[str, int]:
        """Bytes devmapd's serving versions occupy per device (what the hardware sees)."""
        held: dict[str, int] = {}
        for rec in self.registry.records():
            for device, nbytes in rec.placement.items():
                held[device] = held.get(device, 0) + nbytes
        return held

    def _capacities(self) -> tuple[list[planner.DeviceCapacity], planner.DeviceCapacity]:
        snap = self.snapshot
        assert snap is not None
        held = self._held()
        # A device whose NVML calls hang (error set) shows stale numbers: place nothing new there.
        gpus = [planner.DeviceCapacity(id=d.id, total=d.total, free=d.free, held=held.get(d.id, 0),
                                       lost=d.lost or d.error is not None)
                for d in snap.gpus]
        host = planner.DeviceCapacity(id="cpu", total=snap.host.total, free=snap.host.free, held=held.get("cpu", 0))
        return gpus, host

    def _policy(self) -> planner.Policy:
        d, p = self.cfg.devices, self.cfg.placement
        return planner.Policy(mode=p.policy, reserve=d.reserve_mib * MIB, max_fraction=d.max_fraction,
                              overhead=d.overhead, host_cap=self._host_cap(), allow_split=p.allow_split)

    def _demand(self, rec: ModelRecord, insp: Any) -> planner.ModelDemand:
        """What the model being placed asks for (pins, remap target, rules, a pressure move)."""
        rule = self.cfg.rule_for(rec.name)
        preferred: tuple[str, ...] = ()
        if rec.target and rec.target != "auto":
            preferred = (rec.target,)
        elif rule and rule.devices:
            preferred = rule.devices
        forced = self._forced.get(rec.name)
        if forced is not None and forced[0]:  # a pressure move's target ("" = anywhere that is there)
            preferred = (forced[0],)
        return planner.ModelDemand(name=rec.name, bytes=insp.bytes, groups=tuple(insp.groups), pin=rec.pin,
                                   preferred=preferred, device_map=rule.device_map if rule else ())

    @staticmethod
    def _occupied_by(rec: ModelRecord) -> dict[str, int]:
        """What a model holds now plus where an in-flight load of it is going (taken already)."""
        current: dict[str, int] = dict(rec.placement)
        for device, nbytes in rec.planned.items():
            current[device] = current.get(device, 0) + nbytes
        return current

    def _place(self, rec: ModelRecord, insp: Any) -> planner.Placement:
        """Where this model goes now; every other model keeps what it occupies."""
        gpus, host = self._capacities()
        if rec.placement:  # a move: its current copy is about to be replaced, do not charge it twice
            gpus = [planner.DeviceCapacity(id=g.id, total=g.total, free=g.free + rec.placement.get(g.id, 0),
                                           held=max(0, g.held - rec.placement.get(g.id, 0)), lost=g.lost)
                    for g in gpus]
        # Every other model stays where it is, so the planner only needs what they occupy per
        # device: one stand-in per device keeps each placement O(devices), not O(models).
        occupied: dict[str, int] = {}
        for other in self.registry.records():
            if other is not rec:
                for device, nbytes in self._occupied_by(other).items():
                    occupied[device] = occupied.get(device, 0) + nbytes
        demands = [self._demand(rec, insp)]
        demands += [planner.ModelDemand(name=f"\0occupied {device}", bytes=nbytes, current=((device, nbytes),),
                                        pin=device)
                    for device, nbytes in sorted(occupied.items()) if nbytes]
        return planner.plan(gpus, host, demands, self._policy())[rec.name]

    @staticmethod
    def _device_of(placement: planner.Placement) -> Callable[[str], str]:
        devices = dict(placement.devices)
        if placement.kind == "split" and placement.group_devices:
            from devmapd.engine.normalize import group_of

            groups = dict(placement.group_devices)
            fallback = next(iter(devices), "cpu")
            return lambda key_path: groups.get(group_of(key_path), fallback)
        only = next(iter(devices), "cpu")
        return lambda _key: only

    def _cuda_index_of(self, device_id: str) -> int | None:
        """Torch index of a REAL GPU id; None for the CPU and simulated GPUs (they stay memfds)."""
        snap = self.snapshot
        if snap is None or snap.backend != "nvml" or device_id == "cpu":
            return None
        for dev in snap.gpus:
            if dev.id == device_id and not dev.simulated:
                return dev.index
        return None

    def _update_simulated_held(self) -> None:
        # Simulated "GPU" tensors live in host memory; tell the backend what we hold so its
        # free memory looks like what NVML would show.
        if self.backend is not None and hasattr(self.backend, "set_held"):
            self.backend.set_held(self._held())
