"""Daemon cold load: ``devmapd.engine.checkpoint.read`` into a sealed arena vs memcpy vs torch.load.

The page cache is warm, so the limit is memory bandwidth and page faults of the fresh
destination: one ``memcpy`` from a mapping of the cached file into freshly allocated memory is
the physical limit the arena fill is held to (issue 6: at least 0.7x its rate). A raw
``sendfile`` of the file into a fresh memfd (what an arena is) is reported beside it.
"""
from __future__ import annotations

from benchmarks.common import median, run_child, warm
from benchmarks.env import Env
from benchmarks.report import Row, fmt_b, fmt_s
from benchmarks.workers import cold_once

TARGET = 0.7
METHODS = ("devmapd", "memcpy", "sendfile", "torch.load")


def run(env: Env) -> list[Row]:
    path = env.models / "big.pt"
    warm(path)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for m in METHODS:   # a discarded round (first-touch of host memory on this VM; see fetch.py)
        run_child(cold_once, m, str(path))
    for _ in range(env.profile.cold_repeats):
        for m in METHODS:
            runs[m].append(run_child(cold_once, m, str(path)))
    rate = {m: median(r["bytes"] / r["s"] for r in rs) for m, rs in runs.items()}
    secs = {m: median(r["s"] for r in rs) for m, rs in runs.items()}
    size = fmt_b(runs["devmapd"][0]["bytes"])
    gbs = lambda r: f"{r / (1 << 30):.2f} GiB/s"   # noqa: E731
    data = {"rates_Bps": rate, "seconds": secs, "runs": runs}
    return [
        Row(section=f"cold load {size}", metric="checkpoint.read rate vs memcpy into fresh memory",
            devmapd=f"{gbs(rate['devmapd'])} ({fmt_s(secs['devmapd'])})",
            peer=f"memcpy {gbs(rate['memcpy'])} ({fmt_s(secs['memcpy'])})",
            ratio=rate["devmapd"] / rate["memcpy"], ratio_means="devmapd rate / memcpy rate",
            target=(">=", TARGET), data=data),
        Row(section=f"cold load {size}", metric="checkpoint.read rate vs raw sendfile into a memfd",
            devmapd=f"{gbs(rate['devmapd'])}",
            peer=f"sendfile {gbs(rate['sendfile'])} ({fmt_s(secs['sendfile'])})",
            ratio=rate["devmapd"] / rate["sendfile"], ratio_means="devmapd rate / sendfile rate",
            note=("sendfile of the whole file into a fresh memfd is the kernel-side limit of an arena "
                  "fill (shmem pages, 4 KiB); memcpy is into fresh anonymous 4 KiB pages"),
            data=data),
        Row(section=f"cold load {size}", metric="checkpoint.read rate vs torch.load",
            devmapd=f"{gbs(rate['devmapd'])}", peer=f"torch.load {gbs(rate['torch.load'])} ({fmt_s(secs['torch.load'])})",
            ratio=rate["devmapd"] / rate["torch.load"], ratio_means="devmapd rate / torch.load rate", data=data),
    ]
