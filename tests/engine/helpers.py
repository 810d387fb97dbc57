"""Helpers for the storage-sharing tests: write checkpoints with torch, read, adopt, compare."""
from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch

from devmapd.engine import arena, checkpoint
from devmapd.engine.dedup import Holding, StorageStore


def adopt(store: StorageStore, owner: Hashable, path: Path, *,
          device_of: Callable[[str], str] | None = None,
          options: checkpoint.ReadOptions = checkpoint.ReadOptions()) -> Holding:
    """Read ``path`` once into sealed segments and hand them to the store as ``owner``."""
    loaded = checkpoint.read(path, options, device_of=device_of)
    return store.adopt(owner, loaded.manifest, loaded.segments)


def fetch(holding: Holding) -> Any:
    """What a client builds from the holding's manifest and fds (copy-on-write mappings)."""
    return arena.build(holding.manifest, holding.fds)


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Equal to torch.load: same keys, dtypes, shapes, strides, storage offsets and values."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert got.stride() == want.stride() and got.storage_offset() == want.storage_offset(), where
        assert torch.equal(got, want), f"{where}: values differ"
        return
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
        return
    if isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
        return
    assert got == want, where


def load(path: Path) -> Any:
    return torch.load(path, weights_only=True, map_location="cpu")


def storage_bytes(sd: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages of a state dict (tied weights counted once)."""
    seen: dict[int, int] = {}
    for t in sd.values():
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())
