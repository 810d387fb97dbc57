"""Scale: 1, 10, 100, 1,000 models: daemon start-up to all-ready and ``status`` latency.

Each point is a fresh daemon over a fresh directory of small checkpoints (8 tensors each).
Start-up runs from spawning ``devmapd serve`` to the first status with every model ready (so it
includes the interpreter and torch import, reported separately as "first answer"). Status
latency is the median round trip of ``Client.status()`` on one open connection. Ratios are
against the 1-model point, to show how each cost grows.
"""
from __future__ import annotations

import json
import time

from benchmarks.common import median, start_daemon, warm
from benchmarks.env import Env
from benchmarks.report import Row, fmt_b, fmt_s

MODEL_BYTES = 16 << 10


def _point(env: Env, n: int) -> dict:
    from devmapd import samples
    base = env.base / "scale" / str(n)
    models = base / "models"
    models.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        samples.big(models, MODEL_BYTES, 8, name=f"m{i:04d}.pt")
    warm(models)
    d = start_daemon(base, models)
    env.daemons.append(d)
    try:
        first = d.wait_ready(0, interval=0.05)          # the socket answers
        # Each status poll costs the daemon ~50 us per model: poll more slowly as n grows so the
        # measuring does not slow the start-up it measures (<= ~5% of its main thread).
        ready = d.wait_ready(n, timeout=1800, interval=max(0.05, n / 1000))
        time.sleep(1.0)   # post-start work (first polls, GC) is over: measure status at rest
        with d.client() as c:
            st = c.status()
            times = []
            for _ in range(env.profile.status_calls):
                t0 = time.perf_counter()
                c.status()
                times.append(time.perf_counter() - t0)
    finally:
        d.stop()
    return {"models": n, "first_answer_s": first - d.started, "startup_s": ready - d.started,
            "status_s": median(times), "status_min_s": min(times), "status_bytes": len(json.dumps(st))}


def run(env: Env) -> list[Row]:
    points = [_point(env, n) for n in env.profile.scale_points]
    one = points[0]
    rows = []
    for p in points:
        n = p["models"]
        # After the socket answers (interpreter + torch import done) the rest is loading models.
        per = max(0.0, p["startup_s"] - p["first_answer_s"]) / n
        rows.append(Row(
            section=f"scale {n} model{'s' if n > 1 else ''}", metric="start-up to all ready",
            devmapd=f"{fmt_s(p['startup_s'])} (socket up at {fmt_s(p['first_answer_s'])}, then {fmt_s(per)}/model)",
            peer=f"1 model {fmt_s(one['startup_s'])}", ratio=p["startup_s"] / one["startup_s"],
            ratio_means="start-up / start-up with 1 model", data=p))
        rows.append(Row(
            section=f"scale {n} model{'s' if n > 1 else ''}", metric="status latency",
            devmapd=f"{fmt_s(p['status_s'])} ({fmt_b(p['status_bytes'])} JSON)",
            peer=f"1 model {fmt_s(one['status_s'])}", ratio=p["status_s"] / one["status_s"],
            ratio_means="status latency / with 1 model", data=p))
    return rows
