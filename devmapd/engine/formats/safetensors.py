"""safetensors: 8-byte little-endian header length, a JSON header, then the tensor bytes.

The header is capped (checkpoint.max_header_bytes) before it is read, and every entry is checked:
known dtype, shape of non-negative ints, byte range inside the data section and equal to
shape x itemsize. Each tensor is its own storage.
"""
from __future__ import annotations

import json
import math
import struct

import torch

from devmapd.engine import diagnose

from .common import OpenedFile, Parsed, StorageRec, element_size

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "C64": torch.complex64,
}


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
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise diagnose.corrupt(path, f"bad safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise diagnose.corrupt(path, "bad safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > max_tensors:
        raise diagnose.too_large(path, f"{len(header)} tensors", f"{max_tensors} (checkpoint.max_tensors)")
    base = 8 + n
    data_len = f.size - base
    entries = []
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = [int(x) for x in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
            if any(type(x) is not int for x in info["shape"]) or any(s < 0 for s in shape):
                raise ValueError("bad shape")
        except (KeyError, TypeError, ValueError) as e:
            raise diagnose.corrupt(path, f"bad safetensors header entry {name!r}: {e}") from None
        nbytes = math.prod(shape) * element_size(dtype)
        if begin < 0 or end < begin or end - begin != nbytes:
            raise diagnose.corrupt(path, f"bad safetensors header: {name!r} spans {end - begin} bytes "
                                         f"but its shape needs {nbytes}")
        if end > data_len:
            raise diagnose.truncated(path, f"tensor {name!r} extends past the end of the file")
        entries.append((begin, name, dtype, shape, nbytes))
    entries.sort(key=lambda e: e[0])   # file order: groups and reads follow the disk
    obj: dict[str, torch.Tensor] = {}
    recs: list[StorageRec] = []
    for begin, name, dtype, shape, nbytes in entries:
        t = torch.empty(shape, dtype=dtype, device="meta")
        recs.append(StorageRec(key=name, dtype=dtype, location="cpu", nbytes=nbytes,
                               meta=t.untyped_storage(), offset=base + begin))
        obj[name] = t
    return Parsed("safetensors", obj, recs, [f])
