"""Damaged torch zip archives that torch.load refuses are refused, never served from guessed offsets.

Python's zipfile is lenient where torch's reader (miniz) is strict: it shifts every offset when
bytes were added or removed before the directory, ignores disk numbers and flags, and is never
asked about records devmapd does not need. Each case here was found by the property test
(tests/reliability/test_format_fuzz.py) and is kept as a fixed regression: a real torch.save file,
damaged one way; torch.load must refuse it and devmapd must diagnose it (and no other exception
may escape the parser).
"""
from __future__ import annotations

import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from devmapd.engine.checkpoint import CheckpointError, inspect, read


def _members(data: bytes) -> dict[str, zipfile.ZipInfo]:
    import io
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {i.filename.split("/", 1)[1]: i for i in z.infolist()}


def _central(data: bytes, name: str) -> int:
    """Offset of the central directory entry of member ``<prefix>/name``."""
    at = 0
    while True:
        at = data.index(b"PK\x01\x02", at)
        nlen = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46:at + 46 + nlen].split(b"/", 1)[1] == name.encode():
            return at
        at += 4


def prepended(data: bytes) -> bytes:
    return b"PK\x05\x06" + data


def byte_deleted_before_directory(data: bytes) -> bytes:
    at = _members(data)[".storage_alignment"].header_offset + 40   # inside a member nobody needs
    return data[:at] + data[at + 1:]


def multi_disk(data: bytes) -> bytes:
    """torch.save writes zip64 end records, which torch's reader trusts: damage those."""
    b = bytearray(data)
    z64 = len(b) - 22 - 20 - 56
    assert b[z64:z64 + 4] == b"PK\x06\x06"
    b[z64 + 24] ^= 0x01         # entries on this disk != entries in total
    return bytes(b)


def zip64_disk(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) - 22 - 20 - 56 + 16] = 1   # zip64 "number of this disk" = 1, directory on disk 0
    return bytes(b)


def zip64_record_size(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) - 22 - 20 - 56 + 4] = 0    # the zip64 end record's own size: 44 -> 0
    return bytes(b)


def comment_past_directory(data: bytes) -> bytes:
    b = bytearray(data)
    b[_central(data, ".data/serialization_id") + 33] ^= 0x01   # comment length 0 -> 256
    return bytes(b)


def member_outside_folder(data: bytes) -> bytes:
    b = bytearray(data)
    at = _central(data, "version") + 46
    b[at + 3] ^= 0x20           # "seed/version" -> "seeD/version" in the directory
    return bytes(b)


def masked_flag(data: bytes) -> bytes:
    b = bytearray(data)
    at = _central(data, "data/0") + 8
    struct.pack_into("<H", b, at, struct.unpack_from("<H", b, at)[0] | 0x2000)
    return bytes(b)


def no_version_record(data: bytes) -> bytes:
    b = bytearray(data)
    at = _central(data, "version") + 46
    b[at + len("xxxx/") + 1] ^= 0x01   # "version" -> "vdrsion": the record is gone
    return bytes(b)


def record(name: str, value: bytes) -> Callable[[bytes], bytes]:
    """The archive rebuilt with record ``name`` holding ``value`` (a value torch.load refuses)."""
    def rewrite(data: bytes) -> bytes:
        import io
        out = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
            for i in src.infolist():
                dst.writestr(i, value if i.filename.split("/", 1)[1] == name else src.read(i))
        return out.getvalue()
    rewrite.__name__ = f"record_{name}_{value!r}"
    return rewrite


def damaged_local_header(name: str) -> Callable[[bytes], bytes]:
    def damage(data: bytes) -> bytes:
        b = bytearray(data)
        b[_members(data)[name].header_offset] ^= 0x01   # the PK\x03\x04 signature
        return bytes(b)
    damage.__name__ = f"damaged_local_header_of_{name}"
    return damage


CASES = [prepended, byte_deleted_before_directory, multi_disk, zip64_disk, zip64_record_size,
         comment_past_directory, member_outside_folder, masked_flag,
         no_version_record, record("version", b"99\n"), record("version", b"x"),
         record(".storage_alignment", b"4P"),
         record(".data/serialization_id", b"\xb4" * 40), record("byteorder", b"lottle"), damaged_local_header(".data/serialization_id"),
         damaged_local_header("byteorder"), damaged_local_header("version")]


@pytest.mark.parametrize("damage", CASES, ids=lambda f: f.__name__)
def test_damaged_archives_torch_refuses_are_diagnosed(tmp_path: Path, damage):
    src = tmp_path / "seed.pt"
    torch.save({"w": torch.arange(16.0), "n": torch.arange(3)}, src)
    p = tmp_path / "bad.pt"
    p.write_bytes(damage(src.read_bytes()))
    with pytest.raises(Exception):   # noqa: B017 - torch's error types vary by case
        torch.load(p, weights_only=True)
    d = inspect(p).diagnosis
    assert d is not None and d.code in ("corrupt", "truncated", "not_a_checkpoint"), d
    with pytest.raises(CheckpointError):
        read(p).close()
