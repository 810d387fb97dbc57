"""Sealed memfd arenas: a model's tensor bytes in one read-only shared-memory file, plus a manifest.

Daemon side: ``ArenaBuilder`` creates a memfd, the checkpoint reader fills it (``write_at`` /
``copy_from_file``, never through a Python-level copy of the data), and ``seal`` makes it
immutable for ever (F_SEAL_WRITE|SHRINK|GROW|SEAL). The sealed fd is what clients receive over
SCM_RIGHTS; the kernel frees the memory when the last holder (daemon or client) closes it.

Client side: ``attach`` checks the seals, maps each segment copy-on-write (MAP_PRIVATE) and
builds the tensors in place; ``build`` also rebuilds the checkpoint structure (``tree.decode``).
A client may write into its tensors: the pages are copied privately, so the write never reaches
the memfd, the daemon or any other client.

Layout rule: each *storage* of the checkpoint starts at an ALIGN-aligned byte offset; tensors
that share a storage in the file (tied weights, views) share it in the arena and after attach.
"""
from __future__ import annotations

import errno
import fcntl
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from devmapd.engine import tree
from devmapd.engine.gcpause import gc_paused

__all__ = [
    "ALIGN", "ArenaError", "SegmentInfo", "TensorEntry", "Manifest", "ArenaBuilder",
    "SealedSegment", "layout", "verify_sealed", "attach", "build", "dtype_from_name",
    "dtype_name", "tensors_on_storage",
]

ALIGN = 64

# fcntl gained the sealing constants only in Python 3.12 on some builds; the values are the
# kernel ABI (include/uapi/linux/fcntl.h), so defining them here is safe.
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1024 + 9)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1024 + 10)
F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x0004)
F_SEAL_WRITE = getattr(fcntl, "F_SEAL_WRITE", 0x0008)
ALL_SEALS = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
MFD_NOEXEC_SEAL = getattr(os, "MFD_NOEXEC_SEAL", 0x0008)

# Fallback copy chunk when sendfile cannot be used (a bounded buffer, not a full copy).
_COPY_CHUNK = 8 << 20


class ArenaError(Exception):
    """An arena or manifest problem; the message says what is wrong and what to do."""


class SegmentImportError(ArenaError):
    """A non-memfd segment (a GPU buffer) cannot be mapped here; its host copy may serve."""


# Mappers for segment kinds that are not memfds, keyed by SegmentInfo.kind. The GPU package
# registers "cuda-ipc" when it is imported (the client imports it only for a manifest that
# holds such a segment), so this module never imports the GPU code: the arena stays the
# bottom layer that both the daemon and the client build on.
SegmentImporter = Callable[["Manifest", int, list[Any]], None]
_IMPORTERS: dict[str, SegmentImporter] = {}


def register_importer(kind: str, importer: SegmentImporter) -> None:
    """Let ``attach`` map segments of ``kind``: ``importer(manifest, index, out)`` fills ``out``
    with the tensors of segment ``index`` or raises SegmentImportError."""
    _IMPORTERS[kind] = importer



# ----------------------------------------------------------------------------- dtypes

def dtype_name(dt: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (INTERNALS.md naming)."""
    return str(dt).removeprefix("torch.")


# Filled on first use of each name: scanning vars(torch) for dtypes at import costs ~0.5 ms,
# a quarter of a fresh client's whole import budget.
_DTYPES: dict[str, torch.dtype] = {}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        v = getattr(torch, name, None) if type(name) is str else None
        if isinstance(v, torch.dtype) and dtype_name(v) == name:   # "half" is not a dtype name
            _DTYPES[name] = v
            return v
    except TypeError:
        pass
    raise ArenaError(f"manifest names an unknown dtype {name!r:.60}; the daemon and client "
                     "torch versions probably differ, upgrade the older one")


# ----------------------------------------------------------------------------- manifest
#
# Plain classes with __slots__, not dataclasses: a client process pays for every class it
# creates at import time (a 10-field frozen dataclass costs ~1.3 ms to define, the three of
# them ~4 ms, more than the rest of the client's import), and a 4,000-tensor fetch would build
# 4,000 entry objects it never needs. They behave like the frozen dataclasses they replace:
# keyword or positional construction, the same attribute names, equality and hashing by value,
# immutable, ``replace(**changes)``, and ``dataclasses.replace`` / ``fields`` / ``asdict`` work
# on them (see _Record._as_dataclass).


class _Record:
    """A frozen value object whose fields are ``_fields`` (in order)."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _defaults: dict[str, Any] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self._fields
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes {len(names)} fields, got {len(args)}")
        values = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names or k in values:
                raise TypeError(f"{type(self).__name__} got an unexpected or repeated field {k!r}")
            values[k] = v
        setattr_ = object.__setattr__
        for n in names:
            if n in values:
                setattr_(self, n, values[n])
            elif n in self._defaults:
                setattr_(self, n, self._defaults[n])
            else:
                raise TypeError(f"{type(self).__name__} is missing the field {n!r}")

    def _astuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return bool(self._astuple() == other._astuple())

    def __hash__(self) -> int:
        return hash(self._astuple())

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields)
        return f"{type(self).__name__}({inner})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; use .replace({name}=...)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._astuple())

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` applied (what ``dataclasses.replace`` did)."""
        values = {n: getattr(self, n) for n in self._fields}
        values.update(changes)
        return type(self)(**values)

    @classmethod
    def _as_dataclass(cls) -> None:
        # The daemon and tests call dataclasses.replace on manifests; it needs only a
        # __dataclass_fields__ map of Field objects marked as plain fields, which costs
        # microseconds (dataclasses itself is already imported by torch), not the generated
        # methods' exec.
        import dataclasses
        fields = {}
        for n in cls._fields:
            f = (dataclasses.field(default=cls._defaults[n]) if n in cls._defaults
                 else dataclasses.field())
            f.name = n
            f._field_type = dataclasses._FIELD   # type: ignore[attr-defined]
            fields[n] = f
        type.__setattr__(cls, "__dataclass_fields__", fields)


class SegmentInfo(_Record):
    """One segment of a model: ``kind`` "memfd" | "cuda-ipc"; ``device`` its placement label
    ("cpu", "cuda:1"; a simulated GPU's segment is a memfd); ``ipc`` (cuda-ipc only) the
    JSON-able handle from cuda_share (GpuSegment.export)."""

    __slots__ = _fields = ("kind", "device", "nbytes", "device_uuid", "ipc")
    _defaults = {"device_uuid": None, "ipc": None}
    kind: str
    device: str
    nbytes: int
    device_uuid: str | None
    ipc: dict[str, Any] | None


class TensorEntry(_Record):
    """One tensor: ``offset`` is the byte offset of its STORAGE in the segment (ALIGN-aligned),
    ``storage_offset`` in elements as torch, ``saved_location`` the file's tag ("cpu", "cuda:3")."""

    __slots__ = _fields = ("segment", "offset", "storage_nbytes", "storage_offset", "dtype",
                           "shape", "stride", "saved_location", "requires_grad", "parameter")
    _defaults = {"requires_grad": False, "parameter": False}
    segment: int
    offset: int
    storage_nbytes: int
    storage_offset: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    saved_location: str
    requires_grad: bool
    parameter: bool


# Tensor entries travel as rows, not objects: a 4,000-tensor manifest is ~2.5x smaller and
# parses ~2x faster that way. The header names the columns so the JSON stays self-describing.
_TENSOR_FIELDS = TensorEntry.__slots__


def _entry_from_row(row: Any) -> TensorEntry:
    seg, off, snb, soff, dt, shape, stride, loc, rg, par = row
    return TensorEntry(int(seg), int(off), int(snb), int(soff), str(dt), tuple(shape),
                       tuple(stride), str(loc), bool(rg), bool(par))


class Manifest(_Record):
    """A model's tensors (``tensors``, TensorEntry), ``segments`` (SegmentInfo) and ``tree``
    (tree.encode output; tensor leaves index ``tensors``).

    A manifest read with ``from_json`` keeps its tensor rows as they came off the wire and makes
    TensorEntry objects only if ``tensors`` is read (the client's attach works on the rows);
    ``_plan`` caches what attach works out from them, so rebuilding an unchanged manifest
    (a repeat fetch) skips that work.
    """

    # The private slots are caches, not fields: __init__, eq, hash, repr and replace see
    # only the four public ones.
    __slots__ = ("tensors", "segments", "tree", "version", "_rows", "_plan", "_flat", "__weakref__")
    _fields = ("tensors", "segments", "tree", "version")
    _defaults = {"version": 1}
    tensors: tuple[TensorEntry, ...]
    segments: tuple[SegmentInfo, ...]
    tree: Any
    version: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "_rows", None)
        object.__setattr__(self, "_plan", None)
        object.__setattr__(self, "_flat", None)

    def __repr__(self) -> str:
        n = len(self._rows) if self._rows is not None else len(self.tensors)
        return f"Manifest(tensors=<{n} entries>, segments={self.segments!r}, version={self.version!r})"

    def __getattr__(self, name: str) -> Any:
        # Only reached for an unset slot: ``tensors`` of a manifest read from JSON.
        if name == "tensors":
            rows = object.__getattribute__(self, "_rows")
            try:
                entries = tuple(_entry_from_row(r) for r in rows)
            except (TypeError, ValueError) as e:
                raise ArenaError(f"malformed manifest ({type(e).__name__}: {e}); the daemon "
                                 "sent something this client cannot read, check both versions"
                                 ) from None
            object.__setattr__(self, "tensors", entries)
            return entries
        raise AttributeError(f"'Manifest' object has no attribute {name!r}")

    def _row_list(self) -> Sequence[Sequence[Any]]:
        """The tensor rows (as on the wire), without making TensorEntry objects."""
        if self._rows is not None:
            rows: Sequence[Sequence[Any]] = self._rows
            return rows
        return [(e.segment, e.offset, e.storage_nbytes, e.storage_offset, e.dtype, e.shape,
                 e.stride, e.saved_location, e.requires_grad, e.parameter) for e in self.tensors]

    def saved_locations(self) -> list[str]:
        return [str(r[7]) for r in self._row_list()]

    def to_json(self) -> dict[str, Any]:
        rows: Any = self._rows
        if rows is None:
            rows = [[t.segment, t.offset, t.storage_nbytes, t.storage_offset, t.dtype,
                     list(t.shape), list(t.stride), t.saved_location, t.requires_grad,
                     t.parameter] for t in self.tensors]
        else:
            rows = [[*r[:5], list(r[5]), list(r[6]), *r[7:]] for r in rows]
        return {
            "version": self.version,
            "segments": [
                {"kind": s.kind, "device": s.device, "nbytes": s.nbytes,
                 "device_uuid": s.device_uuid, "ipc": s.ipc}
                for s in self.segments
            ],
            "tensor_fields": list(_TENSOR_FIELDS),
            "tensors": rows,
            "tree": self.tree,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        try:
            version = d.get("version")
            if version != 1:
                raise ArenaError(f"manifest version {version!r} is not supported (this client "
                                 "reads version 1); upgrade devmapd on the older side")
            if tuple(d["tensor_fields"]) != _TENSOR_FIELDS:
                raise ArenaError("manifest tensor fields differ from this client's; "
                                 "upgrade devmapd on the older side")
            segments = tuple(
                SegmentInfo(str(s["kind"]), str(s["device"]), int(s["nbytes"]),
                            s.get("device_uuid"), s.get("ipc"))
                for s in d["segments"]
            )
            rows = d["tensors"]
            if type(rows) is not list:
                raise TypeError(f"tensors is a {type(rows).__name__}, not a list")
            # Only the row shape is checked here; the values are checked where they are used
            # (attach's plan, or ``tensors`` on first read), so a fetch never walks the rows twice.
            for r in rows:
                if type(r) is not list or len(r) != 10:
                    raise ValueError(f"tensor row {r!r:.60} does not have 10 fields")
            tree_ = d["tree"]
        except ArenaError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArenaError(f"malformed manifest ({type(e).__name__}: {e}); the daemon sent "
                             "something this client cannot read, check both versions") from None
        m = object.__new__(cls)
        setattr_ = object.__setattr__
        setattr_(m, "segments", segments)
        setattr_(m, "tree", tree_)
        setattr_(m, "version", 1)
        setattr_(m, "_rows", rows)
        setattr_(m, "_plan", None)
        setattr_(m, "_flat", None)
        return m


for _cls in (SegmentInfo, TensorEntry, Manifest):
    _cls._as_dataclass()
del _cls


# ----------------------------------------------------------------------------- layout

def layout(nbytes_list: Sequence[int], align: int = ALIGN) -> tuple[list[int], int]:
    """Offsets placing each storage at an ``align``-aligned start, and the total size."""
    if align <= 0 or align & (align - 1):
        raise ValueError(f"align must be a power of two, got {align}")
    mask = align - 1
    offsets: list[int] = []
    pos = 0
    for n in nbytes_list:
        if n < 0:
            raise ValueError(f"negative storage size {n}")
        pos = (pos + mask) & ~mask
        offsets.append(pos)
        pos += n
    return offsets, (pos + mask) & ~mask


# ----------------------------------------------------------------------------- builder

def _as_bytes_view(data: Any) -> memoryview:
    """A flat byte view of ``data`` without copying it (bytes, memoryview, numpy, CPU tensor)."""
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu":
            raise ArenaError("write_at needs a CPU tensor; copy it to the CPU first")
        if not data.is_contiguous():
            raise ArenaError("write_at needs a contiguous tensor (call .contiguous() first)")
        # uint8 reinterpretation works for every dtype, including those numpy lacks (bfloat16).
        flat = data.detach().reshape(-1)
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8)
        data = flat.numpy()
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise ArenaError("write_at needs C-contiguous data")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


def _memfd(name: str) -> int:
    # The name is only a label (visible in /proc/PID/maps and fd links), capped at 249 bytes.
    label = ("devmapd:" + name).encode("utf-8", "replace")[:240].decode("utf-8", "ignore")
    label = label.replace("\0", "?")
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        # MFD_NOEXEC_SEAL (Linux 6.3+): never executable, and required where the
        # vm.memfd_noexec sysctl is 2. Older kernels reject the flag: retry without it.
        return os.memfd_create(label, flags | MFD_NOEXEC_SEAL)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return os.memfd_create(label, flags)


class ArenaBuilder:
    """A writable memfd being filled by the daemon; ``seal`` turns it into a SealedSegment."""

    def __init__(self, name: str, nbytes: int):
        if nbytes < 0:
            raise ArenaError(f"arena size must be >= 0, got {nbytes}")
        self.name = name
        self.nbytes = nbytes
        self.fd: int = _memfd(name)
        try:
            os.ftruncate(self.fd, nbytes)
        except OSError as e:
            os.close(self.fd)
            self.fd = -1
            raise ArenaError(f"cannot size a {nbytes}-byte arena for {name}: {e.strerror}; "
                             "free memory or lower the model count") from None
        # sendfile writes at the fd's file position, which is shared by every user of this open
        # file description. Threads (parallel shard reads) each get their own description,
        # opened through /proc, so their positions never race.
        self._lock = threading.Lock()
        self._thread_fds: dict[int, int] = {}

    # -- checks
    def _check(self, offset: int, n: int) -> None:
        if self.fd < 0:
            raise ArenaError(f"arena {self.name} is already sealed or discarded")
        if offset < 0 or n < 0 or offset + n > self.nbytes:
            raise ArenaError(f"write of {n} bytes at {offset} overruns the {self.nbytes}-byte "
                             f"arena {self.name}; the layout is wrong")

    def write_at(self, offset: int, data: Any) -> None:
        mv = _as_bytes_view(data)
        n = mv.nbytes
        self._check(offset, n)
        done = 0
        while done < n:   # pwrite may write less than asked (signals, >2 GiB requests)
            w = os.pwrite(self.fd, mv[done:], offset + done)
            if w <= 0:
                raise ArenaError(f"write into arena {self.name} made no progress")
            done += w

    def _writer_fd(self) -> int:
        tid = threading.get_ident()
        with self._lock:
            fd = self._thread_fds.get(tid)
            if fd is None:
                fd = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_CLOEXEC)
                self._thread_fds[tid] = fd
            return fd

    def copy_from_file(self, offset: int, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Copy ``nbytes`` of ``src_fd`` at ``src_offset`` into the arena, in the kernel."""
        self._check(offset, nbytes)
        if nbytes == 0:
            return
        done = 0
        try:
            out = self._writer_fd()
            os.lseek(out, offset, os.SEEK_SET)
            while done < nbytes:
                # With an explicit offset sendfile does not move src_fd's position (thread-safe
                # on the source too); it writes at `out`'s position, which advances.
                sent = os.sendfile(out, src_fd, src_offset + done, nbytes - done)
                if sent == 0:
                    raise ArenaError(f"source file ended {nbytes - done} bytes early while "
                                     f"filling arena {self.name}; the file is truncated")
                done += sent
            return
        except OSError:
            pass   # e.g. EINVAL for a source sendfile cannot read; finish with pread/pwrite
        while done < nbytes:
            chunk = os.pread(src_fd, min(_COPY_CHUNK, nbytes - done), src_offset + done)
            if not chunk:
                raise ArenaError(f"source file ended {nbytes - done} bytes early while "
                                 f"filling arena {self.name}; the file is truncated")
            self.write_at(offset + done, chunk)
            done += len(chunk)

    def _close_writers(self) -> None:
        with self._lock:
            fds, self._thread_fds = list(self._thread_fds.values()), {}
        for fd in fds:
            os.close(fd)

    def seal(self) -> SealedSegment:
        if self.fd < 0:
            raise ArenaError(f"arena {self.name} is already sealed or discarded")
        # We never mmap the arena writable, so F_SEAL_WRITE cannot fail with EBUSY because of us.
        self._close_writers()
        try:
            fcntl.fcntl(self.fd, F_ADD_SEALS, ALL_SEALS)
        except OSError as e:
            raise ArenaError(f"cannot seal arena {self.name}: {e.strerror} (a writable shared "
                             "mapping of it still exists)") from None
        fd, self.fd = self.fd, -1
        return SealedSegment(fd, self.nbytes, self.name)

    def discard(self) -> None:
        self._close_writers()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ArenaBuilder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.discard()   # no-op after seal(): the SealedSegment owns the fd then


class SealedSegment:
    """An immutable memfd. Whoever holds this object owns ``fd`` and must ``close`` it."""

    def __init__(self, fd: int, nbytes: int, name: str):
        self.fd = fd
        self.nbytes = nbytes
        self.name = name

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SealedSegment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SealedSegment(name={self.name!r}, fd={self.fd}, nbytes={self.nbytes})"


def verify_sealed(fd: int) -> None:
    """Raise ArenaError unless ``fd`` is a memfd with write, shrink, grow and seal seals set."""
    try:
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError as e:
        raise ArenaError(f"fd {fd} is not a sealed memfd ({e.strerror}); refusing to map memory "
                         "that another process could still change") from None
    missing = [n for n, bit in (("WRITE", F_SEAL_WRITE), ("SHRINK", F_SEAL_SHRINK),
                                ("GROW", F_SEAL_GROW), ("SEAL", F_SEAL_SEAL)) if not seals & bit]
    if missing:
        raise ArenaError(f"memfd {fd} lacks the seal(s) {', '.join(missing)}; its contents could "
                         "still change, so it is refused. Only a devmapd daemon's arena is trusted")


# ----------------------------------------------------------------------------- attach

def _map_segment(fd: int, nbytes: int) -> torch.UntypedStorage:
    """One copy-on-write mapping of a sealed memfd, owned by the returned storage."""
    verify_sealed(fd)
    size = os.fstat(fd).st_size
    if size < nbytes:
        raise ArenaError(f"memfd {fd} holds {size} bytes but the manifest expects {nbytes}; "
                         "the manifest does not belong to this arena")
    if nbytes == 0:
        return torch.UntypedStorage(0)   # type: ignore[no-untyped-call]
    # from_file(shared=False) maps MAP_PRIVATE: reads come from the memfd's pages (zero copy),
    # a write copies the touched page privately. The storage owns the mapping and unmaps it
    # when the last tensor viewing it dies, so nothing can close it under live tensors (a bare
    # mmap + torch.frombuffer could). torch's own shared-memory path cannot open a sealed memfd.
    # /proc/self/fd/N reopens the memfd itself, not a path anyone could swap.
    try:
        return torch.UntypedStorage.from_file(   # type: ignore[return-value]
            f"/proc/self/fd/{fd}", shared=False, nbytes=nbytes)
    except RuntimeError as e:
        raise ArenaError(f"cannot map memfd {fd} ({e}); /proc must be mounted in this process "
                         "for devmapd to map its arenas") from None


def _buffer_of(base: torch.UntypedStorage) -> Any:
    """A buffer-protocol view of a CPU storage for ``torch.frombuffer``, or None.

    The view is a numpy array whose base is a tensor on ``base``: every tensor made from it
    holds the array, which holds the storage, which owns the mapping. No fd is kept open."""
    try:
        return torch.empty(0, dtype=torch.uint8).set_(base).numpy()
    except (RuntimeError, TypeError):   # torch built without numpy: the set_ path serves
        return None


def _bad_entry(i: int, row: Sequence[Any], seg_nbytes: int, itemsize: int) -> ArenaError:
    off, snb, soff, dt, shape, stride = row[1], row[2], row[3], row[4], row[5], row[6]
    try:
        outside = off < 0 or snb < 0 or off + snb > seg_nbytes
        misaligned = off % itemsize
    except TypeError:
        return ArenaError(f"tensor {i}: malformed entry {list(row)!r:.120}; the manifest is corrupt")
    if outside:
        return ArenaError(f"tensor {i}: storage [{off}, +{snb}) lies outside "
                          f"its {seg_nbytes}-byte segment; the manifest is corrupt")
    if misaligned:
        return ArenaError(f"tensor {i}: byte offset {off} is not a multiple of the "
                          f"{dt} item size {itemsize}; the manifest is corrupt")
    return ArenaError(f"tensor {i}: shape {tuple(shape)} stride {tuple(stride)} at element "
                      f"{soff} does not fit its {snb}-byte storage; the manifest is corrupt")


# torch's Python UntypedStorage.__getitem__ only adds a meta-device guard around this C slice;
# a mapped segment is never on the meta device, and skipping the wrapper saves ~1 us a tensor.
_slice = torch._C.StorageBase.__getitem__   # type: ignore[misc]

# A planned tensor that one torch.frombuffer call makes: (index, dtype, byte offset, numel,
# shape to view it as, or None for 1-D).
_Fast = tuple[int, torch.dtype, int, int, "tuple[int, ...] | None"]
# Any other: (index, dtype, byte offset, storage nbytes, storage_offset, shape, stride).
_Slow = tuple[int, torch.dtype, int, int, int, tuple[int, ...], tuple[int, ...]]


class _SegmentPlan:
    """How to build one segment's tensors (see ``_plan``)."""

    __slots__ = ("fast", "slow", "flags")

    def __init__(self) -> None:
        self.fast: list[_Fast] = []
        self.slow: list[_Slow] = []
        self.flags: list[tuple[int, bool, bool]] = []   # (index, parameter, requires_grad), rare


def _malformed(i: int, r: Any) -> ArenaError:
    return ArenaError(f"tensor {i}: malformed entry {list(r)!r:.120}; the manifest is corrupt")


def _plan(manifest: Manifest) -> list[_SegmentPlan]:
    """Per segment, how to build each of its tensors; checked once, cached on the manifest.

    A tensor takes the fast path (``torch.frombuffer``: one C call, ~1 us) when it alone uses
    its storage, starts at storage_offset 0, is C-contiguous with torch's own strides and fills
    the storage exactly: then the tensor frombuffer makes is the one torch.load makes (same
    storage nbytes, offset and strides). Anything else (tied weights, views, padding, empty
    storages) gets a storage of its own byte range and ``set_``, which torch.load also does.
    """
    cached: list[_SegmentPlan] | None = manifest._plan
    if cached is not None:
        return cached
    segments = manifest.segments
    rows = manifest._row_list()
    nseg = len(segments)
    seg_bytes = [s.nbytes for s in segments]
    plan = [_SegmentPlan() for _ in range(nseg)]
    users: dict[tuple[Any, Any, Any], int] = {}
    try:
        for r in rows:
            key = (r[0], r[1], r[2])
            users[key] = users.get(key, 0) + 1
    except TypeError:   # an unhashable value where a number belongs
        raise ArenaError("malformed manifest: a tensor entry holds a non-number where its "
                         "segment, offset or size belongs; the manifest is corrupt") from None
    dtypes: dict[Any, tuple[torch.dtype, int]] = {}
    for i, r in enumerate(rows):
        seg, off, snb, soff, dtn, shape, stride, _loc, rg, par = r
        if type(seg) is not int or not 0 <= seg < nseg:
            raise ArenaError(f"tensor {i} names segment {seg!r}, which does not exist")
        try:
            dt, itemsize = dtypes[dtn]
        except KeyError:
            dt = dtype_from_name(dtn)
            dt, itemsize = dtypes[dtn] = (dt, dt.itemsize)
        except TypeError:
            raise _malformed(i, r) from None
        if type(off) is not int or type(snb) is not int or type(soff) is not int \
                or type(shape) not in (list, tuple) or type(stride) not in (list, tuple):
            raise _malformed(i, r)
        sp = plan[seg]
        ndim = len(shape)
        if off < 0 or snb < 0 or off + snb > seg_bytes[seg] or off % itemsize \
                or len(stride) != ndim or soff < 0:
            raise _bad_entry(i, r, seg_bytes[seg], itemsize)
        try:
            # torch's own contiguous strides, computed from the last dimension; a 1-D or 2-D
            # tensor (nearly every weight) is checked without the loop.
            if ndim == 1:
                numel = shape[0]
                contiguous = stride[0] == 1
            elif ndim == 2:
                numel = shape[0] * shape[1]
                contiguous = stride[1] == 1 and stride[0] == shape[1]
            else:
                numel, contiguous = 1, True
                for n, s in zip(reversed(shape), reversed(stride)):
                    if s != numel:
                        contiguous = False
                    numel *= n
            if type(numel) is not int:
                raise TypeError
        except TypeError:
            raise _malformed(i, r) from None
        if soff == 0 and contiguous and numel > 0 and numel * itemsize == snb \
                and users[(seg, off, snb)] == 1:
            sp.fast.append((i, dt, off, numel, None if ndim == 1 else tuple(shape)))
        else:
            if snb == 0 and numel != 0:
                # an empty storage is resizable: set_ would grow it instead of refusing
                raise _bad_entry(i, r, seg_bytes[seg], itemsize)
            sp.slow.append((i, dt, off, snb, soff, tuple(shape), tuple(stride)))
        if par or rg:
            sp.flags.append((i, bool(par), bool(rg)))
    object.__setattr__(manifest, "_plan", plan)
    return plan


def _make(sp: _SegmentPlan, buf: Any, storage_at: Callable[[int, int], torch.UntypedStorage],
          seg_nbytes: int, out: list[torch.Tensor | None]) -> None:
    """Build the tensors of one segment plan into ``out``: the fast ones with torch.frombuffer
    on ``buf`` (a CPU segment's buffer, or None: then they too take the set_ path), the others
    on ``storage_at(offset, nbytes)``."""
    fast = sp.fast
    if buf is not None:
        fb = torch.frombuffer
        try:
            for i, dt, off, numel, shape in fast:
                t = fb(buf, dtype=dt, count=numel, offset=off)
                out[i] = t if shape is None else t.view(shape)
        except (RuntimeError, TypeError, ValueError):
            raise ArenaError(f"tensor {i}: shape {shape} at byte {off} does not fit its segment; "
                             "the manifest is corrupt") from None
        slow: list[Any] = sp.slow
    else:
        slow = [(i, dt, off, numel * dt.itemsize, 0, (numel,) if shape is None else shape,
                 _contiguous_stride((numel,) if shape is None else shape))
                for i, dt, off, numel, shape in fast] + sp.slow
    storages: dict[tuple[int, int], torch.UntypedStorage] = {}
    templates: dict[torch.dtype, torch.Tensor] = {}
    for i, dt, off, snb, soff, shape, stride in slow:
        try:
            key = (off, snb)
            st = storages.get(key)
            if st is None:
                st = storages[key] = storage_at(off, snb)
            tmpl = templates.get(dt)
            if tmpl is None:
                tmpl = templates[dt] = torch.empty(0, dtype=dt, device=st.device)
            # set_ checks shape/stride/storage_offset against the storage, which cannot be
            # resized (a slice of a mapping), so an overrun raises instead of allocating.
            out[i] = tmpl.new_empty(0).set_(st, soff, shape, stride)
        except (RuntimeError, TypeError, ValueError):
            raise _bad_entry(i, (None, off, snb, soff, dt, shape, stride), seg_nbytes,
                             dt.itemsize) from None
    param = torch.nn.Parameter
    for i, par, rg in sp.flags:
        made = out[i]
        assert made is not None
        if par:
            out[i] = param(made, requires_grad=rg)
        elif rg:
            made.requires_grad_(True)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    acc, out = 1, []
    for n in reversed(shape):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


def tensors_on_storage(base: torch.UntypedStorage, manifest: Manifest, segment_index: int,
                       out: list[torch.Tensor | None]) -> None:
    """Build every tensor of ``segment_index`` as a view of ``base`` (the whole segment), in place.

    Each manifest STORAGE becomes its own storage over ``base``'s memory (no copy) that keeps
    ``base``'s allocation alive, so the mapping lives as long as any tensor on it (tested: drop
    base and manifest, gc, read). Per-storage storages rather than one for the whole segment
    make attached tensors behave like torch.load's: tied weights share one storage object,
    ``untyped_storage().nbytes()`` and ``storage_offset()`` match the file, and
    ``torch.save(t)`` writes that storage, not the whole multi-GB segment.
    """
    seg_nbytes = manifest.segments[segment_index].nbytes
    if seg_nbytes and not base.nbytes() >= seg_nbytes:
        raise ArenaError(f"segment {segment_index} buffer holds {base.nbytes()} bytes, "
                         f"manifest expects {seg_nbytes}")
    sp = _plan(manifest)[segment_index]
    buf = _buffer_of(base) if base.device.type == "cpu" and seg_nbytes else None
    if buf is not None:
        fb = torch.frombuffer

        def storage_at(off: int, nbytes: int) -> torch.UntypedStorage:
            if nbytes == 0:
                empty: torch.UntypedStorage = _slice(base, slice(off, off))
                return empty
            st: torch.UntypedStorage = fb(buf, dtype=torch.uint8, count=nbytes,
                                          offset=off).untyped_storage()
            return st
        _make(sp, buf, storage_at, seg_nbytes, out)
    else:
        _make(sp, None, lambda off, nbytes: _slice(base, slice(off, off + nbytes)), seg_nbytes, out)


def attach(manifest: Manifest, fds: Sequence[int | None]) -> list[torch.Tensor]:
    """Client side: map each segment (memfd: copy-on-write; cuda-ipc: imported) and build tensors.

    ``fds[i]`` is segment i's sealed memfd; for a cuda-ipc segment it is None, or the memfd of
    its host copy, which is used (with a RuntimeWarning) when the CUDA import is impossible
    here (no GPU visible, other container, driver refuses). Without it that raises
    SegmentImportError (cuda_share.CudaShareError). The caller keeps ownership of ``fds``: closing them afterwards
    is fine, the mappings stay.
    """
    if len(fds) != len(manifest.segments):
        raise ArenaError(f"got {len(fds)} fds for {len(manifest.segments)} segments")
    _plan(manifest)   # checks every entry before anything is mapped
    out: list[torch.Tensor | None] = [None] * len(manifest._row_list())
    with gc_paused():
        for si, seg in enumerate(manifest.segments):
            if seg.kind == "memfd":
                fd = fds[si]
                if fd is None:
                    raise ArenaError(f"segment {si} ({seg.device}) is a memfd but no fd came "
                                     "with it; the daemon reply is incomplete")
                tensors_on_storage(_map_segment(fd, seg.nbytes), manifest, si, out)
            else:
                importer = _IMPORTERS.get(seg.kind)
                if importer is None:
                    raise ArenaError(f"segment {si} ({seg.device}) is a {seg.kind!r} segment and "
                                     "nothing in this process can map it; upgrade the client, or "
                                     "import devmapd.gpu for GPU segments")
                try:
                    importer(manifest, si, out)
                except SegmentImportError as e:
                    # A GPU segment may come with its host copy's memfd: use it then.
                    host_fd = fds[si]
                    if host_fd is None:
                        raise
                    warnings.warn(f"{e}; {seg.device} tensors are served from the CPU copy",
                                  RuntimeWarning, stacklevel=2)
                    tensors_on_storage(_map_segment(host_fd, seg.nbytes), manifest, si, out)
    return out  # type: ignore[return-value]  # every slot is filled: each entry names a segment


def build(manifest: Manifest, fds: Sequence[int | None], map_location: Any = None) -> Any:
    """Attach and rebuild the checkpoint object (what torch.load would return).

    ``map_location`` (any of torch's four forms, see mapping.py) moves a tensor only when it
    names a device other than the one its segment sits on.
    """
    tensors = attach(manifest, fds)
    if map_location is not None:
        from devmapd.engine import mapping
        rows = manifest._row_list()
        tensors = mapping.apply_tensors(
            tensors, [str(r[7]) for r in rows], map_location,
            current_devices=[_segment_device(manifest.segments[r[0]], t)
                             for r, t in zip(rows, tensors)])
    flat = manifest._flat
    if flat is None:   # worked out once per manifest: a repeat fetch rebuilds the dict in C
        flat = tree.flat_plan(manifest.tree, len(tensors)) or False
        object.__setattr__(manifest, "_flat", flat)
    if flat:
        cls, keys, idxs = flat
        return cls(zip(keys, map(tensors.__getitem__, idxs)))
    with gc_paused():
        return tree.decode(manifest.tree, tensors)


def _segment_device(seg: SegmentInfo, t: torch.Tensor) -> str:
    # A cuda-ipc segment's tensors really sit on the importing process's local index, which
    # may differ from the daemon's label; a memfd's label may name a simulated GPU.
    return str(t.device) if seg.kind == "cuda-ipc" else seg.device
