"""The devmapd Textual dashboard (import name `devmapd_tui`).

`run(socket)` is what `devmapd tui [--socket S]` calls; `DevmapdApp` is the app itself. It talks
to the daemon only through `devmapd.client`.
"""
from __future__ import annotations

from typing import Any


def run(socket: str | None = None, *, demo: Any = None) -> int:
    """Open the dashboard on `socket` (default: the client's default socket); returns an exit status."""
    # Imported here so `import devmapd_tui` stays cheap for the CLI's argument parsing.
    from .app import run as _run
    return _run(socket, demo=demo)


def __getattr__(name: str) -> Any:
    if name == "DevmapdApp":
        from .app import DevmapdApp
        return DevmapdApp
    raise AttributeError(name)


__all__ = ["run", "DevmapdApp"]
