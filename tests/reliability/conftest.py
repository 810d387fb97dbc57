"""Fixtures for the fault and bad-input suite (issue 6).

Two things every reliability test gets:

* ``guard`` (autouse): a :class:`ModelDirGuard` that records the file list, checksums, mtimes,
  ctimes, modes and owners of every model directory a test uses, and asserts after the test that
  nothing changed except what the test itself changed *through the guard*. DESIGN.md: "The daemon
  never writes, moves or deletes anything in the model directory." Tests therefore make every
  change to a model dir with ``guard.save/write/replace/unlink/truncate/...``, which perform the
  change and then update the expected record of exactly the paths they touched.
* ``rdaemon``: starts real ``devmapd serve`` processes (tests/harness.start_daemon) whose model
  dirs are tracked by the guard; ``shared_daemon`` does the same once per module, because a daemon
  start costs ~5 s on this 2-core box and the suite has a 4-minute budget.

Helpers to build the hostile inputs live in ``tests/reliability/inputs.py``.
"""
from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import DaemonHandle, start_daemon

_CHUNK = 1 << 20


def _checksum(path: Path, size: int) -> str:
    """sha256 over (offset, bytes) of every DATA extent; holes of a sparse file are skipped, so a
    48 GiB sparse "absurd size" file costs nothing, yet any byte written anywhere is seen."""
    h = hashlib.sha256()
    # O_NOFOLLOW|O_NONBLOCK: never follow a link or block on a FIFO (lstat said "regular", but a
    # racing test thread could swap the entry; the suite must not hang either way).
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
                end = os.lseek(fd, start, os.SEEK_HOLE)
            except OSError:   # ENXIO: only a hole remains
                break
            h.update(f"@{start}".encode())
            at = start
            while at < end:
                block = os.pread(fd, min(_CHUNK, end - at), at)
                if not block:
                    break
                h.update(block)
                at += len(block)
            pos = end
    finally:
        os.close(fd)
    return h.hexdigest()


def _entry(path: Path) -> tuple:
    """What we compare for one path: kind, metadata, and a content checksum for regular files."""
    st = os.lstat(path)
    mode = st.st_mode
    meta = (stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_ino, st.st_ctime_ns)
    if stat.S_ISREG(mode):
        return ("file", st.st_size, st.st_mtime_ns, _checksum(path, st.st_size), *meta)
    if stat.S_ISLNK(mode):
        return ("symlink", os.readlink(path), *meta)
    if stat.S_ISDIR(mode):
        return ("dir", st.st_mtime_ns, *meta)
    # FIFO, device, socket: never opened; the node itself must stay what it was.
    return ("special", stat.S_IFMT(mode), st.st_rdev, st.st_mtime_ns, *meta)


def snapshot_tree(root: Path) -> dict[str, tuple]:
    """relpath -> _entry for the root itself and everything below it (symlinks not followed)."""
    out: dict[str, tuple] = {".": _entry(root)}
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                p = Path(e.path)
                rel = p.relative_to(root).as_posix()
                out[rel] = _entry(p)
                if e.is_dir(follow_symlinks=False):
                    stack.append(p)
    return out


class ModelDirGuard:
    """Expected state of every tracked model dir; tests change model dirs only through it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.expected: dict[Path, dict[str, tuple]] = {}

    # ------------------------------------------------------------------ bookkeeping
    def track(self, model_dir: Path) -> Path:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if model_dir not in self.expected:
                self.expected[model_dir] = snapshot_tree(model_dir)
        return model_dir

    def _root_of(self, path: Path) -> Path:
        for root in self.expected:
            if path == root or root in path.parents:
                return root
        raise AssertionError(f"{path} is not inside a tracked model dir; call guard.track first")

    def note(self, *paths: Path) -> None:
        """Re-record ``paths`` (and their parent dirs, whose mtime/ctime the change moved)."""
        with self._lock:
            for path in paths:
                path = Path(path)
                root = self._root_of(path)
                exp = self.expected[root]
                todo = {path, *[p for p in path.parents if p == root or root in p.parents]}
                for p in todo:
                    rel = "." if p == root else p.relative_to(root).as_posix()
                    if os.path.lexists(p):
                        if p == path and p.is_dir() and not p.is_symlink():
                            # a whole directory appeared/changed: take all of it
                            for sub_rel, entry in snapshot_tree(p).items():
                                key = rel if sub_rel == "." else f"{rel}/{sub_rel}" if rel != "." else sub_rel
                                exp[key] = entry
                        else:
                            exp[rel] = _entry(p)
                    else:
                        for k in [k for k in exp if k == rel or k.startswith(rel + "/")]:
                            del exp[k]

    def verify(self) -> None:
        with self._lock:
            problems = []
            for root, exp in self.expected.items():
                if not root.exists():
                    continue  # tmp dir already removed by a teardown we do not own
                actual = snapshot_tree(root)
                for rel in sorted(set(exp) | set(actual)):
                    if exp.get(rel) != actual.get(rel):
                        problems.append(f"{root}/{rel}: expected {exp.get(rel)}, found {actual.get(rel)}")
            assert not problems, "the model directory was modified by something other than the test:\n" + \
                "\n".join(problems[:20])

    # ------------------------------------------------------------------ changes the test makes
    def write(self, path: Path, data: bytes) -> Path:
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            self.note(path)
        return path

    def save(self, obj: Any, path: Path, **save_kwargs: Any) -> Path:
        """torch.save to a temp name outside the watched names, then rename into place."""
        import torch

        path = Path(path)
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name("." + path.name + ".tmp")
            torch.save(obj, tmp, **save_kwargs)
            os.replace(tmp, path)
            self.note(path, tmp)
        return path

    def replace(self, src: Path, dst: Path) -> None:
        with self._lock:
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            self.note(dst, src) if self._inside(src) else self.note(dst)

    def unlink(self, path: Path) -> None:
        with self._lock:
            os.unlink(path)
            self.note(path)

    def truncate(self, path: Path, size: int) -> None:
        """Truncate in place the way a writer does (open, ftruncate, close: IN_CLOSE_WRITE)."""
        with self._lock:
            with open(path, "r+b") as fh:
                fh.truncate(size)
            self.note(path)

    def symlink(self, target: Path | str, path: Path) -> None:
        with self._lock:
            os.symlink(target, path)
            self.note(path)

    def mkfifo(self, path: Path) -> None:
        with self._lock:
            os.mkfifo(path)
            self.note(path)

    def mknod_char(self, path: Path, major: int, minor: int) -> bool:
        """A character device node; False where the container forbids mknod."""
        with self._lock:
            try:
                os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(major, minor))
            except PermissionError:
                return False
            self.note(path)
            return True

    def touch(self, path: Path) -> None:
        with self._lock:
            os.utime(path)
            self.note(path)

    def _inside(self, path: Path) -> bool:
        try:
            self._root_of(Path(path))
            return True
        except AssertionError:
            return False


# One guard for the whole session: module-scoped daemons keep their dirs across tests, and every
# test is checked against everything recorded so far.
_GUARD = ModelDirGuard()


@pytest.fixture(autouse=True)
def guard() -> Iterator[ModelDirGuard]:
    yield _GUARD
    _GUARD.verify()


@pytest.fixture
def rdaemon(tmp_path: Path) -> Iterator[Callable[..., DaemonHandle]]:
    """Start real daemons with guarded model dirs; all are stopped at teardown."""
    started: list[DaemonHandle] = []

    def start(name: str = "d", model_dir: Path | None = None, **kwargs: Any) -> DaemonHandle:
        mdir = _GUARD.track(model_dir or (tmp_path / name / "models"))
        handle = start_daemon(tmp_path, name=name, model_dir=mdir, **kwargs)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


def module_daemon(tmp_path_factory: pytest.TempPathFactory, label: str, **kwargs: Any) -> Iterator[DaemonHandle]:
    """Body of a module-scoped daemon fixture (one ~5 s start shared by a module's tests)."""
    base = tmp_path_factory.mktemp(label)
    mdir = _GUARD.track(base / "d" / "models")
    handle = start_daemon(base, model_dir=mdir, **kwargs)
    try:
        yield handle
    finally:
        handle.stop()
