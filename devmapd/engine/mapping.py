"""``map_location`` with torch.load's semantics, shared by the daemon and the client.

torch accepts four forms (torch/serialization.py ``_get_restore_location``):

* ``str`` / ``bytes`` / ``torch.device``: every storage goes there;
* ``dict``: maps saved location strings to location strings; unmapped ones stay where saved;
* a callable ``fn(storage, location)``: its returned storage is used; ``None`` means "default";
* ``None``: storages go where they were saved.

devmapd differs in one deliberate way: the daemon has already placed every tensor (CPU arena or
a GPU), so "no opinion" (``None``, an unmapped dict key, a callable returning ``None``) keeps a
tensor where the daemon put it instead of forcing it back to the saved device. A tensor is moved
only when ``map_location`` names a device other than the one it sits on. Moves happen per
*storage*, as torch restores per storage, so tied weights stay tied after a move.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["MapLocation", "DeviceMismatchError", "normalize", "resolve", "check_available",
           "apply", "apply_tensors", "apply_tree"]

MapLocation = (None | str | bytes | torch.device | Mapping[str, Any]
               | Callable[[torch.UntypedStorage, str], Any])


class DeviceMismatchError(RuntimeError):
    """A tensor would go to a device this machine does not have; the message gives the fix."""


def _location_str(loc: Any) -> str:
    if isinstance(loc, bytes):
        return loc.decode()
    if isinstance(loc, (str, torch.device)):
        return str(loc)
    raise TypeError(f"map_location values must be device strings or torch.device, got {loc!r}")


def normalize(location: str) -> str:
    """Canonical device string: ``"cuda"`` -> ``"cuda:<current>"``, ``"cpu:0"`` -> ``"cpu"``."""
    try:
        dev = torch.device(location)
    except (RuntimeError, TypeError):
        raise ValueError(f"{location!r} is not a device; use e.g. 'cpu' or 'cuda:0'") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.index is None and dev.type == "cuda":
        idx = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return f"cuda:{idx}"
    return str(dev)


def resolve(map_location: MapLocation, saved_location: str) -> str | None:
    """Where ``map_location`` sends a storage saved at ``saved_location``; None = no opinion.

    A callable has no opinion here: it needs the storage, see ``apply``.
    """
    if map_location is None:
        return None
    if isinstance(map_location, Mapping):
        target = map_location.get(saved_location)
        if target is None:
            # torch matches keys as exact strings; accept a torch.device key too, so
            # {torch.device("cuda:3"): "cpu"} is not silently ignored.
            for k, v in map_location.items():
                if isinstance(k, torch.device) and str(k) == saved_location:
                    target = v
                    break
        return None if target is None else _location_str(target)
    if isinstance(map_location, (str, bytes, torch.device)):
        return _location_str(map_location)
    if callable(map_location):
        return None
    raise TypeError(f"map_location must be a str, torch.device, dict or callable, "
                    f"got {type(map_location).__name__}")


def _device_count(kind: str) -> int:
    mod = getattr(torch, kind, None)
    try:
        if mod is not None and mod.is_available():
            return int(mod.device_count())
    except (AttributeError, RuntimeError):
        pass
    return 0


def check_available(location: str, *, gpu_count: int | None = None,
                    asked_by: str = "the checkpoint") -> None:
    """Raise DeviceMismatchError unless ``location`` exists on this machine.

    ``gpu_count`` overrides the detected CUDA device count (tests; the daemon's inventory).
    """
    dev = torch.device(normalize(location))
    if dev.type in ("cpu", "meta"):
        return
    n = _device_count(dev.type) if gpu_count is None or dev.type != "cuda" else gpu_count
    idx = 0 if dev.index is None else dev.index
    if idx < n:
        return
    loc = str(dev)
    if n == 0:
        what = "no CUDA GPU" if dev.type == "cuda" else f"no {dev.type} device"
        raise DeviceMismatchError(
            f"{asked_by} asks for {loc} but this machine has {what}; pass "
            f"map_location='cpu' (or map_location={{'{loc}': 'cpu'}})")
    have = ", ".join(f"{dev.type}:{i}" for i in range(min(n, 4))) + (", ..." if n > 4 else "")
    plural = "GPU" if n == 1 else "GPUs"
    raise DeviceMismatchError(
        f"{asked_by} asks for {loc} but this machine has {n} {plural} ({have}); pass "
        f"map_location={{'{loc}': '{dev.type}:0'}} or map_location='cpu'")


def _rebuild_on(t: torch.Tensor, storage: torch.UntypedStorage) -> torch.Tensor:
    new = torch.empty(0, dtype=t.dtype, device=storage.device).set_(
        storage, t.storage_offset(), t.shape, t.stride())
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(new, requires_grad=t.requires_grad)
    if t.requires_grad:
        new.requires_grad_(True)
    return new


def _as_untyped(result: Any, saved_location: str) -> torch.UntypedStorage:
    if isinstance(result, torch.UntypedStorage):
        return result
    if isinstance(result, torch.storage.TypedStorage):
        return result._untyped_storage
    raise TypeError(f"map_location callable returned {type(result).__name__} for a storage saved "
                    f"at {saved_location}; it must return a storage or None")


def _same_storage(a: torch.UntypedStorage, b: torch.UntypedStorage) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr() and a.nbytes() == b.nbytes()


def apply_tensors(tensors: Sequence[torch.Tensor], saved_locations: Sequence[str],
                  map_location: MapLocation, *,
                  current_devices: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Apply ``map_location`` to each tensor; the callable runs once per distinct storage.

    ``current_devices[i]`` is where tensor i counts as sitting (the daemon's placement label,
    e.g. "cuda:1" for a simulated GPU whose bytes are in CPU memory); default: its real device.
    """
    if map_location is None:
        return list(tensors)
    is_fn = callable(map_location) and not isinstance(map_location, (Mapping, torch.device))
    # storage identity -> (replacement storage or None for "keep")
    # keyed by StorageImpl identity (_cdata): data_ptr alone confuses an empty storage with
    # the one laid out right after it
    done: dict[int, torch.UntypedStorage | None] = {}
    out: list[torch.Tensor] = []
    for i, t in enumerate(tensors):
        saved = saved_locations[i]
        st = t.untyped_storage()
        key = st._cdata
        if key not in done:
            if is_fn:
                result = map_location(st, saved)  # type: ignore[operator]
                new = None if result is None else _as_untyped(result, saved)
                done[key] = None if new is None or _same_storage(new, st) else new
            else:
                target = resolve(map_location, saved)
                here = current_devices[i] if current_devices is not None else str(t.device)
                if target is None or normalize(target) == normalize(here):
                    done[key] = None
                else:
                    target = normalize(target)
                    check_available(target, asked_by="map_location")
                    moved = (st.to(device=target) if hasattr(st, "to")
                             else st.cpu())  # type: ignore[no-untyped-call]  # torch's _StorageBase.cpu is unannotated
                    done[key] = None if _same_storage(moved, st) else moved
        new_st = done[key]
        out.append(t if new_st is None else _rebuild_on(t, new_st))
    return out


def apply(tensor: torch.Tensor, saved_location: str, map_location: MapLocation, *,
          current_device: str | None = None) -> torch.Tensor:
    """One tensor: move it only if ``map_location`` targets a device other than where it is."""
    return apply_tensors([tensor], [saved_location], map_location,
                         current_devices=None if current_device is None else [current_device])[0]


def apply_tree(obj: Any, saved_locations: Mapping[int, str] | Callable[[torch.Tensor], str],
               map_location: MapLocation, *,
               current_devices: Mapping[int, str] | None = None) -> Any:
    """Apply ``map_location`` over a built checkpoint.

    ``saved_locations`` gives each tensor's saved location: a mapping from ``id(tensor)`` or a
    function of the tensor (tensors it does not know keep their current device as location).
    The structure is rebuilt with the same container types; tensors shared between places stay
    one object.
    """
    if map_location is None:
        return obj
    found: dict[int, torch.Tensor] = {}
    _collect(obj, found, 0)
    tensors = list(found.values())
    if callable(saved_locations) and not isinstance(saved_locations, Mapping):
        locs = [saved_locations(t) for t in tensors]
    else:
        locs = [saved_locations.get(id(t), str(t.device)) for t in tensors]
    cur = None if current_devices is None else [current_devices.get(id(t), str(t.device))
                                                 for t in tensors]
    moved = apply_tensors(tensors, locs, map_location, current_devices=cur)
    repl = {id(a): b for a, b in zip(tensors, moved)}
    return _replace(obj, repl)


_MAX_DEPTH = 200


def _collect(obj: Any, found: dict[int, torch.Tensor], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError(f"checkpoint nested more than {_MAX_DEPTH} levels deep")
    if isinstance(obj, torch.Tensor):
        found.setdefault(id(obj), obj)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _collect(k, found, depth + 1)
            _collect(v, found, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)) and not isinstance(obj, torch.Size):
        for v in obj:
            _collect(v, found, depth + 1)


def _replace(obj: Any, repl: dict[int, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return repl.get(id(obj), obj)
    t = type(obj)
    if t in (dict, collections.OrderedDict, collections.Counter):
        new: dict[Any, Any] = t()
        for k, v in obj.items():
            new[_replace(k, repl)] = _replace(v, repl)
        return new
    if t is list:
        return [_replace(v, repl) for v in obj]
    if t is tuple:
        return tuple(_replace(v, repl) for v in obj)
    if t is set:
        return {_replace(v, repl) for v in obj}
    return obj
