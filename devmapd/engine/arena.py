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
from dataclasses import dataclass
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
SegmentImporter = Callable[["Manifest", int, list], None]
_IMPORTERS: dict[str, SegmentImporter] = {}


def register_importer(kind: str, importer: SegmentImporter) -> None:
    """Let ``attach`` map segments of ``kind``: ``importer(manifest, index, out)`` fills ``out``
    with the tensors of segment ``index`` or raises SegmentImportError."""
    _IMPORTERS[kind] = importer



# ----------------------------------------------------------------------------- dtypes

def dtype_name(dt: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (INTERNALS.md naming)."""
    return str(dt).removeprefix("torch.")


_DTYPES: dict[str, torch.dtype] = {
    dtype_name(v): v for v in vars(torch).values() if isinstance(v, torch.dtype)
}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise ArenaError(f"manifest names an unknown dtype {name!r}; the daemon and client "
                         "torch versions probably differ, upgrade the older one") from None


# ----------------------------------------------------------------------------- manifest

@dataclass(frozen=True)
class SegmentInfo:
    kind: str                   # "memfd" | "cuda-ipc"
    device: str                 # placement label: "cpu", "cuda:1" (a simulated GPU's segment is a memfd)
    nbytes: int
    device_uuid: str | None = None
    ipc: dict | None = None     # cuda-ipc only: JSON-able handle from cuda_share (GpuSegment.export)


@dataclass(frozen=True)
class TensorEntry:
    segment: int
    offset: int                 # byte offset of the STORAGE start in the segment (ALIGN-aligned)
    storage_nbytes: int
    storage_offset: int         # in elements, as torch
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    saved_location: str         # the location tag in the file: "cpu", "cuda:3"
    requires_grad: bool = False
    parameter: bool = False


# Tensor entries travel as rows, not objects: a 4,000-tensor manifest is ~2.5x smaller and
# parses ~2x faster that way. The header names the columns so the JSON stays self-describing.
_TENSOR_FIELDS = ("segment", "offset", "storage_nbytes", "storage_offset", "dtype", "shape",
                  "stride", "saved_location", "requires_grad", "parameter")


@dataclass(frozen=True)
class Manifest:
    tensors: tuple[TensorEntry, ...]
    segments: tuple[SegmentInfo, ...]
    tree: Any                   # tree.encode output; tensor leaves index `tensors`
    version: int = 1

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "segments": [
                {"kind": s.kind, "device": s.device, "nbytes": s.nbytes,
                 "device_uuid": s.device_uuid, "ipc": s.ipc}
                for s in self.segments
            ],
            "tensor_fields": list(_TENSOR_FIELDS),
            "tensors": [
                [t.segment, t.offset, t.storage_nbytes, t.storage_offset, t.dtype, list(t.shape),
                 list(t.stride), t.saved_location, t.requires_grad, t.parameter]
                for t in self.tensors
            ],
            "tree": self.tree,
        }

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        try:
            version = d.get("version")
            if version != 1:
                raise ArenaError(f"manifest version {version!r} is not supported (this client "
                                 "reads version 1); upgrade devmapd on the older side")
            if tuple(d["tensor_fields"]) != _TENSOR_FIELDS:
                raise ArenaError("manifest tensor fields differ from this client's; "
                                 "upgrade devmapd on the older side")
            segments = tuple(
                SegmentInfo(kind=str(s["kind"]), device=str(s["device"]), nbytes=int(s["nbytes"]),
                            device_uuid=s.get("device_uuid"), ipc=s.get("ipc"))
                for s in d["segments"]
            )
            new = TensorEntry.__new__
            setattr_ = object.__setattr__
            tensors = []
            # Bypass the frozen dataclass __init__ (it goes through object.__setattr__ per field
            # anyway); this keeps decoding 4,000 entries to a couple of milliseconds.
            for row in d["tensors"]:
                seg, off, snb, soff, dt, shape, stride, loc, rg, par = row
                e = new(TensorEntry)
                setattr_(e, "__dict__", {
                    "segment": int(seg), "offset": int(off), "storage_nbytes": int(snb),
                    "storage_offset": int(soff), "dtype": str(dt), "shape": tuple(shape),
                    "stride": tuple(stride), "saved_location": str(loc),
                    "requires_grad": bool(rg), "parameter": bool(par)})
                tensors.append(e)
            return cls(tensors=tuple(tensors), segments=segments, tree=d["tree"], version=1)
        except ArenaError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArenaError(f"malformed manifest ({type(e).__name__}: {e}); the daemon sent "
                             "something this client cannot read, check both versions") from None


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
        return torch.UntypedStorage(0)
    # from_file(shared=False) maps MAP_PRIVATE: reads come from the memfd's pages (zero copy),
    # a write copies the touched page privately. The storage owns the mapping and unmaps it
    # when the last tensor viewing it dies, so nothing can close it under live tensors (a bare
    # mmap + torch.frombuffer could). torch's own shared-memory path cannot open a sealed memfd.
    # /proc/self/fd/N reopens the memfd itself, not a path anyone could swap.
    try:
        return torch.UntypedStorage.from_file(f"/proc/self/fd/{fd}", shared=False, nbytes=nbytes)
    except RuntimeError as e:
        raise ArenaError(f"cannot map memfd {fd} ({e}); /proc must be mounted in this process "
                         "for devmapd to map its arenas") from None


def _bad_entry(i: int, e: TensorEntry, seg_nbytes: int, itemsize: int) -> ArenaError:
    if e.offset < 0 or e.storage_nbytes < 0 or e.offset + e.storage_nbytes > seg_nbytes:
        return ArenaError(f"tensor {i}: storage [{e.offset}, +{e.storage_nbytes}) lies outside "
                          f"its {seg_nbytes}-byte segment; the manifest is corrupt")
    if e.offset % itemsize:
        return ArenaError(f"tensor {i}: byte offset {e.offset} is not a multiple of the "
                          f"{e.dtype} item size {itemsize}; the manifest is corrupt")
    return ArenaError(f"tensor {i}: shape {e.shape} stride {e.stride} at element "
                      f"{e.storage_offset} does not fit its {e.storage_nbytes}-byte storage; "
                      "the manifest is corrupt")


# torch's Python UntypedStorage.__getitem__ only adds a meta-device guard around this C slice;
# a mapped segment is never on the meta device, and skipping the wrapper saves ~1 us a tensor.
_slice = torch._C.StorageBase.__getitem__


def tensors_on_storage(base: torch.UntypedStorage, manifest: Manifest, segment_index: int,
                       out: list[torch.Tensor | None]) -> None:
    """Build every tensor of ``segment_index`` as a view of ``base`` (the whole segment), in place.

    Each manifest STORAGE becomes one slice ``base[offset:offset+nbytes]``. A slice is a new
    storage whose memory *is* the base's (no copy) and which holds a reference to the base's
    allocation, so the mapping lives as long as any tensor on any slice (tested: drop base and
    manifest, gc, read). Per-storage slices rather than one storage for the whole segment make
    attached tensors behave like torch.load's: tied weights share one storage object,
    ``untyped_storage().nbytes()`` and ``storage_offset()`` match the file, and
    ``torch.save(t)`` writes that storage, not the whole multi-GB segment.
    """
    seg_nbytes = manifest.segments[segment_index].nbytes
    storages: dict[tuple[int, int], torch.UntypedStorage] = {}
    dtypes: dict[str, torch.dtype] = {}
    templates: dict[torch.dtype, torch.Tensor] = {}   # new_empty on one is ~15% cheaper than torch.empty
    empty = torch.empty
    param = torch.nn.Parameter
    dev = base.device
    if seg_nbytes and not base.nbytes() >= seg_nbytes:
        raise ArenaError(f"segment {segment_index} buffer holds {base.nbytes()} bytes, "
                         f"manifest expects {seg_nbytes}")
    for i, e in enumerate(manifest.tensors):
        if e.segment != segment_index:
            continue
        dt = dtypes.get(e.dtype)
        if dt is None:
            dt = dtypes[e.dtype] = dtype_from_name(e.dtype)
            templates[dt] = empty(0, dtype=dt, device=dev)
        off, snb = e.offset, e.storage_nbytes
        # Bounds here because storage slicing clamps silently; shape/stride/storage_offset
        # against the storage size is checked by set_ itself (slices of a mapping cannot be
        # resized, so an overrun raises instead of allocating). Empty segments have a
        # resizable storage, hence their explicit numel check.
        if off < 0 or snb < 0 or off + snb > seg_nbytes or off % dt.itemsize \
                or (seg_nbytes == 0 and all(e.shape)):
            raise _bad_entry(i, e, seg_nbytes, dt.itemsize)
        key = (off, snb)
        st = storages.get(key)
        if st is None:
            st = storages[key] = _slice(base, slice(off, off + snb))
        try:
            t = templates[dt].new_empty(0).set_(st, e.storage_offset, e.shape, e.stride)
        except (RuntimeError, TypeError, ValueError):
            raise _bad_entry(i, e, seg_nbytes, dt.itemsize) from None
        if e.parameter:
            t = param(t, requires_grad=e.requires_grad)
        elif e.requires_grad:
            t.requires_grad_(True)
        out[i] = t


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
    for i, e in enumerate(manifest.tensors):
        if not 0 <= e.segment < len(manifest.segments):
            raise ArenaError(f"tensor {i} names segment {e.segment}, which does not exist")
    out: list[torch.Tensor | None] = [None] * len(manifest.tensors)
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
                    if fds[si] is None:
                        raise
                    warnings.warn(f"{e}; {seg.device} tensors are served from the CPU copy",
                                  RuntimeWarning, stacklevel=2)
                    tensors_on_storage(_map_segment(fds[si], seg.nbytes), manifest, si, out)
    return out  # type: ignore[return-value]  # every slot is filled: each entry names a segment


def build(manifest: Manifest, fds: Sequence[int | None], map_location: Any = None) -> Any:
    """Attach and rebuild the checkpoint object (what torch.load would return).

    ``map_location`` (any of torch's four forms, see mapping.py) moves a tensor only when it
    names a device other than the one its segment sits on.
    """
    tensors = attach(manifest, fds)
    if map_location is not None:
        from devmapd.engine import mapping
        tensors = mapping.apply_tensors(
            tensors, [e.saved_location for e in manifest.tensors], map_location,
            current_devices=[_segment_device(manifest.segments[e.segment], t)
                             for e, t in zip(manifest.tensors, tensors)])
    with gc_paused():
        return tree.decode(manifest.tree, tensors)


def _segment_device(seg: SegmentInfo, t: torch.Tensor) -> str:
    # A cuda-ipc segment's tensors really sit on the importing process's local index, which
    # may differ from the daemon's label; a memfd's label may name a simulated GPU.
    return str(t.device) if seg.kind == "cuda-ipc" else seg.device
