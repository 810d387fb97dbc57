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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devmapd import pressure
from devmapd._version import __version__
from devmapd.config import Config, ConfigError
from devmapd.config import load as load_config
from devmapd.daemon import handoff, names, statefile
from devmapd.daemon.actions import ActionsMixin
from devmapd.daemon.loading import LoadingMixin
from devmapd.daemon.registry import ModelRecord, Registry
from devmapd.daemon.watcher import ModelEvent, ModelWatcher
from devmapd.devices import Snapshot, open_backend
from devmapd.engine import checkpoint
from devmapd.service import fdstore
from devmapd.textfmt import placement_text

log = logging.getLogger("devmapd")

MIB = 1 << 20
SHUTDOWN_TIMEOUT_S = 10.0
RECENT_DECISIONS = 200


class Daemon(LoadingMixin, ActionsMixin):
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
        self._leases: dict[int, str] = {}  # lease id -> model name (ModelRecord.leases: id -> generation)
        self._subscribers: list[asyncio.Queue] = []
        # The last decisions, replayed to each new subscriber so a dashboard opened late
        # still shows why every model sits where it does.
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_DECISIONS)
        self._pending: dict[str, asyncio.Event] = {}  # name -> set when its current load attempt ends
        self._load_queue: asyncio.PriorityQueue[tuple[tuple, str]] | None = None
        self._queued: set[str] = set()
        self._forced: dict[str, tuple[str, str]] = {}  # name -> (device, why) of a pressure move under way
        self._on_demand: set[str] = set()  # loads a fetch is waiting for: they go past the host cap
        self._loading: set[str] = set()  # being read right now (one load per model at a time)
        self._rerun: set[str] = set()  # asked for again while loading: load once more afterwards
        self._gpu_released = False  # a GPU copy was dropped: collect CUDA IPC blocks at each poll
        self.metrics_server = None
        self._socket_group = cfg.server.socket_group or None
        self._exit_code = 0
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._signals = 0
        self.registry.listen(self._fan_out)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        """Start, serve until stopped, shut down cleanly. Returns the exit status."""
        from devmapd.service.systemd import Notifier

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
        except TimeoutError:
            log.error("shutdown took longer than %.0fs; exiting anyway", SHUTDOWN_TIMEOUT_S)
            return 1
        return self._exit_code

    async def _startup(self, loop: asyncio.AbstractEventLoop) -> None:
        from devmapd.wire.server import Server

        if not self.model_dir.is_dir():
            raise ConfigError(f"model_dir {self.model_dir} is not a directory")
        self.operator_state = statefile.load(self.cfg.state_dir)
        self.backend = open_backend(self._backend_kind(), self.cfg.devices.simulate or None)
        self.snapshot = await asyncio.to_thread(self.backend.snapshot)
        checkpoint.register_allowed_globals(self.cfg.safety.allowed_globals)
        if self.snapshot.backend == "nvml" and self.snapshot.gpus:
            await asyncio.to_thread(self._match_cuda_indices)
        await self._setup_metrics()
        self._load_queue = asyncio.PriorityQueue()
        # systemd may hand us the listening socket (socket activation) and, after a restart,
        # the sealed arenas the previous process parked in its fd store.
        from devmapd.service.systemd import LISTEN_FDNAME, listen_socket

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
        await asyncio.to_thread(self.watcher.start)  # its first full scan is disk I/O
        self._spawn(self._consume_watch_events(events), "watch-events")
        for i in range(self.cfg.placement.load_workers):
            self._spawn(self._load_worker(), f"loader-{i}")
        self._spawn(self._poll_loop(), "poll")

    def _spawn(self, coro: Any, name: str) -> None:
        """Start a background task whose death stops the daemon loudly.

        A dead poll loop or load worker would be a silent outage; exiting non-zero instead
        lets the service manager (Restart=on-failure) bring devmapd back.
        """
        task = asyncio.create_task(coro, name=name)

        def died(t: asyncio.Task) -> None:
            if t.cancelled() or self._stop.is_set():
                return
            log.critical("internal task %s died (%r); stopping so that devmapd is restarted", t.get_name(),
                         t.exception())
            self._exit_code = 1
            self._stop.set()

        task.add_done_callback(died)
        self._tasks.append(task)

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
            except Exception as exc:  # any bad entry (older format after an upgrade...) must not crash-loop us
                log.warning("%s: fd store entry unusable (%s); loading from disk instead", name, exc)
                stored.close()
                handoff.unpark(self.notifier, stored.fdnames)
                continue
            rec = self._new_record(name, sources[name], current[name])
            rec.state, rec.inspection, rec.serving = "ready", version.inspection, version
            rec.generation, rec.placement, rec.stored = version.generation, dict(version.placement), list(stored.fdnames)
            rec.load_time_s, rec.loaded_at = 0.0, time.time()
            rec.reason = "restored from the systemd fd store after a restart (no disk read)"
            self.registry.add(rec)
            newest = max(newest, version.generation)
            log.info("%s: restored from the fd store (%s)", name, placement_text(version.placement))
        self._generation = itertools.count(newest + 1)

    def _new_record(self, name: str, source: Any, fingerprint: tuple | None) -> ModelRecord:
        """A record for a model just found, with its persisted pin/remap and its rule applied."""
        rule = self.cfg.rule_for(name)
        rec = ModelRecord(name=name, path=str(source.path), source=source, fingerprint=fingerprint,
                          lazy=bool(rule and rule.preload == "lazy"))
        rec.pin = self.operator_state.pins.get(name) or (rule.pin if rule and rule.pin else None)
        rec.target = self.operator_state.targets.get(name)
        return rec

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
            # Everything that can still fail (unknown group names, globals that do not import)
            # is resolved BEFORE anything is applied: a reload applies whole or not at all.
            options = self._server_options(new)
            checkpoint.register_allowed_globals(new.safety.allowed_globals)
        except (ConfigError, ValueError, checkpoint.CheckpointError) as exc:
            checkpoint.register_allowed_globals(self.cfg.safety.allowed_globals)
            log.error("config reload failed, keeping the running config: %s", exc)
            self.registry.emit({"type": "log", "level": "error", "message": f"config reload failed: {exc}"})
        else:
            self.cfg = new
            if self.server is not None:
                self.server.set_policy(options["policy"])
                self.server.set_limits(max_frame=options["max_frame"], idle_timeout_s=options["idle_timeout_s"],
                                       max_conns_per_uid=options["max_conns_per_uid"],
                                       request_timeout_s=options["request_timeout_s"])
                if (options["socket_mode"], options["socket_group"]) != (self.server.socket_mode, self._socket_group):
                    log.warning("config reload: socket_mode/socket_group changes need a restart")
            logging.getLogger().setLevel(new.log_level.upper())
            log.info("config reloaded from %s", self.config_path or "defaults")
            self.registry.emit({"type": "log", "level": "info", "message": "config reloaded"})
        finally:
            if self.notifier is not None:
                self.notifier.ready(self._summary())  # RELOADING=1 is always answered

    def _backend_kind(self) -> str:
        if self.cfg.devices.simulate:
            return "simulated"
        return self.cfg.devices.backend

    def _server_options(self, cfg: Config | None = None) -> dict[str, Any]:
        from devmapd.wire.peercred import AccessPolicy

        s = (cfg or self.cfg).server
        policy = AccessPolicy(fetch_uids=s.fetch_uids, fetch_groups=s.fetch_groups,
                              operator_uids=s.operator_uids, operator_groups=s.operator_groups)
        return {"policy": policy, "socket_mode": s.mode_bits(), "socket_group": s.socket_group or None,
                "max_frame": s.max_frame_bytes, "idle_timeout_s": s.idle_timeout_s,
                "max_conns_per_uid": s.max_connections_per_uid, "request_timeout_s": s.fetch_timeout_s}

    async def _setup_metrics(self) -> None:
        from devmapd.service.metrics import Metrics, MetricsHTTPServer

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
                # A subscriber that cannot keep up is dropped (the server sees its full queue
                # and closes the subscription), not allowed to grow our memory.
                self._subscribers.remove(queue)

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
        from devmapd.wire.protocol import ApiError

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
        if rec is None:
            rec = self.registry.add(self._new_record(event.name, source, event.fingerprint))
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
        self._drop_version(rec)
        self.registry.remove(name, f"{name}: file removed; unloaded")

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
                if self._gpu_released:
                    # torch frees an exported CUDA block only once its importers let go and
                    # ipc_collect runs: do it every poll so NVML shows the memory come back.
                    from devmapd.gpu import cuda_share

                    await asyncio.to_thread(cuda_share.collect)
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

    def _evacuate_lost(self) -> None:
        """Models on a GPU that fell off the bus are read again onto a device that is there."""
        lost = {d.id: d.error or "lost" for d in (self.snapshot.gpus if self.snapshot else ()) if d.lost}
        if not lost:
            return
        for rec in self.registry.records():
            gone = [dev for dev in rec.placement if dev in lost]
            if not gone or rec.state != "ready" or rec.name in self._queued or rec.name in self._loading:
                continue
            where = ", ".join(gone)
            # "" = no target: the planner picks a device that is there.
            self._move(rec, "demoted", where, "", f"{where} was lost ({lost[gone[0]]})")

    def _apply_pressure(self) -> None:
        snap = self.snapshot
        if snap is None or not snap.gpus:
            return
        self._evacuate_lost()
        holdings = []
        for rec in self.registry.records():
            if rec.state != "ready" or rec.serving is None:
                continue
            for device, nbytes in rec.placement.items():
                holdings.append(pressure.Holding(name=rec.name, device=device, bytes=nbytes,
                                                 # never fetched = least recently fetched (ties go biggest-first)
                                                 last_fetch=rec.last_fetch or 0.0,
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
            rec.home = None if promoting else (rec.home or move.source)
            self._move(rec, "promoted" if promoting else "demoted", move.source, move.target, move.reason)

    def _move(self, rec: ModelRecord, action: str, source: str, target: str, why: str) -> None:
        """Carry out a move decided here (pressure, a lost GPU): read the model again onto ``target``.

        The current version keeps serving until the new one is ready; ``why`` becomes the
        model's reason once it lands.
        """
        self._forced[rec.name] = (target, f"{action} from {source}: {why}")
        if self.metrics is not None and action == "demoted":
            self.metrics.count_demotion(rec.name)
        arrow = f"{source} -> {target}" if target else f"off {source}"
        self.registry.decision(rec, action, f"{rec.name}: {action} {arrow}: {why}", source=source,
                               target=target or None)
        self._enqueue(rec, f"{rec.name}: moving {arrow}")

    def _write_metrics(self) -> None:
        if self.metrics is None or not self.cfg.metrics.textfile:
            return
        from devmapd.service.metrics import write_textfile

        try:
            write_textfile(self.cfg.metrics.textfile, self.metrics.render(self.status()))
        except OSError as exc:
            log.warning("cannot write metrics textfile %s: %s", self.cfg.metrics.textfile, exc)

    # ------------------------------------------------------------------ DaemonAPI: fetch
    async def fetch(self, name: str, peer: Any) -> Any:
        from devmapd.wire.protocol import ApiError, FetchGrant

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
        self._leases[lease] = name
        rec.leases[lease] = version.generation
        rec.fetches += 1
        rec.last_fetch = time.time()
        if self.metrics is not None:
            self.metrics.observe_fetch(name, time.perf_counter() - started)
        self.registry.changed(rec, f"{name}: fetched by pid {getattr(peer, 'pid', '?')} (uid {getattr(peer, 'uid', '?')})")
        return FetchGrant(manifest=version.manifest_for_client(), fds=version.fds, lease=lease,
                          model=rec.to_status(), manifest_json=version.manifest_json)

    def release(self, lease: Any) -> None:
        name = self._leases.pop(lease, None)
        if name is None:
            return
        rec = self.registry.get(name)
        if rec is not None and rec.leases.pop(lease, None) is not None:
            self.registry.changed(rec, f"{name}: a client released it")


def serve(cfg: Config, *, config_path: str | None = None,
          overrides: Callable[[Config], Config] | None = None) -> int:
    """Run a daemon in the foreground until it is stopped (what systemd runs)."""
    from devmapd.service.systemd import listen_fds

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
