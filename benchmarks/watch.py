"""Watch-to-ready: a checkpoint renamed into the watched directory until the daemon says ready.

The file is written under a temporary name the watcher ignores (``*.tmp``) in the model dir,
its pages made warm, then renamed into place; the clock runs from the rename to the ``model``
event with state ``ready`` on a subscription. The model's own ``load_time_s`` is subtracted;
what is left is the daemon's reaction time (watcher, planner, queue, events).
"""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

from benchmarks.common import DEFAULT_SETTLE_S, median, warm
from benchmarks.env import Env
from benchmarks.report import Row, fmt_b, fmt_s


def _listen(socket: str, out: queue.Queue[tuple[float, dict]], stop: threading.Event) -> Any:
    from devmapd.client import Client
    c = Client(socket, timeout=30.0)

    def loop() -> None:
        try:
            for ev in c.events(reconnect=False):
                out.put((time.time(), ev))
                if stop.is_set():
                    return
        except Exception as e:   # surfaced as a timeout in the waiting loop
            out.put((time.time(), {"type": "error", "message": str(e)}))

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return c, t


def run(env: Env) -> list[Row]:
    from devmapd import samples
    prof = env.profile
    q: queue.Queue[tuple[float, dict]] = queue.Queue()
    stop = threading.Event()
    client, thread = _listen(env.socket, q, stop)
    time.sleep(0.5)   # let the subscription be in place before the first rename
    samples_run: list[dict[str, float]] = []
    names: list[str] = []
    try:
        for i in range(prof.watch_repeats):
            name = f"watch-{i}"
            tmp = samples.big(env.models, prof.watch_bytes, 50, name=f"{name}.pt.tmp")
            warm(tmp)
            time.sleep(0.3)   # any event for the temp file would have been ignored by now
            t0 = time.time()
            os.rename(tmp, env.models / f"{name}.pt")
            names.append(name)
            deadline = time.monotonic() + 120
            while True:
                try:
                    ts, ev = q.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError(f"no ready event for {name} within 120 s") from None
                if ev.get("type") == "error":
                    raise RuntimeError(f"event stream failed: {ev['message']}")
                m = ev.get("model") or {}
                if ev.get("type") == "model" and m.get("name") == name and m.get("state") == "ready":
                    load = float(m.get("load_time_s") or 0.0)
                    samples_run.append({"latency_s": ts - t0, "load_s": load})
                    break
                if ev.get("type") == "model" and m.get("name") == name and m.get("state") == "failed":
                    raise RuntimeError(f"{name} failed: {m.get('error')}")
    finally:
        stop.set()
        client.close()
        thread.join(5)
        for name in names:   # unload them: later sections should not pay for them
            try:
                os.unlink(env.models / f"{name}.pt")
            except OSError:
                pass
    lat = median(s["latency_s"] for s in samples_run)
    load = median(s["load_s"] for s in samples_run)
    over = median(s["latency_s"] - s["load_s"] for s in samples_run)
    settle = DEFAULT_SETTLE_S
    return [Row(
        section=f"watch {fmt_b(prof.watch_bytes)}", metric="rename -> ready, beyond its load time",
        devmapd=fmt_s(over),
        peer=f"load time {fmt_s(load)}", ratio=lat / load if load > 0 else None,
        ratio_means="rename->ready latency / load time",
        note=(f"median rename->ready {fmt_s(lat)} with watch.settle_s={settle:g} s (shipped default; "
              f"a file renamed into place after being closed counts as settled at once)"),
        data={"runs": samples_run, "settle_s": settle, "latency_s": lat, "load_s": load, "overhead_s": over})]
