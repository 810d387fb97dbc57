"""Daemon cold load: the daemon's read into a sealed arena vs memcpy vs sendfile vs torch.load.

The page cache is warm, so the limit is memory bandwidth and page faults of the fresh
destination: one ``memcpy`` from a mapping of the cached file into freshly allocated memory is
the physical limit the arena fill is held to (issue 6: at least 0.7x its rate). A raw
``sendfile`` of the file into ONE fresh memfd (what a one-segment arena is) is measured beside
it: one shmem file serialises its writers, so the daemon fills a big placement as several
memfds in parallel (``engine.learned``: parse once, then one thread per memfd) and is held to
1.5x that single-memfd rate (issue 14) where the model is big enough to be split.
``checkpoint.read`` (one memfd, the path before issue 14) is kept in the JSON for comparison.
"""
from __future__ import annotations

import time
from typing import Any

from benchmarks.common import median, run_child, warm
from benchmarks.env import Env
from benchmarks.report import Row, fmt_b, fmt_s
from benchmarks.workers import cold_once

TARGET = 0.7
SENDFILE_TARGET = 1.5
METHODS = ("devmapd", "memcpy", "sendfile", "torch.load", "checkpoint.read")


def daemon_read(path: str) -> dict[str, Any]:
    """What the daemon does for a model it has not seen: parse once, fill the arena in parallel."""
    from devmapd.engine import learned  # the daemon has it imported before any load
    t0 = time.perf_counter()
    lr = learned.learn(path)
    lm = learned.read_learned(lr)
    dt = time.perf_counter() - t0
    nbytes = sum(s.nbytes for s in lm.segments)
    segments = len(lm.segments)
    lm.close()
    return {"s": dt, "bytes": nbytes, "segments": segments, "threads": learned.default_threads(),
            "tensors": lm.inspection.tensors, "payload": lm.inspection.bytes}


def _once(method: str, path: str) -> dict[str, Any]:
    if method == "devmapd":
        return run_child(daemon_read, path)
    return run_child(cold_once, "devmapd" if method == "checkpoint.read" else method, path)


def run(env: Env) -> list[Row]:
    from devmapd.engine.learned import SPLIT_MIN_BYTES
    path = env.models / "big.pt"
    warm(path)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for m in METHODS:   # a discarded round (first-touch of host memory on this VM; see fetch.py)
        _once(m, str(path))
    for _ in range(env.profile.cold_repeats):
        for m in METHODS:
            runs[m].append(_once(m, str(path)))
    rate = {m: median(r["bytes"] / r["s"] for r in rs) for m, rs in runs.items()}
    secs = {m: median(r["s"] for r in rs) for m, rs in runs.items()}
    size = fmt_b(runs["devmapd"][0]["bytes"])
    segments = runs["devmapd"][0]["segments"]
    gbs = lambda r: f"{r / (1 << 30):.2f} GiB/s"   # noqa: E731
    data = {"rates_Bps": rate, "seconds": secs, "runs": runs}
    split = path.stat().st_size >= 2 * SPLIT_MIN_BYTES   # smaller models keep one memfd
    return [
        Row(section=f"cold load {size}", metric="checkpoint.read rate vs memcpy into fresh memory",
            devmapd=f"{gbs(rate['devmapd'])} ({fmt_s(secs['devmapd'])})",
            peer=f"memcpy {gbs(rate['memcpy'])} ({fmt_s(secs['memcpy'])})",
            ratio=rate["devmapd"] / rate["memcpy"], ratio_means="devmapd rate / memcpy rate",
            target=(">=", TARGET), data=data),
        Row(section=f"cold load {size}", metric="checkpoint.read rate vs raw sendfile into a memfd",
            devmapd=f"{gbs(rate['devmapd'])} ({segments} memfd{'s' if segments != 1 else ''}; "
                    f"one memfd: {gbs(rate['checkpoint.read'])})",
            peer=f"sendfile {gbs(rate['sendfile'])} ({fmt_s(secs['sendfile'])})",
            ratio=rate["devmapd"] / rate["sendfile"], ratio_means="devmapd rate / sendfile rate",
            target=(">=", SENDFILE_TARGET) if split else None,
            note=("sendfile of the whole file into ONE fresh memfd (shmem pages, 4 KiB); devmapd fills "
                  "several memfds in parallel, one thread each; memcpy is into fresh anonymous 4 KiB pages"),
            data=data),
        Row(section=f"cold load {size}", metric="checkpoint.read rate vs torch.load",
            devmapd=f"{gbs(rate['devmapd'])}", peer=f"torch.load {gbs(rate['torch.load'])} ({fmt_s(secs['torch.load'])})",
            ratio=rate["devmapd"] / rate["torch.load"], ratio_means="devmapd rate / torch.load rate", data=data),
    ]
