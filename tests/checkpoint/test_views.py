"""A tensor view the file declares is judged as torch.load judges it, never as the meta device does.

On the meta device ``set_`` turns a negative stride positive and grows the storage to fit any
offset, so a reader that trusts the meta tensor serves files torch.load refuses. These files are
real ``torch.save`` output whose pickle is rewritten the way an attacker or a bad writer would:
torch.load must refuse each of them, and devmapd must call each ``corrupt``. The identity rewrite
(nothing changed) proves the rewriting itself leaves a file both readers accept.
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch

from devmapd.engine import arena, checkpoint
from devmapd.engine.checkpoint import CheckpointError, inspect, read

# arange(1000.)[5::77]: storage offset 5, size (13,), stride (77,), pickled as
# BININT1 5, BININT1 13, TUPLE1, <memo put>, BININT1 77, TUPLE1
_OFFSET_SIZE = b"K\x05K\x0d\x85"
_STRIDE = b"K\x4d\x85"


def _int(v: int) -> bytes:
    """A pickle int opcode for any v: BININT (4 bytes, signed) or LONG1 for the big ones."""
    if -(1 << 31) <= v < (1 << 31):
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


MUTATIONS = {
    "identity": (_STRIDE, _STRIDE),
    "negative stride": (_STRIDE, _int(-77) + b"\x85"),
    "huge stride": (_STRIDE, _int(1 << 62) + b"\x85"),
    "offset past the storage": (_OFFSET_SIZE, _int(10 ** 9) + b"K\x0d\x85"),
    "negative offset": (_OFFSET_SIZE, _int(-5) + b"K\x0d\x85"),
    "negative size": (_OFFSET_SIZE, b"K\x05" + _int(-13) + b"\x85"),
    "size past the storage": (_OFFSET_SIZE, b"K\x05K\x0e\x85"),
}


def _rewrite(src: Path, dst: Path, old: bytes, new: bytes, legacy: bool) -> None:
    if legacy:   # the object pickle is read sequentially: growing it shifts nothing that matters
        data = src.read_bytes()
        assert data.count(old) == 1, "the tensor's view is not where this test expects it"
        dst.write_bytes(data.replace(old, new))
        return
    with zipfile.ZipFile(src) as z:
        entries = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            if info.filename.endswith("/data.pkl"):
                assert data.count(old) == 1, "the tensor's view is not where this test expects it"
                data = data.replace(old, new)
            z.writestr(info, data)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_views_torch_load_refuses_are_corrupt(tmp_path, mutation, legacy):
    src = tmp_path / "src.pt"
    view = torch.arange(1000.0)[5::77]
    assert (view.storage_offset(), tuple(view.shape), view.stride()) == (5, (13,), (77,))
    torch.save({"w": view, "b": torch.ones(2)}, src, _use_new_zipfile_serialization=not legacy)
    p = tmp_path / "bad.pt"
    old, new = MUTATIONS[mutation]
    _rewrite(src, p, old, new, legacy)
    if mutation == "identity":
        want = torch.load(p, weights_only=True)
        lm = read(p)
        try:
            got = arena.build(lm.manifest, [s.fd for s in lm.segments])
            assert got["w"].stride() == (77,) and got["w"].storage_offset() == 5
            assert torch.equal(got["w"], want["w"])
        finally:
            lm.close()
        return
    with pytest.raises(RuntimeError):
        torch.load(p, weights_only=True)
    d = inspect(p).diagnosis
    assert d is not None and d.code == "corrupt", d
    with pytest.raises(CheckpointError) as ei:
        read(p).close()
    d = ei.value.diagnosis
    assert d.code == "corrupt", d
    if "negative" in mutation:
        assert "negative" in d.message, d
    else:
        assert "past the end of its storage" in d.message or "invalid" in d.message, d


def test_negative_stride_diagnosis_is_early_and_allocates_nothing(tmp_path):
    """The refusal happens while the pickle is parsed: inspect (which reads no data) says it."""
    src = tmp_path / "src.pt"
    torch.save({"w": torch.arange(1000.0)[5::77]}, src)
    p = tmp_path / "neg.pt"
    _rewrite(src, p, _STRIDE, _int(-77) + b"\x85", legacy=False)
    insp = checkpoint.inspect(p)
    assert insp.diagnosis is not None and insp.diagnosis.code == "corrupt"
    assert "negative stride (-77)" in insp.diagnosis.message and "torch.load refuses" in insp.diagnosis.message
