"""The checkpoint engine's public face: inspect a checkpoint without its data, read it once into an arena.

``inspect(path)`` reports what a file or Hugging Face directory holds (format, tensors, bytes per
dtype and per saved location, prefixes, containers, module groups) from headers and pickles only,
and never raises for a bad file: the Inspection carries a Diagnosis instead.

``read(source)`` opens each file ONCE through the one safe opener
(``formats.common.open_in_model_dir``: link resolved once and kept inside ``root``, regular
files only, never a FIFO or a device), parses its structure into meta tensors with
torch's weights-only unpickler, checks sizes against the caps and free memory BEFORE allocating,
then copies every storage straight from the file into a sealed memfd arena (sendfile, no Python
copy; casting is the only slow path). Each file is fstat'ed before and after: a file changed
underneath is a ``changed_during_read`` error, never a mixed model.

The non-tensor part (the object tree) is bounded by what it EXPANDS to, not by what the file
holds: pickle memoises shared objects, so a 2 KB file can hold 4 million lists. Before anything
walks or copies the tree, ``tree.measure`` counts its objects and bytes with every shared
reference counted each time it is reached, and refuses (``too_large``) past
``max(tree_min_nodes, tree_expansion x S)`` objects or ``max(tree_min_bytes, tree_expansion x
S)`` bytes, S being the bytes of the file(s) that are not tensor data (the pickle or header
itself: a big tensor cannot buy a big allowance). ``side_file_json`` reads a small JSON side
file of a model (config.json...) through the same opener, capped.

Failure vocabulary: ``Diagnosis`` / ``CheckpointError`` (see diagnose.py).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from devmapd.engine import diagnose, normalize, tree
from devmapd.engine.diagnose import CheckpointError, Diagnosis, diagnose_exception
from devmapd.engine.filenames import is_temporary
from devmapd.engine.formats import hfdir, legacy, torchzip
from devmapd.engine.formats import safetensors as st_format
from devmapd.engine.formats.common import (
    MAX_SIDE_FILE_BYTES,
    OpenedFile,
    Parsed,
    StorageRec,
    check_inside,
    element_size,
    open_in_model_dir,
    read_json_file,
)
from devmapd.engine.formats.detect import HEAD_BYTES, detect
from devmapd.engine.gcpause import gc_paused

if TYPE_CHECKING:   # at run time the arena is imported only to read (see read)
    from devmapd.engine.arena import SealedSegment

__all__ = ["Diagnosis", "CheckpointError", "Inspection", "ReadOptions", "LoadedModel", "inspect",
           "read", "summary", "diagnose_exception", "FORMATS", "side_file_json", "MAX_SIDE_FILE_BYTES"]

FORMATS = ("torch-zip", "torch-legacy", "safetensors", "hf-dir", "torchscript", "unknown")
_CAST_CHUNK = 32 << 20   # bytes read per step on the (slow) casting path


# ----------------------------------------------------------------------------- public records

@dataclass(frozen=True)
class Inspection:
    path: str
    format: str                      # one of FORMATS
    tensors: int
    bytes: int                       # sum of storage bytes (shared storages counted once)
    dtypes: dict[str, int]           # dtype -> bytes
    locations: dict[str, int]        # saved location tag ("cpu", "cuda:3") -> bytes
    prefixes: tuple[str, ...]        # ("module.",) / ("_orig_mod.",) found on state-dict keys
    containers: tuple[str, ...]      # key paths of the dicts holding tensors ("" is the top)
    groups: tuple[tuple[str, int], ...]   # module groups in file order -> bytes
    largest_tensor: int              # bytes of the largest storage (the unit that cannot be split)
    files: tuple[str, ...]
    diagnosis: Diagnosis | None

    @property
    def ok(self) -> bool:
        return self.diagnosis is None

    def to_json(self) -> dict[str, Any]:
        """The keys of ``devmapd inspect --json``."""
        return {
            "path": self.path, "format": self.format, "tensors": self.tensors, "bytes": self.bytes,
            "dtypes": dict(self.dtypes), "locations": dict(self.locations),
            "prefixes": list(self.prefixes), "containers": list(self.containers),
            "groups": [[g, b] for g, b in self.groups], "largest_tensor": self.largest_tensor,
            "files": list(self.files),
            "diagnosis": None if self.diagnosis is None else self.diagnosis.to_json(),
        }

    @classmethod
    def failed(cls, path: str, fmt: str, diagnosis: Diagnosis, files: tuple[str, ...] = ()) -> Inspection:
        return cls(path=path, format=fmt, tensors=0, bytes=0, dtypes={}, locations={}, prefixes=(),
                   containers=(), groups=(), largest_tensor=0, files=files or (path,), diagnosis=diagnosis)


@dataclass(frozen=True)
class ReadOptions:
    strip_prefixes: tuple[str, ...] = ("module.", "_orig_mod.")
    cpu_upcast_half: bool = False     # fp16/bf16 -> fp32 for tensors placed on cpu
    gpu_dtype: str | None = None      # "float16"/"bfloat16": cast floating tensors placed on a GPU
    allowed_globals: tuple[str, ...] = ()   # "module.Qualname" strings added to weights_only
    max_header_bytes: int = 100 << 20
    max_tensors: int = 1_000_000
    memory_limit: int | None = None   # refuse (out_of_memory) before allocating more than this
    threads: int = 4                  # parallel shard reads
    root: str | None = None           # refuse files whose opened inode lies outside this directory
    # [safety] caps on what a file may make us read or build besides tensor data (docs/reliability.md)
    max_side_file_bytes: int = MAX_SIDE_FILE_BYTES   # a shard index or other JSON side file
    tree_min_nodes: int = 100_000     # the object tree may always expand to this many objects...
    tree_min_bytes: int = 16 << 20    # ...and this many bytes of strings/bytes/digits,
    tree_expansion: int = 16          # or this many of each per non-tensor byte of the file(s)

    def tree_caps(self, structure_bytes: int) -> tuple[int, int]:
        """(max objects, max bytes) the object tree of a checkpoint with ``structure_bytes``
        non-tensor bytes may expand to."""
        k = self.tree_expansion * max(0, structure_bytes)
        return max(self.tree_min_nodes, k), max(self.tree_min_bytes, k)


@dataclass
class LoadedModel:
    manifest: Any                     # arena.Manifest
    segments: list[SealedSegment]     # same order as manifest.segments
    inspection: Inspection
    load_time_s: float
    fingerprint: tuple[tuple[str, int, int, int], ...]   # (name, size, mtime_ns, ino) as names.fingerprint, as read

    def close(self) -> None:
        for s in self.segments:
            s.close()


# ----------------------------------------------------------------------------- parsing

class _Guess:
    """The format we believe we are looking at, kept for the Inspection when parsing fails."""
    format = "unknown"


class _ParseCaps(TypedDict):
    """The keyword arguments every format's ``parse`` takes."""
    max_header_bytes: int
    max_tensors: int
    locate: bool


def _source_path(source: Any) -> str:
    p: str | os.PathLike[str] = getattr(source, "path", source)   # names.ModelSource or a path
    return os.fspath(p)


def _parse_file(f: OpenedFile, opts: ReadOptions, locate: bool, guess: _Guess) -> Parsed:
    head = f.pread(HEAD_BYTES, 0)
    kind, what = detect(head, f.size)
    caps = _ParseCaps(max_header_bytes=opts.max_header_bytes, max_tensors=opts.max_tensors, locate=locate)
    if kind == "empty":
        raise diagnose.empty(f.path)
    if kind == "zip":
        guess.format = "torch-zip"
        try:
            return torchzip.parse(f, **caps)
        except CheckpointError as e:
            if e.diagnosis.code == "unsupported_format" and "TorchScript" in e.diagnosis.message:
                guess.format = "torchscript"
            raise
    if kind == "torch-legacy":
        guess.format = "torch-legacy"
        return legacy.parse(f, **caps)
    if kind == "safetensors":
        guess.format = "safetensors"
        return st_format.parse(f, **caps)
    if kind in ("tar", "foreign"):
        raise diagnose.unsupported(f.path, what or "an unknown format",
                                   "convert it to a torch.save or safetensors checkpoint")
    if kind == "pickle":
        raise diagnose.not_a_checkpoint(f.path, what)
    raise diagnose.not_a_checkpoint(f.path)


def _open_and_parse(path: str, opts: ReadOptions, locate: bool, guess: _Guess,
                    opened: list[OpenedFile]) -> Parsed:
    """Open every weight file of ``path`` (file or HF directory) once and parse it. Fills ``opened``.

    Every parse goes through here (inspect, read, engine.learned), so the expansion check runs
    on all of them before anyone walks or encodes the structure."""
    parsed = _open_and_parse_files(path, opts, locate, guess, opened)
    _check_expansion(path, parsed, opts)
    return parsed


def _open_and_parse_files(path: str, opts: ReadOptions, locate: bool, guess: _Guess,
                          opened: list[OpenedFile]) -> Parsed:
    real = os.path.realpath(path)   # resolve links once; the open itself then refuses to follow any
    if os.path.isdir(real):
        guess.format = "hf-dir"
        names = hfdir.weight_files(real, root=opts.root, max_index_bytes=opts.max_side_file_bytes)
        for name in names:
            shown = os.path.join(path, os.path.basename(name))
            opened.append(open_in_model_dir(name, shown, root=opts.root))

        def one(i: int) -> Parsed:
            return _parse_file(opened[i], opts, locate, _Guess())

        if len(opened) > 1 and opts.threads > 1:
            with ThreadPoolExecutor(min(opts.threads, len(opened)), thread_name_prefix="devmapd-shard") as ex:
                parts = list(ex.map(one, range(len(opened))))
        else:
            parts = [one(i) for i in range(len(opened))]
        return _merge_shards(path, parts, opened)
    opened.append(open_in_model_dir(real, path, root=opts.root))
    return _parse_file(opened[0], opts, locate, guess)


# Kept for callers outside the engine's formats package (engine.sidefiles); the check itself
# lives with the opener in formats.common.
_check_inside = check_inside


def _check_expansion(path: str, parsed: Parsed, opts: ReadOptions) -> None:
    """Refuse (too_large) an object tree that expands, through shared references, past the caps.

    Runs right after the unpickler (which keeps shared objects shared: its memory is bounded
    by the pickle) and before normalize.walk / tree.encode, which expand every reference."""
    structure = max(0, sum(f.size for f in parsed.files) - sum(r.nbytes for r in parsed.storages))
    max_nodes, max_bytes = opts.tree_caps(structure)
    try:
        tree.measure(parsed.obj, max_nodes=max_nodes, max_bytes=max_bytes)
    except tree.TreeTooLarge as e:
        floor = ("safety.tree_min_nodes" if e.what == "objects" else "safety.tree_min_mib")
        raise diagnose.too_large(
            path, f"a structure (everything but the tensor data) that expands to more than {e.limit} {e.what} "
                  f"(each shared reference counted every time it is reached) from {structure} non-tensor bytes "
                  "in the file",
            f"{e.limit} {e.what} = max({floor}, safety.tree_expansion x {structure})") from None


def _merge_shards(path: str, parts: list[Parsed], opened: list[OpenedFile]) -> Parsed:
    merged: dict[str, Any] = {}
    recs: list[StorageRec] = []
    for i, part in enumerate(parts):
        if not isinstance(part.obj, dict):
            raise diagnose.corrupt(opened[i].path, "a shard that is not a flat state dict")
        for k, v in part.obj.items():
            if k in merged:
                raise diagnose.corrupt(path, f"tensor {k!r} appears in two shards")
            merged[k] = v
        for rec in part.storages:
            rec.file = i
            recs.append(rec)
    return Parsed("hf-dir", merged, recs, list(opened))


# ----------------------------------------------------------------------------- inspection

@dataclass
class _Storage:
    rec: StorageRec
    first: normalize.TensorRef          # first tensor (file order) using this storage
    tensors: list[int] = field(default_factory=list)   # indices into walked.tensors


def _check_tensor(path: str, ref: normalize.TensorRef, rec: StorageRec) -> None:
    t = ref.tensor
    if any(s < 0 for s in t.stride()) or t.storage_offset() < 0:
        raise diagnose.corrupt(path, f"tensor {ref.path!r} has a negative stride or offset")
    if t.numel():
        last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        if (last + 1) * element_size(t.dtype) > rec.nbytes:
            raise diagnose.corrupt(path, f"tensor {ref.path!r} reaches past the end of its storage")


def _storages(path: str, parsed: Parsed, walked: normalize.Walked) -> list[_Storage]:
    """Link each tensor to its storage record; storages in the order tensors first use them."""
    index = parsed.storage_index()
    by_rec: dict[int, _Storage] = {}
    for ti, ref in enumerate(walked.tensors):
        t = ref.tensor
        if t.layout != torch.strided or t.is_quantized or t.is_nested:
            raise diagnose.unsupported(path, f"a checkpoint whose tensor {ref.path!r} is sparse, quantized or "
                                             "nested", "convert it to dense tensors before serving it")
        if t.device.type != "meta":
            raise diagnose.unsupported(path, f"a checkpoint whose tensor {ref.path!r} is not backed by a saved storage",
                                       "re-save it with plain tensors (model.state_dict())")
        si = index.get(ref.tensor.untyped_storage()._cdata)
        if si is None:
            raise diagnose.unsupported(path, f"a checkpoint whose tensor {ref.path!r} is not backed by a saved storage",
                                       "re-save it with plain tensors (model.state_dict())")
        rec = parsed.storages[si]
        _check_tensor(path, ref, rec)
        s = by_rec.get(si)
        if s is None:
            s = by_rec[si] = _Storage(rec, ref)
        s.tensors.append(ti)
    return list(by_rec.values())


def _inspection(path: str, parsed: Parsed, walked: normalize.Walked, storages: list[_Storage]) -> Inspection:
    dtypes: dict[str, int] = {}
    locations: dict[str, int] = {}
    groups: dict[str, int] = {}
    containers: list[str] = []
    for ref in walked.tensors:
        if ref.container not in containers:
            containers.append(ref.container)
    total = largest = 0
    for s in storages:
        n = s.rec.nbytes
        total += n
        largest = max(largest, n)
        dn = _dtype_name(s.rec.dtype)
        dtypes[dn] = dtypes.get(dn, 0) + n
        locations[s.rec.location] = locations.get(s.rec.location, 0) + n
        g = normalize.group_of(s.first.key)
        groups[g] = groups.get(g, 0) + n
    return Inspection(path=path, format=parsed.format, tensors=len(walked.tensors), bytes=total,
                      dtypes=dtypes, locations=locations, prefixes=tuple(walked.prefixes),
                      containers=tuple(containers), groups=tuple(groups.items()), largest_tensor=largest,
                      files=tuple(f.path for f in parsed.files), diagnosis=None)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


@contextmanager
def _allowed(names: tuple[str, ...]) -> Iterator[None]:
    """Scope extra weights-only globals (from config only) to one inspect/read call."""
    if not names:
        yield
        return
    objs = []
    for name in names:
        objs.append(_resolve_global(name))
    with torch.serialization.safe_globals(objs):
        yield


def _resolve_global(name: str) -> Any:
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            break
    raise CheckpointError(Diagnosis(
        "unsafe_pickle", f"the allowed global {name!r} from checkpoint.allowed_globals cannot be imported; "
                         "fix its module.Qualname spelling or install the package that defines it."))


def register_allowed_globals(names: tuple[str, ...]) -> None:
    """Admit ``names`` (module.QualName) to weights-only loading for the whole process.

    The daemon calls this at start-up and on reload instead of passing ``allowed_globals``
    per call: torch's per-call ``safe_globals`` edits one process-wide list, so two reads in
    parallel threads would remove each other's globals mid-unpickle.
    """
    objs = [_resolve_global(name) for name in names]
    torch.serialization.clear_safe_globals()
    if objs:
        torch.serialization.add_safe_globals(objs)


def inspect(path: Any, *, allowed_globals: tuple[str, ...] = (), root: str | None = None,
            options: ReadOptions | None = None) -> Inspection:
    """What ``path`` (a file, an HF directory or a ModelSource) holds, without reading tensor data.

    Never raises for a bad file: the Inspection's ``diagnosis`` says what is wrong. With
    ``root``, a file whose opened inode lies outside it is refused (outside_model_dir).
    ``options`` supplies the caps (header, tensors, side files, tree expansion) a later
    ``read`` will apply, so both refuse the same files; ``allowed_globals`` and ``root``, when
    given, override its fields.
    """
    path = _source_path(path)
    guess = _Guess()
    opened: list[OpenedFile] = []
    opts = options or ReadOptions()
    if allowed_globals:
        opts = dataclasses.replace(opts, allowed_globals=tuple(allowed_globals))
    if root is not None:
        opts = dataclasses.replace(opts, root=root)
    try:
        with _allowed(opts.allowed_globals), gc_paused():
            parsed = _open_and_parse(path, opts, False, guess, opened)
            walked = normalize.walk(parsed.obj, normalize.DEFAULT_PREFIXES, path_hint=path)
            storages = _storages(path, parsed, walked)
            insp = _inspection(path, parsed, walked, storages)
        return insp
    except CheckpointError as e:
        return Inspection.failed(path, guess.format, e.diagnosis, tuple(f.path for f in opened))
    except Exception as e:   # never raise for a bad file: say what happened instead
        return Inspection.failed(path, guess.format, diagnose_exception(e, path), tuple(f.path for f in opened))
    finally:
        for f in opened:
            f.close()


def side_file_json(source: Any, name: str, *, root: str | None = None,
                   max_bytes: int = MAX_SIDE_FILE_BYTES) -> Any:
    """The parsed JSON of the side file ``name`` (``"config.json"``, ``"generation_config.json"``...)
    of a Hugging Face directory ``source`` (a path or a ModelSource), or None when there is none.

    Read through the engine's one safe opener (``formats.common.read_json_file``): a link is
    resolved once and must stay inside ``root`` (pass the model directory), only a regular file
    is ever opened (never a FIFO or a device), the size is capped at ``max_bytes`` (the daemon
    passes ``[safety] max_side_file_mib``) and the read stops at the size it had at open.
    ``name`` must be a plain file name. Raises CheckpointError (too_large, not_a_checkpoint,
    outside_model_dir, corrupt for bad JSON...) when the file exists but is unusable: the
    caller reports that, it is not the same as the file being absent. Blocking: call it from a
    worker thread, never from the event loop.
    """
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"side_file_json: {name!r} is not a plain file name")
    path = os.path.join(_source_path(source), name)
    if not os.path.lexists(path):
        return None
    return read_json_file(path, root=root, max_bytes=max_bytes)


# ----------------------------------------------------------------------------- reading

@dataclass
class _Placed:
    storage: _Storage
    device: str
    segment: int
    out_dtype: torch.dtype
    out_nbytes: int
    offset: int = 0


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(path: str, need: int, limit: int | None) -> None:
    if limit is not None and need > limit:
        raise diagnose.out_of_memory(path, need, limit, "the configured memory limit")
    avail = _mem_available()
    if avail is not None and need > avail:
        raise diagnose.out_of_memory(path, need, avail, "host memory (MemAvailable)")


def _located(rec: StorageRec) -> int:
    """Where a storage's data starts in its file: set for every storage of a parse made to read."""
    assert rec.offset is not None, "read() parses with locate=True, which sets every offset"
    return rec.offset


def _copy_storage(p: _Placed, f: OpenedFile, builder: Any) -> None:
    rec = p.storage.rec
    assert rec.offset is not None, "read() parses with locate=True, which sets every offset"
    if p.out_dtype == rec.dtype:
        builder.copy_from_file(p.offset, f.fd, rec.offset, rec.nbytes)   # kernel copy, no Python bytes
        return
    # Slow path, only when normalisation casts: read a bounded chunk, convert, write.
    in_size, out_size = element_size(rec.dtype), element_size(p.out_dtype)
    step = max(in_size, _CAST_CHUNK // in_size * in_size)
    done = 0
    while done < rec.nbytes:
        n = min(step, rec.nbytes - done)
        data = os.pread(f.fd, n, rec.offset + done)
        if len(data) != n:
            raise diagnose.truncated(f.path, "the file ended while reading a tensor")
        src = torch.frombuffer(bytearray(data), dtype=rec.dtype)
        builder.write_at(p.offset + done // in_size * out_size, src.to(p.out_dtype))
        done += n


def read(source: Any, options: ReadOptions = ReadOptions(), *,
         device_of: Callable[[str], str] | None = None,
         progress: Callable[[int, int], None] | None = None) -> LoadedModel:
    """Read a checkpoint once into sealed arena segments. Raises CheckpointError.

    ``device_of(key_path)`` places each tensor (default all "cpu"); tensors sharing a storage go
    where the first of them goes. ``progress(done_bytes, total_bytes)`` is called after each
    storage is copied, possibly from a worker thread.
    """
    from devmapd.engine import arena  # the arena is only needed to read, not to inspect

    # Bad options are the caller's bug (config.py validates them), not a property of the file.
    if options.gpu_dtype not in (None, *normalize.GPU_DTYPES):
        raise ValueError(f"ReadOptions.gpu_dtype must be None, 'float16' or 'bfloat16', not {options.gpu_dtype!r}")
    if options.threads < 1 or min(options.max_tensors, options.max_header_bytes, options.max_side_file_bytes,
                                  options.tree_min_nodes, options.tree_min_bytes, options.tree_expansion) < 0:
        raise ValueError("ReadOptions.threads must be >= 1 and the caps >= 0")
    t0 = time.monotonic()
    path = _source_path(source)
    opened: list[OpenedFile] = []
    builders: list[Any] = []
    sealed: list[Any] = []
    guess = _Guess()
    try:
        with _allowed(options.allowed_globals):
            with gc_paused():
                parsed = _open_and_parse(path, options, True, guess, opened)
                walked = normalize.walk(parsed.obj, options.strip_prefixes, path_hint=path,
                                        max_nodes=max(1000, 20 * options.max_tensors))
            if len(walked.tensors) > options.max_tensors:
                raise diagnose.too_large(path, f"{len(walked.tensors)} tensors",
                                         f"{options.max_tensors} (checkpoint.max_tensors)")
            storages = _storages(path, parsed, walked)
            inspection = _inspection(path, parsed, walked, storages)

            # Placement and served dtype of every storage, then one layout per device segment.
            devices: list[str] = []
            placed: list[_Placed] = []
            for s in storages:
                dev = device_of(s.first.path) if device_of else "cpu"
                if dev not in devices:
                    devices.append(dev)
                out = normalize.target_dtype(s.rec.dtype, dev, cpu_upcast_half=options.cpu_upcast_half,
                                             gpu_dtype=options.gpu_dtype)
                out_nbytes = s.rec.nbytes // element_size(s.rec.dtype) * element_size(out)
                placed.append(_Placed(s, dev, devices.index(dev), out, out_nbytes))
            sizes = []
            for si in range(len(devices)):
                mine = [p for p in placed if p.segment == si]
                offsets, total = arena.layout([p.out_nbytes for p in mine])
                for p, off in zip(mine, offsets):
                    p.offset = off
                sizes.append(total)
            _check_memory(path, sum(sizes), options.memory_limit)   # before any allocation

            # The structure first: an object the tree codec cannot carry fails before we copy.
            tensor_idx = {id(ref.tensor): i for i, ref in enumerate(walked.tensors)}
            encoded = tree.encode(walked.obj, lambda t: tensor_idx[id(t)])

            name = os.path.basename(os.path.normpath(path)) or "model"
            for si, dev in enumerate(devices):
                builders.append(arena.ArenaBuilder(f"{name}@{dev}", sizes[si]))
            _copy_all(parsed, placed, builders, options, progress)
            for f in parsed.files:
                if not f.unchanged():
                    raise diagnose.changed_during_read(f.path)
            for b in builders:
                sealed.append(b.seal())

            entries: list[arena.TensorEntry | None] = [None] * len(walked.tensors)
            for p in placed:
                rec = p.storage.rec
                for ti in p.storage.tensors:
                    t = walked.tensors[ti].tensor
                    entries[ti] = arena.TensorEntry(
                        segment=p.segment, offset=p.offset, storage_nbytes=p.out_nbytes,
                        storage_offset=int(t.storage_offset()), dtype=_dtype_name(p.out_dtype),
                        shape=tuple(int(x) for x in t.shape), stride=tuple(int(x) for x in t.stride()),
                        saved_location=rec.location, requires_grad=bool(t.requires_grad),
                        parameter=isinstance(t, torch.nn.Parameter))
            manifest = arena.Manifest(
                tensors=tuple(entries),
                segments=tuple(arena.SegmentInfo(kind="memfd", device=d, nbytes=sizes[i])
                               for i, d in enumerate(devices)),
                tree=encoded)
            fingerprint = _fingerprint(path, parsed)
            return LoadedModel(manifest, sealed, inspection, time.monotonic() - t0, fingerprint)
    except BaseException as e:
        abandon(builders, sealed)
        if not isinstance(e, Exception):
            raise
        raise read_failure(e, path, opened) from None
    finally:
        for f in opened:
            f.close()


def abandon(builders: list[Any], sealed: list[Any]) -> None:
    """Release what a failed read had built: unsealed arenas discarded, sealed segments closed."""
    for b in builders:
        b.discard()
    for seg in sealed:
        seg.close()


def read_failure(e: Exception, path: str, opened: list[OpenedFile]) -> CheckpointError:
    """The diagnosis of a read that failed with ``e`` (both readers: ``read`` and ``engine.learned``).

    A failure while reading (short read, "truncated", a bad pickle) is most often the file
    changing under us: say so when it did, whatever the symptom."""
    for f in opened:
        if f.fd >= 0 and not f.unchanged():
            return diagnose.changed_during_read(f.path, f"{type(e).__name__}: {e}")
    if isinstance(e, CheckpointError):
        return e
    if isinstance(e, tree.TreeError):
        return diagnose.unsupported(path, f"a checkpoint holding objects devmapd cannot serve ({e})",
                                    "re-save only tensors in plain dicts, lists and tuples", f"TreeError: {e}")
    from devmapd.engine import arena  # loaded already by the read that failed (deferred for inspect)

    if isinstance(e, arena.ArenaError) and "truncated" in str(e):
        return diagnose.truncated(path, str(e))
    return CheckpointError(diagnose_exception(e, path))


def _fingerprint(path: str, parsed: Parsed) -> tuple[tuple[str, int, int, int], ...]:
    """``((name, size, mtime_ns, ino), ...)`` sorted, in names.fingerprint's format, so the daemon can
    compare it with the watcher's. The weight files' entries are the fstat taken when we opened
    them (the version we actually read); an HF directory's other top-level files (config.json,
    tokenizer...) are stat'ed like names.fingerprint does."""
    mine = {os.path.basename(f.path): (os.path.basename(f.path), f.before.st_size, f.before.st_mtime_ns,
                                       f.before.st_ino) for f in parsed.files}
    if parsed.format == "hf-dir":
        try:
            with os.scandir(path) as it:
                for entry in it:
                    if entry.name in mine or is_temporary(entry.name):
                        continue
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        mine[entry.name] = (entry.name, st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            pass
    return tuple(sorted(mine.values()))


def _copy_all(parsed: Parsed, placed: list[_Placed], builders: list[Any], options: ReadOptions,
              progress: Callable[[int, int], None] | None) -> None:
    """Copy every storage, file by file in disk order; files (shards) in parallel threads."""
    total = sum(p.storage.rec.nbytes for p in placed)
    done = [0]
    lock = threading.Lock()
    per_file: dict[int, list[_Placed]] = {}
    for p in placed:
        per_file.setdefault(p.storage.rec.file, []).append(p)

    def copy_file(fi: int) -> None:
        f = parsed.files[fi]
        for p in sorted(per_file[fi], key=lambda p: _located(p.storage.rec)):
            _copy_storage(p, f, builders[p.segment])
            if progress is not None:
                with lock:
                    done[0] += p.storage.rec.nbytes
                    progress(done[0], total)

    keys = sorted(per_file)
    if len(keys) > 1 and options.threads > 1:
        with ThreadPoolExecutor(min(options.threads, len(keys)), thread_name_prefix="devmapd-copy") as ex:
            for fut in [ex.submit(copy_file, k) for k in keys]:
                fut.result()
    else:
        for k in keys:
            copy_file(k)


# ----------------------------------------------------------------------------- summary text

def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def summary(insp: Inspection) -> str:
    """The readable text of ``devmapd inspect``."""
    lines = [f"{insp.path}: {insp.format}"]
    if insp.diagnosis is not None:
        lines.append(f"  problem:   {insp.diagnosis.message}")
        if insp.diagnosis.detail:
            lines.append(f"  detail:    {insp.diagnosis.detail}")
        return "\n".join(lines)
    lines.append(f"  tensors:   {insp.tensors} ({_human(insp.bytes)}; largest {_human(insp.largest_tensor)})")
    lines.append("  dtypes:    " + ", ".join(f"{k} {_human(v)}" for k, v in insp.dtypes.items()))
    lines.append("  saved on:  " + ", ".join(f"{k} {_human(v)}" for k, v in insp.locations.items()))
    if insp.prefixes:
        lines.append("  prefixes:  " + ", ".join(insp.prefixes) + " (stripped when served)")
    if insp.containers and insp.containers != ("",):
        lines.append("  tensors in: " + ", ".join(c or "<top>" for c in insp.containers))
    if insp.groups:
        shown = ", ".join(f"{g} {_human(b)}" for g, b in insp.groups[:8])
        more = f", ... ({len(insp.groups)} groups)" if len(insp.groups) > 8 else ""
        lines.append(f"  groups:    {shown}{more}")
    if len(insp.files) > 1:
        lines.append(f"  files:     {len(insp.files)} shards")
    return "\n".join(lines)


# diagnose_exception falls back to asking the file itself what it is (a truncated zip only
# says "Invalid argument"); diagnose cannot import this module, so it is handed inspect.
diagnose.register_sniffer(lambda path: inspect(path).diagnosis)
