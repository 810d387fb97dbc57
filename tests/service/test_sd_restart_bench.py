"""Measurement (opt in: DEVMAPD_SLOW=1): time to serving after a restart from the fd store vs a cold start.

    DEVMAPD_SLOW=1 DEVMAPD_RESTART_GIB=10 .venv/bin/python -m pytest -q -s tests/service/test_sd_restart_bench.py

Writes DEVMAPD_RESTART_GIB GiB of real torch checkpoints (4 files), then, each time from the
moment the process is started until STATUS says every model is ready:
  * floor:   an empty model directory (interpreter + imports + start-up),
  * cold:    the files evicted from the page cache (posix_fadvise DONTNEED), read from disk,
  * warm:    the files in the page cache,
  * restart: the memfds handed back through LISTEN_FDS (what `systemctl restart devmapd` does).
It needs about 2x the size in RAM (page cache + the memfds); 10 GiB is the issue's figure, the
default here is 2 so the shared CI box is not starved.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GIB = 1 << 30
FILES = 4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("DEVMAPD_SLOW") != "1", reason="measurement; opt in with DEVMAPD_SLOW=1"),
]

CONFIG = """
log_level = "info"
[devices]
poll_interval_s = 0.1
[watch]
settle_s = 0.1
[placement]
load_workers = 2
"""


def _ready_all(note, count: int) -> bool:
    return bool(re.match(rf"{count} models ready", note.fields.get("STATUS", "")))


def _run(tmp_path, fake, child_env, model_dir: Path, count: int, *, prefix=(), pass_fds=(), stop=True):
    cfg = tmp_path / "devmapd.toml"
    cfg.write_text(CONFIG)
    gpus = tmp_path / "gpus.json"
    gpus.write_text(json.dumps({"gpus": []}))
    argv = [*prefix, sys.executable, "-m", "devmapd", "serve", "--config", str(cfg), "--model-dir", str(model_dir),
            "--socket", str(tmp_path / "d.sock"), "--simulate", str(gpus), "--state-dir", str(tmp_path / "state")]
    fake.drain(0.05)
    started = time.monotonic()
    with open(tmp_path / "daemon.log", "ab") as log:
        proc = subprocess.Popen(argv, env=dict(child_env, NOTIFY_SOCKET=fake.address), stdout=log, stderr=log,
                                cwd=str(ROOT), pass_fds=pass_fds)
    try:
        deadline = started + 900
        while True:
            note = fake.recv(max(1.0, deadline - time.monotonic()))
            if "READY" in note.fields and count == 0:
                break
            if count and _ready_all(note, count):
                break
        elapsed = time.monotonic() - started
        if count:  # let every model reach the store before we stop
            wait_until = time.monotonic() + 60
            while sum(name.endswith(".m") for name in fake.store) < count and time.monotonic() < wait_until:
                fake.recv(60)
    finally:
        if stop:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return elapsed


def _evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_restart_from_the_fd_store_vs_cold_start(tmp_path, fake_systemd, child_env, listen_exec):
    gib = float(os.environ.get("DEVMAPD_RESTART_GIB", "2"))
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    per_file = int(gib * GIB / FILES) // 4 * 4
    files = []
    for i in range(FILES):
        # 32 tensors per file, like layers of a model; float32 values, real torch.save zip files.
        rows = per_file // 4 // 32 // 1024
        sd = {f"layers.{j}.weight": torch.full((rows, 1024), float(i * 100 + j)) for j in range(32)}
        path = model_dir / f"model{i}.pt"
        torch.save(sd, path)
        files.append(path)
        del sd
    total = sum(p.stat().st_size for p in files)

    floor = _run(tmp_path, fake_systemd, child_env, empty, 0)
    _evict(files)
    cold = _run(tmp_path, fake_systemd, child_env, model_dir, FILES)
    fake_systemd.clear_store()  # the warm run starts with an empty store, as after `systemctl stop`
    warm = _run(tmp_path, fake_systemd, child_env, model_dir, FILES)

    named = [(name, fd) for name, fds in fake_systemd.store.items() for fd in fds]
    prefix, fds = listen_exec(named, ["true"])
    restart = _run(tmp_path, fake_systemd, child_env, model_dir, FILES,
                   prefix=prefix[: prefix.index("--") + 1], pass_fds=fds)
    print(f"\n{total / GIB:.2f} GiB in {FILES} checkpoints: floor {floor:.2f}s, cold {cold:.2f}s, "
          f"warm {warm:.2f}s, restart from fd store {restart:.2f}s")
    assert restart < warm and restart < cold
