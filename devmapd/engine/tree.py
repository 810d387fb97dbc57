"""The structure of a loaded checkpoint as JSON, with tensors replaced by indices.

A checkpoint is whatever ``torch.load(weights_only=True)`` returns: nested containers of
scalars, strings, bytes, torch metadata objects and tensors. The daemon keeps tensor bytes in an
arena and ships only this *shape* of the object over the socket; the client rebuilds it with
``decode`` around the tensors it attached.

Encoding (docs/INTERNALS.md "tree.py"): JSON scalars (None, bool, int, str, finite float) are
themselves; everything else is a dict tagged ``"@"``::

    {"@": "tensor", "i": 3}                      tensors, by index into the manifest
    {"@": "dict" | "odict" | "counter", "items": [[k, v], ...]}   keys are nodes too
    {"@": "list" | "tuple" | "set", "items": [...]}
    {"@": "bytes" | "bytearray", "b64": "..."}
    {"@": "float", "v": "nan" | "inf" | "-inf"}
    {"@": "complex", "re": node, "im": node}
    {"@": "size", "v": [...]}  {"@": "dtype", "v": "float32"}  {"@": "device", "v": "cuda:0"}
    {"@": "layout", "v": "strided"}  {"@": "qscheme", "v": "per_tensor_affine"}

``counter``, ``bytearray``, ``complex``, ``layout`` and ``qscheme`` go beyond the INTERNALS list:
they are in torch's weights_only allow-list, so a checkpoint can contain them.

Because a plain JSON object is never a scalar here, no user data can be mistaken for a tag.
Shared sub-containers are encoded once per reference (tensors keep their identity through the
index); reference cycles are refused by the depth guard. ``measure`` counts that expansion
without building it, so a caller refuses a structure that would expand past a cap before encoding.
"""
from __future__ import annotations

import base64
import collections
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["TreeError", "TreeTooLarge", "MAX_DEPTH", "encode", "measure", "decode"]

# Deep enough for any real checkpoint (Lightning nests ~6 levels), shallow enough that neither
# encode nor decode can hit Python's recursion limit (1000 frames) on hostile input.
MAX_DEPTH = 200


class TreeError(ValueError):
    """The object (or its encoded form) cannot be represented; the message says what and where."""


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _torch_named(kind: type, name: Any) -> Any:
    """``torch.<name>`` if it is a ``kind`` (dtype, layout, qscheme) named exactly ``name``.

    Looked up on use: scanning vars(torch) for three tables at import cost ~1 ms of a fresh
    client's import budget. KeyError otherwise, as the tables it replaces raised."""
    v = getattr(torch, name, None) if type(name) is str else None
    if isinstance(v, kind) and str(v).removeprefix("torch.") == name:
        return v
    raise KeyError(name)


def _too_deep(path: str) -> TreeError:
    return TreeError(
        f"checkpoint structure is nested more than {MAX_DEPTH} levels deep at {path or '<top>'} "
        "(or contains a reference cycle); flatten it before serving it"
    )


def encode(obj: Any, tensor_index: Callable[[torch.Tensor], int]) -> Any:
    """Encode ``obj`` as JSON-able data; ``tensor_index(t)`` gives each tensor's manifest index."""
    return _enc(obj, tensor_index, 0, "")


def _enc(obj: Any, ti: Callable[[torch.Tensor], int], depth: int, path: str) -> Any:
    if depth > MAX_DEPTH:
        raise _too_deep(path)
    # Exact-type checks first: bool is an int subclass, torch.Size a tuple subclass,
    # OrderedDict/Counter dict subclasses; each must keep its own type through the round trip.
    t = type(obj)
    if obj is None or t is bool or t is int or t is str:
        return obj
    if t is float:
        if math.isfinite(obj):
            return obj
        return {"@": "float", "v": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, torch.Tensor):  # Parameter included: TensorEntry.parameter records it
        return {"@": "tensor", "i": int(ti(obj))}
    d = depth + 1
    if t is dict or t is collections.OrderedDict or t is collections.Counter:
        tag = {dict: "dict", collections.OrderedDict: "odict", collections.Counter: "counter"}[t]
        items = []
        for k, v in obj.items():
            # only cheap, readable keys go into the error path (str() of a tensor key is not)
            sub = f"{path}.{k}" if type(k) in (str, int) else f"{path}.<key>"
            items.append([_enc(k, ti, d, f"{path}.<key>"), _enc(v, ti, d, sub)])
        return {"@": tag, "items": items}
    if t is torch.Size:
        return {"@": "size", "v": [int(x) for x in obj]}
    if t is list or t is tuple:
        return {"@": "list" if t is list else "tuple",
                "items": [_enc(v, ti, d, f"{path}.{i}") for i, v in enumerate(obj)]}
    if t is set:
        return {"@": "set", "items": [_enc(v, ti, d, f"{path}.<item>") for v in obj]}
    if t is bytes or t is bytearray:
        return {"@": t.__name__, "b64": base64.b64encode(obj).decode("ascii")}
    if t is complex:
        return {"@": "complex", "re": _enc(obj.real, ti, d, path), "im": _enc(obj.imag, ti, d, path)}
    if t is torch.dtype:
        return {"@": "dtype", "v": _dtype_name(obj)}
    if t is torch.device:
        return {"@": "device", "v": str(obj)}
    if t is torch.layout:
        return {"@": "layout", "v": str(obj).removeprefix("torch.")}
    if t is torch.qscheme:
        return {"@": "qscheme", "v": str(obj).removeprefix("torch.")}
    raise TreeError(
        f"cannot serve a checkpoint holding a {t.__module__}.{t.__qualname__} at "
        f"{path or '<top>'}; only what torch.load(weights_only=True) returns is supported"
    )


class TreeTooLarge(TreeError):
    """The structure expands past a cap (``measure``); ``what`` is "objects" or "bytes"."""

    def __init__(self, what: str, limit: int):
        self.what, self.limit = what, limit
        super().__init__(f"the structure expands to more than {limit} {what} (each shared reference "
                         "counted every time it is reached)")


_LEAVES = frozenset((type(None), bool, int, float, str, bytes, bytearray, complex))
# Leaves whose count alone (plus string lengths) is their measure, for the one-pass fast path.
_FLAT = frozenset((type(None), bool, float, str, torch.Tensor, torch.nn.Parameter))
_STR = {str}
_INT = {int}


def _leaf_bytes(obj: Any, t: type) -> int:
    """A leaf's payload in the encoded text: its characters, base64 of its bytes, its digits; fixed-size
    leaves (None, bools, floats, tensor references) are counted as nodes only."""
    if t is str:
        return len(obj)
    if t is bytes or t is bytearray:
        return (len(obj) + 2) // 3 * 4
    if t is int:
        return int(obj.bit_length()) // 3 + 1   # >= the number of decimal digits
    return 0


def measure(obj: Any, *, max_nodes: int, max_bytes: int) -> tuple[int, int]:
    """``(nodes, bytes)`` that ``encode(obj)`` would write, each shared object counted EVERY time
    it is reached (encode writes it once per reference); raises :class:`TreeTooLarge` as soon as
    either passes its cap.

    Pickle memoises shared objects, so a tiny file can hold a structure that expands without
    bound ("billion laughs": ``l = [l, l]`` 21 times is 4 million lists; ``[s] * 1500`` of a
    1 MiB string is 1.5 GiB of text). This walk costs at most ``max_nodes`` steps and allocates
    nothing that grows with the expansion (an explicit stack, bounded by the objects that exist:
    reference cycles simply run into the cap), so it runs before anything expands the structure.
    Tensors are leaves (their data is not structure); unknown types count one node (encode
    refuses them itself).
    """
    nodes = nbytes = 0
    stack = [obj]
    leaves = _LEAVES
    tensor = torch.Tensor
    while stack:
        node = stack.pop()
        t = type(node)
        nodes += 1
        if t in leaves or isinstance(node, tensor):
            nbytes += _leaf_bytes(node, t)
        else:
            if isinstance(node, dict):
                parts: tuple[Any, ...] = (node.keys(), node.values())
            elif isinstance(node, (list, tuple, set, frozenset)):
                parts = (node,)
            else:
                parts = ()
            for part in parts:
                kinds = set(map(type, part))   # one C pass: most containers hold one kind of leaf
                if kinds <= _FLAT:             # keys of a state dict, its tensors, lists of floats
                    nodes += len(part)
                    if kinds == _STR:
                        nbytes += sum(map(len, part))
                    elif str in kinds:
                        nbytes += sum(len(c) for c in part if type(c) is str)
                    continue
                if kinds == _INT:              # an optimizer's parameter ids
                    nodes += len(part)
                    nbytes += sum(map(int.bit_length, part)) // 3 + len(part)
                    continue
                for child in part:             # mixed: leaves counted here, containers stacked
                    ct = type(child)
                    if ct in leaves or isinstance(child, tensor):
                        nodes += 1
                        nbytes += _leaf_bytes(child, ct)
                    else:
                        stack.append(child)
        if nodes > max_nodes:
            raise TreeTooLarge("objects", max_nodes)
        if nbytes > max_bytes:
            raise TreeTooLarge("bytes", max_bytes)
    return nodes, nbytes


def decode(node: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """Rebuild the object encoded by ``encode`` around ``tensors`` (indexed by tensor leaves)."""
    return _dec(node, tensors, 0)


def flat_plan(node: Any, n: int) -> tuple[type, list[str], list[int]] | None:
    """``(dict class, keys, tensor indices)`` when ``node`` is a dict or OrderedDict of string
    keys to tensor leaves (a state dict: nearly every served checkpoint), checked against ``n``
    tensors; None for anything else. ``cls(zip(keys, (tensors[i] for i in indices)))`` is then
    what ``decode`` returns, built in C: a caller keeps the plan to rebuild the same tree."""
    if type(node) is not dict:
        return None
    tag = node.get("@")
    cls: type | None = dict if tag == "dict" else collections.OrderedDict if tag == "odict" else None
    items = node.get("items")
    if cls is None or type(items) is not list:
        return None
    keys: list[str] = []
    idxs: list[int] = []
    try:
        for k, v in items:
            if type(k) is not str or type(v) is not dict or len(v) != 2 or v.get("@") != "tensor":
                return None
            i = v.get("i")
            if type(i) is not int or not 0 <= i < n:
                return None
            keys.append(k)
            idxs.append(i)
    except (TypeError, ValueError):   # an item that is not a [key, value] pair
        return None
    return cls, keys, idxs


def _bad(node: Any, why: str) -> TreeError:
    text = repr(node)
    if len(text) > 80:
        text = text[:77] + "..."
    return TreeError(f"malformed checkpoint structure: {why} in {text}")


def _dec(node: Any, tensors: Sequence[torch.Tensor], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise _too_deep("")
    t = type(node)
    if node is None or t is bool or t is int or t is str or t is float:
        return node
    if t is not dict:
        raise _bad(node, f"unexpected JSON {t.__name__}")
    tag = node.get("@")
    d = depth + 1
    try:
        if tag == "tensor":
            i = node["i"]
            if type(i) is not int or not 0 <= i < len(tensors):
                raise _bad(node, f"tensor index out of range (have {len(tensors)})")
            return tensors[i]
        if tag in ("dict", "odict", "counter"):
            cls = {"dict": dict, "odict": collections.OrderedDict, "counter": collections.Counter}[tag]
            out = cls()
            n = len(tensors)
            for k, v in node["items"]:
                # Fast path for what a state dict is made of (string keys, tensor values):
                # no call per item, which is most of a 4,000-tensor decode.
                if type(k) is not str:
                    k = _dec(k, tensors, d)
                if type(v) is dict and v.get("@") == "tensor" and len(v) == 2:
                    i = v.get("i")
                    if type(i) is not int or not 0 <= i < n:
                        raise _bad(v, f"tensor index out of range (have {n})")
                    out[k] = tensors[i]
                else:
                    out[k] = _dec(v, tensors, d)
            return out
        if tag == "list":
            return [_dec(v, tensors, d) for v in node["items"]]
        if tag == "tuple":
            return tuple(_dec(v, tensors, d) for v in node["items"])
        if tag == "set":
            return {_dec(v, tensors, d) for v in node["items"]}
        if tag == "bytes":
            return base64.b64decode(node["b64"], validate=True)
        if tag == "bytearray":
            return bytearray(base64.b64decode(node["b64"], validate=True))
        if tag == "float":
            v = node["v"]
            if v not in ("nan", "inf", "-inf"):
                raise _bad(node, "special float must be nan, inf or -inf")
            return float(v)
        if tag == "complex":
            return complex(_dec(node["re"], tensors, d), _dec(node["im"], tensors, d))
        if tag == "size":
            return torch.Size([int(x) for x in node["v"]])
        if tag == "dtype":
            return _torch_named(torch.dtype, node["v"])
        if tag == "device":
            return torch.device(node["v"])
        if tag == "layout":
            return _torch_named(torch.layout, node["v"])
        if tag == "qscheme":
            return _torch_named(torch.qscheme, node["v"])
    except TreeError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        # TypeError covers unhashable keys/set members; ValueError bad base64; RuntimeError a bad device
        raise _bad(node, f"{type(e).__name__}: {e}") from None
    raise _bad(node, f"unknown tag {tag!r}")
