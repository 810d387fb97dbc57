"""Make a module's parameters and buffers BE a served state dict's tensors (no copy).

``module.load_state_dict(sd)`` copies every tensor into the module's own, freshly initialised
storage: with served tensors that throws the zero-copy away (each process gets a private copy
of the weights) and pays for initialising weights it then overwrites. ``assign_state_dict``
uses ``load_state_dict(sd, strict=..., assign=True)`` instead, so the module's parameters and
buffers become the served tensors (Parameter-ness and requires_grad as torch's assign=True
gives them), for a module built normally or on the meta device, and adds what assign=True
alone lacks:

* wrapper prefixes: a DistributedDataParallel / DataParallel (``module.``) or torch.compile
  (``_orig_mod.``) wrapper is unwrapped, as the daemon strips those prefixes from the keys it
  serves; keys that still carry them are stripped by the daemon's rule (only when every key
  does);
* tied weights: parameters that were one object before loading (an embedding shared with the
  output layer) are one object after it, and a checkpoint that stores only one key of a tied
  group fills the others (assign=True alone would leave two unrelated Parameters);
* a clear error naming every parameter or buffer left on the meta device (strict=False, or a
  non-persistent buffer that no state dict carries), instead of a module that fails at its
  first forward.

Pure torch: no daemon, no socket (``devmapd.load_into`` fetches, then calls this).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["AssignError", "PREFIXES", "unwrap", "state_dict_of", "strip_prefixes",
           "assign_state_dict", "meta_leftovers", "meta_init"]

# The daemon's normalisation (engine.normalize.DEFAULT_PREFIXES), repeated so that the client
# does not import the daemon-side normaliser.
PREFIXES = ("module.", "_orig_mod.")


class AssignError(RuntimeError):
    """The state dict cannot become the module's weights; the message says what and the fix."""


@contextlib.contextmanager
def meta_init() -> Iterator[None]:
    """Build modules on the meta device with torch.nn.init's initialisers skipped.

    ``with torch.device("meta")`` alone already allocates nothing, but an initialiser run on a
    meta tensor is not free: the first ``normal_`` (nn.Embedding's) imports torch's compiler
    stack, 1.5-4 s in a fresh process. The weights are about to be replaced, so their
    initialisers are skipped (as transformers' ``no_init_weights`` does). The initialisers are
    module attributes patched for the duration: do not build modules on other threads meanwhile.
    """
    import torch.nn.init as init
    names = [n for n in vars(init) if n.endswith("_") and not n.startswith("_")
             and callable(vars(init)[n])]
    saved = {n: vars(init)[n] for n in names}

    def skip(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor
    try:
        for n in names:
            setattr(init, n, skip)
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module a DDP / DataParallel / torch.compile wrapper holds (repeatedly), else itself."""
    seen = 0
    while seen < 8:
        seen += 1
        inner = getattr(module, "_orig_mod", None)           # torch.compile's OptimizedModule
        if isinstance(inner, torch.nn.Module):
            module = inner
            continue
        if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            module = module.module
            continue
        break
    return module


def strip_prefixes(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """The daemon's rule: strip a prefix only when EVERY key carries it (repeatedly)."""
    keys = list(sd)
    if not keys or not all(type(k) is str for k in keys):
        return sd
    cut, changed = 0, True
    while changed:
        changed = False
        for p in PREFIXES:
            if all(k.startswith(p, cut) and len(k) > cut + len(p) for k in keys):
                cut += len(p)
                changed = True
    if not cut:
        return sd
    return {k[cut:]: v for k, v in sd.items()}


def state_dict_of(obj: Any, what: str) -> Mapping[str, torch.Tensor]:
    """The state dict in a served checkpoint: the object itself when it maps names to tensors,
    else its ``state_dict`` or ``model`` entry (Lightning and training-loop checkpoints)."""
    def is_sd(x: Any) -> bool:
        return isinstance(x, Mapping) and bool(x) and all(
            type(k) is str and isinstance(v, torch.Tensor) for k, v in x.items())
    if is_sd(obj):
        found: Mapping[str, torch.Tensor] = obj
        return found
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if is_sd(obj.get(key)):
                found = obj[key]
                return found
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise AssignError(f"{what} is not a state dict (a mapping of names to tensors) and holds "
                          f"none under 'state_dict' or 'model'; its top-level keys are {keys}. "
                          "Fetch it with devmapd.load and pass the right part to "
                          "module.load_state_dict(..., assign=True)")
    raise AssignError(f"{what} is a {type(obj).__name__}, not a state dict; fetch it with "
                      "devmapd.load instead")


def meta_leftovers(module: torch.nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device (nothing filled them)."""
    names = [n for n, p in module.named_parameters(remove_duplicate=False) if p.is_meta]
    names += [n for n, b in module.named_buffers(remove_duplicate=False) if b.is_meta]
    return names


def _tied_groups(module: torch.nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    return [names for names in by_id.values() if len(names) > 1]


def _set(module: torch.nn.Module, dotted: str, value: torch.nn.Parameter) -> None:
    owner_name, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    owner._parameters[leaf] = value   # same slot setattr would fill; no re-registration checks


def assign_state_dict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], *,
                      strict: bool = True, what: str = "the checkpoint",
                      check_meta: bool = True) -> torch.nn.Module:
    """``module.load_state_dict(sd, strict=strict, assign=True)`` plus wrappers, prefixes,
    tied weights and the meta check (module docstring). Returns ``module`` (the one passed)."""
    target = unwrap(module)
    sd = strip_prefixes(sd)
    groups = _tied_groups(target)
    expected = set(target.state_dict(keep_vars=True))
    fill: dict[str, Any] = {}
    for names in groups:
        have = [n for n in names if n in sd]
        if have:
            fill.update({n: sd[have[0]] for n in names if n not in sd and n in expected})
    if fill:
        sd = {**sd, **fill}
    try:
        target.load_state_dict(sd, strict=strict, assign=True)
    except RuntimeError as e:
        # torch's own message lists missing/unexpected keys and size mismatches.
        raise AssignError(f"cannot load {what} into {type(target).__name__}: {e}") from None
    # assign=True replaced each registration separately: tie the groups again.
    for names in groups:
        first = target.get_parameter(names[0])
        for n in names[1:]:
            _set(target, n, first)
    if check_meta:
        left = meta_leftovers(target)
        if left:
            shown = ", ".join(left[:10]) + (f" and {len(left) - 10} more" if len(left) > 10 else "")
            raise AssignError(
                f"{len(left)} parameter(s)/buffer(s) of {type(target).__name__} are still on the "
                f"meta device after loading {what}: {shown}. Nothing in the checkpoint filled "
                "them (strict=False skipped them, or they are non-persistent buffers, which no "
                "state dict carries): build the module on a real device, or fill them before use")
    return module
