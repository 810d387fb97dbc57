"""Fixtures for the checkpoint engine tests: real sample checkpoints written by torch at test time."""
from __future__ import annotations

import collections
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from devmapd import samples


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every sample kind, written once per session (the DDP and torch.compile ones cost ~2 s)."""
    d = tmp_path_factory.mktemp("samples")
    samples.write_samples(d)
    return d


@pytest.fixture(scope="session")
def sample_paths(sample_dir: Path) -> dict[str, Path]:
    # write_samples is deterministic in its names; map kind -> path without rewriting anything.
    names = {"plain": "plain.pt", "ddp": "ddp.pt", "dataparallel": "dataparallel.pt",
             "compiled": "compiled.pt", "compiled_dataparallel": "compiled_dataparallel.pt",
             "fp16": "fp16.pt", "bf16": "bf16.pt", "mixed_dtypes": "mixed_dtypes.pt",
             "legacy": "legacy.pt", "cuda3": "cuda3.pt", "hf_safetensors": "hf-safetensors",
             "hf_bin": "hf-bin", "lightning": "lightning.ckpt", "safetensors": "model.safetensors",
             "malicious": "malicious.pt", "truncated": "truncated.pt", "random": "random.pt",
             "empty": "empty.pt", "torchscript": "torchscript.pt", "big": "big.pt"}
    assert set(names) == set(samples.KINDS), "a sample kind was added: name its file here"
    paths = {k: sample_dir / v for k, v in names.items()}
    for p in paths.values():
        assert p.exists(), p
    return paths


@pytest.fixture
def private_copy(sample_paths: dict[str, Path], tmp_path: Path) -> Callable[[str], Path]:
    """A copy of a sample a test may chmod, rewrite or truncate without touching the shared ones."""
    def copy(kind: str) -> Path:
        src = sample_paths[kind]
        dst = tmp_path / src.name
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst
    return copy


def torch_reference(path: Path) -> Any:
    """What torch itself loads from ``path`` (weights_only, on the CPU); HF dirs merge their shards."""
    if path.is_dir():
        merged: dict[str, torch.Tensor] = {}
        for f in sorted(path.iterdir()):
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file
                merged.update(load_file(str(f)))
            elif f.suffix == ".bin":
                merged.update(torch.load(f, weights_only=True, map_location="cpu"))
        return merged
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, weights_only=True, map_location="cpu")


def assert_same(got: Any, want: Any, where: str = "<top>") -> None:
    """Structural equality: same container types, keys, values; tensors equal in dtype, shape, values."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got)} is not a tensor"
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
        assert got.stride() == want.stride(), f"{where}: stride {got.stride()} != {want.stride()}"
        assert torch.equal(got, want), f"{where}: values differ"
        assert isinstance(got, torch.nn.Parameter) == isinstance(want, torch.nn.Parameter), where
        return
    if isinstance(want, dict):
        assert type(got) is type(want) or (isinstance(got, dict) and isinstance(want, dict)), \
            f"{where}: {type(got)} != {type(want)}"
        assert list(got.keys()) == list(want.keys()) or set(got.keys()) == set(want.keys()), \
            f"{where}: keys {sorted(map(str, got))[:5]}... != {sorted(map(str, want))[:5]}..."
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
        return
    if isinstance(want, (list, tuple)):
        assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}.{i}")
        return
    assert got == want, f"{where}: {got!r} != {want!r}"


def strip_like(obj: Any, prefixes: tuple[str, ...] = ("module.", "_orig_mod.")) -> Any:
    """The expected result of prefix stripping, computed independently of devmapd.engine.normalize."""
    if isinstance(obj, dict):
        keys = list(obj)
        if keys and all(isinstance(k, str) for k in keys) and any(isinstance(v, torch.Tensor) for v in obj.values()):
            progress = True
            while progress:
                progress = False
                for p in prefixes:
                    if all(k.startswith(p) for k in keys):
                        keys = [k[len(p):] for k in keys]
                        progress = True
            out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
            for nk, v in zip(keys, obj.values()):
                out[nk] = strip_like(v, prefixes)
            return out
        return type(obj)((k, strip_like(v, prefixes)) for k, v in obj.items())
    if isinstance(obj, list):
        return [strip_like(v, prefixes) for v in obj]
    if isinstance(obj, tuple):
        return tuple(strip_like(v, prefixes) for v in obj)
    return obj


@pytest.fixture
def helpers():
    class H:
        reference = staticmethod(torch_reference)
        same = staticmethod(assert_same)
        strip = staticmethod(strip_like)
    return H
