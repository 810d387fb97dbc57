"""Normalisation: name every tensor by its key path, strip wrapper prefixes, choose served dtypes.

Prefixes: DistributedDataParallel / DataParallel add ``module.``, torch.compile adds ``_orig_mod.``
(stacked: ``_orig_mod.module.``). A state dict's keys are stripped only when EVERY key of that dict
carries the prefix, so stripping is a bijection and keys never collide.

Dtypes: ``cpu_upcast_half`` turns fp16/bf16 into fp32 for tensors placed on the CPU; ``gpu_dtype``
casts floating tensors placed on a GPU to fp16/bf16. Integer and bool tensors are never cast.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import torch

from devmapd.engine import diagnose

DEFAULT_PREFIXES = ("module.", "_orig_mod.")
MAX_DEPTH = 150
_HALF = (torch.float16, torch.bfloat16)
_CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GPU_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TensorRef:
    path: str          # dotted key path after stripping: "state_dict.encoder.0.weight"
    container: str     # key path of the state dict holding it: "", "state_dict", "optimizer_states.0.state"
    key: str           # container-relative key: "encoder.0.weight"
    tensor: torch.Tensor


@dataclass
class Walked:
    obj: Any                       # the structure with stripped keys (same tensors)
    tensors: list[TensorRef]       # one per distinct tensor object, first occurrence order
    prefixes: list[str]            # prefixes found (and stripped), outermost first


def _strip_keys(d: dict[Any, Any], prefixes: tuple[str, ...], found: list[str]) -> dict[Any, Any]:
    """Strip prefixes carried by every key of ``d`` (repeatedly, for stacked wrappers)."""
    keys = list(d.keys())
    if not keys or not all(type(k) is str for k in keys):
        return d
    cut = 0
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if p and all(k.startswith(p, cut) and len(k) > cut + len(p) for k in keys):
                cut += len(p)
                if p not in found:
                    found.append(p)
                changed = True
    if not cut:
        return d
    out = type(d)() if type(d) in (dict, collections.OrderedDict) else {}
    for k, v in d.items():
        out[k[cut:]] = v
    if hasattr(d, "__dict__") and d.__dict__:   # OrderedDict state dicts carry _metadata
        out.__dict__.update(d.__dict__)
    return out


def walk(obj: Any, strip: tuple[str, ...] = DEFAULT_PREFIXES, *, max_nodes: int = 10_000_000,
         path_hint: str = "the checkpoint") -> Walked:
    """Name every tensor of ``obj`` and strip prefixes from the state dicts holding tensors."""
    refs: list[TensorRef] = []
    seen: set[int] = set()
    found: list[str] = []
    budget = [max_nodes]

    def tensor(node: torch.Tensor, path: str, container: str) -> torch.Tensor:
        if id(node) not in seen:
            seen.add(id(node))
            rel = path[len(container) + 1:] if container else path
            refs.append(TensorRef(path, container, rel, node))
        return node

    def child(v: Any, cpath: str, key_anchor: str, parent_anchor: str, depth: int) -> Any:
        if isinstance(v, torch.Tensor):
            return tensor(v, cpath, parent_anchor)
        return visit(v, cpath, key_anchor, depth)

    def visit(node: Any, path: str, anchor: str, depth: int) -> Any:
        # anchor: the container path this node reports its tensors under (its own path, unless
        # it was reached by a numeric key, e.g. an optimizer's per-parameter state).
        budget[0] -= 1
        if budget[0] < 0:
            raise diagnose.too_large(path_hint, "a structure with too many objects",
                                     f"{max_nodes} objects (shared sub-structures are counted each time)")
        if depth > MAX_DEPTH:
            raise diagnose.corrupt(path_hint, f"the structure is nested more than {MAX_DEPTH} levels deep")
        t = type(node)
        if isinstance(node, dict):
            if strip and any(isinstance(v, torch.Tensor) for v in node.values()):
                node = _strip_keys(node, strip, found)
            out = type(node)() if t in (dict, collections.OrderedDict, collections.Counter) else node
            for k, v in node.items():
                cpath = f"{path}.{k}" if path else str(k)
                nv = child(v, cpath, anchor if _numeric(k) else cpath, anchor, depth + 1)
                if out is not node:
                    out[k] = nv
            if out is not node and getattr(node, "__dict__", None):
                out.__dict__.update(node.__dict__)
            return out
        if t is list or t is tuple:
            items = [child(v, f"{path}.{i}" if path else str(i), anchor, anchor, depth + 1)
                     for i, v in enumerate(node)]
            return items if t is list else tuple(items)
        return node

    new = tensor(obj, "", "") if isinstance(obj, torch.Tensor) else visit(obj, "", "", 0)
    return Walked(new, refs, found)


def _numeric(k: Any) -> bool:
    return type(k) is int or (type(k) is str and k.isdigit())


def group_of(key: str) -> str:
    """Module group of a container-relative key: up to the first numeric component, else its parent.

    ``model.layers.3.attn.q.weight`` -> ``model.layers.3``; ``lm_head.weight`` -> ``lm_head``.
    """
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else key


def target_dtype(dtype: torch.dtype, device: str, *, cpu_upcast_half: bool = False,
                 gpu_dtype: str | None = None) -> torch.dtype:
    """The dtype a storage is served in on ``device`` under the normalisation options."""
    if device == "cpu":
        if cpu_upcast_half and dtype in _HALF:
            return torch.float32
        return dtype
    if gpu_dtype is not None:
        if gpu_dtype not in GPU_DTYPES:
            raise ValueError(f"gpu_dtype must be 'float16' or 'bfloat16', got {gpu_dtype!r}")
        if dtype in _CASTABLE:
            return GPU_DTYPES[gpu_dtype]
    return dtype
