"""safetensors: 8-byte little-endian header length, a JSON header, then the tensor bytes.

The header is capped (checkpoint.max_header_bytes) before it is read, and every entry is checked:
known dtype, shape of non-negative ints, byte range inside the data section and equal to
shape x itemsize. Each tensor is its own storage.

We accept exactly what the safetensors library itself accepts, never more: strict UTF-8 JSON
without duplicate keys or NaN, ``__metadata__`` a map of strings, integer offsets and dims, and
tensors that index the whole data section with no hole, overlap or trailing bytes. A file the
reference loader refuses is never served with guessed contents.
"""
from __future__ import annotations

import json
import math
import struct

import torch

from devmapd.engine import diagnose

from .common import OpenedFile, Parsed, StorageRec, element_size

# Every dtype of the safetensors format (its Rust ``Dtype`` enum) that torch has a dtype for.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    # 4-bit floats: the header counts 4-bit elements, torch packs two per byte (last dim halved)
    "F4": torch.float4_e2m1fn_x2,
}
# Sub-byte dtypes: header elements per torch element (along the last dimension).
_PACKED = {"F4": 2}
# Dtypes of the format that torch cannot represent: named, not called corrupt.
_UNREPRESENTABLE = {"F6_E2M3": "6-bit float (E2M3)", "F6_E3M2": "6-bit float (E3M2)"}
_MAX_DIM = (1 << 63) - 1


def parse(f: OpenedFile, *, max_header_bytes: int, max_tensors: int, locate: bool = True) -> Parsed:
    path = f.path
    if f.size < 8:
        raise diagnose.truncated(path, "shorter than the 8-byte safetensors header length")
    (n,) = struct.unpack("<Q", f.pread(8, 0))
    if n > max_header_bytes:
        raise diagnose.too_large(path, f"a {n}-byte safetensors header",
                                 f"{max_header_bytes} bytes (checkpoint.max_header_bytes)")
    if 8 + n > f.size:
        raise diagnose.truncated(path, f"header declares {n} bytes but the file has {f.size - 8}")
    raw = f.pread(n, 8)
    # Every tensor entry names its dtype: counting them is a cheap upper bound on the tensor
    # count, so a header of a million entries is refused before json builds a million dicts.
    declared = raw.count(b'"dtype"')
    if declared > max_tensors:
        raise diagnose.too_large(path, f"about {declared} tensors", f"{max_tensors} (checkpoint.max_tensors)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise diagnose.corrupt(path, f"bad safetensors header: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise diagnose.corrupt(path, "bad safetensors header: not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and (not isinstance(meta, dict) or
                             not all(isinstance(v, str) for v in meta.values())):
        raise diagnose.corrupt(path, "bad safetensors header: __metadata__ is not a map of strings")
    if len(header) > max_tensors:
        raise diagnose.too_large(path, f"{len(header)} tensors", f"{max_tensors} (checkpoint.max_tensors)")
    base = 8 + n
    data_len = f.size - base
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise diagnose.corrupt(path, f"bad safetensors header entry {name!r}: not an object")
        dt_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dt_name in _UNREPRESENTABLE:
            raise diagnose.unsupported(path, f"a safetensors file whose tensor {name!r} is a "
                                             f"{_UNREPRESENTABLE[dt_name]}, which torch has no dtype for",
                                       "convert that tensor to a dtype torch supports and save it again")
        if type(dt_name) is not str or dt_name not in DTYPES:
            raise diagnose.corrupt(path, f"bad safetensors header entry {name!r}: unknown dtype {dt_name!r:.40}")
        if not isinstance(shape, list) or any(type(x) is not int or not 0 <= x <= _MAX_DIM for x in shape):
            raise diagnose.corrupt(path, f"bad safetensors header entry {name!r}: bad shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or \
                any(type(x) is not int or x < 0 for x in offsets):
            raise diagnose.corrupt(path, f"bad safetensors header entry {name!r}: bad data_offsets")
        dtype = DTYPES[dt_name]
        begin, end = offsets
        pack = _PACKED.get(dt_name, 1)
        if pack > 1:
            if not shape or shape[-1] % pack:
                raise diagnose.corrupt(path, f"bad safetensors header entry {name!r}: a {dt_name} tensor "
                                             f"needs a last dimension that is a multiple of {pack}")
            shape = [*shape[:-1], shape[-1] // pack]
        nbytes = math.prod(shape) * element_size(dtype)
        if end < begin or end - begin != nbytes:
            raise diagnose.corrupt(path, f"bad safetensors header: {name!r} spans {end - begin} bytes "
                                         f"but its shape needs {nbytes}")
        if end > data_len:
            raise diagnose.truncated(path, f"tensor {name!r} extends past the end of the file")
        entries.append((begin, end, name, dtype, shape, nbytes))
    entries.sort(key=lambda e: (e[0], e[1]))   # file order: groups and reads follow the disk
    # The format indexes its whole data section: no holes, no overlaps, nothing after the end.
    at = 0
    for begin, end, name, *_ in entries:
        if begin != at:
            raise diagnose.corrupt(path, f"bad safetensors header: tensor {name!r} starts at byte {begin} "
                                         f"of the data, not at {at} (a hole or an overlap)")
        at = end
    if at != data_len:
        raise diagnose.corrupt(path, f"the data section holds {data_len} bytes but the tensors index {at}")
    obj: dict[str, torch.Tensor] = {}
    recs: list[StorageRec] = []
    for begin, _end, name, dtype, shape, nbytes in entries:
        t = torch.empty(shape, dtype=dtype, device="meta")
        recs.append(StorageRec(key=name, dtype=dtype, location="cpu", nbytes=nbytes,
                               meta=t.untyped_storage(), offset=base + begin))
        obj[name] = t
    return Parsed("safetensors", obj, recs, [f])


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r:.60}")
        out[k] = v
    return out


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")
