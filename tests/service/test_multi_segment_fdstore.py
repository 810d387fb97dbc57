"""A model read as several memfds survives the fd-store handoff to a restarted process.

As in test_sd_fdstore.py: this process plays the first daemon (reads a real checkpoint with
``engine.learned`` into three parallel-filled memfds and stashes them), FakeSystemd keeps the
fds, and a fresh process (restore_child.py) gets them back as LISTEN_FDS and rebuilds the model
without reading the file; it must equal torch.load.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from devmapd.daemon import names
from devmapd.engine import checkpoint
from devmapd.engine.learned import learn, read_learned
from devmapd.service import fdstore
from devmapd.service.systemd import Notifier

HERE = Path(__file__).resolve().parent


def test_a_multi_segment_arena_survives_the_fd_store_handoff(tmp_path, fake_systemd, listen_exec, child_env):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    g = torch.Generator().manual_seed(9)
    sd = {f"block.{i}.weight": torch.randn(128, 64, generator=g) for i in range(9)}
    sd["block.tied"] = sd["block.0.weight"]
    torch.save(sd, model_dir / "wide.pt")

    source = names.source_for(model_dir, "wide")
    opts = checkpoint.ReadOptions()
    loaded = read_learned(learn(source, opts), opts, split_min_bytes=64 << 10, threads=3, source=source)
    assert len(loaded.segments) == 3
    notifier = Notifier(fake_systemd.address)
    stored = fdstore.stash(notifier, "wide", 1, loaded.manifest.to_json(), [s.fd for s in loaded.segments],
                           names.fingerprint(source), extra={"bytes": loaded.inspection.bytes})
    for _ in range(2 * len(stored)):   # FDSTOREREMOVE then FDSTORE per name
        fake_systemd.recv()
    assert len(fake_systemd.store) == len(stored) == 4   # three data memfds and the manifest
    loaded.close()   # only systemd's duplicates keep the memory now

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "devmapd.sock"))
    listener.listen(1)
    named = [("devmapd-listen", listener.fileno())] + [
        (name, fd) for name, fds in fake_systemd.store.items() for fd in fds]
    argv, pass_fds = listen_exec(named, [sys.executable, str(HERE / "restore_child.py"), str(model_dir)])
    env = dict(child_env, NOTIFY_SOCKET=fake_systemd.address)
    proc = subprocess.Popen(argv, pass_fds=pass_fds, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    stdout, stderr = proc.communicate(timeout=120)
    listener.close()
    assert proc.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["kept"] == ["wide"] and report["equal"] == {"wide": True}, report
    assert report["problems"] == [] and os.path.exists(model_dir / "wide.pt")
