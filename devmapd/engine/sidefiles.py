"""The small JSON side files of a Hugging Face directory, read for shipping with a fetch.

A client that builds a model from a served directory (``devmapd.hf.from_pretrained``) needs its
``config.json`` (and ``generation_config.json`` when there is one) but may have no read access
to the directory: the daemon reads them when it loads the model and sends them, parsed, in the
fetch reply. They go through the engine's safe opener (no symlink followed at open, regular
files only, inside ``root`` when given), are capped in size, and must parse as JSON objects.
A missing file is simply absent; a present but unreadable one is reported, not skipped silently.
"""
from __future__ import annotations

import os
from typing import Any

from devmapd.engine import diagnose
from devmapd.engine.formats.common import read_json_file

__all__ = ["SIDE_FILES", "MAX_SIDE_FILE_BYTES", "read_side_files"]

SIDE_FILES = ("config.json", "generation_config.json")
MAX_SIDE_FILE_BYTES = 1 << 20


def read_side_files(directory: str | os.PathLike[str], *, names: tuple[str, ...] = SIDE_FILES,
                    max_bytes: int = MAX_SIDE_FILE_BYTES, root: str | None = None) -> dict[str, Any]:
    """``{file name: parsed JSON object}`` for each of ``names`` present in ``directory``.

    Raises diagnose.CheckpointError for a file that exists but is too big, not a regular file,
    outside ``root`` or not a JSON object (the message names the file and the fix)."""
    d = os.fspath(directory)
    out: dict[str, Any] = {}
    for name in names:
        path = os.path.join(d, name)
        if not os.path.lexists(path):
            continue
        # One safe opener for every model-dir file: the link is resolved once and kept inside
        # root, the opened inode must be a regular file, reads stop at its size at open.
        value = read_json_file(path, root=root, max_bytes=max_bytes, what=name,
                               limit_name="the side-file cap")
        if type(value) is not dict:
            raise diagnose.corrupt(path, f"{name} holds a JSON {type(value).__name__}, not an object")
        out[name] = value
    return out
