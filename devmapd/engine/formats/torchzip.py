"""torch.save's zip format (torch >= 1.6): <archive>/data.pkl + one STORED member per storage.

We read only the zip's central directory, data.pkl and the tiny byteorder/version records. Storage
data offsets come from each member's local header (30 bytes + name + extra); they are checked to lie
inside the file and to hold exactly the bytes the pickle declares.
"""
from __future__ import annotations

import io
import struct
import zipfile

from devmapd.engine import diagnose

from .common import OpenedFile, Parsed
from .pickles import StorageCollector, load_pickle
from .torchscript import is_torchscript

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")   # 30 bytes, signature PK\x03\x04


def parse(f: OpenedFile, *, max_header_bytes: int, max_tensors: int, locate: bool) -> Parsed:
    path = f.path
    reader = f.reader()
    try:
        zf = zipfile.ZipFile(reader)
    except zipfile.BadZipFile as e:
        # The central directory sits at the end: a zip without one was cut short.
        if "not a zip file" in str(e).lower() or "truncated" in str(e).lower():
            raise diagnose.truncated(path, f"zip: {e}") from None
        raise diagnose.corrupt(path, f"bad zip archive: {e}") from None
    except _ZIP_ERRORS as e:
        raise diagnose.corrupt(path, f"bad zip archive: {type(e).__name__}: {e}") from None
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if is_torchscript(names):
        raise diagnose.torchscript(path)
    if len(infos) > max_tensors + 64:
        raise diagnose.too_large(path, f"{len(infos)} zip members", f"{max_tensors} tensors (checkpoint.max_tensors)")
    pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pkls) != 1:
        what = "a zip archive without data.pkl, not a PyTorch checkpoint" if not pkls else \
            "a zip archive with several data.pkl records"
        raise diagnose.not_a_checkpoint(path, what) if not pkls else diagnose.corrupt(path, what)
    prefix = pkls[0][: -len("data.pkl")]
    members = {}
    for info in infos:
        if info.filename in members:   # readers disagree on which duplicate wins: refuse
            raise diagnose.corrupt(path, f"duplicate zip member {info.filename}")
        if info.flag_bits & 0x1:
            raise diagnose.corrupt(path, f"encrypted zip member {info.filename}")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise diagnose.corrupt(path, f"compressed zip member {info.filename} (torch.save never compresses)")
        if info.header_offset + info.file_size > f.size:
            raise diagnose.truncated(path, f"zip member {info.filename} extends past the end of the file")
        members[info.filename] = info
    pkl = members[pkls[0]]
    if pkl.file_size > max_header_bytes:
        raise diagnose.too_large(path, f"a {pkl.file_size}-byte data.pkl", f"{max_header_bytes} bytes (checkpoint.max_header_bytes)")
    byteorder = _small_record(zf, members.get(prefix + "byteorder"), path)
    if byteorder not in (None, b"little"):
        raise diagnose.unsupported(path, f"a checkpoint saved on a {byteorder!r}-endian machine",
                                   "re-save it on a little-endian machine")
    data = _read_member(zf, pkl, path)
    collector = StorageCollector(path, max_tensors)
    obj = load_pickle(io.BytesIO(data), path, collector)
    recs = list(collector.records.values())
    for rec in recs:
        info = members.get(f"{prefix}data/{rec.key}")
        if info is None:
            raise diagnose.corrupt(path, f"storage {rec.key} named in data.pkl is missing from the archive")
        if info.file_size != rec.nbytes:
            raise diagnose.corrupt(path, f"storage {rec.key} declares {rec.nbytes} bytes but the archive "
                                         f"holds {info.file_size}")
        if locate:
            rec.offset = _data_offset(f, info)
    return Parsed("torch-zip", obj, recs, [f])


# What zipfile raises on a damaged archive or member (bad headers, CRC, cut-off data, names
# that do not decode, features it lacks): every one of them is a damaged file, never our bug.
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, NotImplementedError,
               zipfile.LargeZipFile)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> bytes:
    """Every member we read goes through here, so a damaged one is always ``corrupt``."""
    try:
        return zf.read(info)
    except _ZIP_ERRORS as e:
        raise diagnose.corrupt(path, f"zip member {info.filename} cannot be read: {type(e).__name__}: {e}") from None


def _small_record(zf: zipfile.ZipFile, info, path: str) -> bytes | None:
    if info is None:
        return None
    if info.file_size > 64:
        raise diagnose.corrupt(path, f"record {info.filename} is implausibly large")
    return _read_member(zf, info, path)


def _data_offset(f: OpenedFile, info: zipfile.ZipInfo) -> int:
    """Where a STORED member's bytes start: after its local header, name and (padding) extra field."""
    head = f.pread(_LOCAL_HEADER.size, info.header_offset)
    if len(head) != _LOCAL_HEADER.size:
        raise diagnose.truncated(f.path, f"local header of {info.filename} is cut off")
    sig, _ver, _flags, method, _t, _d, _crc, _csize, _usize, nlen, xlen = _LOCAL_HEADER.unpack(head)
    if sig != b"PK\x03\x04" or method != 0:
        raise diagnose.corrupt(f.path, f"bad local header for {info.filename}")
    name = f.pread(nlen, info.header_offset + _LOCAL_HEADER.size)
    if name.decode("utf-8", "replace") != info.filename:
        raise diagnose.corrupt(f.path, f"local header name of {info.filename} does not match the directory")
    start = info.header_offset + _LOCAL_HEADER.size + nlen + xlen
    if start + info.file_size > f.size:
        raise diagnose.truncated(f.path, f"data of {info.filename} extends past the end of the file")
    return start
