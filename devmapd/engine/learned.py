"""One parse per checkpoint: what inspecting a file learned is what reading it uses.

``checkpoint.inspect`` then ``checkpoint.read`` unpickle every file twice (the daemon inspects
to decide where a model goes, then reads it there). ``learn(source, options)`` parses the file
ONCE and keeps, beside the Inspection, everything the read needs that does not depend on the
tensor bytes: each storage's file, byte offset, size, dtype and saved location; each tensor's
storage, view (offset, shape, stride) and flags; the encoded structure (tree.encode). That
record, a :class:`Learned`, is plain data: ``read_learned`` fills an arena from it without
unpickling anything, and ``devmapd.engine.inspection_codec`` stores it as JSON, so a daemon that
restarts does not parse an unchanged file at all.

A Learned is only valid for the exact files it was learned from: each file's identity (device,
inode, size, mtime_ns, ctime_ns) at the moment it was opened is kept, and ``read_learned``
opens the files again and compares. Any difference, and the file is parsed afresh (the read
then serves what is on disk now, as ``checkpoint.read`` would). A file that changes while it is
copied is ``changed_during_read``, as in ``checkpoint.read``.

Arena layout: a placement's storages on one device may be spread over several memfds, each
filled by its own thread (one shmem file serialises its writers: two memfds filled by two
threads run ~1.8x one). A storage is never split across memfds; the manifest already points
each tensor into its segment, so clients need nothing new.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from devmapd.engine import arena, checkpoint, diagnose, normalize, tree
from devmapd.engine.checkpoint import CheckpointError, Inspection, LoadedModel, ReadOptions
from devmapd.engine.formats import hfdir
from devmapd.engine.formats.common import OpenedFile, element_size, open_file
from devmapd.engine.gcpause import gc_paused

__all__ = ["FileId", "StorageSpec", "TensorSpec", "Learned", "learn", "read_learned", "options_key",
           "default_threads", "SPLIT_MIN_BYTES"]

# A device's bytes are spread over several memfds only when each gets at least this much:
# below it the extra fds (and, for a real GPU, extra uploads) cost more than the parallel fill
# wins, and the thousands of small models of a lab directory keep one segment each.
SPLIT_MIN_BYTES = 64 << 20
# A model smaller than this reads in milliseconds: its progress is reported once, at the end
# (each report becomes a status event; 1,000 small models x 8 storages was 8,000 events).
PROGRESS_MIN_BYTES = 16 << 20
_CAST_CHUNK = 32 << 20
_DEFAULT_OPTIONS = ReadOptions()


def default_threads() -> int:
    """Copy threads for one model: the cores this process may use, at least 2, at most 8.

    The copies run in the kernel (sendfile releases the GIL), so the event loop thread keeps
    running beside them; past ~8 writers the page allocator, not the thread count, is the limit.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 2
    return max(2, min(8, cores))


# ----------------------------------------------------------------------------- records

@dataclass(frozen=True)
class FileId:
    """A weight file as it was opened: the name users know, where it really is, its identity."""
    path: str        # display name (inside the model directory)
    real: str        # the resolved file the kernel opened
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    def identity(self) -> tuple[int, int, int, int, int]:
        return (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns)

    @staticmethod
    def of(f: OpenedFile, real: str) -> FileId:
        st = f.before
        return FileId(f.path, real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stat_identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class StorageSpec:
    """One storage: where its bytes are, what they are, and the first tensor (file order) on it."""
    file: int            # index into Learned.files
    offset: int          # byte offset of the data in that file
    nbytes: int
    dtype: str           # the dtype its tensors view it as
    location: str        # saved location tag ("cpu", "cuda:3")
    first_path: str      # key path of its first tensor (placement is decided by it)
    first_key: str       # that tensor's container-relative key (module groups)


@dataclass(frozen=True)
class TensorSpec:
    storage: int         # index into Learned.storages
    storage_offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool
    parameter: bool


@dataclass(frozen=True)
class Learned:
    """What one parse of a checkpoint learned; ``inspection.diagnosis`` set means it failed."""
    path: str
    inspection: Inspection
    key: tuple[Any, ...]                 # options_key() of the options it was learned under
    files: tuple[FileId, ...] = ()
    storages: tuple[StorageSpec, ...] = ()
    tensors: tuple[TensorSpec, ...] = ()
    tree: Any = None
    fingerprint: tuple[Any, ...] = ()    # names.fingerprint form, for LoadedModel
    opened_ns: int = 0                   # wall clock just before the files were opened

    @property
    def ok(self) -> bool:
        return self.inspection.diagnosis is None


# Options that only change the read (casts, memory, threads); every other option may change
# what a parse learns or whether it succeeds (prefixes, caps, globals, root), so it is in the key.
_READ_ONLY_OPTIONS = frozenset({"cpu_upcast_half", "gpu_dtype", "memory_limit", "threads"})


def options_key(options: ReadOptions) -> tuple[Any, ...]:
    """``((name, value), ...)`` of the options that change what a parse learns."""
    out = []
    for f in dataclasses.fields(options):
        if f.name in _READ_ONLY_OPTIONS:
            continue
        v = getattr(options, f.name)
        out.append((f.name, tuple(v) if isinstance(v, (list, tuple)) else v))
    return tuple(out)


# ----------------------------------------------------------------------------- learning

def _real_of(f: OpenedFile) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{f.fd}")
    except OSError:
        return os.path.realpath(f.path)


def learn(source: Any, options: ReadOptions = _DEFAULT_OPTIONS) -> Learned:
    """Parse ``source`` (a file, an HF directory, a ModelSource) once; never raises for a bad file."""
    path = checkpoint._source_path(source)
    key = options_key(options)
    guess = checkpoint._Guess()
    opened: list[OpenedFile] = []
    opened_ns = time.time_ns()
    try:
        with checkpoint._allowed(options.allowed_globals):
            with gc_paused():
                parsed = checkpoint._open_and_parse(path, options, True, guess, opened)
                walked = normalize.walk(parsed.obj, options.strip_prefixes, path_hint=path,
                                        max_nodes=max(1000, 20 * options.max_tensors))
            if len(walked.tensors) > options.max_tensors:
                raise diagnose.too_large(path, f"{len(walked.tensors)} tensors",
                                         f"{options.max_tensors} (checkpoint.max_tensors)")
            storages = checkpoint._storages(path, parsed, walked)
            tensor_idx = {id(ref.tensor): i for i, ref in enumerate(walked.tensors)}
            try:
                encoded = tree.encode(walked.obj, lambda t: tensor_idx[id(t)])
            except tree.TreeError as e:
                raise diagnose.unsupported(path, f"a checkpoint holding objects devmapd cannot serve ({e})",
                                           "re-save only tensors in plain dicts, lists and tuples",
                                           f"TreeError: {e}") from None
            files = tuple(FileId.of(f, _real_of(f)) for f in opened)
            specs: list[StorageSpec] = []
            tensors: list[TensorSpec | None] = [None] * len(walked.tensors)
            for si, s in enumerate(storages):
                rec = s.rec
                if rec.offset is None:
                    raise diagnose.corrupt(path, f"storage {rec.key} has no data in the file")
                specs.append(StorageSpec(file=rec.file, offset=int(rec.offset), nbytes=int(rec.nbytes),
                                         dtype=arena.dtype_name(rec.dtype), location=rec.location,
                                         first_path=s.first.path, first_key=s.first.key))
                for ti in s.tensors:
                    t = walked.tensors[ti].tensor
                    tensors[ti] = TensorSpec(storage=si, storage_offset=int(t.storage_offset()),
                                             shape=tuple(int(x) for x in t.shape),
                                             stride=tuple(int(x) for x in t.stride()),
                                             requires_grad=bool(t.requires_grad),
                                             parameter=isinstance(t, torch.nn.Parameter))
            containers: list[str] = []
            for ref in walked.tensors:
                if ref.container not in containers:
                    containers.append(ref.container)
            insp = inspection_of(path, parsed.format, specs, len(walked.tensors), tuple(walked.prefixes),
                                 tuple(containers), tuple(f.path for f in files))
            fingerprint = checkpoint._fingerprint(path, parsed)
            for f in opened:
                if not f.unchanged():
                    raise diagnose.changed_during_read(f.path)
        done = [t for t in tensors if t is not None]
        if len(done) != len(tensors):   # every tensor sits on a storage (_storages checked it)
            raise diagnose.corrupt(path, "a tensor without a storage")
        return Learned(path=path, inspection=insp, key=key, files=files, storages=tuple(specs),
                       tensors=tuple(done), tree=encoded, fingerprint=fingerprint, opened_ns=opened_ns)
    except CheckpointError as e:
        return Learned(path, Inspection.failed(path, guess.format, e.diagnosis, tuple(f.path for f in opened)), key)
    except Exception as e:   # never raise for a bad file: say what happened instead
        diag = checkpoint.diagnose_exception(e, path)
        return Learned(path, Inspection.failed(path, guess.format, diag, tuple(f.path for f in opened)), key)
    finally:
        for f in opened:
            f.close()


def inspection_of(path: str, fmt: str, storages: Sequence[StorageSpec], n_tensors: int,
                  prefixes: tuple[str, ...], containers: tuple[str, ...], files: tuple[str, ...]) -> Inspection:
    """The Inspection a parse reports, computed from the storages alone (as checkpoint does)."""
    dtypes: dict[str, int] = {}
    locations: dict[str, int] = {}
    groups: dict[str, int] = {}
    total = largest = 0
    for s in storages:
        n = s.nbytes
        total += n
        largest = max(largest, n)
        dtypes[s.dtype] = dtypes.get(s.dtype, 0) + n
        locations[s.location] = locations.get(s.location, 0) + n
        g = normalize.group_of(s.first_key)
        groups[g] = groups.get(g, 0) + n
    return Inspection(path=path, format=fmt, tensors=n_tensors, bytes=total, dtypes=dtypes,
                      locations=locations, prefixes=prefixes, containers=containers,
                      groups=tuple(groups.items()), largest_tensor=largest, files=files, diagnosis=None)


# ----------------------------------------------------------------------------- reading

@dataclass
class _Slot:
    storage: int
    device: str
    out_dtype: torch.dtype
    out_nbytes: int
    segment: int = 0
    offset: int = 0


def _split(sizes: list[int], parts: int) -> list[list[int]]:
    """Cut the storage indices (in order) into at most ``parts`` runs of about equal bytes."""
    total = sum(sizes)
    if parts <= 1 or total == 0:
        return [list(range(len(sizes)))]
    runs: list[list[int]] = [[]]
    acc = 0
    for i, n in enumerate(sizes):
        if runs[-1] and acc >= total * len(runs) / parts and len(runs) < parts:
            runs.append([])
        runs[-1].append(i)
        acc += n
    return runs


def _open_learned(learned: Learned, options: ReadOptions) -> list[OpenedFile] | None:
    """Open the learned files again; None if any is not the file that was learned."""
    opened: list[OpenedFile] = []
    try:
        if learned.inspection.format == "hf-dir":
            real_dir = os.path.realpath(learned.path)
            names = [os.path.realpath(n) for n in hfdir.weight_files(
                real_dir, root=options.root, max_index_bytes=options.max_side_file_bytes)]
            if names != [f.real for f in learned.files]:
                return None   # the directory now names other weight files (an index changed)
        for fid in learned.files:
            f = open_file(fid.real, fid.path)
            opened.append(f)
            if stat_identity(f.before) != fid.identity():
                raise _Stale
            checkpoint._check_inside(f, options.root)
        return opened
    except _Stale:
        for f in opened:
            f.close()
        return None
    except BaseException:
        for f in opened:
            f.close()
        raise


class _Stale(Exception):
    pass


def read_learned(learned: Learned, options: ReadOptions = _DEFAULT_OPTIONS, *,
                 device_of: Callable[[str], str] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 split_min_bytes: int = SPLIT_MIN_BYTES, threads: int | None = None,
                 source: Any = None) -> LoadedModel:
    """Fill sealed arena segments from what ``learned`` says, without parsing. Raises CheckpointError.

    Same contract as ``checkpoint.read`` (``device_of``, ``progress``, the options' caps and
    casts). ``threads`` (default: ``default_threads()``) memfds per device are filled in
    parallel when each would get at least ``split_min_bytes``. If a file is no longer the one
    learned, or ``learned`` was made under other options, ``source`` (default ``learned.path``)
    is parsed afresh first.
    """
    t0 = time.monotonic()
    if options.gpu_dtype not in (None, *normalize.GPU_DTYPES):
        raise ValueError(f"ReadOptions.gpu_dtype must be None, 'float16' or 'bfloat16', not {options.gpu_dtype!r}")
    threads = default_threads() if threads is None else max(1, threads)
    opened: list[OpenedFile] | None = None
    if learned.ok and learned.key == options_key(options):
        opened = _open_learned(learned, options)
    if opened is None:   # changed since it was learned (or never learned right): parse it now
        learned = learn(source if source is not None else learned.path, options)
        if learned.ok:
            opened = _open_learned(learned, options)
        if opened is None:
            diag = learned.inspection.diagnosis
            if diag is not None:
                raise CheckpointError(diag)
            raise diagnose.changed_during_read(learned.path)
    path = learned.path
    builders: list[arena.ArenaBuilder] = []
    sealed: list[arena.SealedSegment] = []
    try:
        slots: list[_Slot] = []
        devices: list[str] = []
        for si, s in enumerate(learned.storages):
            dev = device_of(s.first_path) if device_of else "cpu"
            if dev not in devices:
                devices.append(dev)
            dt = arena.dtype_from_name(s.dtype)
            out = normalize.target_dtype(dt, dev, cpu_upcast_half=options.cpu_upcast_half,
                                         gpu_dtype=options.gpu_dtype)
            slots.append(_Slot(si, dev, out, s.nbytes // element_size(dt) * element_size(out)))
        # Segments: per device, consecutive storages (file order) cut into runs of similar size.
        seg_devices: list[str] = []
        seg_sizes: list[int] = []
        for dev in devices:
            mine = [p for p in slots if p.device == dev]
            total = sum(p.out_nbytes for p in mine)
            parts = max(1, min(threads, total // max(1, split_min_bytes)))
            for run in _split([p.out_nbytes for p in mine], parts):
                members = [mine[i] for i in run]
                offsets, size = arena.layout([p.out_nbytes for p in members])
                for p, off in zip(members, offsets):
                    p.segment, p.offset = len(seg_devices), off
                seg_devices.append(dev)
                seg_sizes.append(size)
        checkpoint._check_memory(path, sum(seg_sizes), options.memory_limit)   # before any allocation
        name = os.path.basename(os.path.normpath(path)) or "model"
        for i, dev in enumerate(seg_devices):
            label = f"{name}@{dev}" if seg_devices.count(dev) == 1 else f"{name}@{dev}#{i}"
            builders.append(arena.ArenaBuilder(label, seg_sizes[i]))
        _fill(learned, opened, slots, builders, threads, progress)
        for f in opened:
            if not f.unchanged():
                raise diagnose.changed_during_read(f.path)
        for b in builders:
            sealed.append(b.seal())
        entries = []
        for t in learned.tensors:
            p = slots[t.storage]
            entries.append(arena.TensorEntry(
                segment=p.segment, offset=p.offset, storage_nbytes=p.out_nbytes, storage_offset=t.storage_offset,
                dtype=arena.dtype_name(p.out_dtype), shape=t.shape, stride=t.stride,
                saved_location=learned.storages[t.storage].location, requires_grad=t.requires_grad,
                parameter=t.parameter))
        manifest = arena.Manifest(
            tensors=tuple(entries),
            segments=tuple(arena.SegmentInfo(kind="memfd", device=d, nbytes=seg_sizes[i])
                           for i, d in enumerate(seg_devices)),
            tree=learned.tree)
        return LoadedModel(manifest, list(sealed), learned.inspection, time.monotonic() - t0,
                           learned.fingerprint)
    except BaseException as e:
        checkpoint.abandon(builders, sealed)
        if not isinstance(e, Exception):
            raise
        raise checkpoint.read_failure(e, path, opened) from None
    finally:
        for f in opened:
            f.close()


def _fill(learned: Learned, opened: list[OpenedFile], slots: list[_Slot], builders: list[arena.ArenaBuilder],
          threads: int, progress: Callable[[int, int], None] | None) -> None:
    """Copy every storage into its segment: one thread per segment, each in file order."""
    total = sum(s.nbytes for s in learned.storages)
    done = [0]
    lock = threading.Lock()
    per_segment: dict[int, list[_Slot]] = {}
    for p in slots:
        per_segment.setdefault(p.segment, []).append(p)

    if progress is not None and total < PROGRESS_MIN_BYTES:
        _fill(learned, opened, slots, builders, threads, None)
        progress(total, total)
        return

    def fill(seg: int) -> None:
        b = builders[seg]
        for p in sorted(per_segment.get(seg, ()), key=lambda p: (learned.storages[p.storage].file,
                                                                  learned.storages[p.storage].offset)):
            spec = learned.storages[p.storage]
            _copy(spec, p, opened[spec.file], b)
            if progress is not None:
                with lock:
                    done[0] += spec.nbytes
                    progress(done[0], total)

    segs = [i for i in range(len(builders)) if i in per_segment]
    if len(segs) > 1 and threads > 1:
        with ThreadPoolExecutor(min(threads, len(segs)), thread_name_prefix="devmapd-fill") as ex:
            for fut in [ex.submit(fill, i) for i in segs]:
                fut.result()
    else:
        for i in segs:
            fill(i)


def _copy(spec: StorageSpec, p: _Slot, f: OpenedFile, builder: arena.ArenaBuilder) -> None:
    src_dtype = arena.dtype_from_name(spec.dtype)
    if p.out_dtype == src_dtype:
        builder.copy_from_file(p.offset, f.fd, spec.offset, spec.nbytes)   # kernel copy, no Python bytes
        return
    # Slow path, only when normalisation casts: read a bounded chunk, convert, write.
    in_size, out_size = element_size(src_dtype), element_size(p.out_dtype)
    step = max(in_size, _CAST_CHUNK // in_size * in_size)
    done = 0
    while done < spec.nbytes:
        n = min(step, spec.nbytes - done)
        data = os.pread(f.fd, n, spec.offset + done)
        if len(data) != n:
            raise diagnose.truncated(f.path, "the file ended while reading a tensor")
        src = torch.frombuffer(bytearray(data), dtype=src_dtype)
        builder.write_at(p.offset + done // in_size * out_size, src.to(p.out_dtype))
        done += n
