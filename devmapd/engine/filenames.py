"""File-name rules shared by the engine (an HF directory's side files) and the daemon's naming.

Which suffixes are weight files and which names are work in progress or hidden. Pure: names in,
booleans out; nothing here touches the file system.
"""
from __future__ import annotations

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".incomplete", ".crdownload")


def is_temporary(name: str) -> bool:
    """True for names that are work in progress or hidden: never models, never scanned into."""
    base = name.rsplit("/", 1)[-1]
    if not base or base.startswith(".") or base.endswith("~"):
        return True
    if len(base) >= 2 and base.startswith("#") and base.endswith("#"):
        return True
    return base.lower().endswith(TEMP_SUFFIXES)
