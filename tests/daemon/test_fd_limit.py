"""File descriptors: a daemon started with a low limit raises its soft limit to the hard one,
shows fds open against the limit in ``status``, refuses new loads with a diagnosis naming the
limit and LimitNOFILE= long before the limit, and keeps serving the models already ready.

A real daemon process with a real RLIMIT_NOFILE (set in the child before exec) and 150 real
checkpoints, more than 128 fds can serve.
"""

from __future__ import annotations

import os
import resource
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

from devmapd.client import Client, ModelUnavailable
from tests import harness

MODELS = 150
SOFT, HARD = 64, 128


def _start_with_fd_limit(tmp_path: Path, soft: int, hard: int) -> harness.DaemonHandle:
    base = tmp_path / "d"
    mdir, sdir, sim, cfg = base / "models", base / "state", base / "gpus.json", base / "devmapd.toml"
    mdir.mkdir(parents=True)
    for i in range(MODELS):
        torch.save({"w": torch.full((4,), float(i))}, mdir / f"m{i:03d}.pt")
    harness.write_simulate(sim, [])
    cfg.write_text(harness.FAST_CONFIG.format(reserve_mib=0, low_mib=64, high_mib=128, cooldown_s=1.0))
    sock = str(base / "run" / "devmapd.sock")
    argv = harness.devmapd_cmd("serve", "--config", str(cfg), "--model-dir", str(mdir), "--socket", sock,
                               "--simulate", str(sim), "--state-dir", str(sdir))
    log_file = base / "daemon.log"
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(harness.ROOT),
                                env={**env, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    return harness.DaemonHandle(proc=proc, socket=sock, model_dir=mdir, state_dir=sdir, sim_file=sim,
                                config_file=cfg, log_file=log_file, argv=argv)


@pytest.fixture
def limited(tmp_path: Path):
    handle = _start_with_fd_limit(tmp_path, SOFT, HARD)
    try:
        yield handle
    finally:
        handle.stop()


def test_low_fd_limit_refuses_new_loads_and_keeps_ready_models_serving(limited: harness.DaemonHandle) -> None:
    settled = limited.wait_for(
        lambda st: st if len(st["models"]) == MODELS and all(m["state"] in ("ready", "failed") for m in st["models"])
        else None, timeout=120, what="every model to be ready or failed")
    fds = settled["daemon"]["fds"]
    # The soft limit was raised to the hard one at start; the reserve was kept.
    assert fds["limit"] == HARD and fds["reserve"] == 64
    assert fds["open"] <= HARD - fds["reserve"] + 8  # the refusals started before the reserve was spent
    assert f"raised from {SOFT} to {HARD}" in limited.log()

    states = Counter(m["state"] for m in settled["models"])
    assert states["ready"] >= 10 and states["failed"] >= 10, states
    failed = [m for m in settled["models"] if m["state"] == "failed"]
    for m in failed:
        assert m["diagnosis"]["code"] == "io_error"
        assert f"of its {HARD} file descriptors" in m["diagnosis"]["message"]
        assert "LimitNOFILE=" in m["diagnosis"]["message"]
    assert "Too many open files" not in limited.log()

    ready = [m["name"] for m in settled["models"] if m["state"] == "ready"]
    with Client(limited.socket) as client:
        for name in ready:  # every ready model still serves its own values
            tensors = client.fetch(name)
            assert torch.equal(tensors["w"], torch.full((4,), float(int(name[1:]))))
            client.release(name)
        with pytest.raises(ModelUnavailable, match="LimitNOFILE="):
            client.fetch(failed[0]["name"])
        after = client.status()
        assert after["daemon"]["fds"]["open"] < HARD - 32

        # Evicting ready models gives their fds back: models refused for want of them load after all.
        for name in ready[:8]:
            assert client.evict(name)["outcome"] == "applied"
    refused = {m["name"] for m in failed}
    retried = limited.wait_for(lambda st: [m for m in st["models"] if m["name"] in refused and m["state"] == "ready"],
                               timeout=30, what="a refused model to load once fds were freed")
    assert all(m["diagnosis"] is None and list(m["placement"]) == ["cpu"] for m in retried)
    assert limited.proc.poll() is None
