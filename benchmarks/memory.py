"""Memory: summed PSS of N processes holding one model via devmapd vs N that each torch.load it.

All N processes start and import first; their summed PSS is taken; then each loads the model
and reads every byte (a user running inference touches all of it; an untouched mapping would
flatter devmapd); their summed PSS is taken again. The growth is the memory the model costs
them together. PSS divides a shared page among the processes that map it, so N clients of one
sealed memfd add up to about one copy, where N torch.loads add up to N.
"""
from __future__ import annotations

import time
from typing import Any

from benchmarks.common import ctx, pss_bytes, status_fields, stop_holders, warm
from benchmarks.env import Env
from benchmarks.report import Row, fmt_b
from benchmarks.workers import hold

TARGET = 1.2   # devmapd clients' total PSS growth / model size (issue 3)


def _group(env: Env, method: str, path: str, name: str, k: int) -> dict[str, Any]:
    c = ctx()
    procs, conns = [], []
    try:
        for _ in range(k):
            parent, child = c.Pipe()
            p = c.Process(target=hold, args=(method, path, name, env.socket, child), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        pids = []
        for conn in conns:
            if not conn.poll(120):
                raise TimeoutError(f"a {method} holder did not start")
            pids.append(conn.recv()[1])
        time.sleep(0.2)
        before = sum(pss_bytes(pid) for pid in pids)
        daemon_before = pss_bytes(env.daemon.pid) if env.daemon else 0
        for conn in conns:
            conn.send("go")
        held = []
        for conn in conns:
            if not conn.poll(600):
                raise TimeoutError(f"a {method} holder did not finish loading")
            tag, info = conn.recv()
            if tag != "holding":
                raise RuntimeError(f"{method} holder: {tag} {info}")
            held.append(info)
        after = sum(pss_bytes(pid) for pid in pids)
        daemon_after = pss_bytes(env.daemon.pid) if env.daemon else 0
        daemon_shmem = status_fields(env.daemon.pid).get("RssShmem", 0) if env.daemon else 0
        if len({round(h["checksum"], 3) for h in held}) != 1:
            raise AssertionError(f"{method} holders saw different weights: {held}")
        return {"before": before, "after": after, "growth": after - before, "daemon_pss_before": daemon_before,
                "daemon_pss_after": daemon_after, "daemon_rss_shmem": daemon_shmem, "bytes": held[0]["bytes"]}
    finally:
        stop_holders(conns, procs)


def run(env: Env) -> list[Row]:
    k = env.profile.pss_clients
    path = env.models / f"{env.pss_model}.pt"
    warm(path)
    dev = _group(env, "devmapd", str(path), env.pss_model, k)
    tl = _group(env, "torch.load", str(path), env.pss_model, k)
    size = dev["bytes"]
    dev_x, tl_x = dev["growth"] / size, tl["growth"] / size
    note = (f"model {fmt_b(size)}; summed PSS of the {k} processes before loading: "
            f"{fmt_b(dev['before'])} (devmapd group), {fmt_b(tl['before'])} (torch.load group); "
            f"daemon PSS {fmt_b(dev['daemon_pss_before'])} -> {fmt_b(dev['daemon_pss_after'])}")
    data = {"clients": k, "model_bytes": size, "devmapd": dev, "torch.load": tl}
    return [
        Row(section=f"memory {k} clients", metric=f"PSS growth holding {fmt_b(size)}",
            devmapd=f"{fmt_b(dev['growth'])} ({dev_x:.2f}x model)",
            peer=f"torch.load {fmt_b(tl['growth'])} ({tl_x:.2f}x model)",
            ratio=dev_x, ratio_means="devmapd clients' total PSS growth / model size",
            target=("<=", TARGET), target_label=f"< {TARGET:g}x", note=note, data=data),
        Row(section=f"memory {k} clients", metric="memory saved vs torch.load",
            devmapd=fmt_b(dev["growth"]), peer=f"torch.load {fmt_b(tl['growth'])}",
            ratio=tl["growth"] / max(1, dev["growth"]), ratio_means="peer PSS growth / devmapd PSS growth",
            data=data),
    ]
