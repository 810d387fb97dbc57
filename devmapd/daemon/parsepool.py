"""Parse checkpoints in worker processes when many wait: a first start over a lab's directory.

Parsing a checkpoint is torch's weights-only unpickler, pure Python: load threads take turns
on the GIL, so a first start over 1,000 files parses one file at a time however many threads
load. :class:`ParsePool` runs ``engine.learned.learn`` in a few worker processes (forkserver:
never a fork of this threaded process) and sends back what it learned as the codec's JSON,
which this process checks with ``inspection_codec.decode`` like any stored record: a worker is
no more trusted than a cache file. A failed parse comes back as its Inspection (diagnosis).

The pool costs a torch import per worker, so it starts only once ``start_after`` parses have
been asked for (a daemon serving a few models never starts it) and stops after ``idle_s`` with
nothing to do (the workers' memory goes back). Until it is up, and whenever it fails, parses
run in the calling thread as before.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from devmapd.engine import checkpoint, inspection_codec
from devmapd.engine.checkpoint import Inspection, ReadOptions
from devmapd.engine.learned import Learned, learn, options_key

log = logging.getLogger("devmapd.parsepool")

START_AFTER = 32     # parses asked for before the pool is worth its start-up
IDLE_S = 15.0        # no parse for this long: the workers exit


def default_workers() -> int:
    """One worker per core this process may use, leaving one for the daemon itself; at least 1, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1 if cores > 2 else cores))


def _init_worker(allowed_globals: tuple[str, ...]) -> None:
    checkpoint.register_allowed_globals(allowed_globals)


def _learn_in_worker(path: str, options: ReadOptions) -> dict[str, Any]:
    learned = learn(path, options)
    if learned.ok:
        return {"ok": True, "record": inspection_codec.encode(learned)}
    return {"ok": False, "inspection": learned.inspection}


class ParsePool:
    """``learn`` through worker processes once enough parses are asked for (see the module docstring)."""

    def __init__(self, allowed_globals: Any = (), *, workers: int | None = None, start_after: int = START_AFTER,
                 idle_s: float = IDLE_S) -> None:
        # A getter (the allowed globals change on SIGHUP) or a fixed tuple.
        self._globals = allowed_globals if callable(allowed_globals) else (lambda: tuple(allowed_globals))
        self._workers = workers or default_workers()
        self._start_after = start_after
        self._idle_s = idle_s
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._pool_globals: tuple[str, ...] = ()
        self._asked = 0
        self._busy = 0
        self._last = time.monotonic()
        self._closed = False
        self._reaper: threading.Thread | None = None
        self.parsed_in_workers = 0

    # ------------------------------------------------------------------ pool life
    def _get_pool(self) -> ProcessPoolExecutor | None:
        with self._lock:
            self._asked += 1
            if self._closed or self._asked <= self._start_after:
                return None
            globals_now = tuple(self._globals())
            if self._pool is not None and globals_now != self._pool_globals:
                self._pool.shutdown(wait=False, cancel_futures=False)   # SIGHUP changed them: a new pool
                self._pool = None
            if self._pool is None:
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload(["devmapd.engine.learned", "devmapd.engine.inspection_codec"])
                self._pool = ProcessPoolExecutor(self._workers, mp_context=ctx, initializer=_init_worker,
                                                 initargs=(globals_now,))
                self._pool_globals = globals_now
                log.info("parsing in %d worker processes (%d models asked for so far)", self._workers, self._asked)
                if self._reaper is None:
                    self._reaper = threading.Thread(target=self._reap, name="devmapd-parsepool-reaper", daemon=True)
                    self._reaper.start()
            self._busy += 1
            return self._pool

    def _done(self) -> None:
        with self._lock:
            self._busy -= 1
            self._last = time.monotonic()

    def _reap(self) -> None:
        """Stop the workers once idle (their torch import is a few hundred MB each)."""
        while True:
            time.sleep(min(1.0, self._idle_s / 4))
            with self._lock:
                if self._closed:
                    return
                if self._pool is not None and not self._busy and time.monotonic() - self._last >= self._idle_s:
                    pool, self._pool = self._pool, None
                    self._asked = self._start_after   # the next parse starts it again at once
                else:
                    pool = None
            if pool is not None:
                log.info("parse workers idle for %.0fs: stopping them", self._idle_s)
                pool.shutdown(wait=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ parsing
    def learn(self, source: Any, options: ReadOptions) -> Learned:
        """What ``engine.learned.learn(source, options)`` returns; blocking (call it from a thread)."""
        path = str(getattr(source, "path", source))
        pool = self._get_pool()
        if pool is None:
            return learn(source, options)
        try:
            fut: Future[dict[str, Any]] = pool.submit(_learn_in_worker, path, options)
            doc = fut.result()
        except Exception as exc:   # a dead worker, a shut-down pool: parse here instead
            log.warning("parse worker failed for %s (%s); parsing in the daemon", path, exc)
            return learn(source, options)
        finally:
            self._done()
        if not doc.get("ok"):
            insp = doc.get("inspection")
            if isinstance(insp, Inspection):
                return Learned(path, insp, options_key(options))
            return learn(source, options)
        try:
            learned = inspection_codec.decode(doc.get("record"), path=path)
        except inspection_codec.CodecError as exc:
            log.warning("parse worker sent an unusable record for %s (%s); parsing in the daemon", path, exc)
            return learn(source, options)
        with self._lock:
            self.parsed_in_workers += 1
        return learned
