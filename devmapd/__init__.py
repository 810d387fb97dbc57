"""devmapd: preloaded PyTorch checkpoints, shared zero-copy over a Unix socket.

``devmapd.load(name, map_location=None, *, socket=None, fallback=False, path=None)`` replaces
``torch.load(path, map_location=..., weights_only=True)``; ``devmapd.load_into(module, name)``
makes a module's weights BE the served tensors (no copy); ``devmapd.hf.from_pretrained(name)``
builds a served Hugging Face model ready to run; ``devmapd.Client`` talks to the daemon
(status, events, operator actions). Both are imported lazily: ``import devmapd`` stays cheap (no
torch), which the CLI relies on.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from devmapd._version import __version__

_CLIENT_NAMES = ("load", "load_into", "meta_init", "release", "Client", "DevmapdError", "DaemonUnavailable",
                 "ModelNotFound", "PermissionDenied", "ModelUnavailable", "default_socket")

__all__ = ["__version__", *_CLIENT_NAMES]

if TYPE_CHECKING:
    from devmapd.client import (  # noqa: F401  (re-exported lazily by __getattr__)
        Client,
        DaemonUnavailable,
        DevmapdError,
        ModelNotFound,
        ModelUnavailable,
        PermissionDenied,
        default_socket,
        load,
        load_into,
        meta_init,
        release,
    )


def __getattr__(name: str) -> Any:
    if name == "hf":   # devmapd.hf: imported on first use (it needs transformers, an extra)
        import importlib
        return importlib.import_module("devmapd.hf")
    if name in _CLIENT_NAMES:
        from devmapd import client
        value = getattr(client, name)
        globals()[name] = value   # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'devmapd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CLIENT_NAMES) | {"hf"})
