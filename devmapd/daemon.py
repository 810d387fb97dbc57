"""The devmapd daemon: start-up, serving, placement, pressure, shutdown.

It wires the parts together and owns nothing they can own themselves:

* the watcher tells it which models exist (settled, debounced);
* the inventory backend tells it what the GPUs look like at every poll;
* the planner (pure) decides where a model goes; the pressure module (pure)
  decides what to demote or promote; this module only carries those out;
* the loader reads a checkpoint once into sealed memfds (and a GPU upload);
* the server hands versions to clients; it reaches this object only through
  the small DaemonAPI surface (status, model_detail, fetch, release,
  subscribe, action).

Everything runs on one asyncio loop; blocking work (inspection, reads, NVML)
runs in worker threads. Every failure of a model is that model's state with a
plain diagnosis; the daemon goes on.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
import signal
import socket as socketlib
import threading
import time
from pathlib import Path
from typing import Any, Callable

from . import __version__, checkpoint, fdstore, handoff, names, planner, pressure, statefile
from .config import Config, ConfigError
from .config import load as load_config
from .devices import Snapshot, open_backend
from .loader import ServedVersion, load_version
from .registry import ModelRecord, Registry
from .watcher import ModelEvent, ModelWatcher

log = logging.getLogger("devmapd")

MIB = 1 << 20
SHUTDOWN_TIMEOUT_S = 10.0
RECENT_DECISIONS = 200


class Daemon:
    """One running devmapd. ``await Daemon(cfg).run()`` serves until a signal stops it."""

    def __init__(self, cfg: Config, *, config_path: str | None = None,
                 overrides: Callable[[Config], Config] | None = None,
                 listened: dict[str, list[int]] | None = None) -> None:
        # fds systemd passed (socket activation, fd store), collected before any event loop
        # existed so that no fd of ours can be mistaken for one of them.
        self.listened = listened or {}
        self.overrides = overrides or (lambda c: c)  # command-line flags, re-applied on every reload
        self.cfg = self.overrides(cfg)
        cfg = self.cfg
        self.config_path = config_path
        self.model_dir = Path(cfg.model_dir).resolve()
        self.registry = Registry()
        self.started_at = time.time()
        self.host = socketlib.gethostname()
        self.snapshot: Snapshot | None = None
        self.backend = None
        self.server = None
        self.watcher: ModelWatcher | None = None
        self.notifier = None
        self.metrics = None
        self.operator_state = statefile.OperatorState()
        self.pressure_state = pressure.PressureState()
        self._generation = itertools.count(1)
        self._lease_ids = itertools.count(1)
        self._leases: dict[int, tuple[str, ServedVersion]] = {}
        self._subscribers: list[asyncio.Queue] = []
        # The last decisions, replayed to each new subscriber so a dashboard opened late
        # still shows why every model sits where it does.
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_DECISIONS)
        self._pending: dict[str, asyncio.Event] = {}  # name -> set when its current load attempt ends
        self._load_queue: asyncio.Queue[str] | None = None
        self._queued: set[str] = set()
        self._forced: dict[str, str] = {}  # name -> device a pressure move is taking it to
        self._on_demand: set[str] = set()  # loads a fetch is waiting for: they go past the host cap
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._signals = 0
        self.registry.listen(self._fan_out)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        """Start, serve until stopped, shut down cleanly. Returns the exit status."""
        from .systemd import Notifier

        loop = asyncio.get_running_loop()
        self.notifier = Notifier.from_env()
        self._install_signals(loop)
        try:
            await self._startup(loop)
        except Exception:
            log.exception("start-up failed")
            await self._shutdown()
            return 1
        self.notifier.ready(self._summary())
        log.info("devmapd %s serving %s on %s (%s backend, %d models)", __version__, self.model_dir,
                 self.cfg.server.socket, self.snapshot.backend if self.snapshot else "?", len(self.registry))
        await self._stop.wait()
        self.notifier.stopping()
        log.info("stopping")
        try:
            await asyncio.wait_for(self._shutdown(), SHUTDOWN_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.error("shutdown took longer than %.0fs; exiting anyway", SHUTDOWN_TIMEOUT_S)
            return 1
        return 0

    async def _startup(self, loop: asyncio.AbstractEventLoop) -> None:
        from .server import Server

        if not self.model_dir.is_dir():
            raise ConfigError(f"model_dir {self.model_dir} is not a directory")
        self.operator_state = statefile.load(self.cfg.state_dir)
        self.backend = open_backend(self._backend_kind(), self.cfg.devices.simulate or None)
        self.snapshot = await asyncio.to_thread(self.backend.snapshot)
        if self.snapshot.backend == "nvml" and self.snapshot.gpus:
            await asyncio.to_thread(self._match_cuda_indices)
        await self._setup_metrics()
        self._load_queue = asyncio.Queue()
        # systemd may hand us the listening socket (socket activation) and, after a restart,
        # the sealed arenas the previous process parked in its fd store.
        from .systemd import LISTEN_FDNAME, listen_socket

        listened = self.listened
        listen_sock = listen_socket(listened)
        recovery = fdstore.recover(listened)
        for fd_name, fds in recovery.others.items():
            if fd_name != LISTEN_FDNAME:
                log.warning("closing %d unexpected fd(s) named %r handed over by systemd", len(fds), fd_name)
                for fd in fds:
                    os.close(fd)
        await asyncio.to_thread(self._restore, recovery)
        if listen_sock is not None:
            self.server = Server.from_socket(self, listen_sock, **self._server_options())
        else:
            self.server = Server(self, self.cfg.server.socket, **self._server_options())
        await self.server.start()
        events: asyncio.Queue[ModelEvent] = asyncio.Queue()
        self.watcher = ModelWatcher(self.model_dir, events, loop, settle_s=self.cfg.watch.settle_s,
                                    rescan_interval_s=self.cfg.watch.rescan_interval_s,
                                    force_polling=self.cfg.watch.force_polling)
        self.watcher.start()
        self._tasks.append(asyncio.create_task(self._consume_watch_events(events), name="watch-events"))
        for i in range(self.cfg.placement.load_workers):
            self._tasks.append(asyncio.create_task(self._load_worker(), name=f"loader-{i}"))
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="poll"))

    def _match_cuda_indices(self) -> None:
        """Tell the NVML backend torch's CUDA numbering (by UUID: NVML order is not CUDA order)."""
        try:
            import torch

            if not torch.cuda.is_available():
                log.warning("NVML sees GPUs but torch cannot use CUDA; models stay on the CPU")
                return
            uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
        except Exception as exc:  # a broken CUDA install must not stop the daemon
            log.warning("cannot match CUDA devices to NVML by UUID: %s", exc)
            return
        self.backend.match_torch_indices(uuids)
        self.snapshot = self.backend.snapshot()

    def _restore(self, recovery: fdstore.Recovery) -> None:
        """Serve, at once and without reading the disk, what the previous process parked."""
        if not recovery.models and not recovery.stale:
            return
        sources = names.scan(self.model_dir)
        current = {name: names.fingerprint(src) for name, src in sources.items()}
        kept = fdstore.reconcile(recovery, current, self.notifier)
        newest = 0
        for name, stored in sorted(kept.items()):
            try:
                version = handoff.revive(stored)
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("%s: fd store entry unusable (%s); loading from disk instead", name, exc)
                stored.close()
                handoff.unpark(self.notifier, stored.fdnames)
                continue
            src = sources[name]
            rule = self.cfg.rule_for(name)
            rec = ModelRecord(name=name, path=str(src.path), source=src, fingerprint=current[name], state="ready",
                              inspection=version.inspection, serving=version, generation=version.generation,
                              placement=dict(version.placement), load_time_s=0.0, loaded_at=time.time(),
                              reason="restored from the systemd fd store after a restart (no disk read)",
                              stored=list(stored.fdnames), lazy=bool(rule and rule.preload == "lazy"))
            rec.pin = self.operator_state.pins.get(name) or (rule.pin if rule and rule.pin else None)
            rec.target = self.operator_state.targets.get(name)
            self.registry.add(rec)
            newest = max(newest, version.generation)
            log.info("%s: restored from the fd store (%s)", name,
                     ", ".join(f"{d} {n / MIB:.1f} MiB" for d, n in sorted(version.placement.items())))
        self._generation = itertools.count(newest + 1)

    async def _shutdown(self) -> None:
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
            self.watcher = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.server is not None:
            await self.server.close()
            self.server = None
        for rec in self.registry.records():
            if rec.serving is not None:
                rec.serving.close()
                rec.serving = None
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.backend is not None:
            self.backend.close()

    def request_stop(self) -> None:
        self._stop.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        def on_stop(signame: str) -> None:
            self._signals += 1
            if self._signals > 1:
                log.error("second %s: forcing exit", signame)
                os._exit(1)
            log.info("%s received: stopping (send again to force)", signame)
            self._stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload_config()))

    async def reload_config(self) -> None:
        """SIGHUP: re-read the config; apply what can change live, keep the old on error."""
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            new = self.overrides(load_config(self.config_path) if self.config_path else self.cfg)
            if Path(new.model_dir).resolve() != self.model_dir or new.server.socket != self.cfg.server.socket:
                log.warning("config reload: model_dir and socket changes need a restart; keeping the current ones")
                new = new.replace(model_dir=self.cfg.model_dir,
                                  server=dataclasses.replace(new.server, socket=self.cfg.server.socket))
        except ConfigError as exc:
            log.error("config reload failed, keeping the running config: %s", exc)
            self.registry.emit({"type": "log", "level": "error", "message": f"config reload failed: {exc}"})
        else:
            self.cfg = new
            if self.server is not None and hasattr(self.server, "set_policy"):
                self.server.set_policy(self._server_options()["policy"])
            logging.getLogger().setLevel(new.log_level.upper())
            log.info("config reloaded from %s", self.config_path or "defaults")
            self.registry.emit({"type": "log", "level": "info", "message": "config reloaded"})
        if self.notifier is not None:
            self.notifier.ready(self._summary())

    metrics_server = None

    def _backend_kind(self) -> str:
        if self.cfg.devices.simulate:
            return "simulated"
        return self.cfg.devices.backend

    def _server_options(self) -> dict[str, Any]:
        from .peercred import AccessPolicy

        s = self.cfg.server
        policy = AccessPolicy(fetch_uids=s.fetch_uids, fetch_groups=s.fetch_groups,
                              operator_uids=s.operator_uids, operator_groups=s.operator_groups)
        return {"policy": policy, "socket_mode": s.mode_bits(), "socket_group": s.socket_group or None,
                "max_frame": s.max_frame_bytes, "idle_timeout_s": s.idle_timeout_s,
                "max_conns_per_uid": s.max_connections_per_uid}

    async def _setup_metrics(self) -> None:
        from .metrics import Metrics, MetricsHTTPServer

        self.metrics = Metrics()
        listen = self.cfg.metrics.listen
        if listen:
            host, _, port = listen.rpartition(":")
            self.metrics_server = MetricsHTTPServer(lambda: self.metrics.render(self.status()),
                                                    host=host or "127.0.0.1", port=int(port))
            await self.metrics_server.start()
            log.info("metrics on http://%s/metrics", listen)

    # ------------------------------------------------------------------ events out
    def _fan_out(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind != "devices":  # device updates come every poll; they are for dashboards, not logs
            level = logging.INFO if kind in ("decision", "removed") else logging.DEBUG
            if kind == "log":
                level = logging.ERROR if event.get("level") == "error" else logging.INFO
            log.log(level, "%s", event.get("message", kind))
        if kind in ("decision", "log", "removed"):
            self._recent.append(event)
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                # A subscriber that cannot keep up is dropped, not allowed to grow our memory.
                self._subscribers.remove(queue)
                queue.put_nowait_overflow = True  # type: ignore[attr-defined]

    def subscribe(self) -> tuple[asyncio.Queue, Any]:
        queue: asyncio.Queue = asyncio.Queue(maxsize=10_000)
        for event in self._recent:
            queue.put_nowait({**event, "replay": True})
        self._subscribers.append(queue)

        def unsubscribe() -> None:
            if queue in self._subscribers:
                self._subscribers.remove(queue)

        return queue, unsubscribe

    # ------------------------------------------------------------------ status
    def _held(self) -> dict[str, int]:
        held: dict[str, int] = {}
        for rec in self.registry.records():
            for device, nbytes in rec.placement.items():
                held[device] = held.get(device, 0) + nbytes
        return held

    def _device_status(self) -> list[dict[str, Any]]:
        snap = self.snapshot
        if snap is None:
            return []
        held = self._held()
        reserve = self.cfg.devices.reserve_mib * MIB
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

    def status(self) -> dict[str, Any]:
        snap = self.snapshot
        return {
            "daemon": {
                "version": __version__, "pid": os.getpid(), "host": self.host,
                "socket": self.cfg.server.socket, "backend": snap.backend if snap else None,
                "model_dir": str(self.model_dir), "started_at": self.started_at,
                "uptime_s": round(time.time() - self.started_at, 3),
                "warning": snap.warning if snap else None,
                "watcher": getattr(self.watcher, "backend", None),
                "watcher_fallback": getattr(self.watcher, "fallback_reason", None),
                # Files in the model dir that are not served, and why (escaping symlinks, FIFOs,
                # name clashes); HF directories still waiting for shards.
                "problems": dict(getattr(self.watcher, "problems", None) or {}),
                "pending": {str(k): str(v) for k, v in (getattr(self.watcher, "pending", None) or {}).items()},
            },
            "devices": self._device_status(),
            "models": [rec.to_status() for rec in self.registry.records()],
        }

    def model_detail(self, name: str) -> dict[str, Any]:
        from .protocol import ApiError

        rec = self.registry.get(name)
        if rec is None:
            raise ApiError("not_found", f"no model named {name!r} (see `devmapd status`)")
        detail = rec.to_status()
        insp = rec.inspection
        detail["inspection"] = insp.to_json() if insp is not None else None
        detail["summary"] = checkpoint.summary(insp) if insp is not None else None
        return detail

    def _summary(self) -> str:
        counts = self.registry.counts()
        gpus = len(self.snapshot.gpus) if self.snapshot else 0
        parts = [f"{counts['ready']} models ready"]
        for state in ("loading", "queued", "failed", "evicted"):
            if counts[state]:
                parts.append(f"{counts[state]} {state}")
        parts.append(f"{gpus} GPU{'s' if gpus != 1 else ''}")
        return ", ".join(parts)

    # ------------------------------------------------------------------ watching
    async def _consume_watch_events(self, events: asyncio.Queue[ModelEvent]) -> None:
        while True:
            event = await events.get()
            try:
                if event.kind == "delete":
                    self._on_deleted(event.name)
                else:
                    self._on_upsert(event)
            except Exception:  # a bug in handling one event must not stop the watcher
                log.exception("failed to handle %s event for %s", event.kind, event.name)

    def _on_upsert(self, event: ModelEvent) -> None:
        source = event.source
        rec = self.registry.get(event.name)
        rule = self.cfg.rule_for(event.name)
        if rec is None:
            rec = ModelRecord(name=event.name, path=str(source.path), source=source, fingerprint=event.fingerprint)
            rec.pin = self.operator_state.pins.get(event.name) or (rule.pin if rule and rule.pin else None)
            rec.target = self.operator_state.targets.get(event.name)
            rec.lazy = bool(rule and rule.preload == "lazy")
            self.registry.add(rec)
        else:
            if rec.fingerprint == event.fingerprint:
                return  # nothing changed (a rescan re-announcing a known file): keep its state
            rec.source, rec.path, rec.fingerprint = source, str(source.path), event.fingerprint
            log.info("%s: file changed; loading the new version (the current one keeps serving)", rec.name)
        if rec.lazy and rec.serving is None:
            self.registry.transition(rec, "queued", f"{rec.name}: registered; lazy, loads on first fetch",
                                     reason="lazy: loads on first fetch")
            return
        self._enqueue(rec, f"{rec.name}: queued for loading")

    def _on_deleted(self, name: str) -> None:
        rec = self.registry.get(name)
        if rec is None:
            return
        if rec.serving is not None:
            rec.serving.close()
            rec.serving = None
        handoff.unpark(self.notifier, rec.stored)
        rec.stored = []
        rec.placement = {}
        self.registry.remove(name, f"{name}: file removed; unloaded")

    # ------------------------------------------------------------------ loading
    def _enqueue(self, rec: ModelRecord, message: str) -> None:
        assert self._load_queue is not None
        if rec.state != "loading":
            self.registry.transition(rec, "queued", message, progress=None)
        if rec.name not in self._queued:
            self._queued.add(rec.name)
            self._pending.setdefault(rec.name, asyncio.Event())
            self._load_queue.put_nowait(rec.name)

    async def _load_worker(self) -> None:
        assert self._load_queue is not None
        while True:
            name = await self._next_to_load()
            self._queued.discard(name)
            rec = self.registry.get(name)
            try:
                if rec is not None:
                    await self._load(rec)
            except Exception as exc:  # never let one model take a worker down
                log.exception("%s: unexpected error while loading", name)
                if rec is not None and name in self.registry:
                    self.registry.transition(rec, "failed", f"{name}: failed: {exc}", error=str(exc), progress=None)
            finally:
                # Wake fetches waiting for this model, unless it was queued again meanwhile
                # (then they wait for that attempt, which will set the same event).
                if name not in self._queued:
                    done = self._pending.pop(name, None)
                    if done is not None:
                        done.set()
                self._on_demand.discard(name)

    async def _next_to_load(self) -> str:
        """Bigger-first (or by name) among what is queued right now."""
        assert self._load_queue is not None
        first = await self._load_queue.get()
        batch = [first]
        while not self._load_queue.empty():
            batch.append(self._load_queue.get_nowait())
        order = self.cfg.placement.preload_order

        def key(name: str) -> tuple:
            rec = self.registry.get(name)
            size = 0
            if rec is not None and rec.source is not None:
                try:
                    size = sum(os.stat(f).st_size for f in rec.source.files)
                except OSError:
                    size = 0
            return (-size, name) if order == "bigger-first" else (name,)

        batch.sort(key=key)
        for name in batch[1:]:
            self._load_queue.put_nowait(name)
        return batch[0]

    def _read_options(self, rec: ModelRecord, host_free: int) -> checkpoint.ReadOptions:
        rule = self.cfg.rule_for(rec.name)
        n, s = self.cfg.normalize, self.cfg.safety
        return checkpoint.ReadOptions(
            strip_prefixes=n.strip_prefixes,
            cpu_upcast_half=n.cpu_upcast_half,
            gpu_dtype=(rule.dtype if rule and rule.dtype else n.gpu_dtype) or None,
            allowed_globals=s.allowed_globals,
            max_header_bytes=s.max_header_mib * MIB,
            max_tensors=s.max_tensors,
            memory_limit=host_free,
            root=str(self.model_dir),
        )

    async def _load(self, rec: ModelRecord) -> None:
        name = rec.name
        self.registry.transition(rec, "loading", f"{name}: inspecting {rec.path}", progress=0.0, error=None)
        insp = await asyncio.to_thread(checkpoint.inspect, rec.source or rec.path,
                                       allowed_globals=self.cfg.safety.allowed_globals)
        if self.registry.get(name) is not rec:
            return  # removed while we inspected
        rec.inspection = insp
        if insp.diagnosis is not None:
            self._fail(rec, insp.diagnosis)
            return
        placement = self._place(rec, insp)
        if placement.kind == "deferred" and name in self._on_demand and insp.bytes < self._host_free():
            # "Beyond the host cap, models stay registered and load on first fetch": a fetch is waiting.
            placement = planner.Placement(name=name, kind="cpu", devices=(("cpu", insp.bytes),),
                                          reason=f"loaded on demand past the host memory cap ({placement.reason})")
        if placement.kind == "deferred":
            self.registry.transition(rec, "queued", f"{name}: not loaded now: {placement.reason}",
                                     reason=placement.reason, progress=None)
            return
        device_of = self._device_of(placement)
        generation = next(self._generation)
        loop = asyncio.get_running_loop()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            frac = done / total if total else 1.0
            if frac - last[0] >= 0.1 or frac >= 1.0:  # a few events per load, not thousands
                last[0] = frac
                loop.call_soon_threadsafe(self._progress, rec, generation, frac)

        options = self._read_options(rec, self._host_free())
        started = time.perf_counter()
        try:
            version = await asyncio.to_thread(
                load_version, rec.source, generation, options, device_of=device_of,
                cuda_index_of=self._cuda_index_of, keep_host_copy=self.cfg.placement.keep_host_copy,
                progress=progress)
        except checkpoint.CheckpointError as exc:
            self._fail(rec, exc.diagnosis)
            return
        if self.registry.get(name) is not rec:  # deleted while loading: drop the new version
            version.close()
            return
        old = rec.serving
        rec.serving = version
        rec.generation = generation
        rec.fingerprint = version.fingerprint or rec.fingerprint
        self._forced.pop(name, None)
        elapsed = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.observe_load(name, elapsed)
        where = ", ".join(f"{dev} {nbytes / MIB:.1f} MiB" for dev, nbytes in sorted(version.placement.items()))
        self.registry.transition(rec, "ready", f"{name}: ready on {where} in {elapsed:.2f}s ({placement.reason})",
                                 placement=dict(version.placement), load_time_s=elapsed, loaded_at=time.time(),
                                 progress=None, error=None, diagnosis=None, reason=placement.reason)
        self.registry.decision(rec, "placed", f"{name}: placed on {where}: {placement.reason}",
                               target=",".join(sorted(version.placement)))
        previously_parked, rec.stored = rec.stored, handoff.park(self.notifier, name, version)
        handoff.unpark(self.notifier, previously_parked)
        if old is not None:
            old.close()
        self._update_simulated_held()

    def _progress(self, rec: ModelRecord, generation: int, frac: float) -> None:
        if rec.state == "loading" and self.registry.get(rec.name) is rec:
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

    def _capacities(self, *, excluding: str | None = None) -> tuple[list[planner.DeviceCapacity], planner.DeviceCapacity]:
        snap = self.snapshot
        assert snap is not None
        held = self._held()
        if excluding is not None:
            rec = self.registry.get(excluding)
            if rec is not None:
                for dev, nbytes in rec.placement.items():
                    held[dev] = held.get(dev, 0) - nbytes
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

    def _demand(self, rec: ModelRecord, insp: Any, *, fresh: bool) -> planner.ModelDemand:
        rule = self.cfg.rule_for(rec.name)
        preferred: tuple[str, ...] = ()
        if rec.target and rec.target != "auto":
            preferred = (rec.target,)
        elif rule and rule.devices:
            preferred = rule.devices
        forced = self._forced.get(rec.name)
        if forced is not None:
            preferred = (forced,)
        return planner.ModelDemand(
            name=rec.name, bytes=insp.bytes, groups=tuple(insp.groups),
            current=() if fresh else tuple(sorted(rec.placement.items())),
            pin=rec.pin, preferred=preferred,
            device_map=rule.device_map if rule else (), lazy=False,
        )

    def _place(self, rec: ModelRecord, insp: Any) -> planner.Placement:
        """Where this model goes now; the other models keep their current placements."""
        gpus, host = self._capacities(excluding=rec.name)
        demands = [self._demand(rec, insp, fresh=True)]
        for other in self.registry.records():
            if other is rec or not other.placement or other.inspection is None:
                continue
            demands.append(self._demand(other, other.inspection, fresh=False))
        # The other models already sit where they are: charge them, then place ours.
        placements = planner.plan(gpus, host, demands, self._policy())
        return placements[rec.name]

    @staticmethod
    def _device_of(placement: planner.Placement):
        devices = dict(placement.devices)
        if placement.kind == "split" and placement.group_devices:
            from .normalize import group_of

            groups = dict(placement.group_devices)
            fallback = next(iter(devices), "cpu")

            def device_of(key_path: str) -> str:
                return groups.get(group_of(key_path), fallback)

            return device_of
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

    # ------------------------------------------------------------------ polling & pressure
    async def _poll_loop(self) -> None:
        interval = self.cfg.devices.poll_interval_s
        watchdog_every = self.notifier.watchdog_interval() if self.notifier is not None else None
        last_watchdog = 0.0
        last_devices: Any = None
        last_summary = ""
        while True:
            try:
                self._update_simulated_held()
                self.snapshot = await asyncio.to_thread(self.backend.snapshot)
                devices = self._device_status()
                fingerprint = [(d["id"], d["free"], d["used"], d["lost"], d["error"], d["held"]) for d in devices]
                if fingerprint != last_devices:
                    last_devices = fingerprint
                    self.registry.emit({"type": "devices", "devices": devices, "message": "devices updated"})
                self._apply_pressure()
                self._write_metrics()
                now = time.monotonic()
                if self.notifier is not None:
                    summary = self._summary()
                    if summary != last_summary:  # STATUS= on change only: every datagram costs systemd work
                        last_summary = summary
                        self.notifier.status(summary)
                    if watchdog_every and now - last_watchdog >= watchdog_every:
                        self.notifier.watchdog()  # only from a loop that is demonstrably alive
                        last_watchdog = now
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("poll failed; retrying next interval")
            await asyncio.sleep(interval)

    def _apply_pressure(self) -> None:
        snap = self.snapshot
        if snap is None or not snap.gpus:
            return
        holdings = []
        for rec in self.registry.records():
            if rec.state != "ready" or rec.serving is None:
                continue
            for device, nbytes in rec.placement.items():
                holdings.append(pressure.Holding(name=rec.name, device=device, bytes=nbytes,
                                                 last_fetch=rec.last_fetch or rec.loaded_at or 0.0,
                                                 pinned=rec.pin is not None, home=rec.home))
        gpus, _host = self._capacities()
        p = self.cfg.pressure
        marks = pressure.Watermarks(low=p.low_watermark_mib * MIB, high=p.high_watermark_mib * MIB,
                                    cooldown_s=p.cooldown_s)
        moves, self.pressure_state = pressure.evaluate(gpus, holdings, self.pressure_state, time.time(), marks,
                                                       self._policy())
        for move in moves:
            rec = self.registry.get(move.name)
            if rec is None or rec.name in self._queued or rec.state == "loading":
                continue
            promoting = rec.home is not None and move.target == rec.home
            action = "promoted" if promoting else "demoted"
            rec.home = None if promoting else (rec.home or move.source)
            self._forced[rec.name] = move.target
            if self.metrics is not None and not promoting:
                self.metrics.count_demotion(rec.name)
            self.registry.decision(rec, action, f"{rec.name}: {action} {move.source} -> {move.target}: {move.reason}",
                                   source=move.source, target=move.target)
            self._enqueue(rec, f"{rec.name}: moving {move.source} -> {move.target}")

    def _write_metrics(self) -> None:
        if self.metrics is None or not self.cfg.metrics.textfile:
            return
        from .metrics import write_textfile

        try:
            write_textfile(self.cfg.metrics.textfile, self.metrics.render(self.status()))
        except OSError as exc:
            log.warning("cannot write metrics textfile %s: %s", self.cfg.metrics.textfile, exc)

    # ------------------------------------------------------------------ DaemonAPI: fetch
    async def fetch(self, name: str, peer: Any) -> Any:
        from .protocol import ApiError, FetchGrant

        started = time.perf_counter()
        rec = self.registry.get(name)
        if rec is None:
            raise ApiError("not_found", f"no model named {name!r} (see `devmapd status` for what is served)")
        if rec.serving is None:
            if rec.state == "failed" and rec.diagnosis is not None:
                raise ApiError("unavailable", f"{name} failed to load: {rec.diagnosis.message}")
            self._on_demand.add(name)
            if rec.name not in self._queued and rec.state != "loading":
                self._enqueue(rec, f"{name}: loading on first fetch")
            event = self._pending.setdefault(name, asyncio.Event())
            await event.wait()
            rec = self.registry.get(name)
            if rec is None or rec.serving is None:
                why = rec.diagnosis.message if rec is not None and rec.diagnosis else (rec.reason if rec else "removed")
                raise ApiError("unavailable", f"{name} could not be loaded: {why}")
        version = rec.serving
        lease = next(self._lease_ids)
        self._leases[lease] = (name, version)
        rec.leases[lease] = version.generation
        rec.fetches += 1
        rec.last_fetch = time.time()
        if self.metrics is not None:
            self.metrics.observe_fetch(name, time.perf_counter() - started)
        self.registry.changed(rec, f"{name}: fetched by pid {getattr(peer, 'pid', '?')} (uid {getattr(peer, 'uid', '?')})")
        return FetchGrant(manifest=version.manifest_for_client(), fds=version.fds, lease=lease,
                          model=rec.to_status())

    def release(self, lease: Any) -> None:
        held = self._leases.pop(lease, None)
        if held is None:
            return
        name, _version = held
        rec = self.registry.get(name)
        if rec is not None and rec.leases.pop(lease, None) is not None:
            self.registry.changed(rec, f"{name}: a client released it")

    # ------------------------------------------------------------------ DaemonAPI: operator actions
    async def action(self, op: str, args: dict[str, Any], peer: Any) -> dict[str, Any]:
        from .protocol import ApiError

        name = args.get("name")
        if not isinstance(name, str):
            raise ApiError("bad_request", f"{op} needs a model name")
        rec = self.registry.get(name)
        if rec is None:
            raise ApiError("not_found", f"no model named {name!r}")
        who = f"uid {getattr(peer, 'uid', '?')}"
        if op in ("remap", "pin"):
            device = args.get("device")
            if not isinstance(device, str) or not self._valid_target(device, allow_auto=(op == "remap")):
                known = ", ".join(["auto"] + [d["id"] for d in self._device_status()])
                raise ApiError("bad_request", f"{device!r} is not a device here (known: {known})")
            if op == "pin":
                rec.pin = device
                rec.target = None
                self.operator_state.pins[name] = device
                self.operator_state.targets.pop(name, None)
            else:
                rec.target = None if device == "auto" else device
                if device == "auto":
                    self.operator_state.targets.pop(name, None)
                else:
                    self.operator_state.targets[name] = device
                if rec.pin is not None:
                    rec.pin = None
                    self.operator_state.pins.pop(name, None)
            rec.home = None
            self._save_state()
            action = "pinned" if op == "pin" else "remapped"
            self.registry.decision(rec, action, f"{name}: {action} to {device} by {who}", target=device)
            self._enqueue(rec, f"{name}: moving to {device} ({op} by {who})")
            return {"name": name, "state": rec.state, "device": device}
        if op == "unpin":
            rec.pin = None
            self.operator_state.pins.pop(name, None)
            self._save_state()
            self.registry.decision(rec, "unpinned", f"{name}: unpinned by {who}")
            self.registry.changed(rec, f"{name}: unpinned")
            return {"name": name, "state": rec.state}
        if op == "evict":
            if rec.serving is not None:
                rec.serving.close()
                rec.serving = None
            handoff.unpark(self.notifier, rec.stored)
            rec.stored = []
            self.registry.transition(rec, "evicted", f"{name}: evicted by {who}", placement={}, progress=None,
                                     reason=f"evicted by {who}; loads again on fetch or reload")
            self.registry.decision(rec, "evicted", f"{name}: evicted by {who}")
            self._update_simulated_held()
            return {"name": name, "state": rec.state}
        if op == "reload":
            rec.fingerprint = None
            self.registry.decision(rec, "reloaded", f"{name}: reload requested by {who}")
            self._enqueue(rec, f"{name}: reloading ({who})")
            return {"name": name, "state": rec.state}
        raise ApiError("bad_request", f"unknown action {op!r}")

    def _valid_target(self, device: str, *, allow_auto: bool) -> bool:
        if device == "auto":
            return allow_auto
        return device == "cpu" or any(d.id == device for d in (self.snapshot.gpus if self.snapshot else ()))

    def _save_state(self) -> None:
        try:
            statefile.save(self.cfg.state_dir, self.operator_state)
        except OSError as exc:
            log.error("cannot persist pins/remaps in %s: %s", self.cfg.state_dir, exc)


def serve(cfg: Config, *, config_path: str | None = None,
          overrides: Callable[[Config], Config] | None = None) -> int:
    """Run a daemon in the foreground until it is stopped (what systemd runs)."""
    from .systemd import listen_fds

    listened = listen_fds()
    daemon = Daemon(cfg, config_path=config_path, overrides=overrides, listened=listened)
    runner = asyncio.Runner()
    code = runner.run(daemon.run())
    if threading.active_count() > 1:
        # A read still running in a worker thread (SIGTERM mid-load of a big file) would hold
        # the interpreter's exit until it finishes; its result is unwanted and everything it
        # holds is memory that dies with us, so leave now and keep the stop prompt.
        logging.shutdown()
        os._exit(code)
    runner.close()
    return code
