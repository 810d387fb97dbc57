"""cuda_share.py on a real GPU: upload, export, import in an unrelated process, release.

Skipped cleanly where CUDA is absent. Consumers are fresh interpreters (subprocess), never
forks, as real clients are; they receive only the JSON manifest, like the socket carries it.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from devmapd.engine import arena, tree

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[2]


def _sealed(obj):
    """Pack ``obj``'s tensors into a sealed memfd (the daemon's job, done by hand)."""
    tensors, index = [], {}

    def ti(t):
        if id(t) not in index:
            index[id(t)] = len(tensors)
            tensors.append(t)
        return index[id(t)]

    enc = tree.encode(obj, ti)
    keys, storages = [], {}
    for t in tensors:
        k = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if k not in storages:
            storages[k] = t.untyped_storage()
            keys.append(k)
    offsets, total = arena.layout([storages[k].nbytes() for k in keys])
    off = dict(zip(keys, offsets))
    b = arena.ArenaBuilder("gpu-test", total)
    for k in keys:
        b.write_at(off[k], torch.empty(0, dtype=torch.uint8).set_(storages[k]))
    seg = b.seal()
    entries = tuple(arena.TensorEntry(
        segment=0, offset=off[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())],
        storage_nbytes=t.untyped_storage().nbytes(), storage_offset=t.storage_offset(),
        dtype=arena.dtype_name(t.dtype), shape=tuple(t.shape), stride=tuple(t.stride()),
        saved_location="cuda:0") for t in tensors)
    m = arena.Manifest(tensors=entries, segments=(arena.SegmentInfo("memfd", "cuda:0", total),),
                       tree=enc)
    return m, seg


@pytest.fixture
def model():
    torch.manual_seed(0)
    w = torch.randn(256, 128)
    obj = {"w": w, "tied": w, "wt": w.t(), "b": torch.randn(128).half(),
           "steps": torch.arange(10)}
    m, seg = _sealed(obj)
    yield obj, m, seg
    seg.close()


_CONSUMER = r"""
import json, sys, torch
from devmapd.engine import arena
req = json.loads(sys.stdin.read())
m = arena.Manifest.from_json(req["manifest"])
obj = arena.build(m, [None] * len(m.segments), map_location=req.get("map_location"))
res = {k: [str(v.device), v.double().sum().item()] for k, v in obj.items()}
res["tied_shared"] = obj["w"].untyped_storage()._cdata == obj["tied"].untyped_storage()._cdata
if req.get("write"):
    obj["w"][0, 0] = 4242.0
    torch.cuda.synchronize()
print(json.dumps(res))
"""


def _consume(manifest: arena.Manifest, *, env=None, map_location=None, write=False):
    proc = subprocess.run(
        [sys.executable, "-c", _CONSUMER],
        input=json.dumps({"manifest": manifest.to_json(), "map_location": map_location,
                          "write": write}),
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, **(env or {})})
    return proc


def test_upload_puts_the_segment_bytes_on_the_gpu(model):
    from devmapd.gpu import cuda_share
    obj, m, seg = model
    gpu = cuda_share.GpuSegment.upload(seg, 0)
    try:
        host = torch.frombuffer(bytearray(os.pread(seg.fd, seg.nbytes, 0)), dtype=torch.uint8)
        assert gpu.buf.device.type == "cuda" and torch.equal(gpu.buf.cpu(), host)
        views = cuda_share.tensors_from_segment(gpu.buf, m, 0)
        built = tree.decode(m.tree, views)
        for k, v in obj.items():
            assert built[k].device.type == "cuda" and torch.equal(built[k].cpu(), v)
        assert built["w"].untyped_storage()._cdata == built["tied"].untyped_storage()._cdata
    finally:
        gpu.release()


def test_large_upload_uses_the_staging_path(tmp_path):
    from devmapd.gpu import cuda_share
    n = (200 << 20) + 12345                    # > 3 staging chunks, odd tail
    data = torch.randint(0, 255, (n,), dtype=torch.uint8)
    b = arena.ArenaBuilder("big", n)
    b.write_at(0, data)
    seg = b.seal()
    try:
        t0 = time.perf_counter()
        gpu = cuda_share.GpuSegment.upload(seg, 0)
        took = time.perf_counter() - t0
        assert torch.equal(gpu.buf.cpu(), data)
        print(f"upload {n / took / 1e9:.1f} GB/s")
        gpu.release()
    finally:
        seg.close()


def test_another_process_imports_by_uuid_and_gets_the_same_tensors(model):
    from devmapd.gpu import cuda_share
    obj, m, seg = model
    gpu = cuda_share.GpuSegment.upload(seg, 0)
    try:
        served, payloads = cuda_share.manifest_for_client(m, {0: gpu})
        assert served.segments[0].kind == "cuda-ipc" and len(payloads) == 1
        assert cuda_share.local_index_for_uuid(served.segments[0].device_uuid) == 0
        proc = _consume(served)
        assert proc.returncode == 0, proc.stderr
        res = json.loads(proc.stdout)
        for k, v in obj.items():
            assert res[k][0].startswith("cuda") and res[k][1] == pytest.approx(v.double().sum().item())
        assert res["tied_shared"]
        # map_location='cpu' in the client moves them off the GPU
        served, _ = cuda_share.manifest_for_client(m, {0: gpu})
        res = json.loads(_consume(served, map_location="cpu").stdout)
        assert all(res[k][0] == "cpu" for k in obj)
    finally:
        gpu.release()


def test_cuda_visible_devices_by_uuid_and_hidden(model):
    from devmapd.gpu import cuda_share
    _obj, m, seg = model
    gpu = cuda_share.GpuSegment.upload(seg, 0)
    try:
        served, _ = cuda_share.manifest_for_client(m, {0: gpu})
        # select the GPU by UUID: the consumer's index 0 whatever the daemon called it
        uuid = "GPU-" + cuda_share.normalize_uuid(gpu.device_uuid)
        proc = _consume(served, env={"CUDA_VISIBLE_DEVICES": uuid})
        assert proc.returncode == 0, proc.stderr
        served, issued = cuda_share.manifest_for_client(m, {0: gpu})
        proc = _consume(served, env={"CUDA_VISIBLE_DEVICES": ""})
        assert proc.returncode != 0 and "CudaShareError" in proc.stderr
        for p in issued:        # that client never imported: give its slot back
            cuda_share.release_payload(p)
    finally:
        gpu.release()


def test_gpu_memory_is_freed_only_after_every_consumer_let_go(model):
    from devmapd.gpu import cuda_share
    _obj, _m, seg = model
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(0)
    gpu = cuda_share.GpuSegment.upload(seg, 0)
    held = torch.cuda.memory_allocated(0) - base
    assert held >= seg.nbytes
    payload = gpu.export()                     # issued to a client that never imports it
    gpu.release()
    gc.collect()
    # torch keeps the exported block in limbo while its ref-counter slot is non-zero
    assert torch.cuda.memory_allocated(0) - base >= seg.nbytes
    cuda_share.release_payload(payload)        # e.g. the client died
    cuda_share.collect()
    assert torch.cuda.memory_allocated(0) - base < seg.nbytes


def test_a_client_write_on_the_gpu_is_shared_not_private(model):
    # Documented limit: CUDA IPC maps the daemon's memory itself, no copy-on-write.
    from devmapd.gpu import cuda_share
    _obj, m, seg = model
    gpu = cuda_share.GpuSegment.upload(seg, 0)
    try:
        served, _ = cuda_share.manifest_for_client(m, {0: gpu})
        proc = _consume(served, write=True)
        assert proc.returncode == 0, proc.stderr
        views = tree.decode(m.tree, cuda_share.tensors_from_segment(gpu.buf, m, 0))
        assert views["w"][0, 0].item() == 4242.0
    finally:
        gpu.release()
