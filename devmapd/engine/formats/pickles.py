"""Weights-only unpickling of torch's object pickles into META storages, and naming refused globals.

We reuse torch's own weights-only unpickler (``torch._weights_only_unpickler.Unpickler``): it is the
code that ``torch.load(weights_only=True)`` trusts, so our safety is exactly torch's. Only its
``persistent_load`` is ours: it hands out meta storages (no data read, no memory allocated, any
declared size) and records each storage's key, dtype, location tag and size.
"""
from __future__ import annotations

import io
import pickle
import pickletools
import struct
from collections.abc import Callable
from typing import Any

import torch
import torch._weights_only_unpickler as _wo
from torch._utils import IMPORT_MAPPING, NAME_MAPPING

from devmapd.engine import diagnose

from .common import StorageRec, element_size, meta_storage


class StorageCollector:
    """persistent_load for torch pickles: meta storages + records, refusing more than ``max_storages``."""

    def __init__(self, path: str, max_storages: int, legacy: bool = False):
        self.path = path
        self.max_storages = max_storages
        self.legacy = legacy
        self.records: dict[str, StorageRec] = {}
        self._typed: dict[str, torch.storage.TypedStorage] = {}

    def __call__(self, saved_id: Any) -> torch.storage.TypedStorage:
        if not isinstance(saved_id, tuple) or not saved_id:
            raise diagnose.corrupt(self.path, "a persistent id that is not a storage")
        typename = torch.serialization._maybe_decode_ascii(saved_id[0])
        if typename != "storage":
            raise diagnose.corrupt(self.path, f"unknown persistent id type {typename!r}")
        if self.legacy:
            if len(saved_id) != 6:
                raise diagnose.corrupt(self.path, "a malformed storage reference")
            _, storage_type, key, location, numel, view = saved_id
            if view is not None:
                raise diagnose.unsupported(self.path, "a very old torch checkpoint that uses storage views",
                                           "load it with torch.load once and re-save it with a current torch")
        else:
            if len(saved_id) != 5:
                raise diagnose.corrupt(self.path, "a malformed storage reference")
            _, storage_type, key, location, numel = saved_id
        if storage_type is torch.UntypedStorage:
            dtype = torch.uint8
        elif isinstance(storage_type, torch.serialization.StorageType):
            dtype = storage_type.dtype
        else:
            raise diagnose.corrupt(self.path, f"a storage of unknown type {storage_type!r}")
        key = str(key)
        if type(numel) is not int or numel < 0:
            raise diagnose.corrupt(self.path, f"storage {key} declares an invalid size {numel!r}")
        location = torch.serialization._maybe_decode_ascii(location)
        if not isinstance(location, str):
            raise diagnose.corrupt(self.path, f"storage {key} has an invalid location tag")
        typed = self._typed.get(key)
        if typed is None:
            if len(self.records) >= self.max_storages:
                raise diagnose.too_large(self.path, f"more than {self.max_storages} tensors",
                                         f"{self.max_storages} (checkpoint.max_tensors)")
            nbytes = numel * element_size(dtype)
            typed = meta_storage(nbytes, dtype)
            self._typed[key] = typed
            self.records[key] = StorageRec(key=key, dtype=dtype, location=location, nbytes=nbytes,
                                           meta=typed._untyped_storage)
        elif typed.dtype != dtype:
            # torch.save itself refuses this; only a crafted file can ask for it.
            raise diagnose.corrupt(self.path, f"storage {key} is used with two dtypes")
        return typed


def load_pickle(stream: io.BufferedIOBase | io.BytesIO, path: str,
                persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Run torch's weights-only unpickler on ``stream``; every failure becomes a CheckpointError."""
    start = stream.tell()
    unpickler = _wo.Unpickler(stream, encoding="utf-8")
    if persistent_load is not None:
        unpickler.persistent_load = persistent_load
    try:
        return unpickler.load()
    except diagnose.CheckpointError:
        raise
    except (EOFError, struct.error) as e:
        raise diagnose.truncated(path, f"{type(e).__name__}: {e}") from None
    except (pickle.UnpicklingError, RuntimeError, TypeError, ValueError, AttributeError,
            KeyError, IndexError, AssertionError) as e:
        text = f"{type(e).__name__}: {e}"
        refused = refused_globals(stream, start)
        if refused or "GLOBAL" in str(e) or "unrecognized function" in str(e):
            raise diagnose.unsafe_pickle(path, refused or diagnose.offending_globals_in(str(e)), text) from None
        raise diagnose.corrupt(path, f"unreadable pickle ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None


def globals_in(stream, start: int) -> list[str]:
    """Globals a pickle names, found by parsing its opcodes only (pickletools never executes)."""
    found: list[str] = []
    strings: list[str] = []
    stream.seek(start)
    try:
        for op, arg, _pos in pickletools.genops(stream):
            if op.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                # protocol-2 pickles use Python 2 names (__builtin__); map them as torch does
                if (module, name) in NAME_MAPPING:
                    module, name = NAME_MAPPING[(module, name)]
                else:
                    module = IMPORT_MAPPING.get(module, module)
                found.append(f"{module}.{name}")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
            if op.name == "STOP":
                break
    except Exception:   # a broken pickle: keep what we found before the damage
        pass
    return found


def refused_globals(stream, start: int) -> list[str]:
    """The globals in the pickle that torch's weights-only unpickler would refuse, in file order."""
    allowed = set(_wo._get_allowed_globals()) | set(_wo._get_user_allowed_globals())
    out: list[str] = []
    for name in globals_in(stream, start):
        if name not in allowed and name not in out:
            out.append(name)
    return out
