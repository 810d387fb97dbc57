"""Weights-only unpickling of torch's object pickles into META storages, and naming refused globals.

We reuse torch's own weights-only unpickler (``torch._weights_only_unpickler.Unpickler``): it is the
code that ``torch.load(weights_only=True)`` trusts, so our safety is exactly torch's. Only its
``persistent_load`` is ours: it hands out meta storages (no data read, no memory allocated, any
declared size) and records each storage's key, saved dtype, location tag and size.

What a tensor IS (dtype, shape, stride, storage offset) is decided by its rebuild call, not by its
storage record: torch.save writes float8, uint16/32/64, bits and float4 tensors on an *untyped*
(uint8) storage and passes the real dtype to ``_rebuild_tensor_v3``. And the meta device is no
judge of a view: ``set_`` there turns a negative stride positive and grows the storage to fit any
offset. So while the object pickle is unpickled, a dispatch mode (thread-local, like torch's own
modes) sees every ``aten::set_`` at the moment a tensor is put on one of our storages, with the
raw offset, sizes and strides from the file. It refuses what torch.load would refuse (a negative
stride, a view reaching outside its storage: ``corrupt``) and what devmapd cannot serve
(quantized tensors; one storage viewed as two dtypes: ``unsupported_format``), and it gives each
storage record the dtype its tensors view it as, so serving and the per-dtype byte counts of
inspection use the tensor's dtype.
"""
from __future__ import annotations

import pickle
import pickletools
import struct
from collections.abc import Callable
from contextlib import nullcontext
from typing import IO, Any

import torch
import torch._weights_only_unpickler as _wo
from torch._utils import IMPORT_MAPPING, NAME_MAPPING
from torch.utils._python_dispatch import TorchDispatchMode

from devmapd.engine import diagnose

from .common import StorageRec, element_size, meta_storage

# torch.dtype has no is_quantized; these are the dtypes of quantized tensors (torch.ao)
_QUANTIZED = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})


class StorageCollector:
    """persistent_load for torch pickles: meta storages + records, refusing more than ``max_storages``."""

    def __init__(self, path: str, max_storages: int, legacy: bool = False):
        self.path = path
        self.max_storages = max_storages
        self.legacy = legacy
        self.records: dict[str, StorageRec] = {}
        self._typed: dict[str, torch.storage.TypedStorage] = {}
        self.saved_itemsize: dict[str, int] = {}   # element size the file counts the storage in
        self._by_cdata: dict[int, StorageRec] = {}
        self._viewed: set[str] = set()             # keys whose dtype a tensor view has fixed

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
            rec = StorageRec(key=key, dtype=dtype, location=location, nbytes=nbytes,
                             meta=typed._untyped_storage)
            self.records[key] = rec
            self.saved_itemsize[key] = element_size(dtype)
            self._by_cdata[typed._untyped_storage._cdata] = rec
        elif typed.dtype != dtype:
            # torch.save itself refuses this; only a crafted file can ask for it.
            raise diagnose.corrupt(self.path, f"storage {key} is used with two dtypes")
        return typed

    # ------------------------------------------------------------------ tensor views
    def check_set(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Judge one ``aten::set_`` call before it runs (see the module docstring)."""
        self_t = args[0]
        source = args[1] if len(args) > 1 else kwargs.get("source")
        if source is None:
            return                                  # set_() with no source: an empty tensor
        storage = source.untyped_storage() if isinstance(source, torch.Tensor) else source
        rec = self._by_cdata.get(getattr(storage, "_cdata", -1))
        if rec is None:
            return   # not a saved storage: the engine refuses such a tensor when it walks the tree
        dtype = self_t.dtype
        if dtype in _QUANTIZED or (isinstance(source, torch.Tensor) and source.is_quantized):
            raise quantized(self.path, dtype)
        itemsize = dtype.itemsize   # torch._utils._element_size has no size for the bits dtypes
        overload = func._overloadname
        offset: Any
        size: Any
        stride: Any
        if overload == "source_Storage":            # the whole storage as a 1-d tensor
            offset, size, stride = 0, [rec.nbytes // itemsize], [1]
        elif overload == "source_Tensor":           # the source's own view, already judged
            offset, size, stride = source.storage_offset(), list(source.shape), list(source.stride())
        else:                                       # source_{Storage,Tensor}_storage_offset
            offset = args[2] if len(args) > 2 else kwargs.get("storage_offset")
            size = args[3] if len(args) > 3 else kwargs.get("size")
            stride = args[4] if len(args) > 4 else kwargs.get("stride", [])
        check_view(self.path, rec, dtype, offset, size, stride)
        if rec.key not in self._viewed:
            if rec.nbytes % itemsize:
                raise diagnose.unsupported(
                    self.path, f"a checkpoint whose {rec.nbytes}-byte storage {rec.key} is viewed as "
                               f"{_dtype_name(dtype)}, which is not a whole number of its elements",
                    "save a copy of that tensor (tensor.clone()) instead of the view")
            rec.dtype = dtype
            self._viewed.add(rec.key)
        elif rec.dtype != dtype:
            raise diagnose.unsupported(
                self.path, f"a checkpoint whose storage {rec.key} is viewed as both "
                           f"{_dtype_name(rec.dtype)} and {_dtype_name(dtype)}",
                "save each of those tensors as its own copy (tensor.clone()) before torch.save")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quantized(path: str, dtype: torch.dtype | None = None) -> diagnose.CheckpointError:
    what = f" ({_dtype_name(dtype)})" if dtype in _QUANTIZED else ""
    return diagnose.unsupported(
        path, f"a checkpoint with quantized tensors{what}, which devmapd does not serve",
        "save the dequantized weights (tensor.dequantize()) with torch.save, or load this file "
        "with torch.load(weights_only=True)")


_INT64_MAX = (1 << 63) - 1


def check_view(path: str, rec: StorageRec, dtype: torch.dtype, offset: Any, size: Any, stride: Any) -> None:
    """Refuse a view torch.load would refuse: bad numbers, negative strides, bytes outside the storage."""
    key = rec.key
    if not isinstance(size, (list, tuple)) or not isinstance(stride, (list, tuple)):
        raise diagnose.corrupt(path, f"a tensor on storage {key} has a malformed shape or stride")
    if not stride and size:                         # set_'s default: C-contiguous
        acc, out = 1, []
        for n in reversed(size):
            out.append(acc)
            acc *= n if type(n) is int else 1
        stride = out[::-1]
    if len(stride) != len(size):
        raise diagnose.corrupt(path, f"a tensor on storage {key} has {len(size)} dimensions but "
                                     f"{len(stride)} strides")
    for what, values in (("storage offset", (offset,)), ("size", size), ("stride", stride)):
        for v in values:
            if type(v) is not int or not 0 <= v <= _INT64_MAX:
                if type(v) is int and v < 0:
                    raise diagnose.corrupt(path, f"a tensor on storage {key} has a negative {what} "
                                                 f"({v}), which torch.load refuses too")
                raise diagnose.corrupt(path, f"a tensor on storage {key} has an invalid {what} {v!r:.40}")
    numel = 1
    for n in size:
        numel *= n
    if numel:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if (last + 1) * dtype.itemsize > rec.nbytes:
            raise diagnose.corrupt(path, f"a tensor on storage {key} reaches past the end of its storage "
                                         f"(byte {(last + 1) * dtype.itemsize} of {rec.nbytes}), "
                                         "which torch.load refuses too")


_aten = torch.ops.aten
_STRIDED_VIEWS = (_aten.as_strided, _aten.as_strided_, _aten.as_strided_scatter)
_PASS, _SET, _QUANTIZED_OP, _STRIDED = 0, 1, 2, 3
_KINDS: dict[Any, int] = {}   # aten overload -> what the watch does with it, classified once


def _kind(func: Any) -> int:
    packet = func.overloadpacket
    if packet is _aten.set_:
        return _SET
    if "quantized" in func.name():   # _empty_affine_quantized and friends (_rebuild_qtensor)
        return _QUANTIZED_OP
    return _STRIDED if packet in _STRIDED_VIEWS else _PASS


class _TensorWatch(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's untyped hook
    """Sees every aten call the unpickler makes while this thread unpickles one object pickle."""

    def __init__(self, collector: StorageCollector):
        super().__init__()  # type: ignore[no-untyped-call]
        self.collector = collector

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch would wrap __torch_dispatch__ in torch._dynamo.disable, importing all of dynamo
        # (~1 s, tens of MiB) on the first checkpoint; nothing is ever compiled under this mode.
        return False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kind = _KINDS.get(func)
        if kind is None:
            kind = _KINDS[func] = _kind(func)
        kwargs = kwargs or {}
        if kind == _SET:
            self.collector.check_set(func, args, kwargs)
        elif kind == _QUANTIZED_OP:
            raise quantized(self.collector.path, kwargs.get("dtype"))
        elif kind == _STRIDED:
            stride = args[2] if len(args) > 2 else kwargs.get("stride", ())
            if any(type(s) is int and s < 0 for s in stride):
                raise diagnose.corrupt(self.collector.path, "a tensor view with a negative stride")
        return func(*args, **kwargs)


# bytearray is on torch's weights-only allow-list (torch.save reduces one to bytearray(bytes)).
# Called with an int it allocates that many zero bytes before any cap can look: an 85-byte
# pickle asking for bytearray(10**12). torch.save never writes that form, so an int argument
# past this bound is refused; a bytes argument is already bounded by the file.
MAX_BYTEARRAY_FROM_INT = 1 << 20


class _BoundedBytearrayError(ValueError):
    pass


def _bounded_bytearray(*args: Any) -> bytearray:
    if args and isinstance(args[0], int) and not isinstance(args[0], bool) and args[0] > MAX_BYTEARRAY_FROM_INT:
        raise _BoundedBytearrayError(args[0])
    return bytearray(*args)


# The allow-list is torch's cached dict, looked up by name at every GLOBAL: replacing the entry
# once makes every weights-only unpickle in this process (the daemon's) bounded. The client
# never imports this module.
_wo._get_allowed_globals()["builtins.bytearray"] = _bounded_bytearray


def load_pickle(stream: IO[bytes], path: str,
                persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """Run torch's weights-only unpickler on ``stream``; every failure becomes a CheckpointError."""
    start = stream.tell()
    unpickler = _wo.Unpickler(stream, encoding="utf-8")
    if persistent_load is not None:
        unpickler.persistent_load = persistent_load  # type: ignore[method-assign]  # pickle's per-instance hook
    # Only the object pickle (the one with storages) builds tensors worth watching.
    watch = _TensorWatch(persistent_load) if isinstance(persistent_load, StorageCollector) else nullcontext()
    try:
        with watch:
            return unpickler.load()  # type: ignore[no-untyped-call]  # torch's Unpickler.load is unannotated
    except diagnose.CheckpointError:
        raise
    except _BoundedBytearrayError as e:
        raise diagnose.error(
            "too_large", f"{diagnose._name(path)} asks the unpickler for bytearray({e.args[0]}), that many "
            f"bytes of zeros, over the limit of {MAX_BYTEARRAY_FROM_INT} bytes per call; torch.save never "
            "writes this, so the file is damaged or crafted: save the checkpoint again.") from None
    except (EOFError, struct.error) as e:
        raise diagnose.truncated(path, f"{type(e).__name__}: {e}") from None
    except (pickle.UnpicklingError, RuntimeError, TypeError, ValueError, AttributeError,
            KeyError, IndexError, AssertionError) as e:
        text = f"{type(e).__name__}: {e}"
        refused = refused_globals(stream, start)
        if refused or "GLOBAL" in str(e) or "unrecognized function" in str(e):
            raise diagnose.unsafe_pickle(path, refused or diagnose.offending_globals_in(str(e)), text,
                                         whole_module=pickles_module_state(stream, start)) from None
        raise diagnose.corrupt(path, f"unreadable pickle ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None


def globals_in(stream: IO[bytes], start: int) -> list[str]:
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


# Every nn.Module's __dict__ holds these; a pickle that names a refused class AND carries them
# is torch.save(model), whatever module the class lives in.
_MODULE_STATE = frozenset({"_parameters", "_buffers", "_modules"})


def pickles_module_state(stream: IO[bytes], start: int) -> bool:
    """Whether the pickle's strings include nn.Module's own attribute names (opcodes only)."""
    seen: set[str] = set()
    stream.seek(start)
    try:
        for op, arg, _pos in pickletools.genops(stream):
            if isinstance(arg, str) and arg in _MODULE_STATE:
                seen.add(arg)
                if seen == _MODULE_STATE:
                    return True
            if op.name == "STOP":
                break
    except Exception:   # a broken pickle: judge by what came before the damage
        pass
    return seen == _MODULE_STATE


def refused_globals(stream: IO[bytes], start: int) -> list[str]:
    """The globals in the pickle that torch's weights-only unpickler would refuse, in file order."""
    allowed = set(_wo._get_allowed_globals()) | set(
        _wo._get_user_allowed_globals())  # type: ignore[no-untyped-call]  # torch internal, unannotated
    out: list[str] = []
    for name in globals_in(stream, start):
        if name not in allowed and name not in out:
            out.append(name)
    return out
