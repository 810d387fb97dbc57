"""Watch the model directory and announce models once their files have settled.

watchdog's observer thread (inotify, or polling when inotify is out of watches/instances or
``force_polling`` is set) hands raw events to ``_Handler``, which only appends them to an unbounded
inbox: a burst of hundreds of files is queued, never dropped, and the observer thread never waits
on us. ONE worker thread ("devmapd-watcher") drains the inbox, keeps per-path settle state and
deadlines (a single timer: it sleeps until the earliest deadline), and reconciles. Results cross to
the asyncio loop with ``loop.call_soon_threadsafe(queue.put_nowait, event)``.

Reconciling is always a full ``names.scan_all`` diffed against the fingerprints already announced.
Events only decide *when* to reconcile and *whether a writer still holds a file open*; what exists
and what it is called always comes from the directory itself. So a lost or overflowed event can
delay an announcement (until the next event or the periodic rescan), never lose a model or keep a
deleted one registered, and the naming rules live in one place (names.py). The cost is
O(entries) per reconcile; event-triggered reconciles are coalesced and spaced so that scanning
stays under ~10% of one core however busy the directory is.

When is a file settled? (all must hold)
* closed after writing, on inotify: a path with IN_MODIFY, or created-then-opened, is held until
  IN_CLOSE_WRITE (``close_timeout_s`` is the fallback should that event be lost);
* size, mtime and inode unchanged for ``settle_s``. The first time we see a file, its mtime tells
  how long it has been unchanged, so files that were already there at start-up settle at once;
* a file renamed into place (``FileMovedEvent``, the normal way in) needs only a short stability
  check (``min(settle_s, 0.05)``) unless the writer still had it open under its temporary name.
A Hugging Face directory is announced once ALL its top-level files are settled and its index (if
any) has all its shards (``incomplete_timeout_s`` without progress announces it anyway, so an
abandoned copy still shows up, with the daemon's diagnosis). Deletions are announced at once.

The watcher reads directory listings and inode metadata only; it never writes in the model dir.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.polling import PollingObserver

from devmapd.daemon import names
from devmapd.daemon.names import ModelSource

__all__ = ["ModelEvent", "ModelWatcher"]

log = logging.getLogger("devmapd.daemon.watcher")

# Everything we act on. DirModifiedEvent is left out: watchdog adds one for every change in a
# directory, and the file events already say all we need.
_EVENT_FILTER = [
    FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent,
    FileClosedNoWriteEvent, FileOpenedEvent, FileAttribEvent, DirCreatedEvent, DirDeletedEvent,
    DirMovedEvent,
]
# inotify resources running out: watches (ENOSPC), instances/fds (EMFILE, ENFILE).
_INOTIFY_EXHAUSTED = (errno.ENOSPC, errno.EMFILE, errno.ENFILE)


@dataclass(frozen=True)
class ModelEvent:
    kind: str                   # "upsert" (new or changed, settled) | "delete"
    name: str
    source: ModelSource | None  # None for delete
    fingerprint: tuple | None   # names.fingerprint(source) at announcement; None for delete


@dataclass
class _Track:
    """Settle state of one path (relative to the model dir) with recent activity."""
    sig: tuple | None = None       # (size, mtime_ns, ino) when last looked at
    stable_since: float = 0.0      # monotonic time since which sig is unchanged
    last_event: float = 0.0        # monotonic time of the last content event (create/modify/move/attrib)
    write_open: str | None = None  # "modify" | "create-open": a writer may hold it open (inotify only)
    created: bool = False          # IN_CREATE seen and no close yet: an IN_OPEN now is the creator's
    moved_in: bool = False         # renamed into place: short stability check only


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's thread: hand the event over and return at once."""

    def __init__(self, sink) -> None:
        super().__init__()
        self._sink = sink

    def dispatch(self, event: FileSystemEvent) -> None:
        self._sink(event)


def _sig(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class ModelWatcher:
    """watchdog observer -> settled, debounced ``ModelEvent``s on an asyncio queue.

    ``backend`` is "inotify" or "polling"; ``fallback_reason`` says why polling was chosen;
    ``problems`` (relpath -> reason) and ``pending`` (model name -> what it waits for) reflect
    the last scan, for the daemon's status.
    """

    def __init__(self, model_dir: Path, queue: asyncio.Queue[ModelEvent], loop: asyncio.AbstractEventLoop,
                 *, settle_s: float = 1.0, rescan_interval_s: float = 30.0, force_polling: bool = False,
                 poll_interval_s: float | None = None, close_timeout_s: float | None = None,
                 incomplete_timeout_s: float | None = None) -> None:
        if settle_s < 0 or rescan_interval_s <= 0:
            raise ValueError("settle_s must be >= 0 and rescan_interval_s > 0")
        self.model_dir = Path(model_dir)
        self._root = os.path.abspath(os.fspath(model_dir))
        self._queue = queue
        self._loop = loop
        self.settle_s = float(settle_s)
        self.rescan_interval_s = float(rescan_interval_s)
        self.force_polling = force_polling
        # Polling stats the whole tree every interval: no faster than we settle (a change is not
        # announced sooner anyway), and at most 2 s so a fallback stays responsive.
        self.poll_interval_s = (poll_interval_s if poll_interval_s is not None
                                else max(0.05, min(2.0, self.settle_s)))
        self.close_timeout_s = close_timeout_s if close_timeout_s is not None else max(30.0, 10 * settle_s)
        self.incomplete_timeout_s = (incomplete_timeout_s if incomplete_timeout_s is not None
                                     else max(300.0, 60 * settle_s))
        self._quick_s = min(self.settle_s, 0.05)
        self._coalesce_s = min(0.05, self.settle_s / 4) if self.settle_s else 0.0

        self.backend: str = "polling" if force_polling else "inotify"
        self.fallback_reason: str | None = "forced (force_polling=True)" if force_polling else None
        self.problems: dict[str, str] = {}
        self.pending: dict[str, str] = {}
        self.scans = 0                      # reconciles done (diagnostics, tests)

        self._observer = None
        self._thread: threading.Thread | None = None
        self._started = False
        # _cond guards the hand-over from watchdog's thread: inbox, rescan request, stop flag.
        self._cond = threading.Condition()
        self._inbox: collections.deque[tuple[FileSystemEvent, float]] = collections.deque()
        self._rescan_requested = False
        self._stopping = False
        # _state_lock guards everything below and serialises reconciles.
        self._state_lock = threading.RLock()
        self._known: dict[str, tuple] = {}
        self._tracks: dict[str, _Track] = {}
        self._busy_since: dict[str, float] = {}
        self._moved_dirs: dict[str, float] = {}
        self._scan_at = math.inf            # an event asked for a reconcile at this time
        self._wake_at = math.inf            # earliest settle deadline
        self._next_rescan = math.inf
        self._last_scan_cost = 0.0
        self._last_scan_end = 0.0

    # ------------------------------------------------------------------ public
    @property
    def known(self) -> dict[str, tuple]:
        """name -> fingerprint of every model announced and not deleted since."""
        with self._state_lock:
            return dict(self._known)

    def start(self) -> None:
        """Start watching; the initial full scan announces every settled model before returning
        (the events are delivered once the loop runs); unsettled ones follow when they settle."""
        if self._started:
            return
        if not os.path.isdir(self._root):
            raise NotADirectoryError(f"model directory {self._root} does not exist or is not a directory")
        self._started = True
        # Observer first, scan second: nothing that lands in between can be missed.
        self._start_observer()
        with self._state_lock:
            self._reconcile(time.monotonic())
        self._thread = threading.Thread(target=self._run, name="devmapd-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker, then the observer (idempotent). Queued announcements are kept."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        # Worker first: it may restart a dead observer, so it must be gone before we take it.
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)
        obs, self._observer = self._observer, None
        if obs is not None:
            try:
                obs.stop()
                obs.join(timeout=5)
            except Exception:  # stopping must never fail the daemon's shutdown
                log.exception("stopping the %s observer failed", self.backend)

    def rescan(self) -> None:
        """Ask for a full scan now (thread-safe, returns at once)."""
        with self._cond:
            self._rescan_requested = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ observer
    def _sink(self, event: FileSystemEvent) -> None:
        with self._cond:
            self._inbox.append((event, time.monotonic()))
            self._cond.notify_all()

    def _start_observer(self) -> None:
        handler = _Handler(self._sink)
        if not self.force_polling:
            obs = None
            try:
                from watchdog.observers.inotify import InotifyObserver

                # Full events: a rename from outside arrives as a move (not a create), so it can
                # take the short "renamed into place" path.
                obs = InotifyObserver(generate_full_events=True)
                obs.schedule(handler, self._root, recursive=True, event_filter=_EVENT_FILTER)
                obs.start()
                self._observer = obs
                self.backend = "inotify"
                return
            except OSError as e:
                what = ("out of inotify watches (raise fs.inotify.max_user_watches)" if e.errno == errno.ENOSPC
                        else "out of inotify instances (raise fs.inotify.max_user_instances)"
                        if e.errno in _INOTIFY_EXHAUSTED else f"inotify failed: {e}")
                self.fallback_reason = what
                log.warning("watching %s by polling every %.2fs: %s", self._root, self.poll_interval_s, what)
            except Exception as e:  # no inotify on this platform / libc
                self.fallback_reason = f"inotify unavailable: {e}"
                log.warning("watching %s by polling: %s", self._root, self.fallback_reason)
            if obs is not None:
                try:
                    obs.unschedule_all()
                except Exception:
                    pass
        obs = PollingObserver(timeout=self.poll_interval_s)
        obs.schedule(handler, self._root, recursive=True)
        obs.start()
        self._observer = obs
        self.backend = "polling"

    def _check_observer(self) -> None:
        """Restart watchdog if it died (the model dir was removed and recreated, an emitter thread
        failed): the scans keep us correct meanwhile, events keep us prompt."""
        obs = self._observer
        if self._stopping or not self._started:
            return
        if obs is not None and obs.is_alive() and all(e.is_alive() for e in list(obs.emitters)):
            return
        if not os.path.isdir(self._root):
            return
        log.warning("the %s observer of %s stopped; starting a new one", self.backend, self._root)
        if obs is not None:
            try:
                obs.stop()
            except Exception:
                pass
            self._observer = None
        try:
            self._start_observer()
        except Exception as e:  # keep scanning; try again at the next reconcile
            log.warning("cannot watch %s (%s); relying on rescans every %.0fs until it works",
                        self._root, e, self.rescan_interval_s)

    # ------------------------------------------------------------------ worker
    def _next_due(self) -> float:
        return min(self._scan_at, self._wake_at, self._next_rescan)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._inbox and not self._rescan_requested:
                    # Plain float reads: no need for _state_lock (and no lock-order question).
                    delay = self._next_due() - time.monotonic()
                    if delay <= 0:
                        break
                    self._cond.wait(min(delay, 3600.0))
                if self._stopping:
                    return
                batch = list(self._inbox)
                self._inbox.clear()
                forced, self._rescan_requested = self._rescan_requested, False
            try:
                with self._state_lock:
                    for event, t in batch:
                        self._note(event, t)
                    now = time.monotonic()
                    if forced or now >= self._next_due():
                        self._check_observer()
                        self._reconcile(now)
            except Exception:  # a bug here must not end watching: log it and retry soon
                log.exception("watcher: reconcile failed; retrying in 1s")
                with self._state_lock:
                    self._wake_at = time.monotonic() + 1.0

    def _rel(self, path: str | bytes) -> str | None:
        if not path:
            return None
        p = os.fsdecode(path)
        rel = os.path.relpath(p, self._root)
        if rel == "." or rel == ".." or rel.startswith("../") or os.path.isabs(rel):
            return None
        return rel.replace(os.sep, "/")

    def _track(self, rel: str) -> _Track:
        tr = self._tracks.get(rel)
        if tr is None:
            tr = self._tracks[rel] = _Track()
        return tr

    def _want_scan(self, t: float) -> None:
        # Coalesce a burst into one reconcile, and space reconciles by 10x their own cost so that
        # a directory with many entries under constant change is not rescanned back to back
        # (scanning stays under ~10% of a core; a huge directory announces a little later).
        gap = min(5.0, 10 * self._last_scan_cost)
        self._scan_at = min(self._scan_at, max(t + self._coalesce_s, self._last_scan_end + gap))

    def _note(self, event: FileSystemEvent, t: float) -> None:
        """Fold one raw event into the per-path state (no directory scan here)."""
        inotify = self.backend == "inotify"
        kind = event.event_type
        if event.is_directory:
            if isinstance(event, DirMovedEvent):
                dest = self._rel(event.dest_path)
                if dest:
                    self._moved_dirs[dest] = t
            if isinstance(event, (DirCreatedEvent, DirDeletedEvent, DirMovedEvent)):
                self._want_scan(t)
            return
        rel = self._rel(event.src_path)
        if isinstance(event, FileMovedEvent):
            src_tr = self._tracks.pop(rel, None) if rel else None
            dest = self._rel(event.dest_path)
            if dest:
                tr = self._tracks[dest] = _Track(last_event=t, moved_in=True)
                # Renamed while the writer still had it open under its temporary name: not done.
                tr.write_open = src_tr.write_open if src_tr is not None else None
                tr.sig = _sig(os.path.join(self._root, dest))
                tr.stable_since = time.monotonic()
            self._want_scan(t)
            return
        if rel is None:
            return
        if kind == "created":
            tr = self._tracks[rel] = _Track(last_event=t, created=True)
            if any(rel.startswith(d + "/") and t - when < 2.0 for d, when in self._moved_dirs.items()):
                # Synthetic create for a file inside a directory just renamed into place.
                tr.created, tr.moved_in = False, True
                tr.sig, tr.stable_since = _sig(os.path.join(self._root, rel)), time.monotonic()
            self._want_scan(t)
        elif kind == "opened":
            tr = self._tracks.get(rel)
            if inotify and tr is not None and tr.created and tr.write_open is None:
                tr.write_open = "create-open"
        elif kind == "modified":
            tr = self._track(rel)
            tr.last_event, tr.moved_in = t, False
            if inotify:
                was_open, tr.write_open = tr.write_open, "modify"
                if was_open is None:
                    self._want_scan(t)   # the close will ask again; this one catches a lost close
            else:
                self._want_scan(t)       # polling: the only signal there is
        elif kind == "closed":
            tr = self._track(rel)
            tr.write_open, tr.created = None, False
            self._want_scan(t)
        elif kind == "closed_no_write":
            tr = self._tracks.get(rel)
            if tr is not None and tr.write_open == "create-open":
                tr.write_open, tr.created = None, False   # that open was a reader's, not a writer's
                self._want_scan(t)
        elif kind == "attrib":
            self._track(rel).last_event = t
            self._want_scan(t)
        elif kind == "deleted":
            self._tracks.pop(rel, None)
            self._want_scan(t)

    # ------------------------------------------------------------------ reconcile
    def _reconcile(self, now: float) -> None:
        t0 = time.monotonic()
        result = names.scan_all(self._root)
        self.scans += 1
        self.problems, self.pending = result.problems, result.pending
        out: list[ModelEvent] = []
        for name in sorted(set(self._known) - set(result.models)):
            del self._known[name]
            self._busy_since.pop(name, None)
            out.append(ModelEvent("delete", name, None, None))
            log.info("%s: gone from the model directory", name)
        wake = math.inf
        live: set[str] = set()
        wall = time.time()
        for name, src in result.models.items():
            try:
                fp = result.fingerprints.get(name) or names.fingerprint(src)
            except OSError:
                wake = min(wake, now + max(self._coalesce_s, 0.05))  # changing under us: look again soon
                continue
            if self._known.get(name) == fp:
                self._busy_since.pop(name, None)
                continue
            base = name if src.kind == "hf-dir" else name.rpartition("/")[0]
            keys = []
            ready_at = now
            newest_change = 0.0
            for rel, size, mtime_ns, ino in fp:
                key = f"{base}/{rel}" if base else rel
                keys.append(key)
                live.add(key)
                tr = self._track(key)
                sig = (size, mtime_ns, ino)
                if tr.sig != sig:
                    if tr.sig is not None:
                        tr.moved_in = False      # changed after the rename: settle normally
                    tr.sig = sig
                    # mtime is when the data last changed: a file untouched for a while is stable
                    # already. An event we saw later than that (create, chmod) counts too.
                    age = max(0.0, wall - mtime_ns / 1e9)
                    tr.stable_since = max(now - age, tr.last_event)
                newest_change = max(newest_change, tr.stable_since)
                if tr.write_open and self.backend == "inotify":
                    limit = max(tr.stable_since, tr.last_event) + self.close_timeout_s
                    if now < limit:
                        ready_at = max(ready_at, limit)   # the close event will wake us sooner
                        continue
                    log.warning("%s: still open for writing after %.0fs without a change; treating it as "
                                "settled", key, self.close_timeout_s)
                    tr.write_open = None
                need = self._quick_s if tr.moved_in else self.settle_s
                ready_at = max(ready_at, tr.stable_since + need)
            if name in result.pending:
                since = max(self._busy_since.setdefault(name, now), newest_change)
                if now < since + self.incomplete_timeout_s:
                    ready_at = max(ready_at, since + self.incomplete_timeout_s)
                else:
                    log.warning("%s: announced although incomplete (%s): nothing changed for %.0fs",
                                name, result.pending[name], self.incomplete_timeout_s)
            else:
                self._busy_since.pop(name, None)
            if ready_at > now:
                wake = min(wake, ready_at)
                continue
            self._known[name] = fp
            out.append(ModelEvent("upsert", name, src, fp))
            log.info("%s: settled (%s, %d file%s)", name, src.kind, len(fp), "" if len(fp) == 1 else "s")
            for key in keys:
                tr = self._tracks.get(key)
                if tr is not None and not tr.write_open:
                    del self._tracks[key]
        # Forget paths that are no model's file any more, except a writer's open temporary file
        # (its state must survive the rename into place).
        for key in [k for k in self._tracks if k not in live]:
            tr = self._tracks[key]
            if not (tr.write_open and os.path.lexists(os.path.join(self._root, key))
                    and now - tr.last_event < self.close_timeout_s):
                del self._tracks[key]
        for d in [d for d, when in self._moved_dirs.items() if now - when > 2.0]:
            del self._moved_dirs[d]
        if not os.path.isdir(self._root):
            # The model dir itself is gone (unmounted, removed): look for its return every second.
            wake = min(wake, now + 1.0)
        self._wake_at = wake
        self._scan_at = math.inf
        self._next_rescan = now + self.rescan_interval_s
        end = time.monotonic()
        self._last_scan_cost, self._last_scan_end = end - t0, end
        for ev in out:
            self._emit(ev)

    def _emit(self, event: ModelEvent) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the daemon is gone, nobody to tell
            log.debug("event loop closed; dropping %s %s", event.kind, event.name)
