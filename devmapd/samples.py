"""Real sample checkpoints of every kind a lab has, written by torch and safetensors themselves.

Used by the tests, by ``devmapd demo`` and by the benchmarks. Every file is what the named tool
writes: DDP keys come from a real DistributedDataParallel (gloo, world size 1), ``cuda:N``
locations are written by torch.save itself through a registered location tagger (exactly what a
GPU machine writes, apart from the data), the TorchScript archive comes from torch.jit.save.
Default sizes are tiny (KBs) so tests and the demo stay fast; ``big`` is sized by its caller.

    write_samples(dir) -> {kind: path}          # every kind in KINDS
    write_samples(dir, kinds=("plain", "fp16"))
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

# ----------------------------------------------------------------------------- models

class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.mlp = nn.Linear(d, d)


class _Body(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)


class TinyLM(nn.Module):
    """A transformer-shaped toy: keys like ``model.layers.3.q.weight`` and a tied ``lm_head``."""

    def __init__(self, vocab: int = 32, d: int = 8, layers: int = 4, tie: bool = True):
        super().__init__()
        self.model = _Body(vocab, d, layers)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight


def tiny_model(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kw)


# ----------------------------------------------------------------------------- one writer per kind

@contextlib.contextmanager
def _quiet():
    """torch.compile's import and torch.jit emit TorchScript deprecation warnings: not ours to show."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def plain(d: Path) -> Path:
    """A plain state dict (OrderedDict) with tied weights sharing one storage."""
    p = d / "plain.pt"
    torch.save(tiny_model().state_dict(), p)
    return p


def ddp(d: Path) -> Path:
    """A real DistributedDataParallel model's state dict (``module.`` keys), gloo, world size 1."""
    import torch.distributed as dist
    p = d / "ddp.pt"
    created = False
    with tempfile.TemporaryDirectory(prefix="devmapd-ddp-") as tmp:
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
            created = True
        try:
            wrapped = nn.parallel.DistributedDataParallel(tiny_model(tie=False))
            torch.save(wrapped.state_dict(), p)
        finally:
            if created:
                dist.destroy_process_group()
    return p


def dataparallel(d: Path) -> Path:
    """An nn.DataParallel model's state dict (``module.`` keys)."""
    p = d / "dataparallel.pt"
    torch.save(nn.DataParallel(tiny_model(tie=False)).state_dict(), p)
    return p


def compiled(d: Path) -> Path:
    """A torch.compile'd module's state dict (``_orig_mod.`` keys); compilation itself is lazy."""
    p = d / "compiled.pt"
    with _quiet():
        torch.save(torch.compile(tiny_model(tie=False)).state_dict(), p)
    return p


def compiled_dataparallel(d: Path) -> Path:
    """torch.compile over DataParallel: stacked ``_orig_mod.module.`` keys."""
    p = d / "compiled_dataparallel.pt"
    with _quiet():
        torch.save(torch.compile(nn.DataParallel(tiny_model(tie=False))).state_dict(), p)
    return p


def fp16(d: Path) -> Path:
    p = d / "fp16.pt"
    torch.save(tiny_model().half().state_dict(), p)
    return p


def bf16(d: Path) -> Path:
    p = d / "bf16.pt"
    torch.save(tiny_model().to(torch.bfloat16).state_dict(), p)
    return p


def mixed_dtypes(d: Path) -> Path:
    """fp16 weights plus int64/bool buffers (which normalisation must never cast)."""
    p = d / "mixed_dtypes.pt"
    sd = tiny_model(tie=False).half().state_dict()
    sd["position_ids"] = torch.arange(16, dtype=torch.int64)
    sd["mask"] = torch.arange(16) % 3 == 0
    torch.save(sd, p)
    return p


def legacy(d: Path) -> Path:
    """The pre-1.6 stream format (``_use_new_zipfile_serialization=False``)."""
    p = d / "legacy.pt"
    torch.save(tiny_model().state_dict(), p, _use_new_zipfile_serialization=False)
    return p


# torch.save asks registered taggers for each storage's location; ours answers "cuda:N" for the
# storages being saved by saved_on_cuda and None (= ask the next tagger) for everything else.
_tags = threading.local()
_tagger_lock = threading.Lock()
_tagger_registered = False


def _tagger(storage) -> str | None:
    table = getattr(_tags, "table", None)
    if not table:
        return None
    return table.get(storage.data_ptr())


def _no_deserializer(storage, location):   # loading is torch's business (map_location)
    return None


def _ensure_tagger() -> None:
    global _tagger_registered
    with _tagger_lock:
        if not _tagger_registered:
            torch.serialization.register_package(-1000, _tagger, _no_deserializer)
            _tagger_registered = True


def saved_on_cuda(d: Path, devices: tuple[str, ...] = ("cuda:3",), name: str = "cuda3.pt") -> Path:
    """A checkpoint whose storages torch.save recorded as living on ``devices`` (round robin)."""
    _ensure_tagger()
    p = d / name
    sd = tiny_model().state_dict()
    table: dict[int, str] = {}
    for t in sd.values():
        ptr = t.untyped_storage().data_ptr()
        if ptr not in table:
            table[ptr] = devices[len(table) % len(devices)]
    _tags.table = table
    try:
        torch.save(sd, p)
    finally:
        _tags.table = None
    return p


def _sharded(sd: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    keys = list(sd)
    size = -(-len(keys) // n)
    return [{k: sd[k].clone().contiguous() for k in keys[i * size:(i + 1) * size]} for i in range(n)]


def _hf_config(d: Path) -> None:
    (d / "config.json").write_text(json.dumps({
        "architectures": ["TinyLM"], "model_type": "devmapd-sample", "hidden_size": 8,
        "num_hidden_layers": 4, "vocab_size": 32, "torch_dtype": "float32"}, indent=2))


def _hf_sharded(out: Path, shards: int, shard_name: str, index_name: str,
                save: Callable[[dict, Path], None]) -> Path:
    """config.json + ``shards`` weight files named ``shard_name.format(i, shards)`` + the index."""
    out.mkdir(exist_ok=True)
    _hf_config(out)
    sd = tiny_model(tie=False).state_dict()
    weight_map, total = {}, 0
    for i, part in enumerate(_sharded(sd, shards), 1):
        fname = shard_name.format(i, shards)
        save(part, out / fname)
        for k, v in part.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    (out / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2))
    return out


def hf_safetensors(d: Path, shards: int = 3) -> Path:
    """A Hugging Face directory: config.json + model-0000N-of-0000M.safetensors + index."""
    from safetensors.torch import save_file

    return _hf_sharded(d / "hf-safetensors", shards, "model-{:05d}-of-{:05d}.safetensors",
                       "model.safetensors.index.json",
                       lambda part, path: save_file(part, str(path), metadata={"format": "pt"}))


def hf_bin(d: Path, shards: int = 2) -> Path:
    """A Hugging Face directory with pickled shards: pytorch_model-0000N-of-0000M.bin + index."""
    return _hf_sharded(d / "hf-bin", shards, "pytorch_model-{:05d}-of-{:05d}.bin", "pytorch_model.bin.index.json",
                       lambda part, path: torch.save(part, path))


def lightning(d: Path) -> Path:
    """A Lightning-style checkpoint: epoch, global_step, nested state_dict and Adam optimizer state."""
    p = d / "lightning.ckpt"
    model = tiny_model(tie=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model.lm_head(model.model.embed_tokens(torch.tensor([1, 2, 3]))).square().mean()
    loss.backward()
    opt.step()
    torch.save({
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 1e-3, "layers": 4},
    }, p)
    return p


class _RunsCode:
    """Unpickling this runs ``touch marker``: what a hostile checkpoint does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def malicious(d: Path, marker: Path | None = None) -> Path:
    """A checkpoint whose pickle calls os.system (posix.system) to create ``marker`` when loaded unsafely."""
    p = d / "malicious.pt"
    marker = marker or (d / "PWNED")
    torch.save({"weight": torch.ones(4), "payload": _RunsCode(str(marker))}, p)
    return p


def truncated(d: Path) -> Path:
    """A real checkpoint cut to 60 % of its length (an interrupted copy)."""
    src = d / "_whole_for_truncation.pt"
    torch.save(tiny_model().state_dict(), src)
    data = src.read_bytes()
    src.unlink()
    p = d / "truncated.pt"
    p.write_bytes(data[: len(data) * 6 // 10])
    return p


def random_bytes(d: Path, n: int = 4096) -> Path:
    p = d / "random.pt"
    p.write_bytes(random.Random(1234).randbytes(n))
    return p


def empty(d: Path) -> Path:
    p = d / "empty.pt"
    p.write_bytes(b"")
    return p


def torchscript(d: Path) -> Path:
    """A TorchScript archive (torch.jit.script + torch.jit.save)."""
    p = d / "torchscript.pt"
    with _quiet():   # torch 2.9+ deprecates TorchScript; labs still have such files
        torch.jit.save(torch.jit.script(nn.Linear(4, 2)), str(p))
    return p


def safetensors_file(d: Path) -> Path:
    """A single safetensors file (safetensors cannot hold tied weights, so untied)."""
    from safetensors.torch import save_file
    p = d / "model.safetensors"
    save_file(tiny_model(tie=False).state_dict(), str(p), metadata={"format": "pt"})
    return p


def big(d: Path, total_bytes: int = 1 << 20, count: int = 16, dtype: torch.dtype = torch.float32,
        name: str = "big.pt", fmt: str = "torch") -> Path:
    """``count`` tensors totalling about ``total_bytes`` (benchmarks: e.g. 1 GiB in 200 tensors)."""
    per = max(1, total_bytes // max(1, count) // torch.empty((), dtype=dtype).element_size())
    g = torch.Generator().manual_seed(7)
    sd = {f"layers.{i}.weight": torch.randn(per, generator=g).to(dtype) for i in range(count)}
    p = d / name
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(p))
    else:
        torch.save(sd, p)
    return p


KINDS: dict[str, Callable[[Path], Path]] = {
    "plain": plain, "ddp": ddp, "dataparallel": dataparallel, "compiled": compiled,
    "compiled_dataparallel": compiled_dataparallel, "fp16": fp16, "bf16": bf16,
    "mixed_dtypes": mixed_dtypes, "legacy": legacy, "cuda3": saved_on_cuda,
    "hf_safetensors": hf_safetensors, "hf_bin": hf_bin, "lightning": lightning,
    "safetensors": safetensors_file, "malicious": malicious, "truncated": truncated,
    "random": random_bytes, "empty": empty, "torchscript": torchscript, "big": big,
}
# Kinds a healthy model directory would hold (the demo serves these).
GOOD = ("plain", "ddp", "dataparallel", "compiled", "compiled_dataparallel", "fp16", "bf16",
        "mixed_dtypes", "legacy", "cuda3", "hf_safetensors", "hf_bin", "lightning", "safetensors", "big")
BAD = ("malicious", "truncated", "random", "empty", "torchscript")


def write_samples(directory: Path | str, kinds: Iterable[str] | None = None) -> dict[str, Path]:
    """Write the named sample kinds (default: all) into ``directory``; returns kind -> path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for kind in (kinds if kinds is not None else KINDS):
        try:
            fn = KINDS[kind]
        except KeyError:
            raise ValueError(f"unknown sample kind {kind!r}; choose from {', '.join(KINDS)}") from None
        out[kind] = fn(d)
    return out
