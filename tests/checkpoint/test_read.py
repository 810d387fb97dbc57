"""read(): one pass from one fd into sealed arenas; fetched tensors equal torch.load's."""
from __future__ import annotations

import errno
import os
import threading

import pytest
import torch

from devmapd import samples
from devmapd.engine import arena, checkpoint
from devmapd.engine.checkpoint import ReadOptions, read


def fetch(lm: checkpoint.LoadedModel):
    return arena.build(lm.manifest, [s.fd for s in lm.segments])


@pytest.mark.parametrize("kind", samples.GOOD)
def test_read_equals_torch_load(kind, sample_paths, helpers):
    path = sample_paths[kind]
    lm = read(path)
    try:
        assert lm.inspection.diagnosis is None
        assert lm.inspection.bytes == checkpoint.inspect(path).bytes
        got = fetch(lm)
        helpers.same(got, helpers.strip(helpers.reference(path)))
        for seg in lm.segments:
            arena.verify_sealed(seg.fd)
        assert lm.fingerprint and all(len(f) == 4 for f in lm.fingerprint)
    finally:
        lm.close()


def test_tied_weights_share_storage_in_arena(sample_paths):
    lm = read(sample_paths["plain"])
    try:
        names = [k for k in checkpoint.inspect(sample_paths["plain"]).groups]
        assert names
        sd = fetch(lm)
        emb, head = sd["model.embed_tokens.weight"], sd["lm_head.weight"]
        assert emb.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
        entries = lm.manifest.tensors
        offsets = [(e.segment, e.offset) for e in entries]
        assert len(set(offsets)) == len(entries) - 1     # exactly one shared storage
    finally:
        lm.close()


@pytest.mark.parametrize("kind,prefix", [("ddp", "module."), ("dataparallel", "module."),
                                         ("compiled", "_orig_mod."),
                                         ("compiled_dataparallel", "_orig_mod.module.")])
def test_prefix_stripping(kind, prefix, sample_paths, helpers):
    raw = helpers.reference(sample_paths[kind])
    assert all(k.startswith(prefix) for k in raw)
    lm = read(sample_paths[kind])
    try:
        got = fetch(lm)
        assert sorted(got) == sorted(k[len(prefix):] for k in raw)
        for k, v in raw.items():
            assert torch.equal(got[k[len(prefix):]], v)
    finally:
        lm.close()
    # stripping off: keys exactly as saved
    lm = read(sample_paths[kind], ReadOptions(strip_prefixes=()))
    try:
        assert sorted(fetch(lm)) == sorted(raw)
    finally:
        lm.close()


def test_partial_prefix_is_not_stripped(tmp_path):
    p = tmp_path / "partial.pt"
    torch.save({"module.a": torch.ones(2), "b": torch.zeros(2)}, p)
    lm = read(p)
    try:
        assert set(fetch(lm)) == {"module.a", "b"}
        assert lm.inspection.prefixes == ()
    finally:
        lm.close()


def test_cpu_upcast_half(sample_paths, helpers):
    for kind in ("fp16", "bf16"):
        ref = helpers.reference(sample_paths[kind])
        lm = read(sample_paths[kind], ReadOptions(cpu_upcast_half=True))
        try:
            got = fetch(lm)
            for k, v in ref.items():
                assert got[k].dtype == torch.float32, (kind, k)
                assert torch.equal(got[k], v.float())
            assert lm.manifest.segments[0].nbytes >= 2 * lm.inspection.bytes
        finally:
            lm.close()
    # off by default: values and memory unchanged
    lm = read(sample_paths["fp16"])
    try:
        assert all(t.dtype == torch.float16 for t in fetch(lm).values())
    finally:
        lm.close()


def test_gpu_dtype_casts_floats_only_on_gpu_segments(sample_paths, helpers):
    ref = helpers.reference(sample_paths["mixed_dtypes"])
    on_gpu = lambda key: "cuda:0" if key.startswith("model.layers") or key in ("position_ids", "mask") else "cpu"
    lm = read(sample_paths["mixed_dtypes"], ReadOptions(gpu_dtype="bfloat16"), device_of=on_gpu)
    try:
        assert [s.device for s in lm.manifest.segments] == ["cpu", "cuda:0"]
        got = fetch(lm)
        for k, v in ref.items():
            if k in ("position_ids", "mask"):
                assert got[k].dtype == v.dtype and torch.equal(got[k], v)     # never cast
            elif k.startswith("model.layers"):
                assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16))
            else:
                assert got[k].dtype == torch.float16 and torch.equal(got[k], v)
        for e, (k, _) in zip(lm.manifest.tensors, ref.items()):
            assert lm.manifest.segments[e.segment].device == on_gpu(k)
    finally:
        lm.close()


def test_device_of_sees_stripped_paths_and_nested_containers(sample_paths, helpers):
    seen: list[str] = []
    lm = read(sample_paths["lightning"], device_of=lambda p: seen.append(p) or "cpu")
    try:
        assert "state_dict.model.model.layers.0.q.weight" in seen
        assert any(p.startswith("optimizer_states.0.state.") for p in seen)
        got = fetch(lm)
        ref = helpers.reference(sample_paths["lightning"])
        helpers.same(got, ref)
        assert got["epoch"] == 3 and got["global_step"] == 120
        assert lm.inspection.containers == ("state_dict", "optimizer_states.0.state")
    finally:
        lm.close()
    seen.clear()
    lm = read(sample_paths["ddp"], device_of=lambda p: seen.append(p) or "cpu")
    lm.close()
    assert seen and not any(p.startswith("module.") for p in seen)


def test_hf_shards_read_in_parallel(sample_paths, helpers, monkeypatch):
    """Two shard copies must be in flight at once: each waits at a barrier for another thread."""
    barrier = threading.Barrier(2, timeout=20)
    entered: set[str] = set()
    real = arena.ArenaBuilder.copy_from_file

    def meet_then_copy(self, *args):
        name = threading.current_thread().name
        if name not in entered and len(entered) < 2:
            entered.add(name)
            barrier.wait()          # serial reading would never release this (BrokenBarrierError)
        return real(self, *args)

    monkeypatch.setattr(arena.ArenaBuilder, "copy_from_file", meet_then_copy)
    calls: list[tuple[int, int]] = []
    lm = read(sample_paths["hf_safetensors"], ReadOptions(threads=3),
              progress=lambda done, total: calls.append((done, total)))
    try:
        helpers.same(fetch(lm), helpers.reference(sample_paths["hf_safetensors"]))
        assert len(lm.inspection.files) == 3
        assert len(entered) == 2 and all(t.startswith("devmapd-copy") for t in entered), entered
        assert calls[-1][0] == calls[-1][1] == lm.inspection.bytes
        assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    finally:
        lm.close()


def test_sealed_arena_refuses_writes_and_client_writes_stay_private(sample_paths):
    lm = read(sample_paths["plain"])
    try:
        fd = lm.segments[0].fd
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"x", 0)
        assert ei.value.errno == errno.EPERM
        first = fetch(lm)
        before = first["model.norm.weight"].clone()
        first["model.norm.weight"].add_(1.0)                   # a client writes into its tensor
        second = fetch(lm)
        assert torch.equal(second["model.norm.weight"], before)
    finally:
        lm.close()


def test_legacy_read_is_zero_copy_path(sample_paths, helpers, monkeypatch):
    """The legacy stream is copied with copy_from_file like zips: no Python copy of tensor data."""
    copies: list[int] = []
    real = arena.ArenaBuilder.copy_from_file

    def spy(self, offset, src_fd, src_offset, nbytes):
        copies.append(nbytes)
        return real(self, offset, src_fd, src_offset, nbytes)

    monkeypatch.setattr(arena.ArenaBuilder, "copy_from_file", spy)
    lm = read(sample_paths["legacy"])
    try:
        assert sum(copies) == lm.inspection.bytes
        helpers.same(fetch(lm), helpers.reference(sample_paths["legacy"]))
    finally:
        lm.close()


def test_empty_and_scalar_tensors(tmp_path, helpers):
    p = tmp_path / "odd.pt"
    base = torch.arange(12.0).reshape(3, 4)
    torch.save({"empty": torch.empty(0, 5), "scalar": torch.tensor(2.5), "t": base.t(),
                "view": base[1:, 2:], "nested": [(torch.ones(1, dtype=torch.int8), None, 1.5)],
                "param": torch.nn.Parameter(torch.ones(2))}, p)
    lm = read(p)
    try:
        helpers.same(fetch(lm), torch.load(p, weights_only=True))
    finally:
        lm.close()


def test_hf_cache_layout_with_symlinked_blobs(sample_paths, tmp_path, helpers):
    """huggingface_hub snapshots are symlinks into ../../blobs: resolved once, opened O_NOFOLLOW."""
    blobs = tmp_path / "blobs"
    snap = tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    src = sample_paths["safetensors"]
    (blobs / "f00d").write_bytes(src.read_bytes())
    (snap / "model.safetensors").symlink_to(os.path.relpath(blobs / "f00d", snap))
    (snap / "config.json").write_text("{}")
    insp = checkpoint.inspect(snap)
    assert insp.diagnosis is None and insp.format == "hf-dir"
    assert insp.files == (str(snap / "model.safetensors"),)
    lm = read(snap)
    try:
        helpers.same(fetch(lm), helpers.reference(src))
    finally:
        lm.close()


def test_fingerprint_matches_names_fingerprint(sample_paths):
    """The daemon compares read()'s fingerprint with the watcher's (names.fingerprint)."""
    names = pytest.importorskip("devmapd.daemon.names")
    for kind in ("plain", "hf_safetensors"):
        path = sample_paths[kind]
        src = names.ModelSource(name=path.stem, path=path, kind="hf-dir" if path.is_dir() else "file",
                                files=tuple(sorted(path.iterdir())) if path.is_dir() else (path,))
        lm = read(src)
        lm.close()
        assert lm.fingerprint == names.fingerprint(src), kind
