"""torch.save's legacy stream (``_use_new_zipfile_serialization=False``, torch < 1.6).

Layout: pickles of the magic number, the protocol version and sys_info; the object pickle (storages
as persistent ids); the list of storage keys; then each storage's raw bytes preceded by an 8-byte
element count, in the order of that list. We parse the header pickles only; the data offsets
follow from the declared sizes, so locating storages reads 8 bytes per storage and no data.
"""
from __future__ import annotations

import struct

from devmapd.engine import diagnose

from .common import OpenedFile, Parsed
from .pickles import StorageCollector, load_pickle

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def parse(f: OpenedFile, *, max_header_bytes: int, max_tensors: int, locate: bool) -> Parsed:
    path = f.path
    reader = f.reader()
    if load_pickle(reader, path) != MAGIC_NUMBER:
        raise diagnose.not_a_checkpoint(path)
    if load_pickle(reader, path) != PROTOCOL_VERSION:
        raise diagnose.unsupported(path, "a legacy checkpoint with an unknown protocol version",
                                   "load it with the torch that wrote it and re-save it")
    sys_info = load_pickle(reader, path)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise diagnose.unsupported(path, "a checkpoint saved on a big-endian machine",
                                   "re-save it on a little-endian machine")
    collector = StorageCollector(path, max_tensors, legacy=True)
    obj = load_pickle(reader, path, collector)
    keys = load_pickle(reader, path)
    header_end = reader.tell()
    if header_end > max_header_bytes:
        raise diagnose.too_large(path, f"a {header_end}-byte pickle header",
                                 f"{max_header_bytes} bytes (checkpoint.max_header_bytes)")
    if not isinstance(keys, list) or any(str(k) not in collector.records for k in keys):
        raise diagnose.corrupt(path, "the storage key list does not match the pickle")
    recs_by_key = collector.records
    order = [recs_by_key[str(k)] for k in keys]
    if len({id(r) for r in order}) != len(order) or len(order) != len(recs_by_key):
        raise diagnose.corrupt(path, "the storage key list does not match the pickle")
    # Each storage: 8-byte element count, then count * element_size bytes.
    expected_end = header_end + sum(8 + r.nbytes for r in order)
    if expected_end > f.size:
        raise diagnose.truncated(path, f"the file should be {expected_end} bytes but is {f.size}")
    if locate:
        pos = header_end
        for rec in order:
            raw = f.pread(8, pos)
            if len(raw) != 8:
                raise diagnose.truncated(path)
            (count,) = struct.unpack("<q", raw)
            # counted in the SAVED element size (uint8 for an untyped storage), not in the dtype
            # its tensors view it as
            if count * collector.saved_itemsize[rec.key] != rec.nbytes:
                raise diagnose.corrupt(path, f"storage {rec.key} declares {rec.nbytes} bytes in the pickle "
                                             f"but {count} elements in the data")
            rec.offset = pos + 8
            pos += 8 + rec.nbytes
    return Parsed("torch-legacy", obj, order, [f])
