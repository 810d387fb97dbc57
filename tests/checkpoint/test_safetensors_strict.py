"""The safetensors reader accepts exactly what the safetensors library accepts, and every dtype of it.

Each hand-built header below is one the library (``safetensors.torch.load_file``) refuses; a reader
that is more lenient serves guessed bytes from a file the reference calls broken. Dtypes of the
format that torch cannot hold (6-bit floats) are named as unsupported, not called corrupt.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from devmapd.engine import arena
from devmapd.engine.checkpoint import CheckpointError, inspect, read
from devmapd.engine.formats.safetensors import DTYPES

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
DATA = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def _file(path: Path, header: dict | bytes, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


CASES = {
    "trailing bytes": ({"a": F32x2}, DATA[:8] + b"\0"),
    "hole": ({"a": F32x2, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, DATA),
    "overlap": ({"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, DATA[:12]),
    "metadata not strings": ({"__metadata__": {"step": 1}, "a": F32x2}, DATA[:8]),
    "float offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}}, DATA[:8]),
    "dim beyond 64 bits": ({"a": {"dtype": "F32", "shape": [0, 1 << 64], "data_offsets": [0, 0]}}, b""),
    "utf-16 header": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'.encode("utf-16"), DATA[:8]),
    "NaN in header": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "x": NaN}', DATA[:8]),
    "odd F4 last dim": ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0\0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_headers_the_library_refuses_are_refused(tmp_path, case):
    header, data = CASES[case]
    p = _file(tmp_path / "x.safetensors", header, data)
    with pytest.raises(Exception):   # noqa: B017 - the library's own error types vary by case
        load_file(str(p))
    d = inspect(p).diagnosis
    assert d is not None and d.code in ("corrupt", "truncated", "not_a_checkpoint"), d
    with pytest.raises(CheckpointError):
        read(p).close()


def test_six_bit_floats_are_named_unsupported(tmp_path):
    p = _file(tmp_path / "f6.safetensors", {"a": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}},
              b"\0\0\0")
    d = inspect(p).diagnosis
    assert d is not None and d.code == "unsupported_format" and "6-bit float" in d.message, d


def test_every_dtype_the_library_knows_is_read(tmp_path):
    """The library's own dtype table (plus the ones it writes without listing) is covered."""
    from safetensors import torch as st_torch
    assert set(st_torch._TYPES) <= set(DTYPES), set(st_torch._TYPES) - set(DTYPES)
    for name in ("F8_E8M0", "F4"):
        assert name in DTYPES


def test_packed_fp4_is_served_with_torchs_shape(tmp_path):
    t = torch.arange(24, dtype=torch.uint8).view(torch.float4_e2m1fn_x2).reshape(2, 3, 4)
    p = tmp_path / "fp4.safetensors"
    save_file({"x": t}, str(p))
    lm = read(p)
    try:
        got = arena.build(lm.manifest, [s.fd for s in lm.segments])["x"]
        want = load_file(str(p))["x"]
        assert got.dtype == want.dtype and got.shape == want.shape == (2, 3, 4)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert lm.inspection.dtypes == {"float4_e2m1fn_x2": 24}
    finally:
        lm.close()
