"""A file is read only if the inode actually opened lies inside the model directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from devmapd.engine import checkpoint


def test_symlink_leaving_the_root_is_refused_after_open(tmp_path: Path) -> None:
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    torch.save({"w": torch.ones(4)}, outside / "secret.pt")
    torch.save({"w": torch.zeros(4)}, models / "inside.pt")
    os.symlink(outside / "secret.pt", models / "link.pt")
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.read(models / "link.pt", checkpoint.ReadOptions(root=str(models)))
    assert info.value.diagnosis.code == "outside_model_dir"
    assert "outside the model directory" in info.value.diagnosis.message
    # A symlink that stays inside is fine (Hugging Face caches link snapshots to blobs).
    os.symlink(models / "inside.pt", models / "alias.pt")
    loaded = checkpoint.read(models / "alias.pt", checkpoint.ReadOptions(root=str(models)))
    try:
        assert loaded.manifest.tensors[0].shape == (4,)
    finally:
        loaded.close()
