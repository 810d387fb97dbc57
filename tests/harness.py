"""Test harness: a REAL devmapd daemon process on a real socket, with simulated GPUs.

``daemon_factory(...)`` starts ``python -m devmapd serve`` in a subprocess with
its own model directory, socket, state directory and simulate file under
``tmp_path``, waits until the socket answers, and stops it (SIGTERM, then
SIGKILL) at teardown. Tests change GPU pressure the way DESIGN.md says a test
should: write a new simulate file and rename it into place.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

FAST_CONFIG = """
log_level = "debug"
[devices]
poll_interval_s = 0.2
reserve_mib = {reserve_mib}
max_fraction = 1.0
overhead = 0.0
[pressure]
low_watermark_mib = {low_mib}
high_watermark_mib = {high_mib}
cooldown_s = {cooldown_s}
[watch]
settle_s = 0.2
rescan_interval_s = 2.0
[placement]
load_workers = 2
"""


def write_simulate(path: Path, gpus: list[dict[str, Any]]) -> None:
    """Atomically replace the simulate file (write a temp file, rename it into place)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(json.dumps({"gpus": gpus}))
    os.replace(tmp, path)


def sim_gpu(i: int, total_mib: int, used_by_others_mib: int = 0, **extra: Any) -> dict[str, Any]:
    return {"name": f"Simulated GPU {i}", "uuid": f"GPU-sim-{i:04d}", "total_mib": total_mib,
            "used_by_others_mib": used_by_others_mib, **extra}


@dataclass
class DaemonHandle:
    proc: subprocess.Popen
    socket: str
    model_dir: Path
    state_dir: Path
    sim_file: Path
    config_file: Path
    log_file: Path
    argv: list[str] = field(default_factory=list)

    def client(self):
        from devmapd.client import Client

        return Client(self.socket)

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return c.status()

    def model(self, name: str) -> dict[str, Any] | None:
        for m in self.status()["models"]:
            if m["name"] == name:
                return m
        return None

    def wait_for(self, predicate: Callable[[dict[str, Any]], Any], timeout: float = 20.0, what: str = "") -> Any:
        """Poll status until ``predicate(status)`` is truthy; fail with the last status otherwise."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                last = self.status()
            except Exception:  # not listening yet, or restarting: keep waiting until the deadline
                time.sleep(0.1)
                continue
            try:
                result = predicate(last)
                if result:
                    return result
            except (AssertionError, KeyError, TypeError, StopIteration):
                pass
            time.sleep(0.1)
        models = {m["name"]: (m["state"], m["placement"], m.get("error")) for m in last.get("models", [])}
        raise AssertionError(f"timed out waiting for {what or predicate}; models: {models}\n--- log tail:\n"
                             f"{self.log()[-4000:]}")

    def wait_model(self, name: str, state: str = "ready", timeout: float = 20.0) -> dict[str, Any]:
        def check(st: dict[str, Any]) -> dict[str, Any] | None:
            for m in st["models"]:
                if m["name"] == name and m["state"] == state:
                    return m
            return None

        return self.wait_for(check, timeout, what=f"{name} to be {state}")

    def set_gpus(self, gpus: list[dict[str, Any]]) -> None:
        write_simulate(self.sim_file, gpus)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# What systemd does before exec: move the fds to 3, 4, ... and name them; LISTEN_PID is the pid
# that exec keeps, so it is known only inside the child.
_SYSTEMD_EXEC = """
import fcntl, os, sys
fds = [int(x) for x in os.environ.pop("DEVMAPD_TEST_FDS").split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # well above 3..N, so no dup2 lands on itself
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[1], sys.argv[1:])
"""


def devmapd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "devmapd", *args]


def start_daemon(tmp_path: Path, *, gpus: list[dict[str, Any]] | None = None, model_dir: Path | None = None,
                 extra_config: str = "", reserve_mib: int = 0, low_mib: int = 64, high_mib: int = 128,
                 cooldown_s: float = 1.0, wait: bool = True, name: str = "d", env: dict[str, str] | None = None,
                 state_dir: Path | None = None, socket: str | None = None,
                 listen_fds: list[tuple[str, int]] | None = None) -> DaemonHandle:
    """Start ``devmapd serve`` in a subprocess under ``tmp_path/name``; wait until it answers.

    ``listen_fds`` [(name, fd), ...] are handed over the way systemd does it: renumbered from
    fd 3, with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID set to the daemon's own pid.
    """
    base = tmp_path / name
    base.mkdir(exist_ok=True)
    mdir = model_dir or (base / "models")
    mdir.mkdir(exist_ok=True)
    sdir = state_dir or (base / "state")
    sim = base / "gpus.json"
    if not sim.exists():
        write_simulate(sim, gpus if gpus is not None else [sim_gpu(0, 1024), sim_gpu(1, 1024)])
    cfg = base / "devmapd.toml"
    cfg.write_text(FAST_CONFIG.format(reserve_mib=reserve_mib, low_mib=low_mib, high_mib=high_mib,
                                      cooldown_s=cooldown_s) + extra_config)
    sock = socket or str(base / "run" / "devmapd.sock")
    log_file = base / "daemon.log"
    argv = devmapd_cmd("serve", "--config", str(cfg), "--model-dir", str(mdir), "--socket", sock,
                       "--simulate", str(sim), "--state-dir", str(sdir))
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if "NOTIFY_SOCKET" not in (env or {}):
        full_env.pop("NOTIFY_SOCKET", None)
    pass_fds: tuple[int, ...] = ()
    launch = argv
    if listen_fds:
        pass_fds = tuple(fd for _, fd in listen_fds)
        full_env["LISTEN_FDNAMES"] = ":".join(n for n, _ in listen_fds)
        full_env["DEVMAPD_TEST_FDS"] = ",".join(str(fd) for fd in pass_fds)
        launch = [sys.executable, "-c", _SYSTEMD_EXEC, *argv]
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(launch, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(ROOT),
                                pass_fds=pass_fds)
    handle = DaemonHandle(proc=proc, socket=sock, model_dir=mdir, state_dir=sdir, sim_file=sim,
                          config_file=cfg, log_file=log_file, argv=argv)
    if wait:
        try:
            handle.wait_for(lambda st: True, timeout=30, what="the daemon to answer on its socket")
        except BaseException:
            handle.stop()
            raise
    return handle
