"""arena.py on real parts: memfds, seals, real checkpoints written by torch, real processes."""
from __future__ import annotations

import errno
import fcntl
import gc
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from devmapd.engine import arena

ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(tmp_path: Path) -> tuple[Path, dict]:
    """A real torch checkpoint with awkward parts: many dtypes, views, ties, 0-d, empty."""
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    emb = torch.nn.Parameter(torch.randn(10, 4))
    sd = {
        "f32": torch.randn(3, 7),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 3).to(torch.bfloat16),
        "f64": torch.randn(3, dtype=torch.float64),
        "i8": torch.randint(-100, 100, (9,), dtype=torch.int8),
        "u8": torch.randint(0, 255, (3, 3), dtype=torch.uint8),
        "i64": torch.arange(11),
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(4, dtype=torch.complex64),
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 3),
        "transposed": base.t(),                 # non-contiguous view
        "row": base[2],                         # view with a storage offset
        "strided": base[:, ::2],
        "embed.weight": emb,
        "lm_head.weight": emb,                  # tied weight: same storage
        "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
    }
    path = tmp_path / "model.pt"
    torch.save(sd, path)
    return path, sd


def _assert_like(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert type(got) is type(ref)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert got.stride() == ref.stride() and got.storage_offset() == ref.storage_offset()
    assert got.untyped_storage().nbytes() == ref.untyped_storage().nbytes()
    assert got.requires_grad == ref.requires_grad
    assert torch.equal(got.detach(), ref.detach())


def _sealed_from_bytes(data: bytes) -> arena.SealedSegment:
    b = arena.ArenaBuilder("raw", len(data))
    b.write_at(0, data)
    return b.seal()


# ----------------------------------------------------------------------------- layout

@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=30), st.sampled_from([1, 8, 64, 4096]))
def test_layout_aligns_and_never_overlaps(sizes, align):
    offsets, total = arena.layout(sizes, align)
    assert len(offsets) == len(sizes)
    end = 0
    for off, n in zip(offsets, sizes):
        assert off % align == 0 and off >= end
        end = off + n
    assert total >= end and total % align == 0


def test_layout_rejects_bad_input():
    with pytest.raises(ValueError):
        arena.layout([1], 48)
    with pytest.raises(ValueError):
        arena.layout([-1])


# ----------------------------------------------------------------------------- builder

def test_write_at_takes_every_buffer_kind_without_reinterpreting(packer):
    bf = torch.randn(8).to(torch.bfloat16)   # numpy has no bfloat16: must go through a uint8 view
    parts = [b"abc", bytearray(b"defg"), memoryview(b"hi"), np.arange(3, dtype=np.int32),
             bf, torch.arange(6, dtype=torch.int16).reshape(2, 3)]
    blobs = [bytes(p) if not isinstance(p, torch.Tensor) else
             p.contiguous().view(torch.uint8).numpy().tobytes() for p in parts]
    offsets, total = arena.layout([len(b) for b in blobs])
    b = arena.ArenaBuilder("kinds", total)
    for off, p in zip(offsets, parts):
        b.write_at(off, p)
    seg = b.seal()
    try:
        for off, blob in zip(offsets, blobs):
            assert os.pread(seg.fd, len(blob), off) == blob
    finally:
        seg.close()


def test_write_at_refuses_overruns_and_non_contiguous():
    b = arena.ArenaBuilder("small", 16)
    try:
        with pytest.raises(arena.ArenaError, match="overruns"):
            b.write_at(10, b"x" * 7)
        with pytest.raises(arena.ArenaError, match="contiguous"):
            b.write_at(0, torch.arange(8).reshape(2, 4).t())
        assert os.fstat(b.fd).st_size == 16     # nothing grew the file
    finally:
        b.discard()
    assert b.fd == -1


def test_copy_from_file_uses_the_kernel_and_handles_short_transfers(tmp_path, monkeypatch):
    data = os.urandom(300_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    calls = []
    real = os.sendfile

    def short_sendfile(out, in_, off, count):     # the kernel may return less than asked
        calls.append(count)
        return real(out, in_, off, min(count, 70_001))

    monkeypatch.setattr(os, "sendfile", short_sendfile)
    fd = os.open(src, os.O_RDONLY)
    b = arena.ArenaBuilder("cp", 200_064)
    try:
        b.copy_from_file(64, fd, 100_000, 200_000)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0        # the source position is untouched
        seg = b.seal()
    finally:
        os.close(fd)
    try:
        assert len(calls) >= 3
        assert os.pread(seg.fd, 200_000, 64) == data[100_000:300_000]
    finally:
        seg.close()


def test_copy_from_file_falls_back_when_sendfile_fails(tmp_path, monkeypatch):
    data = os.urandom(50_000)
    (tmp_path / "s").write_bytes(data)

    def broken(*a):
        raise OSError(errno.EINVAL, "sendfile unsupported")

    monkeypatch.setattr(os, "sendfile", broken)
    monkeypatch.setattr(arena, "_COPY_CHUNK", 4096)   # exercise the chunk loop
    fd = os.open(tmp_path / "s", os.O_RDONLY)
    b = arena.ArenaBuilder("fb", 50_000)
    try:
        b.copy_from_file(0, fd, 0, 50_000)
        seg = b.seal()
    finally:
        os.close(fd)
    try:
        assert os.pread(seg.fd, 50_000, 0) == data
    finally:
        seg.close()


def test_copy_from_truncated_source_is_an_error(tmp_path):
    (tmp_path / "s").write_bytes(b"x" * 100)
    fd = os.open(tmp_path / "s", os.O_RDONLY)
    b = arena.ArenaBuilder("tr", 1000)
    try:
        with pytest.raises(arena.ArenaError, match="truncated"):
            b.copy_from_file(0, fd, 50, 500)
    finally:
        os.close(fd)
        b.discard()


def test_parallel_copies_from_threads_do_not_race(tmp_path):
    # Parallel shard reads share one builder; sendfile writes at the file position, so each
    # thread must have its own. Interleave many small copies to give a race every chance.
    parts = [os.urandom(40_000) for _ in range(4)]
    for i, p in enumerate(parts):
        (tmp_path / f"s{i}").write_bytes(p)
    offsets, total = arena.layout([len(p) for p in parts])
    b = arena.ArenaBuilder("par", total)

    def work(i):
        fd = os.open(tmp_path / f"s{i}", os.O_RDONLY)
        try:
            for k in range(0, 40_000, 1000):
                b.copy_from_file(offsets[i] + k, fd, k, 1000)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seg = b.seal()
    try:
        for off, p in zip(offsets, parts):
            assert os.pread(seg.fd, len(p), off) == p
        # the per-thread writer fds were closed at seal: only the sealed fd remains open
        assert not b._thread_fds
    finally:
        seg.close()


# ----------------------------------------------------------------------------- seals

def test_sealed_memfd_refuses_every_kind_of_write():
    seg = _sealed_from_bytes(b"\x01" * 8192)
    try:
        arena.verify_sealed(seg.fd)
        with pytest.raises(PermissionError):
            os.write(seg.fd, b"x")
        with pytest.raises(PermissionError):
            os.pwrite(seg.fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(seg.fd, 100)                 # shrink
        with pytest.raises(PermissionError):
            os.ftruncate(seg.fd, 1 << 20)             # grow
        with pytest.raises(PermissionError) as e:
            mmap.mmap(seg.fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        assert e.value.errno == errno.EPERM
        with pytest.raises(PermissionError) as e:
            os.write(seg.fd, b"x")
        assert e.value.errno == errno.EPERM
        # a fresh open file description (what a client could get via /proc) is sealed too
        rw = os.open(f"/proc/self/fd/{seg.fd}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.pwrite(rw, b"x", 0)
        finally:
            os.close(rw)
        with pytest.raises(PermissionError):          # F_SEAL_SEAL: seals cannot be removed/added
            fcntl.fcntl(seg.fd, arena.F_ADD_SEALS, arena.F_SEAL_WRITE)
        assert os.pread(seg.fd, 8192, 0) == b"\x01" * 8192
    finally:
        seg.close()


def test_verify_sealed_rejects_unsealed_partial_and_non_memfd(tmp_path):
    fd = os.memfd_create("plain", os.MFD_ALLOW_SEALING)
    try:
        with pytest.raises(arena.ArenaError, match="WRITE, SHRINK, GROW, SEAL"):
            arena.verify_sealed(fd)
        fcntl.fcntl(fd, arena.F_ADD_SEALS, arena.F_SEAL_WRITE | arena.F_SEAL_SHRINK)
        with pytest.raises(arena.ArenaError, match="lacks the seal.*GROW, SEAL"):
            arena.verify_sealed(fd)
    finally:
        os.close(fd)
    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        with pytest.raises(arena.ArenaError, match="not a sealed memfd"):
            arena.verify_sealed(fd)
    finally:
        os.close(fd)


def test_attach_refuses_an_unsealed_memfd(tmp_path, packer):
    path, _ = _checkpoint(tmp_path)
    m, seg = packer(torch.load(path, weights_only=True))
    # same bytes, but in a memfd that was never sealed: somebody could change it under us
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, seg.nbytes)
        os.pwrite(fd, os.pread(seg.fd, seg.nbytes, 0), 0)
        with pytest.raises(arena.ArenaError, match="lacks the seal"):
            arena.attach(m, [fd])
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- attach/build

@pytest.mark.parametrize("via_file", [False, True])
def test_build_equals_torch_load(tmp_path, packer, via_file):
    path, _ = _checkpoint(tmp_path)
    ref = torch.load(path, weights_only=True)
    m, seg = packer(ref, via_file=str(tmp_path / "raw.bin") if via_file else None)
    m = arena.Manifest.from_json(json.loads(json.dumps(m.to_json())))   # as it crosses the wire
    got = arena.build(m, [seg.fd])
    assert list(got) == list(ref)
    for k in ref:
        _assert_like(got[k], ref[k])
    # storages start ALIGN-aligned in the mapping, as the manifest promises
    for k in got:
        assert got[k].untyped_storage().data_ptr() % arena.ALIGN == 0


def test_tied_and_viewed_storages_are_shared_after_attach(tmp_path, packer):
    path, _ = _checkpoint(tmp_path)
    ref = torch.load(path, weights_only=True)
    m, seg = packer(ref)
    got = arena.build(m, [seg.fd])
    # one storage object (StorageImpl) per file storage, exactly as torch.load gives
    for a, b in (("embed.weight", "lm_head.weight"), ("transposed", "row"), ("row", "strided")):
        assert ref[a].untyped_storage()._cdata == ref[b].untyped_storage()._cdata
        assert got[a].untyped_storage()._cdata == got[b].untyped_storage()._cdata
    # the same memory, not equal copies: a write through one is seen through the other
    with torch.no_grad():
        got["embed.weight"][0, 0] = 1234.5
    assert got["lm_head.weight"][0, 0].item() == 1234.5
    # and distinct storages do not share memory
    assert got["f32"].untyped_storage().data_ptr() != got["f16"].untyped_storage().data_ptr()


def test_parameters_and_requires_grad_survive(tmp_path, packer):
    path, _ = _checkpoint(tmp_path)
    ref = torch.load(path, weights_only=True)
    got = arena.build(*_pack_fds(packer, ref))
    assert isinstance(got["embed.weight"], torch.nn.Parameter) and got["embed.weight"].requires_grad
    assert isinstance(got["frozen"], torch.nn.Parameter) and not got["frozen"].requires_grad
    assert not isinstance(got["f32"], torch.nn.Parameter) and not got["f32"].requires_grad
    # a loaded Parameter trains: autograd works on the mapped memory
    (got["embed.weight"] * 2).sum().backward()
    assert torch.equal(got["embed.weight"].grad, torch.full((10, 4), 2.0))


def _pack_fds(packer, obj):
    m, seg = packer(obj)
    return m, [seg.fd]


def test_mapping_is_private_copy_on_write(tmp_path, packer):
    path, _ = _checkpoint(tmp_path)
    m, seg = packer(torch.load(path, weights_only=True), name="cowcheck")
    got = arena.build(m, [seg.fd])
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines()
            if "devmapd:cowcheck" in line]
    assert maps, "the arena should appear as a mapping of the memfd"
    for line in maps:
        assert line.split()[1].endswith("p"), f"arena mapped shared: {line}"
    del got


def test_client_write_does_not_reach_the_arena_or_other_clients(tmp_path, packer):
    path, _ = _checkpoint(tmp_path)
    ref = torch.load(path, weights_only=True)
    m, seg = packer(ref)
    first = arena.build(m, [seg.fd])
    with torch.no_grad():
        first["f32"].fill_(7.0)
        first["i64"].add_(1)
    assert torch.all(first["f32"] == 7.0)
    before = os.pread(seg.fd, seg.nbytes, 0)
    # another attach in this process and one in a fresh process still see the original bytes
    second = arena.build(m, [seg.fd])
    assert torch.equal(second["f32"], ref["f32"]) and torch.equal(second["i64"], ref["i64"])
    assert _attach_in_subprocess(m, seg.fd, ["f32", "i64"]) == {
        "f32": ref["f32"].double().sum().item(), "i64": ref["i64"].double().sum().item()}
    assert os.pread(seg.fd, seg.nbytes, 0) == before


_CHILD = r"""
import json, sys, torch
from devmapd.engine import arena
req = json.loads(sys.stdin.read())
obj = arena.build(arena.Manifest.from_json(req["manifest"]), [req["fd"]])
print(json.dumps({k: obj[k].double().sum().item() for k in req["keys"]}))
"""


def _attach_in_subprocess(m: arena.Manifest, fd: int, keys: list[str]) -> dict:
    # An unrelated interpreter, not a fork: it only has the fd number and the manifest.
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], input=json.dumps({"manifest": m.to_json(), "fd": fd,
                                                          "keys": keys}),
        capture_output=True, text=True, pass_fds=(fd,), cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_attach_in_a_separate_process_from_the_fd_alone(tmp_path, packer):
    path, _ = _checkpoint(tmp_path)
    ref = torch.load(path, weights_only=True)
    m, seg = packer(ref)
    keys = ["f32", "bf16", "transposed", "strided", "lm_head.weight", "c64"]
    got = _attach_in_subprocess(m, seg.fd, [k for k in keys if k != "c64"])
    assert got == {k: ref[k].double().sum().item() for k in keys if k != "c64"}


def test_tensors_outlive_the_fd_and_the_manifest(tmp_path, packer):
    path, _ = _checkpoint(tmp_path)
    ref = torch.load(path, weights_only=True)
    expect = {k: v.detach().clone() for k, v in ref.items()}
    m, seg = packer(ref)
    got = arena.build(m, [seg.fd])
    seg.close()               # the client closes the fd it received...
    del m, ref                # ...and drops the manifest
    keep = {k: got[k] for k in ("embed.weight", "row", "bf16")}
    del got                   # only a few tensors remain, each holding a storage slice
    gc.collect()
    filler = [torch.randn(1000) for _ in range(200)]   # reuse of freed memory would show
    for k, v in keep.items():
        assert torch.equal(v.detach(), expect[k])
    del filler


def test_storage_slices_keep_the_base_mapping_alive():
    # The mechanism attach relies on, tested directly: drop the base storage, collect, read.
    seg = _sealed_from_bytes(bytes(range(256)) * 64)
    try:
        base = torch.UntypedStorage.from_file(f"/proc/self/fd/{seg.fd}", shared=False,
                                              nbytes=seg.nbytes)
        sl = base[4096:4096 + 256]
        t = torch.empty(0, dtype=torch.uint8).set_(sl)
    finally:
        seg.close()
    del base, sl
    gc.collect()
    assert t.tolist() == list(range(256))


def test_manifest_round_trips_through_json(tmp_path, packer):
    path, _ = _checkpoint(tmp_path)
    m, _seg = packer(torch.load(path, weights_only=True))
    wire = json.loads(json.dumps(m.to_json()))
    back = arena.Manifest.from_json(wire)
    assert back == m
    ipc = arena.SegmentInfo(kind="cuda-ipc", device="cuda:1", nbytes=64, device_uuid="GPU-x",
                            ipc={"handle": "AAA="})
    m2 = arena.Manifest(tensors=m.tensors, segments=(m.segments[0], ipc), tree=m.tree)
    assert arena.Manifest.from_json(json.loads(json.dumps(m2.to_json()))) == m2


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d.pop("tensors"), "malformed"),
    (lambda d: d["tensors"][0].pop(), "malformed"),
    (lambda d: d.update(tensor_fields=["segment"]), "fields differ"),
])
def test_malformed_manifest_json_is_refused(tmp_path, packer, mutate, match):
    path, _ = _checkpoint(tmp_path)
    m, _seg = packer(torch.load(path, weights_only=True))
    d = json.loads(json.dumps(m.to_json()))
    mutate(d)
    with pytest.raises(arena.ArenaError, match=match):
        arena.Manifest.from_json(d)


def _with_entry(m: arena.Manifest, i: int, **changes) -> arena.Manifest:
    from dataclasses import replace
    ts = list(m.tensors)
    ts[i] = replace(ts[i], **changes)
    return replace(m, tensors=tuple(ts))


def test_corrupt_manifests_cannot_reach_outside_the_arena(packer):
    m, seg = packer({"a": torch.arange(100, dtype=torch.float32), "b": torch.ones(8)})
    e0 = m.tensors[0]
    cases = [
        (dict(offset=seg.nbytes), "outside"),
        (dict(storage_nbytes=seg.nbytes * 2), "outside"),
        (dict(offset=e0.offset + 2), "not a multiple"),
        (dict(shape=(1000,)), "does not fit"),
        (dict(storage_offset=99, shape=(2,)), "does not fit"),
        (dict(shape=(10, 10), stride=(10, 100)), "does not fit"),
        (dict(dtype="float99"), "unknown dtype"),
        (dict(segment=3), "does not exist"),
    ]
    for change, match in cases:
        with pytest.raises(arena.ArenaError, match=match):
            arena.attach(_with_entry(m, 0, **change), [seg.fd])
    with pytest.raises(arena.ArenaError, match="got 2 fds for 1"):
        arena.attach(m, [seg.fd, seg.fd])
    with pytest.raises(arena.ArenaError, match="no fd came"):
        arena.attach(m, [None])
    from dataclasses import replace
    bigger = replace(m, segments=(replace(m.segments[0], nbytes=seg.nbytes + 4096),))
    with pytest.raises(arena.ArenaError, match="manifest expects"):
        arena.attach(bigger, [seg.fd])


def test_empty_checkpoint_and_zero_size_segment():
    # a checkpoint whose only tensor is empty: a zero-byte memfd, sealed, attached
    b = arena.ArenaBuilder("zero", 0)
    seg = b.seal()
    try:
        entry = arena.TensorEntry(segment=0, offset=0, storage_nbytes=0, storage_offset=0,
                                  dtype="float32", shape=(0,), stride=(1,), saved_location="cpu")
        man = arena.Manifest(tensors=(entry,),
                             segments=(arena.SegmentInfo("memfd", "cpu", 0),),
                             tree={"@": "dict", "items": [["empty", {"@": "tensor", "i": 0}],
                                                          ["epoch", 3]]})
        got = arena.build(man, [seg.fd])
        assert got["epoch"] == 3 and got["empty"].shape == (0,)
        bad = _with_entry(man, 0, shape=(4,))
        with pytest.raises(arena.ArenaError):
            arena.attach(bad, [seg.fd])
    finally:
        seg.close()


def test_builder_seal_and_discard_lifecycle():
    b = arena.ArenaBuilder("life", 64)
    seg = b.seal()
    with pytest.raises(arena.ArenaError, match="already sealed"):
        b.write_at(0, b"x")
    with pytest.raises(arena.ArenaError, match="already sealed"):
        b.seal()
    b.discard()                       # harmless after seal: the segment owns the fd
    os.fstat(seg.fd)
    seg.close()
    seg.close()                       # idempotent
    with arena.ArenaBuilder("ctx", 64) as b2:
        fd = b2.fd
    with pytest.raises(OSError):
        os.fstat(fd)


def test_build_speed_for_many_small_and_few_large_tensors(packer):
    # Generous bounds (shared 2-core box): they catch an accidental copy or O(n^2), not jitter.
    small = {f"layers.{i}.w": torch.full((4, 4), float(i)) for i in range(4000)}
    m, seg = packer(small)
    m = arena.Manifest.from_json(json.loads(json.dumps(m.to_json())))
    best = min(_timed(lambda: arena.build(m, [seg.fd])) for _ in range(3))
    assert best < 0.5, f"4000 tensors took {best * 1e3:.1f} ms"
    got = arena.build(m, [seg.fd])
    assert got["layers.3999.w"][0, 0].item() == 3999.0

    big = {f"w{i}": torch.empty(1 << 20, dtype=torch.uint8) for i in range(64)}   # 64 MiB
    m, seg = packer(big)
    t0 = time.perf_counter()
    got = arena.build(m, [seg.fd])
    took = time.perf_counter() - t0
    assert took < 0.05, f"64 MiB took {took * 1e3:.1f} ms: something copied the bytes"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
