"""tree.py: everything torch.load(weights_only=True) can return survives encode -> JSON -> decode."""
from __future__ import annotations

import collections
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from devmapd.engine import tree


def _roundtrip(obj):
    tensors: list[torch.Tensor] = []

    def ti(t):
        for i, u in enumerate(tensors):
            if u is t:
                return i
        tensors.append(t)
        return len(tensors) - 1

    enc = tree.encode(obj, ti)
    # allow_nan=False: special floats must be tagged, never leak as invalid JSON
    wire = json.loads(json.dumps(enc, allow_nan=False))
    return tree.decode(wire, tensors), tensors


def same(a, b) -> bool:
    """Deep equality that also demands identical container types and nan == nan."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a is b
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dict):
        return list(a.keys()) == list(b.keys()) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_everything_weights_only_load_returns_round_trips(tmp_path):
    w = torch.nn.Parameter(torch.randn(3, 2))
    obj = {
        "state_dict": collections.OrderedDict([("w", w), ("b", torch.arange(4)), ("tied", w)]),
        "nested": [1, (2.5, None, True), {"x": [b"\x00\xff", bytearray(b"ab")]}],
        "specials": [float("nan"), float("inf"), float("-inf"), -0.0, 1e308],
        "set": {1, "two", (3, 4)},
        "size": torch.Size([2, 3]),
        "dtypes": [torch.float32, torch.bfloat16, torch.bool, torch.int8],
        "devices": [torch.device("cpu"), torch.device("cuda:3")],
        "counter": collections.Counter({"a": 2}),
        "complex": 1 + 2j,
        "layout": torch.strided,
        "big": 2**70,
        7: "int key",
        (1, "t"): "tuple key",
        "empty": [{}, [], (), collections.OrderedDict()],
    }
    path = tmp_path / "all.pt"
    torch.save(obj, path)
    loaded = torch.load(path, weights_only=True)    # what the daemon really holds
    back, tensors = _roundtrip(loaded)
    assert same(back, loaded)
    # tied entries stay one tensor object; the index maps the same object twice
    assert back["state_dict"]["w"] is back["state_dict"]["tied"]
    assert len(tensors) == 2


@st.composite
def trees(draw):
    leaf = st.one_of(
        st.none(), st.booleans(), st.integers(), st.text(max_size=5), st.binary(max_size=5),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([torch.float16, torch.int64, torch.device("cpu"), torch.Size([1, 2])]),
    )
    key = st.one_of(st.text(max_size=4), st.integers(-5, 5))
    return draw(st.recursive(leaf, lambda ch: st.one_of(
        st.lists(ch, max_size=3), st.lists(ch, max_size=3).map(tuple),
        st.dictionaries(key, ch, max_size=3),
        st.dictionaries(key, ch, max_size=3).map(collections.OrderedDict),
    ), max_leaves=12))


@settings(max_examples=60, deadline=None)
@given(trees())
def test_random_structures_round_trip(obj):
    back, _ = _roundtrip(obj)
    assert same(back, obj)


def test_unknown_type_names_the_type():
    class Custom:
        pass
    with pytest.raises(tree.TreeError, match=r"Custom.*at \.a\.0"):
        tree.encode({"a": [Custom()]}, lambda t: 0)
    with pytest.raises(tree.TreeError, match="frozenset"):
        tree.encode(frozenset([1]), lambda t: 0)


def test_absurd_depth_is_refused_clearly():
    deep: list = []
    node = deep
    for _ in range(tree.MAX_DEPTH + 5):
        node.append([])
        node = node[0]
    with pytest.raises(tree.TreeError, match="nested more than"):
        tree.encode(deep, lambda t: 0)
    cyc: list = []
    cyc.append(cyc)
    with pytest.raises(tree.TreeError, match="reference cycle"):
        tree.encode(cyc, lambda t: 0)
    # decoding a hostile, absurdly deep document fails the same way, not with RecursionError
    hostile: dict = {"@": "list", "items": []}
    node = hostile
    for _ in range(5000):
        child = {"@": "list", "items": []}
        node["items"].append(child)
        node = child
    with pytest.raises(tree.TreeError, match="nested more than"):
        tree.decode(hostile, [])


@pytest.mark.parametrize("node, why", [
    ({"@": "nope"}, "unknown tag"),
    ({"@": "tensor", "i": 3}, "out of range"),
    ({"@": "tensor", "i": True}, "out of range"),
    ({"@": "dict", "items": [[{"@": "list", "items": []}, 1]]}, "unhashable"),
    ({"@": "bytes", "b64": "!!"}, "Error"),
    ({"@": "float", "v": "1.5"}, "nan, inf"),
    ({"@": "dtype", "v": "float99"}, "KeyError"),
    ({"@": "device", "v": "toaster:0"}, "Error"),
    ([1, 2], "unexpected JSON list"),
])
def test_malformed_nodes_raise_tree_error(node, why):
    with pytest.raises(tree.TreeError, match=why):
        tree.decode(node, [torch.zeros(1)])
