"""Scale: 1, 10, 100, 1,000 models: start-up to all-ready, restart, and ``status`` latency.

Each point is a fresh daemon over a fresh directory of small checkpoints (8 tensors each).
Start-up runs from spawning ``devmapd serve`` to the first status with every model ready (so it
includes the interpreter and torch import, reported separately as "first answer"). Restart is a
second daemon over the same model and state directories, not under systemd (so no fd store):
what it gains is the inspection cache. Status latency is the median round trip of
``Client.status()`` on one open connection. Ratios are against the 1-model start-up and status,
in the same run (issue 14's targets at 1,000 models: start-up <= 2.0x, restart <= 1.3x,
status <= 20x).
"""
from __future__ import annotations

import json
import time

from benchmarks.common import median, start_daemon, warm
from benchmarks.env import Env
from benchmarks.report import Row, fmt_b, fmt_s

MODEL_BYTES = 16 << 10
TARGETS = {"startup": 2.0, "restart": 1.3, "status": 20.0}   # at TARGET_MODELS models
TARGET_MODELS = 1000


def _run_daemon(base, models, n: int, calls: int) -> dict:
    d = start_daemon(base, models)
    try:
        first = d.wait_ready(0, interval=0.05)          # the socket answers
        # Each status poll costs the daemon some work per model: poll more slowly as n grows so
        # the measuring does not slow the start-up it measures.
        ready = d.wait_ready(n, timeout=1800, interval=max(0.05, n / 2000))
        time.sleep(1.0)   # post-start work (first polls, GC) is over: measure status at rest
        with d.client() as c:
            st = c.status()
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                c.status()
                times.append(time.perf_counter() - t0)
    finally:
        d.stop()
    cache = (st.get("daemon") or {}).get("inspection_cache") or {}
    return {"first_answer_s": first - d.started, "startup_s": ready - d.started, "status_s": median(times),
            "status_min_s": min(times), "status_bytes": len(json.dumps(st)), "cache": cache}


def _point(env: Env, n: int) -> dict:
    from devmapd import samples
    base = env.base / "scale" / str(n)
    models = base / "models"
    models.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        samples.big(models, MODEL_BYTES, 8, name=f"m{i:04d}.pt")
    warm(models)
    first = _run_daemon(base, models, n, env.profile.status_calls)
    again = _run_daemon(base, models, n, 1)   # same state dir: a restart
    return {"models": n, **first, "restart_s": again["startup_s"], "restart_first_answer_s": again["first_answer_s"],
            "restart_cache": again["cache"]}


def _target(n: int, what: str) -> tuple[str, float] | None:
    return ("<=", TARGETS[what]) if n >= TARGET_MODELS else None


def run(env: Env) -> list[Row]:
    points = [_point(env, n) for n in env.profile.scale_points]
    one = points[0]
    rows = []
    for p in points:
        n = p["models"]
        section = f"scale {n} model{'s' if n > 1 else ''}"
        # After the socket answers (interpreter + torch import done) the rest is loading models.
        per = max(0.0, p["startup_s"] - p["first_answer_s"]) / n
        rows.append(Row(
            section=section, metric="start-up to all ready",
            devmapd=f"{fmt_s(p['startup_s'])} (socket up at {fmt_s(p['first_answer_s'])}, then {fmt_s(per)}/model)",
            peer=f"1 model {fmt_s(one['startup_s'])}", ratio=p["startup_s"] / one["startup_s"],
            ratio_means="start-up / start-up with 1 model", target=_target(n, "startup"), data=p))
        hits = p["restart_cache"].get("hits")
        rows.append(Row(
            section=section, metric="restart to all ready (same state dir, no fd store)",
            devmapd=f"{fmt_s(p['restart_s'])}" + (f" ({hits} parses reused)" if hits is not None else ""),
            peer=f"1 model start-up {fmt_s(one['startup_s'])}", ratio=p["restart_s"] / one["startup_s"],
            ratio_means="restart / start-up with 1 model", target=_target(n, "restart"), data=p))
        rows.append(Row(
            section=section, metric="status latency",
            devmapd=f"{fmt_s(p['status_s'])} ({fmt_b(p['status_bytes'])} JSON)",
            peer=f"1 model {fmt_s(one['status_s'])}", ratio=p["status_s"] / one["status_s"],
            ratio_means="status latency / with 1 model", target=_target(n, "status"), data=p))
    return rows
