"""Arenas filled as several memfds in parallel: equal to torch.load, copy-on-write, no storage split.

Real checkpoints written by torch here, read with ``engine.learned`` (one parse), built the way a
client builds them (``arena.build`` on the sealed fds).
"""

from __future__ import annotations

from pathlib import Path

import torch

from devmapd.engine import arena, checkpoint
from devmapd.engine.learned import default_threads, learn, read_learned

OPTS = checkpoint.ReadOptions()


def _save(path: Path) -> dict:
    g = torch.Generator().manual_seed(5)
    sd = {f"layers.{i}.weight": torch.randn(64 + i, 256, generator=g) for i in range(12)}
    sd["layers.3.weight"] = sd["layers.3.weight"].half()
    sd["layers.10.weight"] = sd["layers.10.weight"].half()
    sd["tied"] = sd["layers.0.weight"]                 # tied weights: one storage
    sd["view"] = sd["layers.1.weight"][3:9, ::2]       # a strided view into another storage
    sd["step"] = torch.tensor(7)
    torch.save({"model": sd, "epoch": 2}, path)
    return sd


def _build(loaded: checkpoint.LoadedModel, **kw) -> dict:
    return arena.build(loaded.manifest, [s.fd for s in loaded.segments], **kw)


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].stride() == b[k].stride(), k
        assert torch.equal(a[k], b[k]), k


def test_several_memfds_equal_torch_load_and_never_split_a_storage(tmp_path):
    path = tmp_path / "m.pt"
    _save(path)
    done = []
    loaded = read_learned(learn(path, OPTS), OPTS, split_min_bytes=64 << 10, threads=3,
                          progress=lambda d, t: done.append((d, t)))
    try:
        segs = loaded.manifest.segments
        assert len(segs) == 3 and {s.device for s in segs} == {"cpu"}
        assert all(s.nbytes > 0 for s in segs) and len({s.fd for s in loaded.segments}) == 3
        # Each storage lies wholly inside one segment, and tensors sharing a storage share it.
        for e in loaded.manifest.tensors:
            assert e.offset + e.storage_nbytes <= segs[e.segment].nbytes
        obj = _build(loaded)
        ref = torch.load(path, weights_only=True)
        assert obj["epoch"] == 2
        _same(obj["model"], ref["model"])
        m = obj["model"]
        assert m["tied"].untyped_storage().data_ptr() == m["layers.0.weight"].untyped_storage().data_ptr()
        assert m["view"].untyped_storage().data_ptr() == m["layers.1.weight"].untyped_storage().data_ptr()
        assert done[-1][0] == done[-1][1] == loaded.inspection.bytes
    finally:
        loaded.close()


def test_one_thread_gives_exactly_the_arena_checkpoint_read_gives(tmp_path):
    path = tmp_path / "m.pt"
    _save(path)
    one = read_learned(learn(path, OPTS), OPTS, threads=1)
    ref = checkpoint.read(path, OPTS)
    try:
        assert one.manifest == ref.manifest
        assert one.inspection == ref.inspection and one.fingerprint == ref.fingerprint
    finally:
        one.close()
        ref.close()


def test_multi_segment_arenas_are_copy_on_write(tmp_path):
    path = tmp_path / "m.pt"
    sd = _save(path)
    loaded = read_learned(learn(path, OPTS), OPTS, split_min_bytes=64 << 10, threads=4)
    try:
        assert len(loaded.manifest.segments) > 1
        first = _build(loaded)["model"]
        for t in first.values():
            if t.is_floating_point():
                t.add_(1000)          # writes land in private pages of this mapping
        second = _build(loaded)["model"]
        _same(second, {k: v for k, v in sd.items()})
        assert not torch.equal(first["layers.5.weight"], second["layers.5.weight"])
    finally:
        loaded.close()


def test_each_device_gets_its_own_segments_and_casts_still_apply(tmp_path):
    path = tmp_path / "m.pt"
    sd = _save(path)
    opts = checkpoint.ReadOptions(cpu_upcast_half=True)
    on = {f"model.layers.{i}.weight" for i in range(6)}
    loaded = read_learned(learn(path, opts), opts, split_min_bytes=32 << 10, threads=2,
                          device_of=lambda p: "cuda:0" if p in on else "cpu")
    try:
        devices = [s.device for s in loaded.manifest.segments]
        assert devices.count("cpu") == 2 and devices.count("cuda:0") == 2
        m = _build(loaded, map_location="cpu")["model"]
        assert m["layers.3.weight"].dtype == torch.float16            # on cuda:0: served as saved
        assert m["layers.10.weight"].dtype == torch.float32           # on the CPU: upcast
        for k, v in sd.items():
            assert torch.equal(m[k].to(v.dtype), v), k
    finally:
        loaded.close()


def test_the_thread_count_follows_the_cores():
    import os

    n = default_threads()
    assert 2 <= n <= 8 and (n == 2 or n <= len(os.sched_getaffinity(0)))


def test_a_sharded_hugging_face_directory_reads_as_checkpoint_read_does(tmp_path):
    from devmapd import samples

    model = samples.hf_safetensors(tmp_path, shards=3)
    one = read_learned(learn(model, OPTS), OPTS, threads=1)
    ref = checkpoint.read(model, OPTS)
    try:
        assert one.manifest == ref.manifest and one.inspection == ref.inspection
        assert one.fingerprint == ref.fingerprint
    finally:
        one.close()
        ref.close()
    split = read_learned(learn(model, OPTS), OPTS, split_min_bytes=1 << 10, threads=3)
    try:
        assert len(split.segments) > 1
        _same(_build(split), _build(checkpoint.read(model, OPTS)))
    finally:
        split.close()
