"""Hugging Face model directories: config.json + weights, single or sharded with ``*.index.json``.

This module only decides WHICH files hold the weights (validating index files and shard names);
each shard is parsed by its own format module and the shards' flat state dicts are merged.
Preference follows transformers: safetensors over pickled .bin.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from devmapd.engine import diagnose

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weight_files(directory: str, max_header_bytes: int = 100 << 20) -> list[str]:
    """The weight files of an HF directory, in shard order; raises CheckpointError if there are none."""
    d = Path(directory)
    try:
        names = sorted(os.listdir(d))
    except OSError as e:
        raise diagnose.CheckpointError(diagnose.diagnose_exception(e, directory)) from None
    index_names = [n for n in _INDEXES if n in names] + sorted(
        n for n in names if n.endswith(".index.json") and n not in _INDEXES)
    if index_names:
        return _from_index(d, index_names[0], names, max_header_bytes)
    for single in _SINGLES:
        if single in names:
            return [str(d / single)]
    for ext in _WEIGHT_EXTS:   # any other weight files: safetensors first
        found = [n for n in names if n.endswith(ext) and not n.startswith(".")]
        if found:
            return [str(d / n) for n in found]
    raise diagnose.not_a_checkpoint(directory, "a directory without model weights (no *.safetensors, "
                                               "*.bin or *.index.json)")


def _from_index(d: Path, index_name: str, names: list[str], max_header_bytes: int) -> list[str]:
    index_path = d / index_name
    try:
        st = os.stat(index_path)
        if st.st_size > max_header_bytes:
            raise diagnose.too_large(str(index_path), f"a {st.st_size}-byte index",
                                     f"{max_header_bytes} bytes (checkpoint.max_header_bytes)")
        with open(index_path, "rb") as fh:
            index = json.loads(fh.read())
    except diagnose.CheckpointError:
        raise
    except OSError as e:
        raise diagnose.CheckpointError(diagnose.diagnose_exception(e, str(index_path))) from None
    except ValueError as e:
        raise diagnose.corrupt(str(index_path), f"bad JSON index: {e}") from None
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
