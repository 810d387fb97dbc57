"""The load queue: which model loads next, where it goes, reading it, and swapping it in.

:class:`LoadQueue` owns everything about getting a model from its file into a served
version: the priority queue and the set of names in it, the events fetches wait on, the loads
in flight, the attempt tokens' use, the bytes in-flight loads have been planned onto, the
pressure moves under way (target and why) and the version generations. Other parts ask it
through its public methods (``enqueue``, ``load_now``, ``request_move``, ``cancel_move``,
``drop_version``, ``busy``); none of them touches its state. Its dependencies come in: the
registry (records and their state machine), a :class:`~devmapd.daemon.inventory.Capacity`
(what each device has and holds), a config getter, the systemd notifier (fd store) and the
metrics.

The rules it keeps:

* one load of a model at a time: a request that arrives while the model is
  loading runs once more after it, never beside it;
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
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from devmapd import planner
from devmapd.config import Config
from devmapd.daemon import handoff
from devmapd.daemon.inspection_cache import InspectionCache
from devmapd.daemon.inventory import Capacity
from devmapd.daemon.loader import ServedVersion, UploadError, load_version
from devmapd.daemon.registry import ModelRecord, Registry, TransitionError
from devmapd.engine import checkpoint
from devmapd.engine.learned import Learned, learn
from devmapd.textfmt import placement_text

log = logging.getLogger("devmapd")

MIB = 1 << 20


class FdGuard(Protocol):
    """Whether file descriptors are left for one more load (:class:`~devmapd.daemon.fdbudget.FdBudget`)."""

    def refusal(self, name: str) -> checkpoint.Diagnosis | None: ...


class LoadQueue:
    """Queueing, placing and reading models (see the module docstring)."""

    def __init__(self, registry: Registry, capacity: Capacity, config: Callable[[], Config], model_dir: Path, *,
                 notifier: Any = None, metrics: Any = None, fds: FdGuard | None = None,
                 inspections: InspectionCache | None = None, store: Any = None) -> None:
        self._registry = registry
        # The parse of each model, kept across restarts when a state directory is usable.
        self._learn: Callable[[Any, checkpoint.ReadOptions], Learned] = (
            inspections.obtain if inspections is not None else learn)
        self._capacity = capacity
        self._config = config  # a getter: the config changes on SIGHUP
        self._model_dir = model_dir
        self._notifier = notifier  # systemd's fd store keeps each served version across restarts
        self._metrics = metrics
        self._fds = fds  # a load needs fds (file, memfds): refused while too few are left
        self._store = store  # engine.dedup.StorageStore: CPU/simulated storages shared by content, or None
        self._heap: asyncio.PriorityQueue[tuple[tuple, str]] = asyncio.PriorityQueue()
        self._queued: set[str] = set()  # names in the heap (each at most once)
        self._pending: dict[str, asyncio.Event] = {}  # name -> set when its current load attempt ends
        self._forced: dict[str, tuple[str, str]] = {}  # name -> (device, why) of a pressure move under way
        self._on_demand: set[str] = set()  # loads a fetch is waiting for: they go past the host cap
        self._loading: set[str] = set()  # being read right now (one load per model at a time)
        self._rerun: set[str] = set()  # asked for again while loading: load once more afterwards
        self._short_of_fds: list[str] = []  # refused for want of fds, oldest first: retried as fds free up
        self._generation = itertools.count(1)
        self.gpu_released = False  # a GPU copy was dropped: the poll loop collects CUDA IPC blocks

    # ------------------------------------------------------------------ asking
    def busy(self, name: str) -> bool:
        """Queued or loading: a move decided now would race the load already coming."""
        return name in self._queued or name in self._loading

    def moves_in_flight(self) -> dict[str, str]:
        """Pressure moves asked for and not yet landed: name -> target ("" = wherever there is room)."""
        return {name: target for name, (target, _why) in self._forced.items()}

    def preview(self, rec: ModelRecord) -> planner.Placement | None:
        """Where a load of ``rec`` would put it now (pure: nothing moves); None before its first inspection."""
        if rec.inspection is None:
            return None
        return self._place(rec, rec.inspection)

    def queued(self) -> list[str]:
        return sorted(self._queued)

    def generations_after(self, newest: int) -> None:
        """Versions restored from the fd store used generations up to ``newest``: go on from there."""
        self._generation = itertools.count(newest + 1)

    # ------------------------------------------------------------------ queue
    def enqueue(self, rec: ModelRecord, message: str) -> None:
        """Queue a load of ``rec`` (once: a model already queued keeps its place)."""
        if rec.state not in ("loading", "queued"):
            self._registry.transition(rec, "queued", message, progress=None)
        if rec.name not in self._queued:
            self._queued.add(rec.name)
            self._pending.setdefault(rec.name, asyncio.Event())
            self._heap.put_nowait((self._load_order(rec), rec.name))

    def request_move(self, rec: ModelRecord, target: str, why: str, message: str) -> None:
        """Read ``rec`` again onto ``target`` ("" = wherever the planner finds room); ``why`` becomes
        its reason once it lands. The current version keeps serving meanwhile."""
        self._forced[rec.name] = (target, why)
        self.enqueue(rec, message)

    def cancel_move(self, name: str) -> None:
        """An operator's decision replaces a pressure move under way."""
        self._forced.pop(name, None)

    async def load_now(self, rec: ModelRecord, message: str) -> None:
        """Load ``rec`` for a waiting fetch (past the host cap if need be); return when the attempt ends."""
        name = rec.name
        self._on_demand.add(name)
        if name not in self._queued and rec.state != "loading":
            self.enqueue(rec, message)
        event = self._pending.setdefault(name, asyncio.Event())
        await event.wait()

    def _load_order(self, rec: ModelRecord) -> tuple:
        """Priority-queue key: bigger-first (sizes from the fingerprint, no I/O) or by name."""
        if self._config().placement.preload_order != "bigger-first":
            return (rec.name,)
        size = sum(int(f[1]) for f in rec.fingerprint) if rec.fingerprint else 0
        return (-size, rec.name)

    async def next_name(self) -> str:
        """The next model to load (it leaves the queue)."""
        _order, name = await self._heap.get()
        self._queued.discard(name)
        return name

    async def worker(self) -> None:
        """One load worker: runs until cancelled; the daemon starts ``load_workers`` of them."""
        while True:
            name = await self.next_name()
            if name in self._loading:
                self._rerun.add(name)  # another worker is on it: run once more after that one
                continue
            rec = self._registry.get(name)
            if rec is None or (rec.state == "evicted" and name not in self._on_demand):
                self._wake(name)  # evicted (or removed) while it waited in the queue
                continue
            self._loading.add(name)
            try:
                await self._load(rec)
            except Exception as exc:  # a bug in one load must not take a worker down
                log.exception("%s: unexpected error while loading", name)
                if self._registry.get(name) is rec and rec.state == "loading":
                    with contextlib.suppress(TransitionError):
                        self._registry.transition(rec, "ready" if rec.serving else "failed",
                                                  f"{name}: load failed: {exc}", error=str(exc), progress=None)
            finally:
                self._loading.discard(name)
                rec.planned = {}
                self._capacity.recount(rec)
                self._forced.pop(name, None)
                if name in self._rerun and self._registry.get(name) is rec:
                    self._rerun.discard(name)
                    self.enqueue(rec, f"{name}: loading again (asked for while it loaded)")
                self._rerun.discard(name)
                if name not in self._queued:
                    self._wake(name)
                    self._on_demand.discard(name)

    def _wake(self, name: str) -> None:
        """Release fetches waiting for ``name``'s load attempt."""
        done = self._pending.pop(name, None)
        if done is not None:
            done.set()

    # ------------------------------------------------------------------ one load
    def _read_options(self, rec: ModelRecord) -> checkpoint.ReadOptions:
        cfg = self._config()
        rule = cfg.rule_for(rec.name)
        n, s = cfg.normalize, cfg.safety
        return checkpoint.ReadOptions(
            strip_prefixes=n.strip_prefixes,
            cpu_upcast_half=n.cpu_upcast_half,
            gpu_dtype=(rule.dtype if rule and rule.dtype else n.gpu_dtype) or None,
            memory_limit=self._capacity.host_free(),
            root=str(self._model_dir),
            **s.read_option_values(),   # every [safety] cap: header, tensors, side files, tree expansion
        )

    def _still_wanted(self, rec: ModelRecord, attempt: int) -> bool:
        return self._registry.get(rec.name) is rec and rec.attempt == attempt and rec.state == "loading"

    async def _load(self, rec: ModelRecord) -> None:
        name = rec.name
        rec.attempt += 1
        attempt = rec.attempt
        self._registry.transition(rec, "loading", f"{name}: inspecting {rec.path}", progress=0.0)
        refused = self._fds.refusal(name) if self._fds is not None else None
        if refused is not None:
            # Near the fd limit: the models already serving keep the fds they need.
            self._fail(rec, refused)
            if name not in self._short_of_fds:
                self._short_of_fds.append(name)
            return
        # One parse: what it learns (or what a previous run learned of the same files) is what
        # the read below uses; it never unpickles the file a second time.
        learned = await asyncio.to_thread(self._learn, rec.source or rec.path, self._read_options(rec))
        insp = learned.inspection
        if not self._still_wanted(rec, attempt):
            return  # evicted or removed while we inspected
        if insp.diagnosis is not None:
            rec.format_hint = insp.format if insp.format not in (None, "unknown") else None
            self._fail(rec, insp.diagnosis)
            return
        rec.inspection, rec.format_hint = insp, None
        placement = self._place(rec, insp)
        if placement.kind == "deferred" and name in self._on_demand and insp.bytes < self._capacity.host_free():
            # "Beyond the host cap, models stay registered and load on first fetch": a fetch is waiting.
            placement = planner.Placement(name=name, kind="cpu", devices=(("cpu", insp.bytes),),
                                          reason=f"loaded on demand past the host memory cap ({placement.reason})")
        if placement.kind == "deferred":
            if rec.serving is not None:  # a move that cannot happen now: keep serving where it is
                self._registry.transition(rec, "ready", f"{name}: move deferred: {placement.reason}",
                                          progress=None, reason=f"move deferred: {placement.reason}")
            else:
                self._registry.transition(rec, "queued", f"{name}: not loaded now: {placement.reason}",
                                          reason=placement.reason, progress=None)
            return
        rec.planned = dict(placement.devices)
        self._capacity.recount(rec)
        generation = next(self._generation)
        loop = asyncio.get_running_loop()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            frac = done / total if total else 1.0
            if frac - last[0] >= 0.1 or frac >= 1.0:  # a few events per load, not thousands
                last[0] = frac
                loop.call_soon_threadsafe(self._progress, rec, attempt, frac)

        started = time.perf_counter()

        def read(where: planner.Placement) -> ServedVersion:
            return load_version(rec.source, generation, self._read_options(rec), device_of=self._device_of(where),
                                cuda_index_of=self._capacity.cuda_index_of,
                                keep_host_copy=self._config().placement.keep_host_copy, progress=progress,
                                learned=learned, store=self._store)

        try:
            try:
                version = await asyncio.to_thread(read, placement)
            except UploadError as exc:
                if not self._still_wanted(rec, attempt):
                    return
                # The GPU could not take it (no usable CUDA, or out of memory since the snapshot):
                # serve it from the CPU rather than fail a model that reads fine.
                log.warning("%s: %s; serving it from the CPU", name, exc)
                self._forced.pop(name, None)  # a pressure move's reason no longer says where it is
                placement = planner.Placement(
                    name=name, kind="cpu", devices=(("cpu", insp.bytes),),
                    reason=f"on the CPU: the upload to {exc.device} failed ({exc.reason}); remap or reload it to try "
                           f"the GPU again")
                rec.planned = dict(placement.devices)
                version = await asyncio.to_thread(read, placement)
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
        version.refresh()  # a release while it was read may have moved storages it shares
        rec.serving = version
        rec.generation = version.generation
        rec.fingerprint = version.fingerprint or rec.fingerprint
        rec.planned = {}
        if self._metrics is not None:
            self._metrics.observe_load(name, elapsed)
        reason = self._forced.get(name, (None, placement.reason))[1]  # a pressure move says why it moved
        where = placement_text(version.placement)
        self._registry.transition(rec, "ready", f"{name}: ready on {where} in {elapsed:.2f}s ({reason})",
                                  placement=dict(version.placement), load_time_s=elapsed, loaded_at=time.time(),
                                  progress=None, error=None, diagnosis=None, reason=reason)
        self._registry.decision(rec, "placed", f"{name}: placed on {where}: {reason}",
                                target=",".join(sorted(version.placement)))
        previously_parked, rec.stored = rec.stored, handoff.park(self._notifier, name, version)
        handoff.unpark(self._notifier, previously_parked)
        if old is not None:
            self.retire(old)
        self._capacity.holdings_changed()

    def retire(self, version: ServedVersion) -> None:
        store = version.shared
        if version.gpu_segments:
            self.gpu_released = True  # poll loop collects CUDA IPC blocks once importers let go
        version.close()
        if store is not None:
            self.storages_released(store)

    def storages_released(self, store: Any) -> None:
        """After a release every serving version takes the manifest the store rebuilt for it (a
        compaction moved storages it shares), then the segments nobody serves from are closed.
        On the event loop, so no fetch sits between reading a version's fds and duplicating
        them (the server dups them before its first await)."""
        for rec in self._registry.records():
            if rec.serving is not None and rec.serving.shared is store:
                rec.serving.refresh()
        # Closing a segment frees its pages (milliseconds per hundred MiB): off the event loop.
        # Nothing serves from a retired segment any more, so no fetch can be reading its fd.
        try:
            asyncio.get_running_loop().run_in_executor(None, store.reap)
        except RuntimeError:  # no loop (shutdown, tests): close them here
            store.reap()

    def drop_version(self, rec: ModelRecord) -> None:
        """Forget ``rec``'s memory (evict, delete): cancel its load, close its version, unpark it."""
        rec.attempt += 1  # an in-flight load of it now drops what it reads
        freed = 0
        if rec.serving is not None:
            freed = sum(1 for fd in rec.serving.fds if fd is not None)
            self.retire(rec.serving)
            rec.serving = None
        handoff.unpark(self._notifier, rec.stored)
        rec.stored = []
        rec.placement = {}
        self._forced.pop(rec.name, None)
        self._capacity.recount(rec)   # counts the emptied placement at once
        self._capacity.holdings_changed()
        if freed:
            self._retry_short_of_fds(freed)

    def _retry_short_of_fds(self, freed: int) -> None:
        """Fds came back: queue again (oldest first) as many models refused for want of them."""
        while freed > 0 and self._short_of_fds:
            rec = self._registry.get(self._short_of_fds.pop(0))
            if rec is not None and rec.state == "failed" and rec.serving is None:
                self.enqueue(rec, f"{rec.name}: file descriptors were freed; loading it again")
                freed -= 1

    def _progress(self, rec: ModelRecord, attempt: int, frac: float) -> None:
        if self._still_wanted(rec, attempt):
            rec.progress = round(frac, 3)
            self._registry.changed(rec, f"{rec.name}: loading {frac:.0%}")

    def _fail(self, rec: ModelRecord, diagnosis: Any) -> None:
        if self._metrics is not None:
            self._metrics.count_failure(rec.name)
        if rec.serving is not None:
            # The previous version keeps serving; say why the new one was refused.
            self._registry.transition(rec, "ready", f"{rec.name}: new version refused, previous one keeps serving: "
                                      f"{diagnosis.message}", error=diagnosis.message, diagnosis=diagnosis, progress=None)
        else:
            if diagnosis.code == "outside_model_dir":
                rec.inspection = None  # never show what lies outside the model directory
            self._registry.transition(rec, "failed", f"{rec.name}: failed: {diagnosis.message}",
                                      error=diagnosis.message, diagnosis=diagnosis, progress=None, placement={})
        self._registry.decision(rec, "failed", f"{rec.name}: {diagnosis.code}: {diagnosis.message}")

    # ------------------------------------------------------------------ placement
    def _demand(self, rec: ModelRecord, insp: Any) -> planner.ModelDemand:
        """What the model being placed asks for (pins, remap target, rules, a pressure move)."""
        rule = self._config().rule_for(rec.name)
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
        gpus, host = self._capacity.capacities()
        if rec.placement:  # a move: its current copy is about to be replaced, do not charge it twice
            gpus = [planner.DeviceCapacity(id=g.id, total=g.total, free=g.free + rec.placement.get(g.id, 0),
                                           held=max(0, g.held - rec.placement.get(g.id, 0)), lost=g.lost)
                    for g in gpus]
        # Every other model stays where it is, so the planner only needs what they occupy per
        # device: one stand-in per device keeps each placement O(devices), not O(models).
        occupied = self._capacity.occupied_by_others(rec)
        demands = [self._demand(rec, insp)]
        demands += [planner.ModelDemand(name=f"\0occupied {device}", bytes=nbytes, current=((device, nbytes),),
                                        pin=device)
                    for device, nbytes in sorted(occupied.items()) if nbytes]
        return planner.plan(gpus, host, demands, self._capacity.policy())[rec.name]

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
