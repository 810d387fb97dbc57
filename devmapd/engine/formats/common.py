"""Shared records and low-level file access for the format parsers."""
from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass, field
from typing import Any

import torch

from devmapd.engine import diagnose


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

    def identity(self, st: os.stat_result | None = None) -> tuple:
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
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b) -> int:
        data = os.pread(self._fd, len(b), self._pos)
        n = len(data)
        b[:n] = data
        self._pos += n
        return n

    def close(self) -> None:   # the fd belongs to OpenedFile, not to this reader
        super().close()


def open_file(path: str, display: str | None = None) -> OpenedFile:
    """Open ``path`` once for reading (O_NOFOLLOW), refusing anything but a regular file.

    ``display`` is the name users know the file by (messages, Inspection.files) when ``path`` is
    its resolved location (e.g. a Hugging Face cache blob behind a snapshot symlink).
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK   # NONBLOCK: a FIFO must not hang us
    path_shown = display or path
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise diagnose.CheckpointError(diagnose.diagnose_exception(e, path_shown)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (FIFO, socket or device)"
            raise diagnose.not_a_checkpoint(path_shown, kind)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(path_shown, fd, st)


def meta_storage(nbytes: int, dtype: torch.dtype) -> torch.storage.TypedStorage:
    """A storage of ``nbytes`` on the meta device: costs nothing, whatever the declared size."""
    us = torch.UntypedStorage(nbytes, device="meta")
    return torch.storage.TypedStorage(wrap_storage=us, dtype=dtype, _internal=True)


def element_size(dtype: torch.dtype) -> int:
    return torch._utils._element_size(dtype)
