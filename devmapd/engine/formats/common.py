"""Shared records and THE safe opener: every file devmapd opens under a model directory.

``open_in_model_dir`` is the one way the engine and the daemon open a file that a model
directory holds (weights, a shard index, config.json, any side file, now and later), and
``read_json_file`` the one way they read a small JSON side file:

* a link is resolved ONCE (``realpath``), and a target outside the model directory is refused
  before anything is opened; the open itself follows no link (``O_NOFOLLOW``);
* the entry must be a regular file: checked with ``lstat`` before the open (so a FIFO or a
  device is never opened at all) and again with ``fstat`` on the opened fd (``O_NONBLOCK``, so
  a swap to a FIFO in between cannot hang the open; blocking is restored after the check);
* the inode actually opened must lie inside the model directory (``/proc/self/fd``);
* side files are capped in size (``MAX_SIDE_FILE_BYTES``, ``[safety] max_side_file_mib``), and
  every read is bounded by the size ``fstat`` gave at open: a growing file, or an endless one
  that slipped past the checks, can never make devmapd read on.
"""
from __future__ import annotations

import io
import json
import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from devmapd.engine import diagnose

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

# A side file (shard index, config.json...) is a small JSON document: the biggest real shard
# index (~100k tensors) is ~10 MiB. Anything over this is not one and is not read.
MAX_SIDE_FILE_BYTES = 64 << 20
_READ_STEP = 16 << 20   # bytes per pread when reading a side file whole


@dataclass
class StorageRec:
    """One storage of a checkpoint: its metadata and where its bytes sit in which file."""
    key: str                     # storage key in its file ("0", or the tensor name for safetensors)
    dtype: torch.dtype
    location: str                # the saved location tag: "cpu", "cuda:3"
    nbytes: int
    meta: torch.UntypedStorage   # the meta storage tensors were built on (identity via _cdata)
    file: int = 0                # index into Parsed.files
    offset: int | None = None    # byte offset of the data in that file (None: not located yet)


@dataclass
class Parsed:
    """A checkpoint understood without its data: object tree of meta tensors + storage records."""
    format: str                  # torch-zip | torch-legacy | safetensors | hf-dir
    obj: Any
    storages: list[StorageRec]
    files: list[OpenedFile] = field(default_factory=list)

    def storage_index(self) -> dict[int, int]:
        """Map a tensor's ``untyped_storage()._cdata`` to its index in ``storages``."""
        return {rec.meta._cdata: i for i, rec in enumerate(self.storages)}


@dataclass
class OpenedFile:
    """A checkpoint file opened once; ``before`` is its fstat at open, compared again at the end."""
    path: str
    fd: int
    before: os.stat_result

    @property
    def size(self) -> int:
        return self.before.st_size

    def identity(self, st: os.stat_result | None = None) -> tuple[int, int, int, int, int]:
        st = st or self.before
        return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev)

    def unchanged(self) -> bool:
        return self.identity(os.fstat(self.fd)) == self.identity()

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def reader(self, buffer_size: int = 64 << 10) -> io.BufferedReader:
        """A buffered, seekable reader over the fd that never moves the fd's own position."""
        return io.BufferedReader(_PreadRaw(self.fd, self.size), buffer_size=buffer_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _PreadRaw(io.RawIOBase):
    """Raw IO on an fd through pread: independent readers never race on a shared file position."""

    def __init__(self, fd: int, size: int):
        self._fd, self._size, self._pos = fd, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        if base + pos < 0:
            # A parser that computes a negative offset is reading a damaged file: say so rather
            # than quietly reading from the start.
            raise OSError(22, f"seek to a negative position ({base + pos})")
        self._pos = base + pos
        return self._pos

    def readinto(self, b: WriteableBuffer) -> int:
        # Never past the size fstat gave at open: a file growing under us is not read on.
        # The view is released on return, so a caller may resize its bytearray afterwards.
        with memoryview(b) as view:
            data = os.pread(self._fd, max(0, min(len(view), self._size - self._pos)), self._pos)
            n = len(data)
            view[:n] = data
        self._pos += n
        return n

    def close(self) -> None:   # the fd belongs to OpenedFile, not to this reader
        super().close()


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "not a regular file but a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "not a regular file but a device"
    if stat.S_ISSOCK(mode):
        return "not a regular file but a socket"
    return "not a regular file (FIFO, socket or device)"


def open_file(path: str, display: str | None = None) -> OpenedFile:
    """Open ``path`` once for reading (O_NOFOLLOW), refusing anything but a regular file.

    ``display`` is the name users know the file by (messages, Inspection.files) when ``path`` is
    its resolved location (e.g. a Hugging Face cache blob behind a snapshot symlink). Files of a
    model directory are opened through :func:`open_in_model_dir`, which calls this.
    """
    # NONBLOCK: a FIFO swapped in after the lstat must not hang the open; NOCTTY: a terminal
    # device never becomes our controlling terminal.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    path_shown = display or path
    try:
        lst = os.lstat(path)
    except OSError as e:
        raise diagnose.CheckpointError(diagnose.diagnose_exception(e, path_shown)) from None
    # A FIFO or a device is refused without being opened (opening some devices has effects).
    # A symlink here is left to the open, which refuses it (O_NOFOLLOW: ELOOP).
    if not stat.S_ISREG(lst.st_mode) and not stat.S_ISLNK(lst.st_mode):
        raise diagnose.not_a_checkpoint(path_shown, _kind_of(lst.st_mode))
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise diagnose.CheckpointError(diagnose.diagnose_exception(e, path_shown)) from None
    try:
        st = os.fstat(fd)   # the opened inode decides, whatever the name pointed at before
        if not stat.S_ISREG(st.st_mode):
            raise diagnose.not_a_checkpoint(path_shown, _kind_of(st.st_mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(path_shown, fd, st)


def inside(real: str, real_root: str) -> bool:
    """``real`` is ``real_root`` or lies below it (both already resolved)."""
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def check_inside(f: OpenedFile, root: str | None) -> None:
    """The file we actually opened (not the name we resolved) must lie inside ``root``.

    A symlink the watcher accepted can be repointed before the read; /proc/self/fd/N names
    the inode the kernel gave us, so checking it closes that window.
    """
    if root is None:
        return
    real_root = os.path.realpath(root)
    try:
        opened_at = os.readlink(f"/proc/self/fd/{f.fd}")
    except OSError:
        return  # no /proc: the resolved-path check done before the open is all we have
    if not inside(opened_at, real_root):
        raise diagnose.outside_model_dir(f.path, opened_at, real_root)


def open_in_model_dir(path: str | os.PathLike[str], display: str | None = None, *, root: str | None = None,
                      max_bytes: int | None = None, what: str = "file",
                      limit_name: str = "safety.max_side_file_mib") -> OpenedFile:
    """THE opener for every file under a model directory (see the module docstring).

    ``path`` may be a link (a Hugging Face cache snapshot links into blobs/): it is resolved once
    and the target must lie inside ``root`` (when given) before it is opened. ``max_bytes`` caps
    the size (``what`` and ``limit_name`` word the too_large diagnosis). Raises CheckpointError
    with a diagnosis naming ``display`` (default: ``path``).
    """
    path = os.fspath(path)
    shown = display or path
    real = os.path.realpath(path)
    if root is not None:
        real_root = os.path.realpath(root)
        if not inside(real, real_root):   # never open (or even probe) a file outside the model dir
            raise diagnose.outside_model_dir(shown, real, real_root)
    f = open_file(real, shown)
    try:
        check_inside(f, root)
        if max_bytes is not None and f.size > max_bytes:
            raise diagnose.too_large(shown, f"a {f.size}-byte {what}", f"{max_bytes} bytes ({limit_name})")
    except BaseException:
        f.close()
        raise
    return f


def read_whole(f: OpenedFile) -> bytes:
    """All of ``f`` as fstat sized it at open: never more (a growing file is not read on), and a
    file that shrank or changed meanwhile is a ``changed_during_read`` error."""
    chunks: list[bytes] = []
    pos = 0
    while pos < f.size:
        chunk = os.pread(f.fd, min(_READ_STEP, f.size - pos), pos)
        if not chunk:
            break
        chunks.append(chunk)
        pos += len(chunk)
    if pos != f.size or not f.unchanged():
        raise diagnose.changed_during_read(f.path)
    return b"".join(chunks)


def read_small_file(path: str | os.PathLike[str], *, root: str | None = None, display: str | None = None,
                    max_bytes: int = MAX_SIDE_FILE_BYTES, what: str = "side file",
                    limit_name: str = "safety.max_side_file_mib") -> bytes:
    """The bytes of one small file of a model directory, through :func:`open_in_model_dir`."""
    f = open_in_model_dir(path, display, root=root, max_bytes=max_bytes, what=what, limit_name=limit_name)
    try:
        return read_whole(f)
    finally:
        f.close()


def read_json_file(path: str | os.PathLike[str], *, root: str | None = None, display: str | None = None,
                   max_bytes: int = MAX_SIDE_FILE_BYTES, what: str | None = None,
                   limit_name: str = "safety.max_side_file_mib") -> Any:
    """Read and parse one small JSON side file of a model directory (config.json,
    generation_config.json, a shard index...), safely.

    The file is opened by :func:`open_in_model_dir` (link resolved once and kept inside
    ``root``, regular file checked on the opened fd, never a FIFO or a device), refused over
    ``max_bytes`` (default ``MAX_SIDE_FILE_BYTES``; the daemon passes ``[safety]
    max_side_file_mib``) and read only up to the size it had at open. Returns the parsed JSON
    (any JSON value: check its type). Raises ``diagnose.CheckpointError``: ``too_large``,
    ``not_a_checkpoint`` (not a regular file), ``outside_model_dir``, ``changed_during_read``,
    ``corrupt`` (not JSON, or nested too deep to parse), or the open's own error
    (``not_found``, ``permission_denied``...). Each message names the file.
    """
    shown = display or os.fspath(path)
    what = what or os.path.basename(os.fspath(path))
    data = read_small_file(path, root=root, display=display, max_bytes=max_bytes, what=what,
                           limit_name=limit_name)
    try:
        return json.loads(data)
    except RecursionError:   # "[[[[...": nested past the parser's stack
        raise diagnose.corrupt(shown, f"{what} is nested too deeply to be a side file") from None
    except ValueError as e:   # includes UnicodeDecodeError
        raise diagnose.corrupt(shown, f"{what} is not valid JSON: {e}") from None


def meta_storage(nbytes: int, dtype: torch.dtype) -> torch.storage.TypedStorage:
    """A storage of ``nbytes`` on the meta device: costs nothing, whatever the declared size."""
    us = torch.UntypedStorage(nbytes, device="meta")  # type: ignore[no-untyped-call]  # torch's constructor is unannotated
    return torch.storage.TypedStorage(  # type: ignore[no-untyped-call]  # TypedStorage.__init__ is unannotated
        wrap_storage=us, dtype=dtype, _internal=True)


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element; ``dtype.itemsize`` knows every dtype (torch's private helper lacks the
    bits dtypes)."""
    return dtype.itemsize
