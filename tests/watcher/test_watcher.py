"""ModelWatcher with REAL watchdog observers (inotify and polling) on a real temp directory."""
from __future__ import annotations

import asyncio
import io
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devmapd.daemon import names
from devmapd.daemon.watcher import ModelWatcher

from .conftest import SETTLE_S, names_of

pytestmark = [
    pytest.mark.timeout(60),
    # watchdog's own harmless race when a new subdirectory is watched twice (its event and its walk)
    pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning"),
]

BACKENDS = pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])


def ckpt_bytes(n: int = 8, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(n, dtype=torch.float32) + seed}, buf)
    return buf.getvalue()


def write_aged(path: Path, data: bytes, age_s: float = 100.0) -> Path:
    """A file that has been sitting there untouched for a while (settled already)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


async def test_initial_scan_announces_settled_models_at_once(model_dir: Path, start_watcher):
    write_aged(model_dir / "a.pt", ckpt_bytes())
    (model_dir / "sub").mkdir()
    save_file({"w": torch.zeros(4)}, str(model_dir / "sub/b.safetensors"))
    os.utime(model_dir / "sub/b.safetensors", (time.time() - 100,) * 2)
    w, ev = await start_watcher()
    await asyncio.sleep(0)   # let the loop run the call_soon_threadsafe callbacks start() made
    assert ev.queue.qsize() == 2, "already-settled files must be announced by start(), not after settle_s"
    got = await ev.until(lambda g: len(g) >= 2, timeout=5)
    assert sorted(names_of(got, "upsert")) == ["a", "sub/b"]
    for e in got:
        assert e.fingerprint == names.fingerprint(e.source) and e.source == names.source_for(model_dir, e.name)
    assert w.known == {e.name: e.fingerprint for e in got}
    assert w.backend == "inotify"
    w.rescan()   # nothing changed: nothing re-announced
    assert await ev.during(3 * SETTLE_S) == []


async def test_writer_holding_file_open_is_not_announced_before_close(model_dir: Path, start_watcher):
    """inotify: pauses longer than settle_s while the file is still open do not count as settled."""
    w, ev = await start_watcher()
    data = ckpt_bytes(2048)
    with open(model_dir / "slow.pt", "wb") as f:
        for i in range(4):
            f.write(data[i * len(data) // 4:(i + 1) * len(data) // 4])
            f.flush()
            assert await ev.during(SETTLE_S * 1.6) == [], "announced while still open for writing"
    closed = time.monotonic()
    e = await ev.upsert("slow")
    assert ev.log[-1][0] >= closed
    assert e.fingerprint[0][1] == len(data)
    assert await ev.during(2 * SETTLE_S) == []


@BACKENDS
async def test_slow_chunked_write_is_announced_once_after_it_settles(model_dir: Path, start_watcher, polling):
    # Polling has only stability to go on: settle_s well above the 0.1 s pauses between chunks, so
    # that a loaded test machine stalling this writer cannot pass for a finished file.
    settle = 0.6
    w, ev = await start_watcher(force_polling=polling, settle_s=settle)
    assert w.backend == ("polling" if polling else "inotify")
    data = ckpt_bytes(4096)
    n = 8
    with open(model_dir / "slow.pt", "wb") as f:
        for i in range(n):
            f.write(data[i * len(data) // n:(i + 1) * len(data) // n])
            f.flush()
            # the "sleep" between chunks doubles as the check that nothing is announced meanwhile
            assert await ev.during(0.1) == [], "announced while being written"
    last_write = time.monotonic() - 0.1
    e = await ev.upsert("slow", timeout=5)
    assert ev.log[-1][0] - last_write >= settle * 0.8
    assert e.fingerprint[0][1] == len(data)
    loaded = torch.load(e.source.path, weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(4096, dtype=torch.float32))
    assert await ev.during(1.0) == [], "announced more than once"


@BACKENDS
async def test_atomic_rename_into_place(model_dir: Path, tmp_path: Path, start_watcher, polling):
    # A longer settle_s here, so that "at once" (a short stability check) is clearly told apart
    # from "after settle_s" even on a loaded machine.
    settle = 0.8
    w, ev = await start_watcher(force_polling=polling, settle_s=settle)
    tmp = model_dir / "m.pt.tmp"
    torch.save({"w": torch.ones(3)}, tmp)
    assert await ev.during(0.3) == [], "a temporary name was announced"
    t = time.monotonic()
    os.rename(tmp, model_dir / "m.pt")
    e = await ev.upsert("m", timeout=5)
    if not polling:
        assert ev.log[-1][0] - t < settle / 2, "a rename into place should settle at once"
    assert torch.equal(torch.load(e.source.path, weights_only=True)["w"], torch.ones(3))
    # renamed in from outside the model directory (another staging dir on the same filesystem)
    staged = tmp_path / "staging.pt"
    torch.save({"w": torch.zeros(3)}, staged)
    t = time.monotonic()
    os.rename(staged, model_dir / "n.pt")
    await ev.upsert("n", timeout=5)
    if not polling:
        assert ev.log[-1][0] - t < settle / 2
    assert await ev.during(0.5) == []


async def test_temporary_names_are_ignored(model_dir: Path, start_watcher):
    w, ev = await start_watcher()
    for rel in ["a.pt.tmp", "b.part", "c.safetensors.incomplete", ".d.pt", "e.pt~", "#f.pt#",
                ".cache/g.pt", "h.tmp/i.pt", "notes.txt"]:
        p = model_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(ckpt_bytes())
    assert await ev.during(3 * SETTLE_S) == []
    (model_dir / "sentinel.pt").write_bytes(ckpt_bytes())
    await ev.upsert("sentinel")
    assert list(w.known) == ["sentinel"] and w.problems == {}


@BACKENDS
async def test_modify_reannounces_with_new_fingerprint_and_delete_unregisters(model_dir: Path, start_watcher,
                                                                            polling):
    write_aged(model_dir / "a.pt", ckpt_bytes(8))
    write_aged(model_dir / "b.pt", ckpt_bytes(8))
    w, ev = await start_watcher(force_polling=polling)
    first = {e.name: e for e in await ev.until(lambda g: len(g) >= 2, timeout=5)}
    torch.save({"w": torch.zeros(64)}, model_dir / "a.pt")         # rewritten in place
    second = await ev.upsert("a", timeout=5)
    assert second.fingerprint != first["a"].fingerprint
    assert second.fingerprint == names.fingerprint(names.source_for(model_dir, "a"))
    assert torch.equal(torch.load(second.source.path, weights_only=True)["w"], torch.zeros(64))
    w.rescan()
    assert await ev.during(2 * SETTLE_S) == [], "an unchanged fingerprint must not be re-announced"
    (model_dir / "a.pt").unlink()
    got = await ev.until(lambda g: len(g) >= 1, timeout=5)
    assert [(e.kind, e.name, e.source, e.fingerprint) for e in got] == [("delete", "a", None, None)]
    os.rename(model_dir / "b.pt", model_dir.parent / "b-moved-away.pt")   # moved out: deleted too
    got = await ev.until(lambda g: len(g) >= 1, timeout=5)
    assert [(e.kind, e.name) for e in got] == [("delete", "b")]
    assert w.known == {}


async def test_sharded_hf_dir_written_shard_by_shard_is_one_upsert(model_dir: Path, start_watcher):
    w, ev = await start_watcher()
    d = model_dir / "org" / "llama"
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    shards = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    (d / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {' + ", ".join(f'"layers.{i}.w": "{s}"' for i, s in enumerate(shards))
        + "}}")
    for i, s in enumerate(shards):
        save_file({f"layers.{i}.w": torch.full((256,), float(i))}, str(d / s))
        if i < len(shards) - 1:
            # gaps longer than settle_s: only the index tells that more shards are coming
            assert await ev.during(SETTLE_S * 1.6) == [], f"announced before shard {i + 2} was there"
    e = await ev.upsert("org/llama", timeout=5)
    assert e.source.kind == "hf-dir" and e.source.path == d
    assert [p.name for p in e.source.files] == shards
    assert await ev.during(2 * SETTLE_S) == [], "more than one upsert for the HF dir"
    # any change inside it (here its config) -> one more upsert of the dir model
    (d / "config.json").write_text('{"model_type": "llama", "rope": 2}')
    e2 = await ev.upsert("org/llama", timeout=5)
    assert e2.fingerprint != e.fingerprint
    assert await ev.during(2 * SETTLE_S) == []
    assert list(w.known) == ["org/llama"]


async def test_config_json_turns_a_dir_of_files_into_one_hf_model(model_dir: Path, start_watcher):
    d = model_dir / "proj"
    write_aged(d / "a.pt", ckpt_bytes(4))
    write_aged(d / "b.pt", ckpt_bytes(4, seed=1))
    w, ev = await start_watcher()
    assert sorted(names_of(await ev.until(lambda g: len(g) >= 2, timeout=5), "upsert")) == ["proj/a", "proj/b"]
    (d / "config.json").write_text("{}")
    got = await ev.until(lambda g: any(e.kind == "upsert" for e in g), timeout=5)
    assert sorted(names_of(got, "delete")) == ["proj/a", "proj/b"]
    assert got[-1].kind == "upsert" and got[-1].name == "proj" and got[-1].source.kind == "hf-dir"
    assert list(w.known) == ["proj"]


@BACKENDS
async def test_burst_of_300_files_all_announced_none_lost(model_dir: Path, start_watcher, polling):
    w, ev = await start_watcher(force_polling=polling)
    data = ckpt_bytes(4)
    expected = set()
    for i in range(300):
        # a few brand-new subdirectories too: files land in them before their watch exists
        rel = f"burst/g{i % 3}/m{i:03d}" if i % 5 == 0 else f"m{i:03d}"
        p = model_dir / f"{rel}.pt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        expected.add(rel)
    got = await ev.until(lambda g: len(g) >= 300, timeout=30)
    ups = names_of(got, "upsert")
    assert len(ups) == 300 and set(ups) == expected, "lost or duplicated announcements"
    assert await ev.during(2 * SETTLE_S) == []
    assert set(w.known) == expected


async def test_lost_events_are_recovered_by_rescan(model_dir: Path, start_watcher):
    write_aged(model_dir / "x.pt", ckpt_bytes())
    w, ev = await start_watcher(rescan_interval_s=600)
    await ev.upsert("x")
    # Lose events for real: the observer is stopped while files come and go.
    obs = w._observer
    obs.stop()
    obs.join(5)
    write_aged(model_dir / "y.pt", ckpt_bytes())
    (model_dir / "z.pt").write_bytes(ckpt_bytes())
    (model_dir / "x.pt").unlink()
    assert await ev.during(3 * SETTLE_S) == [], "the observer was stopped: nothing should have been seen"
    w.rescan()
    got = await ev.until(lambda g: len(g) >= 3, timeout=5)
    assert sorted((e.kind, e.name) for e in got) == [("delete", "x"), ("upsert", "y"), ("upsert", "z")]
    assert sorted(w.known) == ["y", "z"]


async def test_periodic_rescan_finds_what_events_missed(model_dir: Path, start_watcher):
    w, ev = await start_watcher(rescan_interval_s=0.5)
    obs = w._observer
    obs.stop()
    obs.join(5)
    write_aged(model_dir / "late.pt", ckpt_bytes())
    await ev.upsert("late", timeout=3)


async def test_model_dir_removed_and_recreated_is_watched_again(model_dir: Path, start_watcher):
    write_aged(model_dir / "a.pt", ckpt_bytes())
    w, ev = await start_watcher(rescan_interval_s=600)
    await ev.upsert("a")
    shutil.rmtree(model_dir)
    got = await ev.until(lambda g: len(g) >= 1, timeout=5)
    assert [(e.kind, e.name) for e in got] == [("delete", "a")]
    assert "." in w.problems
    model_dir.mkdir()
    (model_dir / "b.pt").write_bytes(ckpt_bytes())
    await ev.upsert("b", timeout=5)
    # and events flow again (a new observer), not only the scan
    t = time.monotonic()
    os.rename(write_aged(model_dir.parent / "c.pt", ckpt_bytes()), model_dir / "c.pt")
    await ev.upsert("c", timeout=5)
    assert ev.log[-1][0] - t < 1.0


@BACKENDS
async def test_fifo_and_escaping_symlink_refused_without_blocking(model_dir: Path, tmp_path: Path,
                                                                  start_watcher, polling):
    os.mkfifo(model_dir / "pipe.pt")
    secret = tmp_path / "secret.pt"
    secret.write_bytes(ckpt_bytes())
    os.symlink(secret, model_dir / "escape.pt")
    write_aged(model_dir / "good.pt", ckpt_bytes())
    # start() must not block on the FIFO: run it with a deadline
    w, ev = await asyncio.wait_for(start_watcher(force_polling=polling), 5)
    await ev.upsert("good", timeout=3)
    assert "FIFO" in w.problems["pipe.pt"] and "outside" in w.problems["escape.pt"]
    # new ones while running: the worker keeps going, and says why
    os.mkfifo(model_dir / "pipe2.pt")
    os.symlink(secret, model_dir / "escape2.pt")
    (model_dir / "after.pt").write_bytes(ckpt_bytes())
    await ev.upsert("after", timeout=5)
    assert await ev.during(2 * SETTLE_S) == []
    assert {"pipe.pt", "pipe2.pt", "escape.pt", "escape2.pt"} <= set(w.problems)
    assert sorted(w.known) == ["after", "good"]


async def test_watcher_never_writes_in_the_model_dir(model_dir: Path, start_watcher):
    write_aged(model_dir / "a.pt", ckpt_bytes())
    (model_dir / "sub").mkdir()

    def state():   # every entry, the dir itself included: names, sizes, mtimes, ctimes
        return {p: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ctime_ns)
                for p in [model_dir, *model_dir.rglob("*")]}

    before = state()
    w, ev = await start_watcher()
    await ev.upsert("a")
    w.rescan()
    await ev.during(2 * SETTLE_S)
    assert state() == before


def test_missing_model_dir_is_a_clear_error(tmp_path: Path):
    loop = asyncio.new_event_loop()
    try:
        w = ModelWatcher(tmp_path / "nope", asyncio.Queue(), loop)
        with pytest.raises(NotADirectoryError, match="does not exist"):
            w.start()
    finally:
        loop.close()
