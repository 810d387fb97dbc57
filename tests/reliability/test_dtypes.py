"""Every dtype torch.save can write is served bit for bit, with torch.load's dtype, shape and view.

torch.save writes float8, uint16/32/64, bits and float4 tensors on an *untyped* (uint8) storage and
names the real dtype only in the tensor's rebuild call; a reader that takes the dtype from the
storage record serves raw bytes (uint16 [1, 65535, 300] came back as uint8 [1, 0, 255], ready, no
error). So the dtypes are not listed here: they are enumerated from torch, each one torch.save can
write is round-tripped through every format that can hold it, and what devmapd serves is compared
with ``torch.load(weights_only=True)`` as BYTES of the storage, plus dtype, shape, stride, storage
offset, storage sharing and the inspection's bytes per dtype. Quantized dtypes, which torch.save
writes only through quantized tensors, must be refused as ``unsupported_format``.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file as st_load
from safetensors.torch import save as st_serialize
from safetensors.torch import save_file as st_save

from devmapd.engine import arena, checkpoint

warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")

ALL_DTYPES: list[torch.dtype] = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)},
                                       key=str)


def _random_bytes(nbytes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def _cannot_save(dt: torch.dtype) -> str | None:
    """Why torch.save cannot write a plain tensor of ``dt`` (its own error), or None if it can."""
    try:
        t = _random_bytes(4 * dt.itemsize, 0).view(dt)
        torch.save(t, io.BytesIO())
    except Exception as e:   # noqa: BLE001 - the reason is the point: it is reported with the skip
        return f"torch.save refuses {dt}: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return None


_REASONS = {dt: _cannot_save(dt) for dt in ALL_DTYPES}
SAVEABLE = [dt for dt in ALL_DTYPES if _REASONS[dt] is None]


def _quantizable(dt: torch.dtype) -> bool:
    try:
        torch.quantize_per_tensor(torch.ones(4), 0.5, 0, dt)
    except Exception:   # noqa: BLE001 - not a quantized dtype (or not one quantize_per_tensor makes)
        return False
    return True


QUANTIZED = [dt for dt in ALL_DTYPES if _quantizable(dt)]
# Quantized dtypes are not round-tripped: torch.load makes quantized tensors of them (even of a
# plain byte view saved as qint8), which devmapd refuses as unsupported_format (tested below).
ROUND_TRIP = [dt for dt in SAVEABLE if dt not in QUANTIZED]


def _name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _objects(dt: torch.dtype) -> dict[str, Any]:
    """Random bits in every tensor shape a state dict meets: views share one storage."""
    base = _random_bytes(6 * 5 * dt.itemsize, 1).view(dt).view(6, 5)
    return {
        "base": base,
        "view": base[1:, ::2],                         # storage offset 5, stride (5, 2)
        "transposed": base.t(),                        # stride (1, 5)
        "row": base[4],                                # offset 20
        "alone": _random_bytes(7 * dt.itemsize, 2).view(dt),
        "scalar": _random_bytes(dt.itemsize, 3).view(dt).view(()),
        "empty": _random_bytes(0, 4).view(dt),
        "param": torch.nn.Parameter(_random_bytes(3 * dt.itemsize, 5).view(dt), requires_grad=False),
    }


def _storage_bytes(t: torch.Tensor) -> bytes:
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).numpy().tobytes()


def assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want), what
    for k, w in want.items():
        g = got[k]
        where = f"{what}: {k}"
        assert g.dtype == w.dtype, f"{where}: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{where}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert g.stride() == w.stride(), f"{where}: stride {g.stride()} != {w.stride()}"
        assert g.storage_offset() == w.storage_offset(), where
        assert _storage_bytes(g) == _storage_bytes(w), f"{where}: the bits differ"
        assert isinstance(g, torch.nn.Parameter) == isinstance(w, torch.nn.Parameter), where
    # tensors that share a storage in torch.load's result share it in devmapd's, and only those
    def groups(d: dict[str, torch.Tensor]) -> set[frozenset[str]]:
        by: dict[int, set[str]] = {}
        for k, t in d.items():
            by.setdefault(t.untyped_storage()._cdata, set()).add(k)
        return {frozenset(v) for v in by.values()}
    assert groups(got) == groups(want), what


def _expected_dtype_bytes(want: dict[str, torch.Tensor]) -> dict[str, int]:
    """Inspection's bytes per dtype: each distinct storage once, under its tensors' dtype."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for t in want.values():
        st = t.untyped_storage()
        if st._cdata not in seen:
            seen.add(st._cdata)
            out[_name(t.dtype)] = out.get(_name(t.dtype), 0) + st.nbytes()
    return out


def _served(path: Path) -> tuple[dict[str, torch.Tensor], checkpoint.Inspection]:
    lm = checkpoint.read(path)
    try:
        return _copy_out(arena.build(lm.manifest, [s.fd for s in lm.segments])), lm.inspection
    finally:
        lm.close()


def _copy_out(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same views on private copies of their storages (sharing kept), so nothing depends on
    the arena's mapping staying open."""
    copies: dict[int, torch.UntypedStorage] = {}
    out = {}
    for k, t in tensors.items():
        src = t.untyped_storage()
        st = copies.get(src._cdata)
        if st is None:
            st = copies[src._cdata] = torch.UntypedStorage(src.nbytes())
            st.copy_(src)
        v = torch.empty(0, dtype=t.dtype).set_(st, t.storage_offset(), t.shape, t.stride())
        out[k] = torch.nn.Parameter(v, requires_grad=False) if isinstance(t, torch.nn.Parameter) else v
    return out


def test_the_dtype_list_comes_from_torch_and_every_skip_has_a_reason():
    """The loop below is over torch's own dtypes; what it skips, torch.save itself cannot write."""
    assert len(ALL_DTYPES) >= 40, ALL_DTYPES
    for dt in (torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
               torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu, torch.bfloat16,
               torch.complex32, torch.bool, torch.bits16, torch.float4_e2m1fn_x2):
        assert dt in ROUND_TRIP, dt
    assert len(ROUND_TRIP) >= 25 and len(QUANTIZED) == 5, (ROUND_TRIP, QUANTIZED)
    for dt in ALL_DTYPES:
        if dt not in ROUND_TRIP:
            assert dt in QUANTIZED or "torch.save refuses" in str(_REASONS[dt]), dt


@pytest.mark.parametrize("dt", ROUND_TRIP, ids=_name)
@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
def test_torch_save_round_trips_every_dtype_bit_for_bit(tmp_path, dt, fmt):
    obj = _objects(dt)
    p = tmp_path / f"{_name(dt)}.pt"
    torch.save(obj, p, _use_new_zipfile_serialization=(fmt == "torch-zip"))
    try:
        want = torch.load(p, weights_only=True)
    except AttributeError as e:
        # torch's own legacy reader cannot read the untyped storages its legacy writer wrote
        # ("UntypedStorage has no attribute dtype"); the reference is then what was saved.
        assert fmt == "torch-legacy" and "UntypedStorage" in str(e), e
        want = obj
    got, insp = _served(p)
    assert insp.format == fmt
    assert_same_bits(got, want, f"{fmt} {dt}")
    assert insp.dtypes == _expected_dtype_bytes(want), insp.dtypes
    assert checkpoint.inspect(p).dtypes == insp.dtypes


def _safetensors_refuses(dt: torch.dtype) -> str | None:
    try:
        # Serialise to bytes: save_file replaces its target by rename, so it must never be
        # pointed at a device such as /dev/null.
        st_serialize({"x": _random_bytes(4 * dt.itemsize, 0).view(dt)})
    except Exception as e:   # noqa: BLE001 - reported with the skip
        return f"safetensors cannot hold {dt}: {type(e).__name__}: {str(e)[:60]}"
    return None


@pytest.mark.parametrize("dt", ROUND_TRIP, ids=_name)
def test_safetensors_round_trips_every_dtype_it_can_hold(tmp_path, dt):
    reason = _safetensors_refuses(dt)
    if reason:
        pytest.skip(reason)
    # a 0-d tensor of a packed dtype (two fp4 values a byte) has no safetensors shape
    keep = ("alone", "empty") if dt == torch.float4_e2m1fn_x2 else ("alone", "scalar", "empty")
    obj = {k: v for k, v in _objects(dt).items() if k in keep}
    obj["base"] = _random_bytes(6 * 4 * dt.itemsize, 6).view(dt).view(6, 4)
    p = tmp_path / f"{_name(dt)}.safetensors"
    st_save(obj, str(p))
    want = st_load(str(p))
    got, insp = _served(p)
    assert insp.format == "safetensors"
    assert_same_bits(got, want, f"safetensors {dt}")
    assert insp.dtypes == _expected_dtype_bytes(want)


def test_uint16_and_float8_values_survive_as_numbers(tmp_path):
    """The issue's own example, as values: not only the same bits, the same numbers."""
    u = torch.tensor([1, 65535, 300], dtype=torch.uint16)
    f8 = torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn)
    p = tmp_path / "ex.pt"
    torch.save({"u": u, "f8": f8}, p)
    got, insp = _served(p)
    assert got["u"].dtype == torch.uint16 and got["u"].to(torch.int32).tolist() == [1, 65535, 300]
    assert got["f8"].dtype == torch.float8_e4m3fn and got["f8"].float().tolist() == [0.5, -2.0, 448.0]
    assert insp.dtypes == {"uint16": 6, "float8_e4m3fn": 3}


@pytest.mark.parametrize("dt", QUANTIZED, ids=_name)
@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
@pytest.mark.parametrize("how", ["quantize_per_tensor", "byte-view"])
def test_quantized_tensors_are_unsupported_format_with_the_fix(tmp_path, dt, fmt, how):
    """Today's main called these corrupt; the diagnosis names the kind and the fix."""
    if how == "quantize_per_tensor":
        q = torch.quantize_per_tensor(torch.linspace(-1, 1, 8), 0.25, 0, dt)
    else:   # a plain tensor viewed as a quantized dtype: torch.load makes it a quantized tensor
        q = _random_bytes(8 * dt.itemsize, 7).view(dt)
    p = tmp_path / "q.pt"
    torch.save({"w": torch.ones(2), "q": q}, p, _use_new_zipfile_serialization=(fmt == "torch-zip"))
    if fmt == "torch-zip":
        assert torch.load(p, weights_only=True)["q"].is_quantized
    for d in (checkpoint.inspect(p).diagnosis, _read_error(p)):
        assert d is not None and d.code == "unsupported_format", d
        assert "quantized" in d.message and "dequantize()" in d.message, d


def _read_error(p: Path) -> Any:
    with pytest.raises(checkpoint.CheckpointError) as ei:
        checkpoint.read(p).close()
    return ei.value.diagnosis


def test_one_storage_viewed_as_two_dtypes_is_refused_not_misread(tmp_path):
    """torch.save writes a uint16 tensor and its float8 view on one untyped storage; the arena
    serves one dtype per storage, so this is unsupported_format with the fix, never wrong bits."""
    x = torch.tensor([1, 2, 3, 4], dtype=torch.int32).to(torch.uint16)
    p = tmp_path / "two.pt"
    torch.save({"x": x, "y": x.view(torch.float8_e4m3fn)}, p)
    d = _read_error(p)
    assert d.code == "unsupported_format" and "uint16" in d.message and "float8_e4m3fn" in d.message
    assert "clone()" in d.message


# ----------------------------------------------------------------------------- through a daemon

def test_daemon_serves_uint16_and_float8_bit_for_bit(tmp_path, rdaemon):
    mdir = tmp_path / "d" / "models"
    mdir.mkdir(parents=True)
    u = torch.tensor([[1, 65535, 300], [7, 8, 40000]], dtype=torch.int32).to(torch.uint16)
    f8 = _random_bytes(12, 9).view(torch.float8_e4m3fn).view(3, 4)
    e5 = _random_bytes(6, 10).view(torch.float8_e5m2)
    torch.save({"u16": u, "u16_view": u[:, 1:], "f8": f8, "u64": torch.arange(3).to(torch.uint64)},
               mdir / "exotic.pt")
    torch.save({"u16": u}, mdir / "exotic_legacy.pt", _use_new_zipfile_serialization=False)
    st_save({"f8": f8.contiguous(), "e5": e5, "u32": torch.arange(5).to(torch.uint32)}, str(mdir / "fp8.safetensors"))
    d = rdaemon(model_dir=mdir)
    for name in ("exotic", "exotic_legacy", "fp8"):
        m = d.wait_model(name, timeout=60)
        assert m["state"] == "ready", m
    want = {"exotic": torch.load(mdir / "exotic.pt", weights_only=True),
            "exotic_legacy": {"u16": u},
            "fp8": st_load(str(mdir / "fp8.safetensors"))}
    with d.client() as c:
        for name, ref in want.items():
            got = c.fetch(name)
            assert_same_bits(_copy_out(got), ref, f"daemon {name}")
    assert d.proc.poll() is None
