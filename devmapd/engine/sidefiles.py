"""The small JSON side files of a Hugging Face directory, read for shipping with a fetch.

A client that builds a model from a served directory (``devmapd.hf.from_pretrained``) needs its
``config.json`` (and ``generation_config.json`` when there is one) but may have no read access
to the directory: the daemon reads them when it loads the model and sends them, parsed, in the
fetch reply. They go through the engine's safe opener (no symlink followed at open, regular
files only, inside ``root`` when given), are capped in size, and must parse as JSON objects.
A missing file is simply absent; a present but unreadable one is reported, not skipped silently.
"""
from __future__ import annotations

import json
import os
from typing import Any

from devmapd.engine import checkpoint, diagnose
from devmapd.engine.formats.common import open_file

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
        # Links (a Hugging Face cache snapshot links to its blobs) are resolved once here;
        # the open itself refuses to follow any, and root containment is checked on what
        # was opened.
        f = open_file(os.path.realpath(path), path)
        try:
            checkpoint._check_inside(f, root)
            size = f.size
            if size > max_bytes:
                raise diagnose.too_large(path, f"a {size}-byte {name}",
                                         f"{max_bytes} bytes (the side-file cap)")
            data = b""
            while len(data) < size:
                chunk = os.pread(f.fd, size - len(data), len(data))
                if not chunk:
                    break
                data += chunk
        finally:
            f.close()
        try:
            value = json.loads(data)
        except ValueError as e:
            raise diagnose.corrupt(path, f"{name} is not valid JSON: {e}") from None
        if type(value) is not dict:
            raise diagnose.corrupt(path, f"{name} holds a JSON {type(value).__name__}, not an object")
        out[name] = value
    return out
