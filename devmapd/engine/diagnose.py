"""Every checkpoint failure becomes a Diagnosis: a short, plain sentence saying what is wrong and the fix.

The engine raises ``CheckpointError(diagnosis)`` built by the helpers below; ``diagnose_exception``
turns any other exception (including ones raised by a plain ``torch.load``, which the client's
fallback path uses) into the same vocabulary, so users see one kind of message everywhere.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

CODES = (
    "device_mismatch", "out_of_memory", "corrupt", "truncated", "not_a_checkpoint", "empty",
    "unsafe_pickle", "permission_denied", "unsupported_format", "changed_during_read",
    "too_large", "not_found", "io_error", "outside_model_dir")

# What the helpers accept as the file named in a message; None reads "the checkpoint".
PathArg: TypeAlias = "os.PathLike[str] | str | None"


@dataclass(frozen=True)
class Diagnosis:
    code: str      # one of CODES
    message: str   # one plain sentence saying what is wrong AND the fix
    detail: str | None = None   # the underlying error text, for logs

    def to_json(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "detail": self.detail}


class CheckpointError(Exception):
    """A checkpoint cannot be inspected or read; ``diagnosis`` says why and what to do."""

    def __init__(self, diagnosis: Diagnosis):
        super().__init__(diagnosis.message)
        self.diagnosis = diagnosis


def _name(path: PathArg) -> str:
    return str(path) if path is not None else "the checkpoint"


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def error(code: str, message: str, detail: str | None = None) -> CheckpointError:
    return CheckpointError(Diagnosis(code, message, detail))


# --- constructors, one per failure kind (keep the wording plain and end with the fix) ---------

def empty(path: PathArg) -> CheckpointError:
    return error("empty", f"{_name(path)} is an empty file (0 bytes); the save was probably interrupted "
                          "— save the checkpoint again.")


def truncated(path: PathArg, detail: str | None = None) -> CheckpointError:
    return error("truncated", f"{_name(path)} is truncated (the file ends early); it was probably copied or "
                              "saved only partly — copy or save it again.", detail)


def corrupt(path: PathArg, detail: str | None = None) -> CheckpointError:
    return error("corrupt", f"{_name(path)} is corrupt ({detail or 'inconsistent contents'}); "
                            "save or copy the checkpoint again.", detail)


def not_a_checkpoint(path: PathArg, what: str | None = None, detail: str | None = None) -> CheckpointError:
    what = what or "not a PyTorch checkpoint (invalid magic number)"
    return error("not_a_checkpoint", f"{_name(path)} is {what}; put only files written by torch.save or "
                                     "safetensors in the model directory.", detail)


def outside_model_dir(path: PathArg, real: str, root: str) -> CheckpointError:
    return error("outside_model_dir", f"{_name(path)} resolves to {real}, outside the model directory {root}; "
                                      "devmapd serves only files inside it: copy the file in instead of linking it.")


def unsupported(path: PathArg, what: str, fix: str, detail: str | None = None) -> CheckpointError:
    return error("unsupported_format", f"{_name(path)} is {what}; {fix}.", detail)


def torchscript(path: PathArg) -> CheckpointError:
    return unsupported(path, "a TorchScript archive (torch.jit.save), which devmapd does not serve",
                       "load it with torch.jit.load, or save model.state_dict() with torch.save "
                       "to have devmapd serve it")


# Globals whose only use in a checkpoint is to run code: never suggest allowing them.
_CODE_RUNNERS = ("os.", "posix.", "nt.", "subprocess.", "sys.", "shutil.", "socket.", "runpy.",
                 "importlib.", "pty.", "builtins.eval", "builtins.exec", "builtins.compile",
                 "builtins.getattr", "builtins.__import__", "builtins.open", "webbrowser.", "code.")


def pickled_module(path: PathArg, names: str, detail: str | None = None) -> CheckpointError:
    """torch.save(model): a format choice, not an attack, so ``unsupported_format`` with the fix."""
    return unsupported(path, f"a whole pickled model object ({names}, written by torch.save(model)), not "
                             "just its weights, which weights-only loading cannot rebuild",
                       "save its state_dict instead: torch.save(model.state_dict(), path)", detail)


def unsafe_pickle(path: PathArg, offending: list[str] | tuple[str, ...], detail: str | None = None, *,
                  whole_module: bool = False) -> CheckpointError:
    """A refused global. ``whole_module``: the pickle itself shows nn.Module state (the caller
    parsed its opcodes); without it, the names alone decide."""
    names = ", ".join(offending) if offending else "an unknown callable"
    if not offending or any(n.startswith(_CODE_RUNNERS) for n in offending):
        return error("unsafe_pickle",
                     f"{_name(path)} would call {names} when unpickled, i.e. run code, so devmapd refused it; "
                     "do not load it with weights_only=False — get the weights from a trusted source and "
                     "re-save only the tensors (model.state_dict()).", detail)
    if whole_module or any(n.startswith(("torch.nn.modules.", "__main__.")) for n in offending):
        return pickled_module(path, names, detail)
    return error("unsafe_pickle",
                 f"{_name(path)} refers to {names}, which weights-only loading does not allow; if you trust "
                 f"the file, add {names} to checkpoint.allowed_globals in the config, otherwise re-save "
                 "only the tensors (model.state_dict()).", detail)


def permission_denied(path: PathArg, detail: str | None = None) -> CheckpointError:
    return error("permission_denied", f"{_name(path)} cannot be read by devmapd (permission denied); make it "
                                      "readable by the daemon's user, e.g. chmod o+r or chgrp to its group.",
                 detail)


def not_found(path: PathArg, detail: str | None = None) -> CheckpointError:
    return error("not_found", f"{_name(path)} does not exist (it may have been moved or deleted); check the path.",
                 detail)


def changed_during_read(path: PathArg, detail: str | None = None) -> CheckpointError:
    return error("changed_during_read", f"{_name(path)} changed while devmapd was reading it; write checkpoints "
                                        "to a temporary name and rename them into place, then reload.", detail)


def out_of_memory(path: PathArg, need: int, available: int, where: str = "host memory",
                  detail: str | None = None) -> CheckpointError:
    return error("out_of_memory", f"{_name(path)} needs {_human(need)} but only {_human(available)} of "
                                  f"{where} is available; free memory, raise the memory limit, or evict "
                                  "other models.", detail)


def too_large(path: PathArg, what: str, limit: str, detail: str | None = None) -> CheckpointError:
    return error("too_large", f"{_name(path)} has {what}, over the limit of {limit}; raise the limit in the "
                              "config if the file is trusted.", detail)


def device_mismatch(path: PathArg, saved: str, detail: str | None = None) -> CheckpointError:
    return error("device_mismatch", f"{_name(path)} was saved on {saved}, which this machine does not have; "
                                    "load it with map_location='cpu' (or a dict such as "
                                    f"{{'{saved}': 'cuda:0'}}) to place it on a device that exists.", detail)


def io_error(path: PathArg, detail: str | None = None) -> CheckpointError:
    return error("io_error", f"{_name(path)} could not be read because of an I/O error ({detail}); check the "
                             "disk and the file, then reload.", detail)


# --- turning arbitrary exceptions into diagnoses ----------------------------------------------

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)(?: was not an allowed global| whose module)")
_REDUCE_RE = re.compile(r"unrecognized function (.+?)(?: which belongs|$)")
_CUDA_DEV_RE = re.compile(r"on CUDA device (\d+) but torch\.cuda\.device_count\(\) is (\d+)")


def offending_globals_in(text: str) -> list[str]:
    """Names of refused globals mentioned in a weights-only unpickler error message."""
    found = _GLOBAL_RE.findall(text)
    if not found:
        found = [m.strip() for m in _REDUCE_RE.findall(text)]
    return found


def diagnose_exception(exc: BaseException, path: PathArg = None) -> Diagnosis:
    """Map any exception met while loading ``path`` (by devmapd or by plain torch.load) to a Diagnosis."""
    if isinstance(exc, CheckpointError):
        return exc.diagnosis
    text = str(exc)
    detail = f"{type(exc).__name__}: {text}"[:2000]
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return permission_denied(path, detail).diagnosis
        if exc.errno == errno.ENOENT:
            return not_found(path, detail).diagnosis
        if exc.errno == errno.ELOOP:
            return unsupported(path, "a symbolic link", "point the model directory at the real file",
                               detail).diagnosis
        if exc.errno in (errno.ENOMEM, errno.ENOSPC):
            return error("out_of_memory", f"{_name(path)} could not be loaded: the system ran out of memory "
                                          "for it; free memory or evict other models, then reload.",
                         detail).diagnosis
        if exc.errno == errno.EISDIR:
            return not_a_checkpoint(path, "a directory without model weights", detail).diagnosis
    if isinstance(exc, MemoryError) or "not enough memory" in text or "out of memory" in text.lower():
        return error("out_of_memory", f"{_name(path)} could not be loaded: not enough memory; free memory "
                                      "or evict other models, then reload.", detail).diagnosis
    m = _CUDA_DEV_RE.search(text)
    if m:
        return device_mismatch(path, f"cuda:{m.group(1)}", detail).diagnosis
    if "Attempting to deserialize object on a CUDA device" in text or (
            "torch.cuda.is_available() is False" in text):
        return device_mismatch(path, "a CUDA device", detail).diagnosis
    if "don't know how to restore data location" in text or "Unrecognized device" in text:
        return device_mismatch(path, "an unknown device", detail).diagnosis
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        names = offending_globals_in(text)
        if names or "Unsupported global" in text or "unrecognized function" in text:
            return unsafe_pickle(path, names, detail).diagnosis
    # Anything else: the file itself says best what is wrong with it (inspect never raises and
    # reads no tensor data), e.g. torch's bare "Invalid argument" for a truncated zip.
    sniffed = _inspect_diagnosis(path)
    if sniffed is not None:
        return Diagnosis(sniffed.code, sniffed.message, detail)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        if "invalid load key" in text:
            return not_a_checkpoint(path, None, detail).diagnosis
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        return corrupt(path, f"unreadable pickle: {first}").diagnosis
    if "TorchScript" in text or "torch.jit.load" in text or "constants.pkl" in text:
        return torchscript(path).diagnosis
    if "Invalid magic number" in text or "invalid load key" in text:
        return not_a_checkpoint(path, None, detail).diagnosis
    if "failed finding central directory" in text or isinstance(exc, zipfile.BadZipFile):
        return truncated(path, detail).diagnosis if "central directory" in text or "File is not a zip" in text \
            else corrupt(path, "bad zip archive").diagnosis
    if isinstance(exc, EOFError) or "Ran out of input" in text or "unexpected end" in text.lower():
        return truncated(path, detail).diagnosis
    # safetensors errors (SafetensorError carries the Rust enum name in its text)
    for marker, code in (("HeaderTooLarge", "too_large"), ("HeaderTooSmall", "truncated"),
                         ("InvalidHeader", "corrupt"), ("MetadataIncompleteBuffer", "truncated"),
                         ("InvalidOffset", "corrupt"), ("TensorInvalidInfo", "corrupt")):
        if marker in text:
            if code == "truncated":
                return truncated(path, detail).diagnosis
            if code == "too_large":
                return too_large(path, "a safetensors header", "100 MiB", detail).diagnosis
            return corrupt(path, "bad safetensors header").diagnosis
    if isinstance(exc, OSError):
        return io_error(path, detail).diagnosis
    return error("corrupt", f"{_name(path)} could not be loaded ({text.splitlines()[0][:200] if text else type(exc).__name__}); "
                            "check that it was written by torch.save or safetensors and save it again.",
                 detail).diagnosis


_sniffing = threading.local()
# How to tell what a file is without reading its tensors: checkpoint.inspect, registered by
# devmapd.engine.checkpoint when it is imported (it imports this module, not the reverse).
_sniffer: Callable[[os.PathLike[str] | str], Diagnosis | None] | None = None


def register_sniffer(sniffer: Callable[[os.PathLike[str] | str], Diagnosis | None]) -> None:
    """Let diagnose_exception ask the file itself what is wrong with it (see _inspect_diagnosis)."""
    global _sniffer
    _sniffer = sniffer


def _inspect_diagnosis(path: PathArg) -> Diagnosis | None:
    # inspect() itself turns unexpected errors into diagnoses through diagnose_exception: the
    # thread-local flag stops that from recursing back into inspect().
    if path is None or getattr(_sniffing, "active", False):
        return None
    _sniffing.active = True
    try:
        if not os.path.exists(path):
            return None
        return _sniffer(path) if _sniffer is not None else None
    except Exception:
        return None
    finally:
        _sniffing.active = False
