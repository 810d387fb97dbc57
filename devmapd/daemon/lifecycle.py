"""The devmapd daemon: start-up, serving, placement, pressure, shutdown.

:class:`Daemon` composes the parts and owns only what belongs to no single one of them: the
start-up and shutdown order, signals and config reloads, the background tasks, the watch-event
consumer, the poll loop, the fetch leases and the event fan-out to subscribers. The parts own
their state and are handed their dependencies:

* :class:`~devmapd.daemon.inventory.Inventory`: the device backend, its snapshot and the
  capacity view every placement reads;
* :class:`~devmapd.daemon.loading.LoadQueue`: the load queue, placement of one load, the read
  and the swap of versions;
* :class:`~devmapd.daemon.actions.Actions`: operator actions and the state file;
* :class:`~devmapd.daemon.pressurectl.PressureController`: demotions, promotions and lost-GPU
  evacuation (the rules themselves are the pure :mod:`devmapd.pressure`);
* :class:`~devmapd.daemon.statusview.StatusView`: the status dicts.

The watcher tells the daemon which models exist (settled, debounced); the server hands versions
to clients and reaches the daemon only through the small DaemonAPI surface (status,
model_detail, fetch, release, subscribe, action).

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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devmapd._version import __version__
from devmapd.config import Config, ConfigError
from devmapd.config import load as load_config
from devmapd.daemon import handoff, names, statedir
from devmapd.daemon.actions import Actions
from devmapd.daemon.fdbudget import FdBudget, raise_soft_limit
from devmapd.daemon.inspection_cache import InspectionCache
from devmapd.daemon.inventory import Inventory
from devmapd.daemon.loading import LoadQueue
from devmapd.daemon.pressurectl import PressureController
from devmapd.daemon.registry import ModelRecord, Registry
from devmapd.daemon.statusview import StatusView
from devmapd.daemon.watcher import ModelEvent, ModelWatcher
from devmapd.engine import checkpoint
from devmapd.service import fdstore
from devmapd.service.metrics import Metrics
from devmapd.service.systemd import Notifier
from devmapd.textfmt import placement_text

log = logging.getLogger("devmapd")

SHUTDOWN_TIMEOUT_S = 10.0
METRICS_EVERY_S = 2.0  # the textfile at most this often: rendering 1,000 models every poll is waste
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
        self.notifier = Notifier.from_env()
        self.metrics = Metrics()
        self.server: Any = None
        self.watcher: ModelWatcher | None = None

        def config() -> Config:
            return self.cfg

        # The parts, each handed what it depends on (see the module docstring).
        self.registry = Registry()
        self.fds = FdBudget()
        self.inventory = Inventory(self.registry, config)
        # Storages shared by content across served versions (engine.dedup), when configured.
        self.storages: Any = None
        if getattr(cfg.placement, "share_storages", False):
            from devmapd.engine.dedup import StorageStore
            self.storages = StorageStore()
        self.inventory.storages = self.storages
        # Where pins, remaps and learned parses live: the config's state_dir, systemd's StateDirectory,
        # else one directory per model directory (resolved once: a reload does not move the state).
        self.state_dir = statedir.resolve(cfg.state_dir, self.model_dir)
        # What parsing each model learned, kept across restarts (scoped by the allowed globals).
        self.inspections = InspectionCache(self.state_dir.path, scope=lambda: tuple(self.cfg.safety.allowed_globals))
        self.loads = LoadQueue(self.registry, self.inventory, config, self.model_dir, notifier=self.notifier,
                               metrics=self.metrics, fds=self.fds, inspections=self.inspections,
                               store=self.storages)
        self.actions = Actions(self.registry, self.loads, self.inventory, config, state_dir=self.state_dir.path)
        self.pressure = PressureController(self.registry, self.inventory, self.loads, config,
                                           on_demote=self.metrics.count_demotion)
        self.view = StatusView(self.registry, self.inventory, config, self.model_dir, watcher=lambda: self.watcher,
                               extra=lambda: {"fds": self.fds.status(), "state_dir": {
                                   "path": str(self.state_dir.path), "source": self.state_dir.source,
                                   "why": self.state_dir.describe()},
                                   "inspection_cache": self.inspections.stats(), **self._sharing_status()})
        self._lease_ids = itertools.count(1)
        self._leases: dict[int, str] = {}  # lease id -> model name (ModelRecord.leases: id -> generation)
        self._subscribers: list[asyncio.Queue] = []
        # The last decisions, replayed to each new subscriber so a dashboard opened late
        # still shows why every model sits where it does.
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_DECISIONS)
        self.metrics_server = None
        self._socket_group = cfg.server.socket_group or None
        self._exit_code = 0
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._signals = 0
        self._metrics_written = -METRICS_EVERY_S
        self.registry.listen(self._fan_out)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> int:
        """Start, serve until stopped, shut down cleanly. Returns the exit status."""
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        raise_soft_limit()  # one memfd (at least) per served model: 1024 would cap the models served
        try:
            await self._startup(loop)
        except Exception:
            log.exception("start-up failed")
            await self._shutdown()
            return 1
        self.notifier.ready(self._summary())
        snap = self.inventory.snapshot
        log.info("devmapd %s serving %s on %s (%s backend, %d models)", __version__, self.model_dir,
                 self.cfg.server.socket, snap.backend if snap else "?", len(self.registry))
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
        self.actions.load_state()
        await self.inventory.open()
        checkpoint.register_allowed_globals(self.cfg.safety.allowed_globals)
        await self._setup_metrics()
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
            self._spawn(self.loads.worker(), f"loader-{i}")
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
        self.loads.generations_after(newest)

    def _new_record(self, name: str, source: Any, fingerprint: tuple | None) -> ModelRecord:
        """A record for a model just found, with its persisted pin/remap and its rule applied."""
        rule = self.cfg.rule_for(name)
        rec = ModelRecord(name=name, path=str(source.path), source=source, fingerprint=fingerprint,
                          lazy=bool(rule and rule.preload == "lazy"))
        self.actions.apply_to(rec, rule)
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
        if self.storages is not None:
            self.storages.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        await asyncio.to_thread(self.inspections.close, 3.0)  # write the parses still queued
        self.inventory.close()

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

    def _server_options(self, cfg: Config | None = None) -> dict[str, Any]:
        from devmapd.wire.peercred import AccessPolicy

        s = (cfg or self.cfg).server
        policy = AccessPolicy(fetch_uids=s.fetch_uids, fetch_groups=s.fetch_groups,
                              operator_uids=s.operator_uids, operator_groups=s.operator_groups)
        return {"policy": policy, "socket_mode": s.mode_bits(), "socket_group": s.socket_group or None,
                "max_frame": s.max_frame_bytes, "idle_timeout_s": s.idle_timeout_s,
                "max_conns_per_uid": s.max_connections_per_uid, "request_timeout_s": s.fetch_timeout_s}

    async def _setup_metrics(self) -> None:
        from devmapd.service.metrics import MetricsHTTPServer

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

    # ------------------------------------------------------------------ DaemonAPI: status, action
    def status(self) -> dict[str, Any]:
        return self.view.status()

    def _sharing_status(self) -> dict[str, Any]:
        """``daemon.sharing`` when storages are shared: per device the unique bytes held, per
        model its own and shared bytes and with which models (cached until the next change)."""
        if self.storages is None:
            return {}
        names = {rec.serving.generation: rec.name for rec in self.registry.records() if rec.serving is not None}
        return {"sharing": self.storages.report(names.get)}

    def status_json(self) -> bytes:
        """The status reply's JSON with each model's cached bytes spliced in (see StatusView)."""
        return self.view.status_json()

    def model_detail(self, name: str) -> dict[str, Any]:
        return self.view.model_detail(name)

    async def action(self, op: str, args: dict[str, Any], peer: Any) -> dict[str, Any]:
        return await self.actions.action(op, args, peer)

    def _summary(self) -> str:
        return self.view.summary()

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
        self.loads.enqueue(rec, f"{rec.name}: queued for loading")

    def _on_deleted(self, name: str) -> None:
        rec = self.registry.get(name)
        if rec is None:
            return
        self.loads.drop_version(rec)
        self.registry.remove(name, f"{name}: file removed; unloaded")

    # ------------------------------------------------------------------ polling & pressure
    def _publish_problems(self, last: Any) -> Any:
        """A ``problems`` event when the watcher's problems or pending lists changed since ``last``
        (a dashboard shows them at once instead of at its next status refresh)."""
        watcher = self.watcher
        if watcher is None:
            return last
        now = (dict(watcher.problems), dict(watcher.pending))
        if now != last:
            if last is not None or any(now):
                self.registry.emit({"type": "problems", "problems": now[0], "pending": now[1],
                                    "message": f"{len(now[0])} files not served, {len(now[1])} directories "
                                               "waiting for shards"})
        return now

    async def _poll_loop(self) -> None:
        interval = self.cfg.devices.poll_interval_s
        watchdog_every = self.notifier.watchdog_interval() if self.notifier is not None else None
        last_watchdog = 0.0
        last_devices: Any = None
        last_problems: Any = None
        last_summary = ""
        while True:
            try:
                await self.inventory.refresh()
                devices = self.inventory.device_status()
                fingerprint = [(d["id"], d["free"], d["used"], d["lost"], d["error"], d["held"]) for d in devices]
                if fingerprint != last_devices:
                    last_devices = fingerprint
                    self.registry.emit({"type": "devices", "devices": devices, "message": "devices updated"})
                last_problems = self._publish_problems(last_problems)
                self.pressure.poll()
                if self.loads.gpu_released:
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

    def _write_metrics(self) -> None:
        if self.metrics is None or not self.cfg.metrics.textfile:
            return
        now = time.monotonic()
        if now - self._metrics_written < METRICS_EVERY_S:
            return
        self._metrics_written = now
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
            await self.loads.load_now(rec, f"{name}: loading on first fetch")
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
        self.metrics.observe_fetch(name, time.perf_counter() - started)
        self.registry.changed(rec, f"{name}: fetched by pid {getattr(peer, 'pid', '?')} (uid {getattr(peer, 'uid', '?')})")
        return FetchGrant(manifest=version.manifest_for_client(), fds=version.fds, lease=lease,
                          model=rec.to_status(), manifest_json=version.manifest_json,
                          side_files_json=version.side_files_json)

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
