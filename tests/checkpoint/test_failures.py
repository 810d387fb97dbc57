"""Every failure becomes a Diagnosis with the fix; hostile and broken files are refused safely."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from devmapd import samples
from devmapd.engine import arena, checkpoint
from devmapd.engine.checkpoint import CheckpointError, ReadOptions, inspect, read
from devmapd.engine.diagnose import diagnose_exception


def read_error(path, options: ReadOptions = ReadOptions(), **kw) -> checkpoint.Diagnosis:
    with pytest.raises(CheckpointError) as ei:
        read(path, options, **kw)
    d = ei.value.diagnosis
    assert d.message.endswith(".") and len(d.message) < 400
    return d


@pytest.fixture
def no_alloc(monkeypatch):
    """Records every ArenaBuilder made: refusals must happen before any memory is allocated."""
    made: list[int] = []
    real = arena.ArenaBuilder

    class Counting(real):
        def __init__(self, name, nbytes):
            made.append(nbytes)
            super().__init__(name, nbytes)

    monkeypatch.setattr(arena, "ArenaBuilder", Counting)
    return made


def test_malicious_pickle_runs_no_code_and_names_the_global(tmp_path, no_alloc):
    marker = tmp_path / "PWNED"
    p = samples.malicious(tmp_path, marker)
    # the file really is hostile: plain pickle loading (never done by devmapd) would run it
    assert b"posix" in p.read_bytes() and b"system" in p.read_bytes()
    insp = inspect(p)
    assert insp.diagnosis.code == "unsafe_pickle" and "posix.system" in insp.diagnosis.message
    d = read_error(p)
    assert d.code == "unsafe_pickle" and "posix.system" in d.message
    assert "allowed_globals" not in d.message          # never advise allowing os.system
    assert not marker.exists() and no_alloc == []
    # even "allowing" an unrelated global changes nothing
    d = read_error(p, ReadOptions(allowed_globals=("collections.Counter",)))
    assert d.code == "unsafe_pickle" and not marker.exists()


def test_custom_class_needs_allowed_globals(tmp_path, helpers):
    p = tmp_path / "ns.pt"
    import argparse
    torch.save({"w": torch.ones(3), "args": argparse.Namespace(lr=0.1)}, p)
    d = read_error(p)
    assert d.code == "unsafe_pickle" and "argparse.Namespace" in d.message and "allowed_globals" in d.message
    assert inspect(p).diagnosis.code == "unsafe_pickle"
    assert inspect(p, allowed_globals=("argparse.Namespace",)).diagnosis is None
    # allowed for one call only, and the tree codec cannot carry a Namespace: refused plainly
    d = read_error(p, ReadOptions(allowed_globals=("argparse.Namespace",)))
    assert d.code == "unsupported_format" and "Namespace" in d.message
    assert inspect(p).diagnosis.code == "unsafe_pickle"
    assert read_error(p, ReadOptions(allowed_globals=("nosuchmodule.Thing",))).code == "unsafe_pickle"


@pytest.mark.parametrize("kind,code", [("truncated", "truncated"), ("random", "not_a_checkpoint"),
                                       ("empty", "empty"), ("torchscript", "unsupported_format")])
def test_broken_files(kind, code, sample_paths, no_alloc):
    d = read_error(sample_paths[kind])
    assert d.code == code
    assert no_alloc == []
    if kind == "torchscript":
        assert "TorchScript" in d.message and "torch.jit.load" in d.message


def test_truncated_variants(sample_paths, tmp_path):
    whole = sample_paths["plain"].read_bytes()
    for cut in (len(whole) - 30, len(whole) // 2, 40):
        p = tmp_path / f"cut{cut}.pt"
        p.write_bytes(whole[:cut])
        assert inspect(p).diagnosis.code in ("truncated", "corrupt"), cut
    leg = sample_paths["legacy"].read_bytes()
    for cut in (len(leg) - 10, len(leg) // 2):
        p = tmp_path / f"leg{cut}.pt"
        p.write_bytes(leg[:cut])
        assert read_error(p).code == "truncated", cut
    st = sample_paths["safetensors"].read_bytes()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(st[: len(st) - 100])
    assert read_error(p).code == "truncated"


def test_compressed_zip_member_is_refused(sample_paths, tmp_path):
    p = tmp_path / "deflated.pt"
    with zipfile.ZipFile(sample_paths["plain"]) as src, zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    d = read_error(p)
    assert d.code == "corrupt" and "compressed" in d.message


def test_bad_safetensors_header(tmp_path):
    p = tmp_path / "bad.safetensors"
    body = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'   # not valid JSON
    p.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 8)
    assert read_error(p).code == "corrupt"
    body = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    p.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 16)   # shape needs 16 bytes, span says 8
    assert read_error(p).code == "corrupt"


def test_huge_safetensors_header_refused_before_reading(tmp_path, no_alloc):
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{" + b" " * 64)
    d = read_error(p)
    assert d.code == "too_large" and no_alloc == []
    assert read_error(p, ReadOptions(max_header_bytes=1 << 50)).code == "truncated"


def test_absurd_declared_size_refused_before_allocating(tmp_path, no_alloc):
    """A 64 GiB tensor declared in a sparse file: refused against MemAvailable before any allocation."""
    p = tmp_path / "sparse.safetensors"
    n = 64 << 30
    header = json.dumps({"w": {"dtype": "F32", "shape": [n // 4], "data_offsets": [0, n]}}).encode()
    with open(p, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + n)          # sparse: no disk or memory used
    insp = inspect(p)
    assert insp.diagnosis is None and insp.bytes == n
    d = read_error(p)
    assert d.code == "out_of_memory" and "64.0 GiB" in d.message
    assert no_alloc == []


def test_memory_limit(sample_paths, no_alloc):
    need = inspect(sample_paths["plain"]).bytes
    d = read_error(sample_paths["plain"], ReadOptions(memory_limit=need // 2))
    assert d.code == "out_of_memory" and "memory limit" in d.message
    # upcasting doubles the footprint, and the limit counts what would be allocated
    insp = inspect(sample_paths["fp16"])
    limit = insp.bytes + arena.ALIGN * insp.tensors      # room for the layout's alignment padding
    assert 2 * insp.bytes > limit
    read(sample_paths["fp16"], ReadOptions(memory_limit=limit)).close()
    assert read_error(sample_paths["fp16"], ReadOptions(memory_limit=limit,
                                                        cpu_upcast_half=True)).code == "out_of_memory"
    assert len(no_alloc) == 1


def test_too_many_tensors(sample_paths, tmp_path, no_alloc):
    for kind in ("plain", "legacy", "safetensors"):
        d = read_error(sample_paths[kind], ReadOptions(max_tensors=5))
        assert d.code == "too_large" and "5" in d.message, kind
    p = samples.big(tmp_path, total_bytes=4000 * 4, count=4000, name="many.pt")
    assert read_error(p, ReadOptions(max_tensors=1000)).code == "too_large"
    assert no_alloc == []


def test_tensor_past_its_storage_is_corrupt(tmp_path):
    """A crafted safetensors span is checked; a crafted pickle view beyond its storage too."""
    p = tmp_path / "view.pt"
    torch.save({"w": torch.arange(8.0)}, p)
    # Rewrite the tensor's size in data.pkl (torch.Size((8,)) -> (9,)) the way an attacker would.
    with zipfile.ZipFile(p) as z:
        entries = [(i, z.read(i)) for i in z.infolist()]
    out = tmp_path / "past.pt"
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                assert b"K\x08\x85" in data
                data = data.replace(b"K\x08\x85", b"K\x09\x85", 1)
            z.writestr(info, data)
    d = read_error(out)
    assert d.code == "corrupt" and "past the end of its storage" in d.message


def test_changed_during_read(private_copy, no_alloc):
    """A writer rewrites bytes in place while we copy: an error, never a mixed model."""
    p = private_copy("hf_safetensors")
    shard = sorted(p.glob("*.safetensors"))[-1]
    old = 1_000_000_000
    os.utime(shard, ns=(old, old))                 # so any write moves mtime, whatever the clock tick
    fd = os.open(shard, os.O_WRONLY)
    state = {"calls": 0}

    def writer(done, total):
        state["calls"] += 1
        if state["calls"] == 1:
            os.pwrite(fd, b"\x7f" * 8, os.path.getsize(shard) - 8)
    try:
        d = read_error(p, ReadOptions(threads=1), progress=writer)
    finally:
        os.close(fd)
    assert d.code == "changed_during_read" and "rename" in d.message
    assert no_alloc, "the arena was allocated (then discarded) before the change was seen"
    # now the file is stable again: it reads fine
    read(p).close()


def test_changed_size_during_read(private_copy):
    p = private_copy("big")
    with open(p, "rb+") as fh:
        size = fh.seek(0, 2)

    def shrink(done, total):
        os.truncate(p, size // 2)
    d = read_error(p, progress=shrink)
    assert d.code == "changed_during_read"


def test_permission_denied_unprivileged(private_copy, tmp_path):
    """Run as root WITHOUT capabilities (tests may run as root): chmod 000 must give EACCES."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is not installed")
    p = private_copy("plain")
    p.chmod(0)
    code = (
        "import json, sys\n"
        "from devmapd.engine.checkpoint import inspect, read, CheckpointError\n"
        "i = inspect(sys.argv[1])\n"
        "try:\n"
        "    read(sys.argv[1]); r = None\n"
        "except CheckpointError as e:\n"
        "    r = e.diagnosis.code\n"
        "print(json.dumps({'inspect': i.diagnosis.code, 'message': i.diagnosis.message, 'read': r}))\n"
    )
    cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    out = subprocess.run(cmd + [sys.executable, "-c", code, str(p)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["inspect"] == "permission_denied" and res["read"] == "permission_denied"
    assert "chmod" in res["message"]


def test_symlink_and_fifo(sample_paths, tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    assert inspect(fifo).diagnosis.code == "not_a_checkpoint"      # and it did not hang
    link = tmp_path / "link.pt"
    link.symlink_to(sample_paths["plain"])
    assert inspect(link).diagnosis is None                        # resolved once, then opened NOFOLLOW


def test_hf_index_escapes_and_missing_shards(private_copy):
    p = private_copy("hf_safetensors")
    index = p / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["evil"] = "../../etc/passwd"
    index.write_text(json.dumps(data))
    assert read_error(p).code == "corrupt"
    data["weight_map"]["evil"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))
    d = read_error(p)
    assert d.code == "corrupt" and "missing" in d.message


def test_diagnose_plain_torch_load_errors(sample_paths, tmp_path):
    """The client's fallback path runs plain torch.load; its errors get the same diagnoses."""
    cuda = sample_paths["cuda3"]
    with pytest.raises(Exception) as ei:
        torch.load(cuda, weights_only=True)                  # no GPU here: torch refuses cuda:3
    d = diagnose_exception(ei.value, cuda)
    assert d.code == "device_mismatch" and "map_location" in d.message
    msg = ("Attempting to deserialize object on CUDA device 3 but torch.cuda.device_count() is 1. "
           "Please use torch.load with map_location to map your storages to an existing device.")
    d = diagnose_exception(RuntimeError(msg), "m.pt")
    assert d.code == "device_mismatch" and "cuda:3" in d.message and "map_location" in d.message
    cases = {"malicious": "unsafe_pickle", "random": "not_a_checkpoint", "truncated": "truncated",
             "empty": "empty", "torchscript": "unsupported_format"}
    for kind, code in cases.items():
        with pytest.raises(Exception) as ei:
            torch.load(sample_paths[kind], weights_only=True)
        d = diagnose_exception(ei.value, sample_paths[kind])
        assert d.code == code, (kind, d, ei.value)
    with pytest.raises(Exception) as ei:
        torch.load(sample_paths["malicious"], weights_only=True)
    assert "posix.system" in diagnose_exception(ei.value, "x").message
    with pytest.raises(OSError) as ei:
        open(tmp_path / "nope.pt", "rb")
    assert diagnose_exception(ei.value, "nope.pt").code == "not_found"
    from safetensors.torch import load_file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(Exception) as ei:
        load_file(str(bad))
    assert diagnose_exception(ei.value, bad).code == "corrupt"
    assert diagnose_exception(MemoryError(), "m.pt").code == "out_of_memory"


def test_sparse_and_quantized_tensors_are_refused_plainly(tmp_path):
    p = tmp_path / "sparse.pt"
    torch.save({"s": torch.eye(3).to_sparse()}, p)
    d = inspect(p).diagnosis
    assert d is not None and d.code == "unsupported_format" and "sparse" in d.message
    assert read_error(p).code == "unsupported_format"


@pytest.mark.parametrize("how", ["protocol4", "legacy"])
def test_malicious_pickle_variants(tmp_path, how):
    marker = tmp_path / "PWNED"
    payload = {"weight": torch.ones(4), "payload": samples._RunsCode(str(marker))}
    p = tmp_path / f"evil-{how}.pt"
    if how == "protocol4":
        torch.save(payload, p, pickle_protocol=4)          # STACK_GLOBAL instead of GLOBAL
    else:
        torch.save(payload, p, _use_new_zipfile_serialization=False)
    d = read_error(p)
    assert d.code == "unsafe_pickle" and "posix.system" in d.message, d
    assert inspect(p).diagnosis.code == "unsafe_pickle"
    assert not marker.exists()


class _OwnModule(torch.nn.Module):
    """A model class outside torch.nn and __main__: only the pickled state shows it is a module."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))


@pytest.mark.parametrize("model", [torch.nn.Linear(2, 2), _OwnModule()], ids=["torch-nn", "own-class"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_whole_pickled_module_is_unsupported_and_says_save_the_state_dict(tmp_path, model, legacy):
    """README: a pickled nn.Module is unsupported_format with "save its state_dict"."""
    p = tmp_path / "whole.pt"
    torch.save(model, p, _use_new_zipfile_serialization=not legacy)
    for d in (read_error(p), inspect(p).diagnosis):
        assert d.code == "unsupported_format", d
        assert type(model).__name__ in d.message and "save its state_dict" in d.message, d
        assert "torch.save(model.state_dict(), path)" in d.message
    # the same file through a plain torch.load (the client's fallback) reads the same
    with pytest.raises(Exception) as ei:
        torch.load(p, weights_only=True)
    if isinstance(model, torch.nn.Linear):
        assert diagnose_exception(ei.value, p).code == "unsupported_format"


def test_no_fd_leaks(sample_paths):
    """Every file and arena fd is closed on success (after close()) and on every failure."""
    def count() -> int:
        return len(os.listdir("/proc/self/fd"))
    read(sample_paths["hf_safetensors"]).close()       # warm up lazy imports/thread pools
    before = count()
    for _ in range(3):
        for kind in ("plain", "hf_bin", "legacy"):
            read(sample_paths[kind]).close()
        for kind in ("malicious", "truncated", "random", "empty", "torchscript"):
            with pytest.raises(CheckpointError):
                read(sample_paths[kind])
            inspect(sample_paths[kind])
        with pytest.raises(CheckpointError):
            read(sample_paths["plain"], ReadOptions(memory_limit=1))
    assert count() == before


def test_truncated_by_a_writer_while_casting(private_copy):
    """The slow (casting) path reading a file another process truncates: changed, not 'truncated'."""
    p = private_copy("fp16")
    size = p.stat().st_size
    d = read_error(p, ReadOptions(cpu_upcast_half=True), progress=lambda done, total: os.truncate(p, size // 3))
    assert d.code == "changed_during_read"
