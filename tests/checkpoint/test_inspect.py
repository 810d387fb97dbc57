"""inspect(): what a checkpoint holds, from headers and pickles only, never raising for a bad file."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from devmapd import samples
from devmapd.engine import checkpoint
from devmapd.engine.checkpoint import inspect


def _storage_bytes(obj) -> tuple[int, dict[str, int]]:
    """Bytes of distinct storages (and per dtype) in what torch.load returns: the ground truth."""
    seen: dict[int, torch.Tensor] = {}

    def walk(o):
        if isinstance(o, torch.Tensor):
            seen.setdefault(o.untyped_storage().data_ptr(), o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
    walk(obj)
    per: dict[str, int] = {}
    for t in seen.values():
        n = t.untyped_storage().nbytes()
        per[str(t.dtype).removeprefix("torch.")] = per.get(str(t.dtype).removeprefix("torch."), 0) + n
    return sum(per.values()), per


def test_plain_state_dict_fields(sample_paths, helpers):
    insp = inspect(sample_paths["plain"])
    ref = helpers.reference(sample_paths["plain"])
    total, per = _storage_bytes(ref)
    assert insp.diagnosis is None and insp.ok
    assert insp.format == "torch-zip"
    assert insp.tensors == len(ref)                       # tied lm_head counted as a tensor ...
    assert insp.bytes == total                            # ... but its storage only once
    assert insp.dtypes == per == {"float32": total}
    assert insp.locations == {"cpu": total}
    assert insp.prefixes == () and insp.containers == ("",)
    assert insp.largest_tensor == max(t.untyped_storage().nbytes() for t in ref.values())
    groups = dict(insp.groups)
    assert [g for g, _ in insp.groups][:3] == ["model.embed_tokens", "model.layers.0", "model.layers.1"]
    assert set(groups) == {"model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2",
                           "model.layers.3", "model.norm"}   # lm_head shares embed_tokens' storage
    assert sum(groups.values()) == total
    layer0 = sum(v.numel() * 4 for k, v in ref.items() if k.startswith("model.layers.0."))
    assert groups["model.layers.0"] == layer0


def test_every_good_kind_matches_torch_load(sample_paths, helpers):
    expect_format = {"legacy": "torch-legacy", "hf_safetensors": "hf-dir", "hf_bin": "hf-dir",
                     "safetensors": "safetensors"}
    for kind in samples.GOOD:
        insp = inspect(sample_paths[kind])
        assert insp.diagnosis is None, (kind, insp.diagnosis)
        assert insp.format == expect_format.get(kind, "torch-zip"), kind
        total, per = _storage_bytes(helpers.reference(sample_paths[kind]))
        assert insp.bytes == total and insp.dtypes == per, kind


def test_saved_locations_cuda3(sample_paths, tmp_path):
    insp = inspect(sample_paths["cuda3"])
    assert insp.locations == {"cuda:3": insp.bytes} and insp.bytes > 0
    # round robin over two devices: bytes are split per saved location
    p = samples.saved_on_cuda(tmp_path, ("cuda:3", "cuda:1"), name="two.pt")
    two = inspect(p)
    assert set(two.locations) == {"cuda:3", "cuda:1"}
    assert sum(two.locations.values()) == two.bytes
    # the file really says cuda: torch refuses it on this CPU-only machine without map_location
    raw = (p.read_bytes())
    assert b"cuda:3" in raw and b"cuda:1" in raw


def test_prefixes_found(sample_paths):
    assert inspect(sample_paths["ddp"]).prefixes == ("module.",)
    assert inspect(sample_paths["dataparallel"]).prefixes == ("module.",)
    assert inspect(sample_paths["compiled"]).prefixes == ("_orig_mod.",)
    assert inspect(sample_paths["compiled_dataparallel"]).prefixes == ("_orig_mod.", "module.")
    # groups are computed after stripping
    assert dict(inspect(sample_paths["ddp"]).groups).keys() >= {"model.layers.0", "lm_head"}


def test_lightning_containers(sample_paths):
    insp = inspect(sample_paths["lightning"])
    assert insp.containers == ("state_dict", "optimizer_states.0.state")
    assert insp.prefixes == ()
    assert "model.model.layers.0" in dict(insp.groups)


def test_mixed_dtypes(sample_paths):
    insp = inspect(sample_paths["mixed_dtypes"])
    assert insp.dtypes["int64"] == 16 * 8 and insp.dtypes["bool"] == 16
    assert insp.dtypes["float16"] == insp.bytes - 16 * 8 - 16


def test_hf_dirs_list_their_shards(sample_paths):
    for kind, n in (("hf_safetensors", 3), ("hf_bin", 2)):
        insp = inspect(sample_paths[kind])
        assert len(insp.files) == n, kind
        assert all(Path(f).parent.name == sample_paths[kind].name for f in insp.files)


def test_bad_inputs_never_raise(sample_paths, tmp_path):
    cases = {"malicious": ("torch-zip", "unsafe_pickle"), "truncated": ("torch-zip", "truncated"),
             "random": ("unknown", "not_a_checkpoint"), "empty": ("unknown", "empty"),
             "torchscript": ("torchscript", "unsupported_format")}
    for kind, (fmt, code) in cases.items():
        insp = inspect(sample_paths[kind])
        assert (insp.format, insp.diagnosis and insp.diagnosis.code) == (fmt, code), kind
        assert insp.tensors == 0
    assert inspect(tmp_path / "missing.pt").diagnosis.code == "not_found"
    (tmp_path / "emptydir").mkdir()
    assert inspect(tmp_path / "emptydir").diagnosis.code == "not_a_checkpoint"
    ts = inspect(sample_paths["torchscript"]).diagnosis.message
    assert "TorchScript" in ts and "torch.jit.load" in ts
    assert "invalid magic number" in inspect(sample_paths["random"]).diagnosis.message


def test_json_and_summary(sample_paths):
    insp = inspect(sample_paths["cuda3"])
    j = json.loads(json.dumps(insp.to_json()))
    for key in ("format", "tensors", "bytes", "dtypes", "locations", "prefixes", "diagnosis"):
        assert key in j
    assert j["format"] in checkpoint.FORMATS and j["diagnosis"] is None
    assert j["locations"] == {"cuda:3": insp.bytes}
    text = checkpoint.summary(insp)
    assert "torch-zip" in text and "cuda:3" in text and "float32" in text
    bad = inspect(sample_paths["malicious"])
    assert bad.to_json()["diagnosis"]["code"] == "unsafe_pickle"
    assert "posix.system" in checkpoint.summary(bad)
    assert "module." in checkpoint.summary(inspect(sample_paths["ddp"]))


def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return int(re.search(r"rchar: (\d+)", fh.read()).group(1))


def test_inspect_reads_no_tensor_data(tmp_path):
    """64 MiB of tensors; inspect must read only the zip directory and data.pkl (a few KB)."""
    for fmt, name in (("torch", "big.pt"), ("safetensors", "big.safetensors")):
        p = samples.big(tmp_path, total_bytes=64 << 20, count=64, name=name, fmt=fmt)
        before = _rchar()
        insp = inspect(p)
        read = _rchar() - before
        assert insp.diagnosis is None and insp.bytes == 64 << 20 and insp.tensors == 64
        assert read < 1 << 20, f"{fmt}: inspect read {read} bytes of a 64 MiB checkpoint"
