"""Storage sharing (issue 16): near-duplicate checkpoints held once per device.

``python -m benchmarks.dedup [--quick]`` prints the table; ``run(env)`` returns its rows for
the full benchmark run. What it measures, on the engine path the daemon runs for a CPU model
(``checkpoint.read`` into sealed segments, then ``StorageStore.adopt``) and the client's
``arena.build`` from the manifest and fds a fetch carries:

* four checkpoints of one base that differ in 4 of its 40 tensors: bytes held / the base's
  bytes (target <= 1.35x; 4.0x without sharing), and every fetch equal to ``torch.load``;
* the read rate of the base with hashing (read + adopt into an empty store) against the read
  alone, page cache warm as in the cold-load section (target >= 0.85x);
* fetch latency (manifest + fds -> tensors) of a fine-tune whose storages live in two segments
  against the same model unshared in one segment (target <= 1.1x);
* twenty epoch checkpoints of one small run in which only the last layers change: memory and
  load time per extra checkpoint, against the first.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import Row, fmt_b, fmt_s, text_table
from devmapd.engine import arena, checkpoint
from devmapd.engine.dedup import StorageStore, hash_name

TARGET_HELD = 1.35
TARGET_RATE = 0.85
TARGET_FETCH = 1.1


def _base(n_tensors: int, tensor_bytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cols = 1024
    rows = tensor_bytes // 4 // cols
    return {f"layers.{i}.weight": torch.randn(rows, cols, generator=g) for i in range(n_tensors)}


def _changed(sd: dict[str, torch.Tensor], keys: list[str], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for k in keys:
        out[k] = sd[k] + 0.01 * torch.randn(sd[k].shape, generator=g)
    return out


def _equal(got: Any, want: dict[str, torch.Tensor]) -> bool:
    return list(got) == list(want) and all(
        got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v) for k, v in want.items())


def _median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def four_checkpoints(work: Path, n_tensors: int, tensor_bytes: int, repeats: int) -> list[Row]:
    base = _base(n_tensors, tensor_bytes)
    keys = list(base)
    paths = [work / "base.pt"]
    torch.save(base, paths[0])
    for j in range(1, 4):
        sd = _changed(base, keys[4 * j: 4 * j + 4], j)
        paths.append(work / f"ft{j}.pt")
        torch.save(sd, paths[-1])
    base_bytes = sum(t.nbytes for t in base.values())
    for p in paths:   # page cache warm, as the cold-load section measures
        p.read_bytes()

    # -- bytes held by four checkpoints, and equality of every fetch
    store = StorageStore()
    holdings = []
    for p in paths:
        loaded = checkpoint.read(p)
        holdings.append(store.adopt(p.stem, loaded.manifest, loaded.segments))
    store.reap()
    usage = store.usage()["cpu"]
    equal = all(_equal(arena.build(h.manifest, h.fds), torch.load(p, weights_only=True))
                for h, p in zip(holdings, paths))
    held_ratio = usage.resident / base_bytes

    # -- fetch latency: a fine-tune in two shared segments vs the same model in its own segment
    shared = holdings[1]
    alone = checkpoint.read(paths[1])
    for _ in range(3):
        arena.build(shared.manifest, shared.fds)
        arena.build(alone.manifest, [s.fd for s in alone.segments])
    ts, ta = [], []
    alone_fds = [s.fd for s in alone.segments]
    for _ in range(repeats * 20):   # interleaved, so load from other processes hits both alike
        ts.append(_median_time(lambda: arena.build(shared.manifest, shared.fds), 1))
        ta.append(_median_time(lambda: arena.build(alone.manifest, alone_fds), 1))
    fetch_shared, fetch_alone = statistics.median(ts), statistics.median(ta)
    alone.close()
    store.close()

    # -- read rate with and without hashing (interleaved; fresh memory each time). The worst
    # case for hashing: an unrelated model of the same shapes, so every storage has a same-size
    # candidate and is hashed (the candidates' digests are known already); nothing is shared.
    other = work / "other.pt"
    torch.save(_base(n_tensors, tensor_bytes, seed=99), other)
    other.read_bytes()
    plain_t, hashed_t, first_t, ft_t = [], [], [], []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        checkpoint.read(other).close()
        plain_t.append(time.perf_counter() - t0)
        s = StorageStore()
        gc.collect()
        t0 = time.perf_counter()
        loaded = checkpoint.read(paths[0])
        s.adopt("base", loaded.manifest, loaded.segments)
        first_t.append(time.perf_counter() - t0)
        s.keys_of("base")   # the base's digests, as after any earlier comparison
        gc.collect()
        t0 = time.perf_counter()
        loaded = checkpoint.read(other)
        s.adopt("other", loaded.manifest, loaded.segments)
        hashed_t.append(time.perf_counter() - t0)
        assert s.owner_usage("other").shared == 0
        gc.collect()
        t0 = time.perf_counter()
        loaded = checkpoint.read(paths[1])
        s.adopt("ft1", loaded.manifest, loaded.segments)
        ft_t.append(time.perf_counter() - t0)
        s.close()
    plain, hashed = statistics.median(plain_t), statistics.median(hashed_t)
    first, ft = statistics.median(first_t), statistics.median(ft_t)
    rate_ratio = plain / hashed

    sec = f"sharing 4 checkpoints of {fmt_b(base_bytes)}/{n_tensors} tensors"
    data = {"base_bytes": base_bytes, "unique": usage.unique, "resident": usage.resident,
            "segments": usage.segments, "equal": equal, "read_s": plain_t, "read_hash_s": hashed_t,
            "read_first_s": first_t, "read_ft_s": ft_t, "fetch_shared_s": fetch_shared, "fetch_alone_s": fetch_alone,
            "hash": hash_name()}
    return [
        Row(section=sec, metric="bytes held / base bytes (4 fine-tunes differing in 4 tensors)",
            devmapd=f"{fmt_b(usage.resident)} in {usage.segments} segments ({'equal' if equal else 'NOT EQUAL'} "
                    "to torch.load)", peer=f"unshared {fmt_b(4 * base_bytes)} (4.00x)",
            ratio=held_ratio if equal else float("inf"), ratio_means="bytes held / one base's bytes",
            target=("<=", TARGET_HELD), data=data),
        Row(section=sec, metric="read rate with hashing vs without (same shapes held: every storage hashed)",
            devmapd=f"{base_bytes / hashed / (1 << 30):.2f} GiB/s ({fmt_s(hashed)})",
            peer=f"read alone {base_bytes / plain / (1 << 30):.2f} GiB/s ({fmt_s(plain)})",
            ratio=rate_ratio, ratio_means="rate with hashing / rate without", target=(">=", TARGET_RATE),
            note=(f"hash {hash_name()}; only storages of a size already held are hashed: the first model "
                  f"of its shapes loads in {fmt_s(first)} (no hashing); a fine-tune sharing 36/40 tensors "
                  f"loads in {fmt_s(ft)} (hashing both sides the first time, comparing, copying its 4)"),
            data=data),
        Row(section=sec, metric="fetch latency of a shared fine-tune vs the same model unshared",
            devmapd=f"{fmt_s(fetch_shared)} (2 segments)", peer=f"unshared {fmt_s(fetch_alone)} (1 segment)",
            ratio=fetch_shared / fetch_alone, ratio_means="shared fetch time / unshared fetch time",
            target=("<=", TARGET_FETCH), data=data),
    ]


def epochs(work: Path, n_epochs: int, layers: int, width: int) -> list[Row]:
    """One run's epoch checkpoints: embeddings and the first layers frozen, the last two trained."""
    g = torch.Generator().manual_seed(7)
    sd: dict[str, torch.Tensor] = {"embed.weight": torch.randn(4 * width, width, generator=g)}
    for i in range(layers):
        sd[f"layers.{i}.weight"] = torch.randn(width, width, generator=g)
        sd[f"layers.{i}.bias"] = torch.zeros(width)
    sd["head.weight"] = sd["embed.weight"]    # tied, as language models do
    total = sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in sd.values()}.values())
    trained = [k for k in sd if k.startswith((f"layers.{layers - 2}.", f"layers.{layers - 1}."))]
    paths = []
    for e in range(n_epochs):
        if e:
            sd = _changed(sd, trained, 100 + e)
        paths.append(work / f"epoch{e:02d}.pt")
        torch.save(sd, paths[-1])
        paths[-1].read_bytes()
    store = StorageStore()
    grow, times = [], []
    held = 0
    equal = True
    for e, p in enumerate(paths):
        gc.collect()
        t0 = time.perf_counter()
        loaded = checkpoint.read(p)
        h = store.adopt(e, loaded.manifest, loaded.segments)
        store.reap()
        times.append(time.perf_counter() - t0)
        now = store.usage()["cpu"].resident
        grow.append(now - held)
        held = now
        equal = equal and _equal(arena.build(h.manifest, h.fds), torch.load(p, weights_only=True))
    store.close()
    first_t, extra_t = times[0], statistics.median(times[1:])
    extra_b = statistics.mean(grow[1:])
    sec = f"sharing {n_epochs} epoch checkpoints of {fmt_b(total)}"
    data = {"model_bytes": total, "growth": grow, "load_s": times, "equal": equal, "held": held}
    return [
        Row(section=sec, metric=f"memory per extra checkpoint (last 2 of {layers} layers trained)",
            devmapd=f"{fmt_b(extra_b)} each; {fmt_b(held)} for all {n_epochs} "
                    f"({'equal' if equal else 'NOT EQUAL'} to torch.load)",
            peer=f"unshared {fmt_b(total)} each, {fmt_b(total * n_epochs)} for all",
            ratio=extra_b / total, ratio_means="bytes added per extra checkpoint / model bytes", data=data),
        Row(section=sec, metric="load time per extra checkpoint (read + share)",
            devmapd=f"{fmt_s(extra_t)}", peer=f"first checkpoint {fmt_s(first_t)}",
            ratio=extra_t / first_t, ratio_means="extra checkpoint load time / first's", data=data),
    ]


def run(env: Any) -> list[Row]:
    quick = getattr(getattr(env, "profile", None), "name", "full") != "full"
    work = Path(env.base) / "dedup"
    work.mkdir(parents=True, exist_ok=True)
    return _rows(work, quick)


def _rows(work: Path, quick: bool) -> list[Row]:
    rows = four_checkpoints(work, 40, (256 << 10) if quick else (2 << 20), 3 if quick else 7)
    rows += epochs(work, 20, 8, 128 if quick else 512)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dedup", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 10 MiB base instead of 80 MiB")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="devmapd-dedup-") as tmp:
        rows = _rows(Path(tmp), args.quick)
    print(text_table(rows))
    return 0 if all(r.verdict != "MISS" for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
