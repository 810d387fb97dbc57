"""Operator decisions that survive a restart: pins and remaps, in one small JSON file.

The file lives in the config's ``state_dir`` (systemd's StateDirectory), never in
the model directory. Writes are atomic (temp file + rename) so a crash mid-write
leaves the previous state, and a corrupt file is reported and ignored rather than
keeping the daemon from starting.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("devmapd.state")

STATE_FILE = "state.json"
FORMAT_VERSION = 1


@dataclass
class OperatorState:
    pins: dict[str, str] = field(default_factory=dict)  # model -> device
    targets: dict[str, str] = field(default_factory=dict)  # model -> device (remap, unpinned)

    def to_json(self) -> dict:
        return {"version": FORMAT_VERSION, "pins": dict(sorted(self.pins.items())),
                "targets": dict(sorted(self.targets.items()))}


def load(state_dir: str | os.PathLike[str]) -> OperatorState:
    path = Path(state_dir) / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return OperatorState()
    except (OSError, ValueError) as exc:
        log.error("ignoring unreadable state file %s (%s); pins and remaps start empty", path, exc)
        return OperatorState()
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        log.error("ignoring state file %s: unknown format", path)
        return OperatorState()
    pins = {str(k): str(v) for k, v in (data.get("pins") or {}).items()}
    targets = {str(k): str(v) for k, v in (data.get("targets") or {}).items()}
    return OperatorState(pins=pins, targets=targets)


def save(state_dir: str | os.PathLike[str], state: OperatorState) -> None:
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(state.to_json(), fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
