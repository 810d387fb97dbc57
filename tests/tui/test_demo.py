"""`devmapd demo` end to end, headless (stdout is a pipe, so it prints instead of opening the
dashboard): real sample checkpoints, a real daemon on two simulated GPUs, pressure from a second
command, and nothing left behind after Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness import ROOT
from tests.tui.helpers import require_serve


class Output:
    """Collect a process's stdout lines in a thread so waiting never blocks on a pipe."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, needle: str, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            if proc.poll() is not None:
                time.sleep(0.2)
                if needle in self.text:
                    return
                raise AssertionError(f"demo exited ({proc.returncode}) before {needle!r}:\n{self.text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} within {timeout}s:\n{self.text}")
            time.sleep(0.1)


def test_pressure_without_a_running_demo_says_so(tmp_path: Path):
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "devmapd.demo", "--pressure", "on"], env=env,
                          capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert done.returncode == 1 and "no demo is running" in done.stderr


def test_demo_headless_pressure_and_cleanup(tmp_path: Path):
    require_serve()
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "devmapd.demo", "--tiny"], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Output(proc)
    try:
        out.wait_for("demo ready", proc, timeout=180)
        state = json.loads((tmp_path / "devmapd-demo.json").read_text())
        workdir = Path(state["workdir"])
        assert state["pid"] == proc.pid and workdir.is_dir()
        names = {p.name for p in Path(state["model_dir"]).iterdir()}
        assert {"plain-state-dict.pt", "ddp-module-prefix.pt", "fp16-weights.pt",
                "saved-on-cuda1.pt", "hf-sharded", "broken-truncated.pt"} <= names
        text = out.text
        assert "Simulated A100 (demo)" in text and "(simulated)" in text
        assert "ddp-module-prefix      ready" in text and "hf-sharded             ready" in text
        assert "broken-truncated       failed" in text and "[truncated]" in text

        from devmapd.client import Client
        with Client(state["socket"]) as client:
            daemon_pid = client.status()["daemon"]["pid"]

        squeeze = subprocess.run([sys.executable, "-m", "devmapd.demo", "--pressure", "on"], env=env,
                                 capture_output=True, text=True, cwd=str(ROOT), timeout=60)
        assert squeeze.returncode == 0, squeeze.stderr
        assert "pressure ON" in squeeze.stdout
        out.wait_for("demoted", proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)    # what Ctrl-C does
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"demo did not exit on SIGINT:\n{out.text}")
    assert proc.returncode in (0, 130), out.text
    assert not workdir.exists(), "the demo's temporary directory was left behind"
    assert not (tmp_path / "devmapd-demo.json").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(daemon_pid, 0)


def test_demo_dashboard_in_a_terminal_pressure_key_and_hangup(tmp_path: Path):
    """`devmapd demo` on a real pseudo-terminal: the dashboard draws, `x` squeezes a simulated
    GPU (the simulate file changes), and closing the terminal (SIGHUP) stops the daemon and
    removes every file."""
    import fcntl
    import pty
    import struct
    import termios

    require_serve()
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path), "TERM": "xterm-256color",
           "COLUMNS": "120", "LINES": "40"}
    pid, master = pty.fork()
    if pid == 0:   # child: exec at once (the parent has threads)
        os.chdir(str(ROOT))
        os.execve(sys.executable, [sys.executable, "-m", "devmapd.demo", "--tiny"], env)
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    screen: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            screen.append(data)

    threading.Thread(target=drain, daemon=True).start()
    state_path = tmp_path / "devmapd-demo.json"

    def wait(predicate, what: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            done, _ = os.waitpid(pid, os.WNOHANG)
            assert done == 0, f"demo exited early:\n{b''.join(screen)[-3000:]!r}"
            assert time.monotonic() < deadline, f"no {what}:\n{b''.join(screen)[-3000:]!r}"
            time.sleep(0.1)

    try:
        wait(state_path.exists, "demo state file")
        state = json.loads(state_path.read_text())
        wait(lambda: b"Decisions" in b"".join(screen), "dashboard on the terminal")
        sim = Path(state["simulate"])
        before = json.loads(sim.read_text())["gpus"]
        # Connected and listening: the log's demo hint is drawn once the first status arrived.
        wait(lambda: b"press x" in b"".join(screen), "the dashboard connected")
        os.write(master, b"x")
        wait(lambda: json.loads(sim.read_text())["gpus"] != before, "pressure from the x key")
        squeezed = json.loads(sim.read_text())["gpus"]
        assert any(g["used_by_others_mib"] > b["used_by_others_mib"] for g, b in zip(squeezed, before))
        from devmapd.client import Client
        with Client(state["socket"]) as client:
            daemon_pid = client.status()["daemon"]["pid"]
    finally:
        os.close(master)                         # the terminal goes away: SIGHUP
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the demo did not exit after its terminal closed")
        time.sleep(0.1)
    assert not Path(state["workdir"]).exists()
    assert not state_path.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(daemon_pid, 0)
