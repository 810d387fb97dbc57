"""What a parse learned (``learned.Learned``), as JSON that can be stored and trusted only after checks.

``encode`` writes plain JSON (no pickle: a stored record is data, never code). ``decode`` treats
its input as hostile: every field's type and bound is checked (file indices, offsets inside the
file's size, storage views inside their storage, dtype names torch knows, the encoded
structure's tensor indices), and the Inspection is recomputed from the storages rather than
read, so the record cannot claim sizes its storages do not have. Anything wrong raises
:class:`CodecError`, whose message says what; callers then parse the file afresh.

A record names the codec VERSION and the torch version it was made with; either differing is
a CodecError too (dtype names and the rebuild rules belong to one torch).
"""
from __future__ import annotations

from typing import Any

import torch

from devmapd.engine import arena, tree
from devmapd.engine.learned import FileId, Learned, StorageSpec, TensorSpec, inspection_of

__all__ = ["VERSION", "CodecError", "encode", "decode"]

VERSION = 1
_FORMATS = ("torch-zip", "torch-legacy", "safetensors", "hf-dir")
_MAX_DIMS = 64


class CodecError(ValueError):
    """A stored record that cannot be trusted; the message says which field is wrong."""


def encode(learned: Learned) -> dict[str, Any]:
    """The JSON form of a successful ``learned`` (a failed one is never stored)."""
    if not learned.ok:
        raise ValueError("only a successful parse is stored")
    insp = learned.inspection
    return {
        "codec": VERSION,
        "torch": torch.__version__,
        "key": [[name, list(v) if isinstance(v, tuple) else v] for name, v in learned.key],
        "path": learned.path,
        "format": insp.format,
        "prefixes": list(insp.prefixes),
        "containers": list(insp.containers),
        "files": [[f.path, f.real, f.dev, f.ino, f.size, f.mtime_ns, f.ctime_ns] for f in learned.files],
        "fingerprint": [list(e) for e in learned.fingerprint],
        "opened_ns": learned.opened_ns,
        "storages": [[s.file, s.offset, s.nbytes, s.dtype, s.location, s.first_path, s.first_key]
                     for s in learned.storages],
        "tensors": [[t.storage, t.storage_offset, list(t.shape), list(t.stride), t.requires_grad, t.parameter]
                    for t in learned.tensors],
        "tree": learned.tree,
    }


def _int(v: Any, what: str, lo: int = 0, hi: int | None = None) -> int:
    if type(v) is not int or v < lo or (hi is not None and v > hi):
        raise CodecError(f"{what} is {v!r:.40}, not an integer in [{lo}, {'inf' if hi is None else hi}]")
    return v


def _str(v: Any, what: str) -> str:
    if type(v) is not str:
        raise CodecError(f"{what} is not a string")
    return v


def _list(v: Any, what: str, n: int | None = None) -> list[Any]:
    if type(v) is not list or (n is not None and len(v) != n):
        raise CodecError(f"{what} is not a list" + (f" of {n} items" if n is not None else ""))
    return v


def decode(d: Any, *, path: str) -> Learned:
    """Check and rebuild a stored record for the model at ``path``. Raises CodecError."""
    if type(d) is not dict:
        raise CodecError("the record is not a JSON object")
    if d.get("codec") != VERSION:
        raise CodecError(f"codec version {d.get('codec')!r:.20} is not {VERSION} (written by another devmapd)")
    if d.get("torch") != torch.__version__:
        raise CodecError(f"written under torch {d.get('torch')!r:.40}, this is {torch.__version__}")
    if d.get("path") != path:
        raise CodecError("the record is for another model")
    fmt = d.get("format")
    if fmt not in _FORMATS:
        raise CodecError(f"unknown format {fmt!r:.40}")
    key_items = []
    for item in _list(d.get("key"), "key"):
        pair = _list(item, "key item", 2)
        name, v = _str(pair[0], "key name"), pair[1]
        if type(v) is list:
            v = tuple(_str(x, f"key {name}") for x in v)
        elif v is not None and type(v) not in (str, int, float, bool):
            raise CodecError(f"key {name} has a value of type {type(v).__name__}")
        key_items.append((name, v))
    key = tuple(key_items)
    files = []
    for i, row in enumerate(_list(d.get("files"), "files")):
        r = _list(row, f"files[{i}]", 7)
        files.append(FileId(_str(r[0], "file path"), _str(r[1], "file real path"),
                            *(_int(x, f"files[{i}] identity") for x in r[2:])))
    if not files:
        raise CodecError("the record names no file")
    fingerprint = []
    for row in _list(d.get("fingerprint"), "fingerprint"):
        r = _list(row, "fingerprint entry", 4)
        fingerprint.append((_str(r[0], "fingerprint name"), _int(r[1], "fingerprint size"),
                            _int(r[2], "fingerprint mtime", lo=-(1 << 63)), _int(r[3], "fingerprint inode")))
    # The per-storage and per-tensor checks are inline (no call, no message built unless one
    # fails): a restart decodes one record per model, and this loop is most of it.
    storages = []
    dtypes: dict[str, torch.dtype] = {}
    nfiles = len(files)
    for i, r in enumerate(_list(d.get("storages"), "storages")):
        if type(r) is not list or len(r) != 7:
            raise CodecError(f"storages[{i}] is not a list of 7 items")
        fi, off, nbytes, dtn, loc, first_path, first_key = r
        if not (type(fi) is int and 0 <= fi < nfiles and type(off) is int and off >= 0
                and type(nbytes) is int and nbytes >= 0 and type(dtn) is str and type(loc) is str
                and type(first_path) is str and type(first_key) is str):
            raise CodecError(f"storages[{i}] has a field of the wrong type or out of range")
        if off + nbytes > files[fi].size:
            raise CodecError(f"storages[{i}] reaches past the end of its file")
        dt = dtypes.get(dtn)
        if dt is None:
            try:
                dt = dtypes[dtn] = arena.dtype_from_name(dtn)
            except arena.ArenaError:
                raise CodecError(f"storages[{i}] has an unknown dtype {dtn!r:.40}") from None
        if nbytes % dt.itemsize:
            raise CodecError(f"storages[{i}] is not a whole number of {dtn} elements")
        storages.append(StorageSpec(fi, off, nbytes, dtn, loc, first_path, first_key))
    tensors = []
    used = [False] * len(storages)
    nstorages = len(storages)
    for i, r in enumerate(_list(d.get("tensors"), "tensors")):
        if type(r) is not list or len(r) != 6:
            raise CodecError(f"tensors[{i}] is not a list of 6 items")
        si, soff, shape, stride, requires_grad, parameter = r
        if not (type(si) is int and 0 <= si < nstorages and type(soff) is int and soff >= 0
                and type(shape) is list and type(stride) is list and len(shape) == len(stride) <= _MAX_DIMS
                and all(type(x) is int and x >= 0 for x in shape) and all(type(x) is int and x >= 0 for x in stride)
                and type(requires_grad) is bool and type(parameter) is bool):
            raise CodecError(f"tensors[{i}] has a field of the wrong type or out of range")
        numel = 1
        for n in shape:
            numel *= n
        spec = storages[si]
        if numel:
            last = soff
            for n, st in zip(shape, stride):
                last += (n - 1) * st
            if (last + 1) * dtypes[spec.dtype].itemsize > spec.nbytes:
                raise CodecError(f"tensors[{i}] reaches past the end of its storage")
        tensors.append(TensorSpec(si, soff, tuple(shape), tuple(stride), requires_grad, parameter))
        used[si] = True
    if not all(used):
        raise CodecError("a storage no tensor uses")
    encoded = d.get("tree")
    try:   # the structure must decode around exactly these tensors
        placeholder = torch.empty(0)
        tree.decode(encoded, [placeholder] * len(tensors))
    except (tree.TreeError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:
        raise CodecError(f"the stored structure does not decode ({type(e).__name__}: {e})") from None
    prefixes = tuple(_str(x, "prefix") for x in _list(d.get("prefixes"), "prefixes"))
    containers = tuple(_str(x, "container") for x in _list(d.get("containers"), "containers"))
    if fmt != "hf-dir" and len(files) != 1:
        raise CodecError("several files for a format that has one")
    insp = inspection_of(path, fmt, storages, len(tensors), prefixes, containers, tuple(f.path for f in files))
    return Learned(path=path, inspection=insp, key=key, files=tuple(files), storages=tuple(storages),
                   tensors=tuple(tensors), tree=encoded, fingerprint=tuple(fingerprint),
                   opened_ns=_int(d.get("opened_ns"), "opened_ns"))
