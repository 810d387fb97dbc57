"""A restart that has learned: what parsing each model taught us, kept in the state directory.

Each successful parse (``engine.learned.Learned``: format, storages, tensor views, structure)
is stored as one JSON file under ``<state_dir>/inspections/``, named by a hash of the model's
real path and the parse options, and keyed inside by the identity of every file of the model
(device, inode, size, mtime_ns, ctime_ns; for a Hugging Face directory, every regular file at
its top). A later lookup stats the files again and serves the record only if every identity
matches; the read then opens the files and compares once more (``read_learned``), so a file
replaced, rewritten in place (ctime moves even when mtime is put back) or touched is parsed
afresh, never served from a stale record.

Nothing here is trusted blindly: a record file must be a regular file owned by this process's
user and writable by nobody else, carry this format's version and a matching SHA-256 of its
content, and pass ``inspection_codec.decode``'s checks. Anything else is ignored with a
warning (and replaced at the next store). Records are written atomically (temp file + rename,
in the state directory; the model directory is never written) and without fsync: a record lost
in a crash costs one parse.

Racily clean files: a file's timestamps have the filesystem's granularity, so a file changed
again within the same tick as the version we parsed would show the same identity. A parse of a
file changed less than RACY_NS before we opened it is therefore not stored (git's rule).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devmapd.engine import inspection_codec
from devmapd.engine.checkpoint import ReadOptions
from devmapd.engine.filenames import is_temporary
from devmapd.engine.learned import Learned, learn, options_key
from devmapd.textfmt import safe

log = logging.getLogger("devmapd.cache")

DIRNAME = "inspections"
FORMAT = "devmapd-inspection"
VERSION = 1
MAX_RECORD_BYTES = 256 << 20
RACY_NS = 500_000_000

Listing = list[list[Any]]   # [[name, dev, ino, size, mtime_ns, ctime_ns], ...] sorted by name


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def current_listing(path: str, real: str | None = None) -> Listing | None:
    """The identities of a model's files now, from ``stat`` only; None if it cannot be read.
    ``real`` is ``os.path.realpath(path)`` when the caller has it already."""
    try:
        real = real or os.path.realpath(path)
        st = os.stat(real)
        if stat.S_ISREG(st.st_mode):
            return [[os.path.basename(path), *_identity(st)]]
        if not stat.S_ISDIR(st.st_mode):
            return None
        out = []
        with os.scandir(real) as it:
            for entry in it:
                if is_temporary(entry.name):
                    continue
                try:
                    est = entry.stat()   # follows links (HF cache snapshots link into blobs/)
                except OSError:
                    continue
                if stat.S_ISREG(est.st_mode):
                    out.append([entry.name, *_identity(est)])
        return sorted(out)
    except OSError:
        return None


def _fingerprint_of(listing: Listing) -> tuple:
    """names.fingerprint's form ((name, size, mtime_ns, ino), ...) of a listing."""
    return tuple(sorted((r[0], r[3], r[4], r[2]) for r in listing))


class InspectionCache:
    """Stored parses under ``state_dir``; thread-safe (lookups and stores run in load threads)."""

    def __init__(self, state_dir: str | os.PathLike[str], *, enabled: bool = True,
                 scope: Callable[[], tuple[str, ...]] | None = None,
                 parse: Callable[[Any, ReadOptions], Learned] | None = None) -> None:
        self.dir = Path(state_dir) / DIRNAME
        self.enabled = enabled
        # What else decides whether a parse succeeds: the daemon admits its allowed globals
        # process-wide (not per read), so a record made under other globals is another record.
        self._scope = scope or (lambda: ())
        self._parse = parse or learn   # a miss is parsed by this (parsepool.ParsePool.learn: worker processes)
        self._lock = threading.Lock()
        self._checked = False
        # Records are written by one writer thread, off the load path (creating a file costs
        # ~0.5 ms, 1,000 of them are half a second of a first start); close() drains it.
        self._queue: queue.SimpleQueue[tuple[str, Learned, ReadOptions] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self.counts = {"hits": 0, "misses": 0, "stale": 0, "rejected": 0, "stored": 0, "racy": 0}

    # ------------------------------------------------------------------ helpers
    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"dir": str(self.dir), "enabled": self.enabled, **self.counts}

    def _usable(self) -> bool:
        """The directory exists (made 0700 if not), is ours and writable by nobody else."""
        if not self.enabled:
            return False
        with self._lock:
            if self._checked:
                return self.enabled
            self._checked = True
            try:
                self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                st = os.stat(self.dir, follow_symlinks=False)
                why = None
                if not stat.S_ISDIR(st.st_mode):
                    why = "it is not a directory"
                elif st.st_uid != os.geteuid():
                    why = f"it belongs to uid {st.st_uid}, not {os.geteuid()}"
                elif st.st_mode & 0o022:
                    why = f"others may write to it (mode {stat.S_IMODE(st.st_mode):o})"
            except OSError as exc:
                why = str(exc)
            if why is not None:
                log.warning("inspection cache %s disabled (%s); every model is parsed at start-up. "
                            "Fix: remove it or give it to this user with mode 0700", safe(str(self.dir)), why)
                self.enabled = False
            return self.enabled

    def _entry(self, path: str, options: ReadOptions, real: str | None = None) -> Path:
        real = real or os.path.realpath(path)
        key = [[name, list(v) if isinstance(v, tuple) else v] for name, v in options_key(options)]
        h = hashlib.sha256(json.dumps([real, key, list(self._scope())]).encode("utf-8", "surrogateescape"))
        return self.dir / f"{h.hexdigest()[:40]}.json"

    @staticmethod
    def _digest(body: bytes) -> str:
        return hashlib.sha256(body).hexdigest()

    def _read_record(self, entry: Path) -> dict[str, Any] | None:
        """The stored document, or None (missing, or refused with a warning)."""
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._reject(entry, f"cannot open it ({exc.strerror})")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return self._reject(entry, "it is not a regular file")
            if st.st_uid != os.geteuid():
                return self._reject(entry, f"it belongs to uid {st.st_uid}, not {os.geteuid()}")
            if st.st_mode & 0o022:
                return self._reject(entry, f"others may write to it (mode {stat.S_IMODE(st.st_mode):o})")
            if st.st_size > MAX_RECORD_BYTES:
                return self._reject(entry, f"it is {st.st_size} bytes, over {MAX_RECORD_BYTES}")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                raw = fh.read(MAX_RECORD_BYTES + 1)
        finally:
            os.close(fd)
        # Line 1: a small header (format, version, the body's SHA-256); then the body.
        head, sep, body = raw.partition(b"\n")
        try:
            header = json.loads(head)
        except ValueError as exc:
            return self._reject(entry, f"its header is not valid JSON ({exc})")
        if type(header) is not dict or header.get("format") != FORMAT:
            return self._reject(entry, "it is not an inspection record")
        if header.get("version") != VERSION:
            return self._reject(entry, f"its version {header.get('version')!r:.20} is not {VERSION}")
        if not sep or header.get("sha256") != self._digest(body):
            return self._reject(entry, "its checksum does not match (truncated or edited)")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            return self._reject(entry, f"its body is not valid JSON ({exc})")
        if type(doc) is not dict:
            return self._reject(entry, "its body is not a JSON object")
        return doc

    def _reject(self, entry: Path, why: str) -> None:
        self._count("rejected")
        log.warning("ignoring inspection cache file %s: %s; the model is parsed afresh", safe(str(entry)), why)
        return None

    # ------------------------------------------------------------------ API
    def lookup(self, path: str, options: ReadOptions) -> Learned | None:
        """The stored parse of the model at ``path`` if every file is unchanged, else None."""
        if not self._usable():
            return None
        real = os.path.realpath(path)
        entry = self._entry(path, options, real)
        doc = self._read_record(entry)
        if doc is None:
            self._count("misses")
            return None
        if doc.get("model") != real:
            self._reject(entry, "it is for another model")
            return None
        if doc.get("scope") != list(self._scope()):
            self._count("stale")
            return None
        listing = current_listing(path, real)
        if listing is None or doc.get("listing") != listing:
            self._count("stale")
            return None
        try:
            learned = inspection_codec.decode(doc.get("record"), path=str(path))
        except inspection_codec.CodecError as exc:
            self._reject(entry, str(exc))
            return None
        if learned.key != options_key(options):
            self._count("stale")
            return None
        # The weight files the record names must be among the files we just stat'ed, as they were.
        by_name = {r[0]: r[1:] for r in listing}
        for f in learned.files:
            if by_name.get(os.path.basename(f.path)) != list(f.identity()):
                self._count("stale")
                return None
        self._count("hits")
        # The fingerprint comes from the identities just checked, so it matches the watcher's.
        return Learned(path=learned.path, inspection=learned.inspection, key=learned.key, files=learned.files,
                       storages=learned.storages, tensors=learned.tensors, tree=learned.tree,
                       fingerprint=_fingerprint_of(listing), opened_ns=learned.opened_ns)

    def store(self, path: str, learned: Learned, options: ReadOptions) -> bool:
        """Keep ``learned`` for the next start; False if it is not stored (failed, racy, changed)."""
        if not learned.ok or not self._usable() or learned.key != options_key(options):
            return False
        for f in learned.files:
            if max(f.mtime_ns, f.ctime_ns) >= learned.opened_ns - RACY_NS:
                self._count("racy")   # changed just before we parsed it: its identity proves nothing
                return False
        listing = current_listing(path)
        if listing is None:
            return False
        by_name = {r[0]: r[1:] for r in listing}
        for f in learned.files:
            if by_name.get(os.path.basename(f.path)) != list(f.identity()):
                return False   # already changed again: the next load learns the new version
        record = inspection_codec.encode(learned)
        entry = self._entry(path, options)
        try:
            body = json.dumps({"model": os.path.realpath(path), "scope": list(self._scope()), "listing": listing,
                               "record": record},
                              separators=(",", ":")).encode("ascii")
            head = json.dumps({"format": FORMAT, "version": VERSION, "sha256": self._digest(body)}).encode("ascii")
            fd, tmp = tempfile.mkstemp(prefix=".insp-", suffix=".tmp", dir=self.dir)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(head + b"\n" + body)
                os.replace(tmp, entry)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except (OSError, ValueError) as exc:
            log.warning("cannot store the inspection of %s in %s: %s", safe(str(path)), safe(str(self.dir)), exc)
            return False
        self._count("stored")
        return True

    def forget(self, path: str, options: ReadOptions) -> None:
        """Drop the record of a model that is gone."""
        if self._usable():
            try:
                self._entry(path, options).unlink(missing_ok=True)
            except OSError:
                pass

    def obtain(self, source: Any, options: ReadOptions) -> Learned:
        """What the load of ``source`` (a ModelSource or path) needs: the stored parse if every file
        is unchanged, else a fresh one (stored for the next start). Blocking: run it in a thread."""
        path = str(getattr(source, "path", source))
        hit = self.lookup(path, options)
        if hit is not None:
            return hit
        learned = self._parse(source, options)
        if learned.ok:
            self.store_later(path, learned, options)
        return learned

    def store_later(self, path: str, learned: Learned, options: ReadOptions) -> None:
        """``store`` in the writer thread (the identities were taken when the file was opened, and
        ``store`` checks them again, so a late write never keeps a parse of a file changed since)."""
        if not learned.ok or not self._usable():
            return
        with self._lock:
            self._pending += 1
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="devmapd-cache-writer", daemon=True)
                self._writer.start()
        self._queue.put((path, learned, options))

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.store(*item)
            except Exception:   # a bug here must not lose the writer: the next start just parses again
                log.exception("storing the inspection of %s failed", safe(item[0]))
            finally:
                with self._lock:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued record is written; False if ``timeout`` passed first."""
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for at most ``timeout`` seconds) and stop the writer."""
        if not self.flush(timeout):
            log.warning("inspection cache: %d records not written at shutdown; those models are parsed "
                        "again at the next start", self._pending)
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put(None)
            writer.join(timeout)
