"""Where a daemon keeps its state (pins, remaps, the inspection cache), and why there.

In order:

1. ``state_dir`` from the config or ``--state-dir``: the operator said so;
2. ``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``; the first entry if it lists several);
3. otherwise one directory per model directory under the user's state directory:
   ``$XDG_STATE_HOME/devmapd/<name>`` (``~/.local/state`` when XDG_STATE_HOME is unset), where
   ``<name>`` is the model directory's base name plus a hash of its real path. Two daemons
   started by hand on unrelated directories (tests, experiments) then never share pins, and a
   daemon restarted on the same directory finds its own again.

The model directory itself is never written.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class StateDir:
    path: Path
    source: str    # "config" | "systemd" | "per-model-dir"

    def describe(self) -> str:
        return {"config": "from the configuration",
                "systemd": "systemd StateDirectory ($STATE_DIRECTORY)",
                "per-model-dir": "per model directory (no state_dir configured, not under systemd)"}[self.source]


def name_for(model_dir: str | os.PathLike[str]) -> str:
    """A directory name that identifies ``model_dir`` by its real path: ``<base>-<hash>``."""
    real = os.path.realpath(os.fspath(model_dir))
    base = _UNSAFE.sub("_", os.path.basename(real.rstrip("/")) or "root").strip("._") or "models"
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
    return f"{base[:48]}-{digest}"


def user_state_home(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME`` if it is an absolute path (the XDG spec ignores a relative one), else
    ``~/.local/state``."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg)
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".local" / "state"


def resolve(configured: str | None, model_dir: str | os.PathLike[str],
            env: Mapping[str, str] | None = None) -> StateDir:
    """The state directory for a daemon serving ``model_dir`` (see the module docstring).

    ``configured`` is the config's ``state_dir``; empty or None means the operator set none.
    """
    env = os.environ if env is None else env
    if configured:
        return StateDir(Path(configured), "config")
    systemd = env.get("STATE_DIRECTORY", "")
    if systemd:
        return StateDir(Path(systemd.split(":")[0]), "systemd")
    return StateDir(user_state_home(env) / "devmapd" / name_for(model_dir), "per-model-dir")
