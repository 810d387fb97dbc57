"""Daemon at rest: CPU with 2 simulated GPUs and N models, and RSS beyond the arenas.

Idle CPU is utime+stime from /proc/<pid>/stat over a window once every model is ready (the
daemon still polls the inventory every second and re-reads the simulate file, as in production).
The arenas are memfd (shmem) pages, so the daemon's own overhead is RssAnon + RssFile; its
peer is a bare Python process that has imported torch, the floor any torch-based daemon pays.
"""
from __future__ import annotations

import time

from benchmarks.common import cpu_seconds, run_child, sim_gpu, start_daemon, status_fields, warm
from benchmarks.env import Env
from benchmarks.report import Row, fmt_b
from benchmarks.workers import idle_python_rss

TARGET_PCT = 1.0


def run(env: Env) -> list[Row]:
    from devmapd import samples
    prof = env.profile
    base = env.base / "idle"
    models = base / "models"
    models.mkdir(parents=True, exist_ok=True)
    for i in range(prof.idle_models):
        samples.big(models, prof.idle_model_bytes, 8, name=f"m{i:03d}.pt")
    warm(models)
    d = start_daemon(base, models, [sim_gpu(0, 16384), sim_gpu(1, 16384)])
    env.daemons.append(d)
    try:
        d.wait_ready(prof.idle_models)
        time.sleep(2.0)   # start-up work (loads, first polls, GC) is over
        c0, t0 = cpu_seconds(d.pid), time.monotonic()
        time.sleep(prof.idle_window_s)
        c1, t1 = cpu_seconds(d.pid), time.monotonic()
        mem = status_fields(d.pid)
        st = d.status()
    finally:
        d.stop()
    pct = 100.0 * (c1 - c0) / (t1 - t0)
    arenas = sum(int(m.get("bytes") or 0) for m in st["models"])
    placed = sorted({dev for m in st["models"] for dev in (m.get("placement") or {})})
    overhead = mem.get("RssAnon", 0) + mem.get("RssFile", 0)
    bare = run_child(idle_python_rss)
    bare_rss = bare.get("VmRSS", 0)
    return [
        Row(section=f"idle, 2 sim GPUs, {prof.idle_models} models", metric="daemon CPU",
            devmapd=f"{c1 - c0:.3f} s CPU in {t1 - t0:.1f} s", peer="one core",
            ratio=pct, ratio_text=f"{pct:.2f}%", ratio_means="% of one core",
            target=("<=", TARGET_PCT), target_label=f"< {TARGET_PCT:g}%",
            data={"cpu_s": c1 - c0, "window_s": t1 - t0, "percent": pct, "placements": placed}),
        Row(section=f"idle, 2 sim GPUs, {prof.idle_models} models", metric="daemon RSS beyond the arenas",
            devmapd=f"{fmt_b(overhead)} (+ {fmt_b(mem.get('RssShmem', 0))} arena pages mapped)",
            peer=f"python+torch {fmt_b(bare_rss)}", ratio=overhead / max(1, bare_rss),
            ratio_means="daemon RssAnon+RssFile / bare python+torch RSS",
            note=(f"{fmt_b(arenas)} of weights held in arenas (memfd, outside RssAnon/RssFile); placed on "
                  f"{', '.join(placed) or 'nothing'}; daemon VmRSS {fmt_b(mem.get('VmRSS', 0))}"),
            data={"status_mem": mem, "arena_bytes": arenas, "bare": bare}),
    ]
