"""Hugging Face model directories: config.json + weights, single or sharded with ``*.index.json``.

This module only decides WHICH files hold the weights (validating index files and shard names);
each shard is parsed by its own format module and the shards' flat state dicts are merged.
Preference follows transformers: safetensors over pickled .bin.

The index is read through the engine's one safe opener (``common.read_json_file``): a link is
resolved once and must stay inside ``root``, only a regular file is opened (never a FIFO or a
device, which would hang or feed us forever), and it is capped at ``max_index_bytes``.
"""
from __future__ import annotations

import os
from pathlib import Path

from devmapd.engine import diagnose

from .common import MAX_SIDE_FILE_BYTES, read_json_file

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weight_files(directory: str, max_index_bytes: int = MAX_SIDE_FILE_BYTES, *,
                 root: str | None = None) -> list[str]:
    """The weight files of an HF directory, in shard order; raises CheckpointError if there are none
    or if its index is unusable (too big, not a regular file, outside ``root``, not JSON)."""
    d = Path(directory)
    try:
        names = sorted(os.listdir(d))
    except OSError as e:
        raise diagnose.CheckpointError(diagnose.diagnose_exception(e, directory)) from None
    index_names = [n for n in _INDEXES if n in names] + sorted(
        n for n in names if n.endswith(".index.json") and n not in _INDEXES)
    if index_names:
        return _from_index(d, index_names[0], names, root, max_index_bytes)
    for single in _SINGLES:
        if single in names:
            return [str(d / single)]
    for ext in _WEIGHT_EXTS:   # any other weight files: safetensors first
        found = [n for n in names if n.endswith(ext) and not n.startswith(".")]
        if found:
            return [str(d / n) for n in found]
    raise diagnose.not_a_checkpoint(directory, "a directory without model weights (no *.safetensors, "
                                               "*.bin or *.index.json)")


def _from_index(d: Path, index_name: str, names: list[str], root: str | None, max_bytes: int) -> list[str]:
    index_path = d / index_name
    index = read_json_file(index_path, root=root, max_bytes=max_bytes, what="shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise diagnose.corrupt(str(index_path), "the index has no weight_map")
    shards: list[str] = []
    for shard in weight_map.values():
        # A shard name must be a plain file name in this directory: no path escapes.
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise diagnose.corrupt(str(index_path), f"the index names an invalid shard {shard!r}")
        if shard not in shards:
            shards.append(shard)
    missing = [s for s in shards if s not in names]
    if missing:
        raise diagnose.corrupt(str(d), f"shard(s) listed in {index_name} are missing: {', '.join(missing[:3])}")
    return [str(d / s) for s in sorted(shards)]
