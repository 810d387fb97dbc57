"""Hostile files that try to kill, stall or flood the daemon (issue 11, bugs 2-5), against a REAL daemon.

Two classes:

* Side files. Every file the daemon opens under the model directory goes through one safe
  opener (no link followed at open, regular files only, inside the model directory, size
  capped, reads bounded by that size). A Hugging Face directory whose shard index is a link to
  /dev/zero, or a FIFO, fails alone with its diagnosis; the load workers never block; every
  other model keeps loading and serving.
* Amplification through shared references. The non-tensor part of a checkpoint is measured by
  what it expands to, each shared object counted every time it is reached: a 1 MB string
  referenced 1,500 times, or 21 levels of ``l = [l, l]`` ("billion laughs"), is refused as
  ``too_large`` early, before anything big is built.

Each test waits on state (never on a timing margin) and checks the daemon's memory: its peak
RSS (VmHWM, reset before the test) may grow by a bounded amount only.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from tests.reliability import inputs as I
from tests.reliability.conftest import ModelDirGuard, module_daemon

MIB = 1 << 20
# The bugs grew the daemon by 1.3 GiB (billion laughs), 1.5 GiB (shared string) or without bound
# (/dev/zero index); a refusal costs a few MiB. Generous for allocator noise, far below the bugs.
RSS_GROWTH_KIB = 256 * 1024
# A generous deadline for a state change (the refusals take milliseconds; the bugs never end).
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    yield from module_daemon(tmp_path_factory, "hostile")


@contextlib.contextmanager
def bounded_memory(d) -> Iterator[None]:
    """Assert the daemon's peak RSS over the block grew by less than RSS_GROWTH_KIB."""
    base = I.rss_kib(d.proc.pid)
    I.reset_peak_rss(d.proc.pid)
    yield
    peak = I.rss_kib(d.proc.pid, "VmHWM")
    now = I.rss_kib(d.proc.pid)
    assert peak - base < RSS_GROWTH_KIB, f"daemon peak RSS grew by {(peak - base) // 1024} MiB"
    assert now - base < RSS_GROWTH_KIB, f"daemon RSS grew by {(now - base) // 1024} MiB and stayed"


def failed_with(d, name: str, codes: set[str]) -> dict:
    m = d.wait_model(name, "failed", timeout=DEADLINE_S)
    diag = m["diagnosis"]
    assert diag is not None and diag["code"] in codes, m
    return m


def serves(d, name: str, k: int) -> None:
    """``name`` loads and a fetch returns exactly version ``k``: the daemon kept serving."""
    d.wait_model(name, "ready", timeout=DEADLINE_S)
    with d.client() as c:
        assert I.version_of(c.fetch(name)) == k
    assert d.proc.poll() is None, d.log()[-3000:]


def hf_dir(staging: Path, k: int) -> Path:
    """A real sharded-layout Hugging Face directory (config.json + one safetensors shard) in
    ``staging`` (outside the model dir), to be moved in whole; the caller adds the index."""
    staging.mkdir(parents=True)
    (staging / "config.json").write_text(json.dumps({"model_type": "test", "hidden_size": 4}))
    (staging / "model-00001-of-00001.safetensors").write_bytes(st_save(I.versioned(k)))
    return staging


# ----------------------------------------------------------------------------- side files

def test_index_linked_to_dev_zero_fails_alone(d, guard: ModelDirGuard) -> None:
    """model.safetensors.index.json -> /dev/zero beside config.json and a shard: the directory
    fails with a diagnosis naming the index (it was read without bound until the OOM killer)."""
    src = hf_dir(d.model_dir.parent / "stage-zero", 1)
    os.symlink("/dev/zero", src / "model.safetensors.index.json")
    with bounded_memory(d):
        guard.replace(src, d.model_dir / "zero")
        m = failed_with(d, "zero", {"outside_model_dir", "not_a_checkpoint"})
        assert "model.safetensors.index.json" in m["diagnosis"]["message"], m
        guard.save(I.versioned(2), d.model_dir / "after-zero.pt")
        serves(d, "after-zero", 2)


def test_fifo_side_files_never_block_the_loaders(d, guard: ModelDirGuard) -> None:
    """Two directories whose shard index is a FIFO (as many as there are load workers): each
    fails with a diagnosis, and a good model added after them becomes ready (the workers
    blocked in open() forever and every later model stayed queued)."""
    fifos = []
    try:
        with bounded_memory(d):
            for i in range(2):
                src = hf_dir(d.model_dir.parent / f"stage-fifo{i}", 10 + i)
                os.mkfifo(src / "model.safetensors.index.json")
                fifos.append(d.model_dir / f"fifo{i}" / "model.safetensors.index.json")
                guard.replace(src, d.model_dir / f"fifo{i}")
            for i in range(2):
                m = failed_with(d, f"fifo{i}", {"not_a_checkpoint"})
                assert "model.safetensors.index.json" in m["diagnosis"]["message"], m
                assert "FIFO" in m["diagnosis"]["message"], m
            guard.save(I.versioned(3), d.model_dir / "after-fifo.pt")
            serves(d, "after-fifo", 3)
    finally:
        # A loader blocked in open() (the bug) is released by a writer opening the FIFO; with the
        # fix nobody reads it and this open fails with ENXIO. Either way nothing is written.
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_hf_directory_with_linked_side_files_inside_still_loads(d, guard: ModelDirGuard) -> None:
    """The safe opener still accepts what real layouts do: an index and a shard that are links
    to files inside the model directory (a Hugging Face cache snapshot links into blobs/)."""
    blobs = d.model_dir / ".blobs"
    src = d.model_dir.parent / "stage-linked"
    src.mkdir()
    (src / "config.json").write_text("{}")
    index = {"metadata": {}, "weight_map": {f"layers.{i}.weight": "model-00001-of-00001.safetensors"
                                            for i in range(4)}}
    guard.write(blobs / "index", json.dumps(index).encode())
    guard.write(blobs / "shard", st_save(I.versioned(4)))
    os.symlink("../.blobs/index", src / "model.safetensors.index.json")
    os.symlink("../.blobs/shard", src / "model-00001-of-00001.safetensors")
    guard.replace(src, d.model_dir / "linked")
    serves(d, "linked", 4)


# ----------------------------------------------------------------------------- amplification

def test_shared_string_referenced_1500_times_is_refused_early(d, guard: ModelDirGuard) -> None:
    """{"w": t, "meta": [s] * 1500} with one 1 MiB string: a ~1 MiB file that expands to 1.5 GiB
    of structure. It is refused as too_large before the structure is built (the tree codec used
    to write s once per reference: +1.5 GiB RSS, status stalled, every fetch failed)."""
    s = "x" * MIB
    with bounded_memory(d):
        guard.save({"w": torch.ones(4), "meta": [s] * 1500}, d.model_dir / "refs.pt")
        m = failed_with(d, "refs", {"too_large"})
        assert "expands" in m["diagnosis"]["message"], m
        assert os.path.getsize(d.model_dir / "refs.pt") < 2 * MIB
        guard.save(I.versioned(5), d.model_dir / "after-refs.pt")
        serves(d, "after-refs", 5)


def test_billion_laughs_is_refused_early(d, guard: ModelDirGuard) -> None:
    """l = [0]; 21 times l = [l, l], saved beside a tensor: a ~2 KB file that expands to 4 million
    lists. Refused as too_large (it took minutes and +1.3 GiB to load, and each fetch 36 s)."""
    laughs: list = [0]
    for _ in range(21):
        laughs = [laughs, laughs]
    with bounded_memory(d):
        guard.save({"w": torch.ones(4), "laughs": laughs}, d.model_dir / "laughs.pt")
        assert os.path.getsize(d.model_dir / "laughs.pt") < 4096
        m = failed_with(d, "laughs", {"too_large"})
        assert "expands" in m["diagnosis"]["message"], m
        guard.save(I.versioned(6), d.model_dir / "after-laughs.pt")
        serves(d, "after-laughs", 6)


class _HugeBytearray:
    """Pickles as bytearray(10**10): GLOBAL builtins.bytearray, an int, REDUCE (never run here)."""

    def __reduce__(self):
        return (bytearray, (10**10,))


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "legacy"])
def test_a_pickled_bytearray_call_asking_for_gigabytes_is_refused(d, guard: ModelDirGuard, zip_format) -> None:
    """bytearray is on torch's weights-only allow-list; called with an int it allocates that many
    bytes before any cap looks (a 400-byte file asking for 10 GB). torch.save never writes that
    form, so it is refused as too_large and nothing is allocated."""
    name = f"bytearray-{'zip' if zip_format else 'legacy'}"
    with bounded_memory(d):
        guard.save({"w": torch.ones(4), "x": _HugeBytearray()}, d.model_dir / f"{name}.pt",
                   _use_new_zipfile_serialization=zip_format)
        m = failed_with(d, name, {"too_large"})
        assert "bytearray(10000000000)" in m["diagnosis"]["message"], m
        guard.save(I.versioned(8), d.model_dir / f"after-{name}.pt")
        serves(d, f"after-{name}", 8)


def test_modest_sharing_still_loads(d, guard: ModelDirGuard) -> None:
    """Shared references within the cap are fine: a config dict referenced by 100 entries loads and
    round-trips (the cap is on expansion, not on sharing itself)."""
    cfg = {"lr": 0.1, "name": "adam" * 10}
    obj = {**I.versioned(7), "hparams": [cfg] * 100}
    guard.save(obj, d.model_dir / "shared-ok.pt")
    d.wait_model("shared-ok", "ready", timeout=DEADLINE_S)
    with d.client() as c:
        got = c.fetch("shared-ok")
    assert got["hparams"] == [cfg] * 100
    assert I.version_of({k: v for k, v in got.items() if k != "hparams"}) == 7


# ----------------------------------------------------------------------------- the side-file helper

def test_side_file_json_reads_only_small_regular_files_inside(tmp_path: Path) -> None:
    """checkpoint.side_file_json, the helper for shipping config.json and friends: a present file is
    parsed, an absent one is None, and every hostile one is a diagnosis, never a hang or a flood."""
    import concurrent.futures

    from devmapd.engine import checkpoint

    root = tmp_path / "models"
    d = root / "m"
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"hidden_size": 4}')
    os.mkfifo(d / "fifo.json")
    os.symlink("/dev/zero", d / "zero.json")
    (tmp_path / "outside.json").write_text("{}")
    os.symlink(tmp_path / "outside.json", d / "out.json")
    (d / "big.json").write_text("[" + "0," * 600 + "0]")
    (d / "deep.json").write_text("[" * 100_000)

    def code(name: str, **kw) -> str:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:   # a FIFO open would block: bound it
            fut = ex.submit(checkpoint.side_file_json, d, name, **kw)
            try:
                fut.result(timeout=DEADLINE_S)
            except checkpoint.CheckpointError as e:
                assert name in e.diagnosis.message, e.diagnosis
                return e.diagnosis.code
        raise AssertionError(f"{name} was accepted")

    assert checkpoint.side_file_json(d, "config.json", root=str(root)) == {"hidden_size": 4}
    assert checkpoint.side_file_json(d, "generation_config.json", root=str(root)) is None
    assert code("fifo.json", root=str(root)) == "not_a_checkpoint"
    assert code("zero.json", root=str(root)) == "outside_model_dir"
    assert code("zero.json") == "not_a_checkpoint"          # no root: still never opens a device
    assert code("out.json", root=str(root)) == "outside_model_dir"
    assert code("big.json", root=str(root), max_bytes=1000) == "too_large"
    assert code("deep.json", root=str(root)) == "corrupt"
    with pytest.raises(ValueError, match="plain file name"):
        checkpoint.side_file_json(d, "../config.json")


def test_measure_counts_every_reference_and_is_bounded_by_its_caps() -> None:
    """tree.measure: a shared object counts each time it is reached, a reference cycle runs into the
    cap instead of looping, and an honest state dict of 100k tensors fits the default caps."""
    from devmapd.engine import checkpoint, tree

    s = "y" * 1000
    assert tree.measure([s, s, s], max_nodes=10, max_bytes=3000) == (4, 3000)
    with pytest.raises(tree.TreeTooLarge, match="3000 bytes"):
        tree.measure([s, s, s, s], max_nodes=10, max_bytes=3000)
    inner = [1, 2]
    assert tree.measure({"a": inner, "b": inner}, max_nodes=100, max_bytes=100)[0] == 1 + 2 + 2 * 3
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(tree.TreeTooLarge, match="1000 objects"):
        tree.measure(cycle, max_nodes=1000, max_bytes=1 << 20)
    sd = {f"layers.{i}.weight": torch.empty(0, device="meta") for i in range(100_000)}
    nodes, nbytes = tree.measure(sd, max_nodes=1 << 40, max_bytes=1 << 40)
    # the pickle of such a state dict holds > 60 bytes per tensor: far inside tree_expansion x S
    max_nodes, max_bytes = checkpoint.ReadOptions().tree_caps(60 * 100_000)
    assert nodes <= max_nodes and nbytes <= max_bytes, (nodes, nbytes)
