"""Fixtures for the wire tests: real checkpoints, a real server process, client processes.

The server runs in its own process (``python -m tests.wire.wiredaemon``); clients are other
processes started with subprocess (never forked from the server), or raw sockets in the pytest
process for the framing attacks.
"""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
NOBODY = 65534
FETCH_GROUP = 4242          # a gid given fetch rights in the session daemon's policy
BIG_MB = 64


def make_checkpoints(d: Path) -> dict[str, Path]:
    """Real checkpoints written by torch.save: mixed dtypes, tied weights, a view, nested data."""
    import torch

    g = torch.Generator().manual_seed(1234)
    d.mkdir(parents=True, exist_ok=True)
    base = torch.randn(16, 8, generator=g)
    tied = torch.randn(32, 4, generator=g)
    small = {
        "w": torch.randn(64, 32, generator=g),
        "b": torch.randn(32, generator=g).to(torch.bfloat16),
        "h": torch.randn(7, 3, generator=g).to(torch.float16),
        "idx": torch.arange(100, dtype=torch.int64),
        "mask": torch.rand(50, generator=g) > 0.5,
        "tied_a": tied, "tied_b": tied,
        "base": base, "view": base[:, 2:6].t(),
        "scalar": torch.tensor(3.5),
        "meta": {"epoch": 3, "name": "wire", "lrs": [0.1, 0.01], "pair": (1, "x"), "nan": float("nan")},
    }
    big = {f"layer{i}.weight": torch.rand(BIG_MB * 1024 * 1024 // 4 // 16, generator=g)
           for i in range(16)}
    many = {f"block{i // 10}.p{i % 10}": torch.randn(16, generator=g) for i in range(4000)}
    paths = {}
    for name, obj in (("small", small), ("big", big), ("many", many), ("slow", small)):
        p = d / f"{name}.pt"
        torch.save(obj, p)
        paths[name] = p
    return paths


def nobody_prefix(groups: tuple[int, ...] = ()) -> list[str]:
    """Run as uid/gid nobody; DAC_READ_SEARCH only to reach the root-owned venv and temp dirs."""
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


def client_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("DEVMAPD_SOCKET", None)
    return env


def run_client(*args: str, prefix: list[str] | None = None, timeout: float = 60,
               input: str | None = None) -> subprocess.CompletedProcess:
    """``python -m tests.wire.clients ARGS`` in a fresh, unrelated process."""
    cmd = [*(prefix or []), PY, "-m", "tests.wire.clients", *args]
    return subprocess.run(cmd, cwd=REPO, env=client_env(), capture_output=True, text=True,
                          timeout=timeout, input=input)


def spawn_client(*args: str, prefix: list[str] | None = None) -> subprocess.Popen:
    cmd = [*(prefix or []), PY, "-m", "tests.wire.clients", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=client_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_json(out: str) -> Any:
    lines = [ln for ln in out.strip().splitlines() if ln.startswith(("{", "["))]
    assert lines, f"no JSON result in client output: {out!r}"
    return json.loads(lines[-1])


def read_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """One stdout line of ``proc`` within ``timeout`` (fails loudly with its stderr otherwise)."""
    assert proc.stdout is not None
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    if not r:
        proc.kill()
        raise AssertionError(f"no output within {timeout}s; stderr: {proc.stderr.read() if proc.stderr else ''}")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"process ended (rc={proc.wait()}); stderr: {err}")
    return line.strip()


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            return v
        time.sleep(interval)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class WireDaemon:
    socket: str
    proc: subprocess.Popen
    ckpts: dict[str, Path]
    cfg: dict
    log: Path
    builder: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict:
        from devmapd.client import Client, DevmapdError
        deadline = time.monotonic() + 5
        while True:
            try:
                with Client(self.socket, timeout=10) as c:
                    return c.status()
            except DevmapdError as e:
                # Right after a test closed many sockets the server may not have reaped them yet.
                if e.code != "busy" or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def wire(self) -> dict:
        return self.status()["wire"]

    def raw(self, timeout: float = 5.0) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.socket)
        return s

    def settle(self, timeout: float = 10.0) -> dict:
        """Wait until only our status connection is open and no lease is outstanding."""
        return wait_for(lambda: (lambda w: w if w["connections"] <= 1 and w["leases"] == 0 else None)(self.wire()),
                        timeout) or self.wire()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_wire_daemon(root: Path, ckpts: dict[str, Path], **overrides: Any) -> WireDaemon:
    cfg = {
        "socket": str(root / "run" / "wire.sock"),   # the server creates run/ itself
        "model_dir": str(next(iter(ckpts.values())).parent),
        "socket_mode": 0o666,          # reachable by nobody, so the POLICY is what refuses it
        "fetch_uids": [0], "fetch_groups": [FETCH_GROUP],
        "operator_uids": [], "operator_groups": [],
        "idle_timeout_s": 2.5, "frame_timeout_s": 1.0, "event_timeout_s": 1.0,
        "max_conns_per_uid": 80, "slow": {"slow": 1.5}, "queue_max": 500,
    }
    cfg.update(overrides)
    root.mkdir(parents=True, exist_ok=True)
    cfg_path = root / "wire.json"
    cfg_path.write_text(json.dumps(cfg))
    log = root / "wire.log"
    proc = subprocess.Popen([PY, "-m", "tests.wire.wiredaemon", str(cfg_path)], cwd=REPO,
                            env=client_env(), stdout=subprocess.PIPE, stderr=open(log, "w"),
                            text=True)
    d = WireDaemon(socket=cfg["socket"], proc=proc, ckpts=ckpts, cfg=cfg, log=log)
    try:
        line = read_line(proc, 60)
    except AssertionError:
        d.stop()
        raise AssertionError(f"wire daemon did not start: {log.read_text()}")
    assert line.startswith("READY"), line
    d.builder = line.split()[-1]
    return d


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_checkpoints(tmp_path_factory.mktemp("wire-ckpts"))


@pytest.fixture(scope="session")
def wired(tmp_path_factory: pytest.TempPathFactory, ckpts: dict[str, Path]) -> Iterator[WireDaemon]:
    d = start_wire_daemon(tmp_path_factory.mktemp("wire-daemon"), ckpts)
    yield d
    rc = d.stop()
    log = d.log.read_text()
    assert rc == 0, f"wire daemon exited with {rc}: {log[-3000:]}"
    assert "Traceback" not in log, log[-5000:]
