"""normalize: key paths, containers, prefix stripping (never colliding), groups, dtype policy."""
from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from devmapd.engine import normalize
from devmapd.engine.normalize import group_of, target_dtype, walk


def test_paths_containers_and_stacked_prefixes():
    t = [torch.zeros(1, device="meta") for _ in range(4)]
    obj = {"epoch": 1,
           "state_dict": collections.OrderedDict([("_orig_mod.module.a.0.w", t[0]), ("_orig_mod.module.b", t[1])]),
           "optimizer_states": [{"state": {0: {"exp_avg": t[2]}}, "param_groups": []}],
           "extra": [t[3], t[0]]}
    w = walk(obj)
    assert [r.path for r in w.tensors] == ["state_dict.a.0.w", "state_dict.b",
                                            "optimizer_states.0.state.0.exp_avg", "extra.0"]
    assert [r.container for r in w.tensors] == ["state_dict", "state_dict", "optimizer_states.0.state", "extra"]
    assert [r.key for r in w.tensors] == ["a.0.w", "b", "0.exp_avg", "0"]
    assert w.prefixes == ["_orig_mod.", "module."]
    assert type(w.obj["state_dict"]) is collections.OrderedDict
    assert list(w.obj["state_dict"]) == ["a.0.w", "b"]
    assert w.obj["extra"][1] is t[0]            # a repeated tensor stays the same object
    assert obj["state_dict"]["_orig_mod.module.b"] is t[1]    # the input is not modified


def test_no_strip_when_one_key_lacks_prefix_or_would_become_empty():
    t = torch.zeros(1, device="meta")
    assert walk({"module.a": t, "b": t}).prefixes == []
    assert list(walk({"module.": t}).obj) == ["module."]
    assert list(walk({"module.a": t}, strip=()).obj) == ["module.a"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab.m0", min_size=1, max_size=6), min_size=1, max_size=8, unique=True),
       st.sampled_from(["", "module.", "_orig_mod.", "_orig_mod.module.", "module.module."]))
def test_stripping_is_a_bijection(keys, prefix):
    t = torch.zeros(1, device="meta")
    d = {prefix + k: t for k in keys}
    out = walk(d).obj
    assert len(out) == len(d)                                  # never a collision
    assert all(k.endswith(s) for k, s in zip(d, out))          # only a common prefix was removed
    common = {k[: len(k) - len(s)] for k, s in zip(d, out)}
    assert len(common) == 1


def test_group_of():
    assert group_of("model.layers.3.attn.q.weight") == "model.layers.3"
    assert group_of("lm_head.weight") == "lm_head"
    assert group_of("bias") == "bias"
    assert group_of("0.exp_avg") == "0"


@pytest.mark.parametrize("dtype,device,opts,want", [
    (torch.float16, "cpu", {}, torch.float16),
    (torch.float16, "cpu", {"cpu_upcast_half": True}, torch.float32),
    (torch.bfloat16, "cpu", {"cpu_upcast_half": True}, torch.float32),
    (torch.float32, "cpu", {"cpu_upcast_half": True}, torch.float32),
    (torch.float32, "cuda:0", {"gpu_dtype": "float16"}, torch.float16),
    (torch.float64, "cuda:1", {"gpu_dtype": "bfloat16"}, torch.bfloat16),
    (torch.int64, "cuda:0", {"gpu_dtype": "float16"}, torch.int64),
    (torch.bool, "cuda:0", {"gpu_dtype": "float16"}, torch.bool),
    (torch.uint8, "cpu", {"cpu_upcast_half": True}, torch.uint8),
    (torch.float32, "cuda:0", {}, torch.float32),
    (torch.float32, "cpu", {"gpu_dtype": "float16"}, torch.float32),
])
def test_target_dtype(dtype, device, opts, want):
    assert target_dtype(dtype, device, **opts) is want


def test_deep_or_huge_structures_are_refused():
    from devmapd.engine.diagnose import CheckpointError
    deep: list = []
    node = deep
    for _ in range(normalize.MAX_DEPTH + 5):
        node.append([])
        node = node[0]
    with pytest.raises(CheckpointError) as ei:
        walk(deep)
    assert ei.value.diagnosis.code == "corrupt"
    shared = [torch.zeros(1, device="meta")]
    for _ in range(30):                       # 2**30 paths through shared lists
        shared = [shared, shared]
    with pytest.raises(CheckpointError) as ei:
        walk(shared, max_nodes=10_000)
    assert ei.value.diagnosis.code == "too_large"
