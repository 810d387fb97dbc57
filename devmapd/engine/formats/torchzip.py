"""torch.save's zip format (torch >= 1.6): <archive>/data.pkl + one STORED member per storage.

We read only the zip's central directory, data.pkl and the tiny byteorder/version records. Storage
data offsets come from each member's local header (30 bytes + name + extra); they are checked to lie
inside the file and to hold exactly the bytes the pickle declares.
"""
from __future__ import annotations

import io
import re
import struct
import zipfile

from devmapd.engine import diagnose

from .common import OpenedFile, Parsed
from .pickles import StorageCollector, load_pickle
from .torchscript import is_torchscript

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")   # 30 bytes, signature PK\x03\x04


_END_RECORD = struct.Struct("<4sHHHHIIH")         # 22 bytes, signature PK\x05\x06
_ZIP64_LOCATOR = struct.Struct("<4sIQI")          # 20 bytes, signature PK\x06\x07
_ZIP64_END = struct.Struct("<4sQHHIIQQQQ")        # 56 bytes, signature PK\x06\x06


def _check_end_record(f: OpenedFile) -> tuple[int, int] | None:
    """What zipfile overlooks and torch's reader (miniz) refuses: a multi-disk end record, entry
    counts that disagree, a comment length that does not reach the end of the file."""
    tail_len = min(f.size, _END_RECORD.size + 0xFFFF)
    tail = f.pread(tail_len, f.size - tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _END_RECORD.size > len(tail):
        return None   # no end record at all: zipfile says so in its own words
    _sig, disk, cd_disk, here, total, cd_size, cd_offset, comment = _END_RECORD.unpack_from(tail, at)
    if at + _END_RECORD.size + comment != len(tail):
        raise diagnose.corrupt(f.path, "the zip end record does not match the end of the file")
    loc = at - _ZIP64_LOCATOR.size
    if loc >= 0 and tail[loc:loc + 4] == b"PK\x06\x07":
        # torch.save always writes zip64 records, and torch's reader then trusts them, not the
        # classic record above: check these the way it does
        _s, _d, z64_at, disks = _ZIP64_LOCATOR.unpack_from(tail, loc)
        rel = z64_at - (f.size - len(tail))
        if disks not in (0, 1) or not 0 <= rel <= loc - _ZIP64_END.size:
            raise diagnose.corrupt(f.path, "the zip64 end locator is damaged")
        sig, rec_size, _v1, _v2, disk, cd_disk, here, total, cd_size, cd_offset = _ZIP64_END.unpack_from(tail, rel)
        # rec_size counts the record after its first 12 bytes; torch's reader refuses a short one
        if sig != b"PK\x06\x06" or rec_size < _ZIP64_END.size - 12:
            raise diagnose.corrupt(f.path, "the zip64 end record is damaged")
    if (disk, cd_disk) not in ((0, 0), (1, 1)) or here != total:
        raise diagnose.corrupt(f.path, "the zip end record describes a multi-disk archive")
    return int(cd_offset), int(cd_size)


def parse(f: OpenedFile, *, max_header_bytes: int, max_tensors: int, locate: bool) -> Parsed:
    path = f.path
    directory = _check_end_record(f)
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
    # zipfile lets the last directory entry's name, extra field or comment run past the directory
    # (into the end records); torch's reader refuses that, and it means the entry is damaged.
    if directory is not None:
        _check_directory(f, *directory)
    # torch.save's first member starts at byte 0. zipfile silently shifts every offset when the
    # directory is not where the end record says (bytes added or removed before it, or prepended
    # data); torch.load refuses such a file, and so do we rather than guess where members are.
    if infos and min(i.header_offset for i in infos) != 0:
        raise diagnose.corrupt(path, "the zip directory's offsets do not match the file (bytes were "
                                     "added or removed before its end)")
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
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if info.filename in members:   # readers disagree on which duplicate wins: refuse
            raise diagnose.corrupt(path, f"duplicate zip member {info.filename}")
        if not info.filename.startswith(prefix):   # torch.save puts every record in one folder
            raise diagnose.corrupt(path, f"zip member {info.filename!r} lies outside the archive folder {prefix!r}")
        if info.flag_bits & _ENCRYPTION_FLAGS:
            raise diagnose.corrupt(path, f"encrypted zip member {info.filename}")
        if info.volume not in (0, 1):   # "disk number start": torch's reader refuses multi-disk
            raise diagnose.corrupt(path, f"zip member {info.filename} claims to start on disk {info.volume}")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise diagnose.corrupt(path, f"compressed zip member {info.filename} (torch.save never compresses)")
        if info.header_offset + info.file_size > f.size:
            raise diagnose.truncated(path, f"zip member {info.filename} extends past the end of the file")
        members[info.filename] = info
    pkl = members[pkls[0]]
    if pkl.file_size > max_header_bytes:
        raise diagnose.too_large(path, f"a {pkl.file_size}-byte data.pkl", f"{max_header_bytes} bytes (checkpoint.max_header_bytes)")
    _check_version(zf, members, prefix, path)
    byteorder = _small_record(zf, members.get(prefix + "byteorder"), path)
    if byteorder not in (None, b"little", b"big"):
        raise diagnose.corrupt(path, f"the byteorder record {byteorder[:16]!r} is neither little nor big")
    serial = _small_record(zf, members.get(prefix + ".data/serialization_id"), path)
    if serial is not None:
        try:
            serial.decode("utf-8")   # torch.load hands it on as text and fails when it is not
        except UnicodeDecodeError:
            raise diagnose.corrupt(path, "the serialization id record is not text") from None
    alignment = _small_record(zf, members.get(prefix + ".storage_alignment"), path)
    if alignment is not None:
        try:
            int(alignment)   # torch.load parses it so, and refuses the file when it cannot
        except ValueError:
            raise diagnose.corrupt(path, f"the storage alignment record {alignment[:16]!r} is not a number") from None
    if byteorder not in (None, b"little"):
        raise diagnose.unsupported(path, f"a checkpoint saved on a {byteorder!r}-endian machine",
                                   "re-save it on a little-endian machine")
    data = _read_member(zf, pkl, path)
    collector = StorageCollector(path, max_tensors)
    obj = load_pickle(io.BytesIO(data), path, collector)
    recs = list(collector.records.values())
    for rec in recs:
        member = members.get(f"{prefix}data/{rec.key}")
        if member is None:
            raise diagnose.corrupt(path, f"storage {rec.key} named in data.pkl is missing from the archive")
        if member.file_size != rec.nbytes:
            raise diagnose.corrupt(path, f"storage {rec.key} declares {rec.nbytes} bytes but the archive "
                                         f"holds {member.file_size}")
        if locate:
            rec.offset = _data_offset(f, member)
    # torch.load reads every record besides the storages too (version, byteorder,
    # .data/serialization_id, ...) and refuses the file if any local header is damaged.
    data_prefix = prefix + "data/"
    for info in infos:
        if not info.filename.startswith(data_prefix):
            _data_offset(f, info)
    return Parsed("torch-zip", obj, recs, [f])


# What zipfile raises on a damaged archive or member (bad headers, CRC, cut-off data, names
# that do not decode, features it lacks): every one of them is a damaged file, never our bug.
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, NotImplementedError,
               zipfile.LargeZipFile)


def _check_directory(f: OpenedFile, offset: int, size: int) -> None:
    """Walk the raw directory entries: together they must fill the directory exactly (zipfile
    quietly cuts a name, extra field or comment short; torch's reader refuses the file)."""
    if offset + size > f.size:   # checked before reading: the sizes come from the file
        raise diagnose.corrupt(f.path, "the zip directory extends past the end of the file")
    raw = f.pread(size, offset)
    pos = 0
    while pos < len(raw):
        if raw[pos:pos + 4] != b"PK\x01\x02" or pos + 46 > len(raw):
            break
        n, x, c = struct.unpack_from("<HHH", raw, pos + 28)
        pos += 46 + n + x + c
    if len(raw) != size or pos != size:
        raise diagnose.corrupt(f.path, "the zip directory entries do not fill the directory exactly")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> bytes:
    """Every member we read goes through here, so a damaged one is always ``corrupt``."""
    try:
        return zf.read(info)
    except _ZIP_ERRORS as e:
        raise diagnose.corrupt(path, f"zip member {info.filename} cannot be read: {type(e).__name__}: {e}") from None


# general purpose flags torch's reader (miniz) refuses: encrypted, strongly encrypted, masked
_ENCRYPTION_FLAGS = 0x1 | 0x40 | 0x2000
# The archive format versions torch reads (caffe2/serialize: kMin/kMaxSupportedFileFormatVersion);
# torch.save writes 3. Outside this range torch.load refuses the file, so devmapd does too.
_VERSIONS = range(1, 11)
_LEADING_INT = re.compile(rb"\s*[+-]?\d+")


def _check_version(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], prefix: str, path: str) -> None:
    """torch reads ``.data/version`` (or ``version``) as a number, refusing a missing one."""
    info = members.get(prefix + ".data/version") or members.get(prefix + "version")
    if info is None:
        raise diagnose.corrupt(path, "the archive has no version record")
    raw = _small_record(zf, info, path) or b""
    m = _LEADING_INT.match(raw)   # parsed the way torch parses it (strtoll: trailing bytes ignored)
    if m is None or int(m.group()) not in _VERSIONS:
        raise diagnose.corrupt(path, f"the archive version record {raw[:16]!r} is not a version torch reads")


def _small_record(zf: zipfile.ZipFile, info: zipfile.ZipInfo | None, path: str) -> bytes | None:
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
    start: int = info.header_offset + _LOCAL_HEADER.size + nlen + xlen
    if start + info.file_size > f.size:
        raise diagnose.truncated(f.path, f"data of {info.filename} extends past the end of the file")
    return start
