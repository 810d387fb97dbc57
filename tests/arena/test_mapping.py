"""mapping.py against torch.load itself, on real files whose storages say cuda:N.

The files are written by torch.save with the location tag a GPU machine would have written
(torch.serialization.location_tag patched for the save only), so the pickle really says
"cuda:3" and torch.load without a map_location refuses them on this CPU-only machine.
"""
from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devmapd.engine import arena, mapping
from devmapd.engine.mapping import DeviceMismatchError

HAS_CUDA = torch.cuda.is_available()


def save_as_if_on(path: Path, obj, location_of_storage, monkeypatch) -> None:
    """torch.save ``obj`` with each storage tagged ``location_of_storage(storage)``."""
    real = torch.serialization.location_tag
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag",
                  lambda storage: location_of_storage(storage) or real(storage))
        torch.save(obj, path)


def load_with_locations(path: Path):
    """torch.load to CPU, recording each storage's saved location (as checkpoint.read does)."""
    seen: dict[int, str] = {}

    def record(storage, location):
        seen[storage.data_ptr()] = location
        return storage

    obj = torch.load(path, map_location=record, weights_only=True)
    return obj, lambda t: seen[t.untyped_storage().data_ptr()]


def _model_file(tmp_path, monkeypatch, tags: dict[str, str]):
    """A state dict whose storages are tagged per key prefix; tied weights included."""
    torch.manual_seed(1)
    w = torch.randn(4, 3)
    sd = collections.OrderedDict(
        enc=w, dec=w, enc_t=w.t(), bias=torch.randn(3), steps=torch.tensor(7),
        half=torch.randn(2, 2).half())
    ptr_tag = {}
    for k, v in sd.items():
        ptr_tag[v.untyped_storage().data_ptr()] = tags.get(k, tags.get("*", "cpu"))
    path = tmp_path / "ckpt.pt"
    save_as_if_on(path, sd, lambda s: ptr_tag.get(s.data_ptr()), monkeypatch)
    return path


def _served(path, packer):
    """What a devmapd client gets: the daemon read the file to CPU and packed it."""
    obj, loc_of = load_with_locations(path)
    m, seg = packer(obj, location_of=loc_of)
    return m, seg


def _compare(ours, ref):
    assert type(ours) is type(ref) and list(ours) == list(ref)
    ptrs_ours, ptrs_ref = {}, {}
    for k in ref:
        a, b = ours[k], ref[k]
        assert a.device == b.device and a.dtype == b.dtype
        assert a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a.cpu(), b.cpu())
        if b.untyped_storage().nbytes() == 0:
            continue   # a manifest cannot tell empty storages apart (same offset); harmless
        ptrs_ours.setdefault(a.untyped_storage()._cdata, []).append(k)   # storage identity
        ptrs_ref.setdefault(b.untyped_storage()._cdata, []).append(k)
    # the same storage-sharing pattern as torch.load: tied weights stay tied
    assert sorted(ptrs_ours.values()) == sorted(ptrs_ref.values())


def test_the_files_really_say_cuda(tmp_path, monkeypatch):
    if HAS_CUDA:
        pytest.skip("only meaningful where there is no GPU")
    path = _model_file(tmp_path, monkeypatch, {"*": "cuda:3"})
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)
    obj, loc_of = load_with_locations(path)
    assert {loc_of(t) for t in obj.values()} == {"cuda:3"}


FORMS = {
    "str": "cpu",
    "device": torch.device("cpu"),
    "dict": {"cuda:3": "cpu", "cuda:0": "cpu"},
    "callable": lambda s, loc: s,
}


@pytest.mark.parametrize("form", list(FORMS))
def test_all_four_forms_match_torch_load(tmp_path, monkeypatch, packer, form):
    path = _model_file(tmp_path, monkeypatch, {"*": "cuda:3", "bias": "cuda:0", "steps": "cpu"})
    ml = FORMS[form]
    ref = torch.load(path, map_location=ml, weights_only=True)
    m, seg = _served(path, packer)
    _compare(arena.build(m, [seg.fd], map_location=ml), ref)


def test_callable_sees_what_torch_passes_it(tmp_path, monkeypatch, packer):
    path = _model_file(tmp_path, monkeypatch, {"*": "cuda:3", "bias": "cuda:0"})
    calls_ref, calls_ours = [], []

    def spy(log):
        def fn(storage, location):
            log.append((type(storage).__name__, storage.nbytes(), location))
            return storage
        return fn

    torch.load(path, map_location=spy(calls_ref), weights_only=True)
    m, seg = _served(path, packer)
    arena.build(m, [seg.fd], map_location=spy(calls_ours))
    # once per storage (tied weights: once), with the same storage size and location
    assert sorted(calls_ours) == sorted(calls_ref)
    assert len(calls_ref) == 4


def test_callable_returning_another_storage_is_used(tmp_path, monkeypatch, packer):
    path = _model_file(tmp_path, monkeypatch, {"*": "cuda:3"})
    copy = lambda s, loc: s.clone()      # noqa: E731  (a private copy, as a user might do)
    ref = torch.load(path, map_location=copy, weights_only=True)
    m, seg = _served(path, packer)
    ours = arena.build(m, [seg.fd], map_location=copy)
    _compare(ours, ref)
    plain = arena.build(m, [seg.fd])
    # really rebuilt on the new storage: not the arena's memory any more
    assert ours["bias"].untyped_storage().data_ptr() != plain["bias"].untyped_storage().data_ptr()


def test_callable_returning_none_keeps_tensors_where_the_daemon_put_them(tmp_path, monkeypatch,
                                                                        packer):
    path = _model_file(tmp_path, monkeypatch, {"*": "cpu"})
    ref = torch.load(path, map_location=lambda s, loc: None, weights_only=True)
    m, seg = _served(path, packer)
    ours = arena.build(m, [seg.fd], map_location=lambda s, loc: None)
    _compare(ours, ref)
    with pytest.raises(TypeError, match="must return a storage or None"):
        arena.build(m, [seg.fd], map_location=lambda s, loc: "cpu")


def test_no_move_means_no_copy(tmp_path, monkeypatch, packer):
    path = _model_file(tmp_path, monkeypatch, {"*": "cuda:3"})
    m, seg = _served(path, packer)
    plain = arena.build(m, [seg.fd])
    for ml in FORMS.values():
        mapped = arena.build(m, [seg.fd], map_location=ml)
        # still views of the arena mapping (its storage is a slice of the memfd mapping)
        for k in plain:
            assert mapped[k].untyped_storage().nbytes() == plain[k].untyped_storage().nbytes()
    t = plain["bias"]
    assert mapping.apply(t, "cuda:3", "cpu") is t
    assert mapping.apply(t, "cuda:3", {"cuda:3": "cpu"}) is t
    assert mapping.apply(t, "cuda:3", None) is t


@pytest.mark.skipif(HAS_CUDA, reason="asserts the no-GPU message")
def test_mapping_to_a_missing_gpu_explains_the_fix(tmp_path, monkeypatch, packer):
    path = _model_file(tmp_path, monkeypatch, {"*": "cuda:3"})
    m, seg = _served(path, packer)
    for ml in ("cuda:0", torch.device("cuda:1"), {"cuda:3": "cuda:2"}):
        with pytest.raises(RuntimeError):           # torch refuses too
            torch.load(path, map_location=ml, weights_only=True)
        with pytest.raises(DeviceMismatchError, match="has no CUDA GPU; pass map_location='cpu'"):
            arena.build(m, [seg.fd], map_location=ml)


def test_unmapped_dict_key_keeps_the_daemons_placement(tmp_path, monkeypatch, packer):
    # Deliberate difference: torch would restore an unmapped cuda:3 storage to cuda:3; the
    # daemon has already placed it, so devmapd leaves it there instead of failing.
    path = _model_file(tmp_path, monkeypatch, {"*": "cuda:3"})
    m, seg = _served(path, packer)
    ours = arena.build(m, [seg.fd], map_location={"cuda:7": "cuda:0"})
    assert all(t.device.type == "cpu" for t in ours.values())


def test_resolve_table():
    r = mapping.resolve
    assert r(None, "cuda:3") is None
    assert r("cpu", "cuda:3") == "cpu" and r(b"cpu", "cuda:3") == "cpu"
    assert r(torch.device("cuda", 1), "cpu") == "cuda:1"
    assert r({"cuda:3": "cuda:0"}, "cuda:3") == "cuda:0"
    assert r({"cuda:3": "cuda:0"}, "cuda:1") is None
    assert r({"cuda:3": torch.device("cpu")}, "cuda:3") == "cpu"
    assert r({torch.device("cuda:3"): "cpu"}, "cuda:3") == "cpu"
    assert r(lambda s, loc: s, "cuda:3") is None
    with pytest.raises(TypeError, match="map_location must be"):
        r(3, "cpu")
    with pytest.raises(ValueError, match="not a device"):
        mapping.normalize("toaster")
    assert mapping.normalize("cpu:0") == "cpu" and mapping.normalize("cuda:2") == "cuda:2"


def test_device_mismatch_messages():
    assert issubclass(DeviceMismatchError, RuntimeError)
    mapping.check_available("cpu")
    mapping.check_available("cuda:0", gpu_count=1)
    with pytest.raises(DeviceMismatchError) as e:
        mapping.check_available("cuda:3", gpu_count=1)
    assert str(e.value) == ("the checkpoint asks for cuda:3 but this machine has 1 GPU (cuda:0); "
                            "pass map_location={'cuda:3': 'cuda:0'} or map_location='cpu'")
    with pytest.raises(DeviceMismatchError, match=r"has 2 GPUs \(cuda:0, cuda:1\)"):
        mapping.check_available("cuda:2", gpu_count=2)
    with pytest.raises(DeviceMismatchError, match="has no CUDA GPU"):
        mapping.check_available("cuda:0", gpu_count=0)


def test_apply_tree_keeps_structure_and_ties():
    w = torch.randn(3)
    obj = {"a": collections.OrderedDict(x=w, y=w), "b": [w[1:], (7, "s")], "c": {1, 2}}
    locs = {id(w): "cuda:3"}
    seen = []
    out = mapping.apply_tree(obj, locs, lambda s, loc: seen.append(loc) or s.clone())
    assert type(out["a"]) is collections.OrderedDict and out["c"] == {1, 2}
    assert out["b"][1] == (7, "s")
    assert out["a"]["x"] is out["a"]["y"]               # one tensor stays one tensor
    assert out["a"]["x"].untyped_storage().data_ptr() == out["b"][0].untyped_storage().data_ptr()
    assert out["a"]["x"].untyped_storage().data_ptr() != w.untyped_storage().data_ptr()
    assert seen == ["cuda:3"]                            # one storage: one call
    assert mapping.apply_tree(obj, locs, None) is obj


def test_parameters_stay_parameters_when_moved():
    p = torch.nn.Parameter(torch.randn(2))
    q = mapping.apply(p, "cpu", lambda s, loc: s.clone())
    assert isinstance(q, torch.nn.Parameter) and q.requires_grad
    assert torch.equal(q.detach(), p.detach()) and q.data_ptr() != p.data_ptr()


@st.composite
def state_dicts(draw):
    n = draw(st.integers(1, 5))
    sd, tags = {}, {}
    for i in range(n):
        dt = draw(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bfloat16]))
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
        t = (torch.arange(int(torch.tensor(shape).prod()) if shape else 1) % 13).to(dt).reshape(shape)
        sd[f"t{i}"] = t
        tags[f"t{i}"] = draw(st.sampled_from(["cpu", "cuda:0", "cuda:3"]))
        if draw(st.booleans()) and t.dim() >= 1 and t.shape[0] > 1:
            sd[f"v{i}"] = t[1:]                       # a view: same storage, same tag
            tags[f"v{i}"] = tags[f"t{i}"]
    form = draw(st.sampled_from(list(FORMS)))
    return sd, tags, form


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state_dicts())
def test_property_matches_torch_load(tmp_path_factory, monkeypatch, packer, case):
    sd, tags, form = case
    tmp = tmp_path_factory.mktemp("prop")
    ptr_tag = {sd[k].untyped_storage().data_ptr(): tags[k] for k in sd}
    path = tmp / "p.pt"
    save_as_if_on(path, sd, lambda s: ptr_tag.get(s.data_ptr()), monkeypatch)
    ref = torch.load(path, map_location=FORMS[form], weights_only=True)
    m, seg = _served(path, packer)
    _compare(arena.build(m, [seg.fd], map_location=FORMS[form]), ref)
