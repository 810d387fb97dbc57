"""The polling fallback when inotify instances really run out (no mocks: a child process uses up
its user's inotify instances, then starts a watcher that must fall back and still work)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

CHILD = r"""
import asyncio, ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
held = []
while len(held) < 4096:          # use up fs.inotify.max_user_instances (or the fd limit)
    fd = libc.inotify_init()
    if fd < 0:
        break
    held.append(fd)
assert ctypes.get_errno() in (24, 23), ctypes.get_errno()     # EMFILE / ENFILE
from devmapd.daemon.watcher import ModelWatcher

async def main():
    q = asyncio.Queue()
    w = ModelWatcher(sys.argv[1], q, asyncio.get_running_loop(), settle_s=0.2)
    w.start()
    print("backend", w.backend, "|", w.fallback_reason, flush=True)
    with open(os.path.join(sys.argv[1], "late.pt"), "wb") as f:
        f.write(b"x" * 100)
    ev = await asyncio.wait_for(q.get(), 10)
    print("event", ev.kind, ev.name, flush=True)
    w.stop()

asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run the child as an unprivileged user")
def test_inotify_exhaustion_falls_back_to_polling(tmp_path: Path):
    # A separate unprivileged user, so that using up *its* inotify instances disturbs nobody else.
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    model_dir.chmod(0o777)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    script.chmod(0o644)
    repo = Path(__file__).resolve().parents[2]
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
           "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
           sys.executable, str(script), str(model_dir)]
    env = dict(os.environ, PYTHONPATH=str(repo))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=40, env=env, cwd=repo)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "backend polling | out of inotify instances" in out.stdout, out.stdout + out.stderr
    assert "event upsert late" in out.stdout
