"""Shared plumbing: real daemons, fresh measured processes, /proc readers, page-cache warming.

Fresh processes come from a multiprocessing *forkserver* that imports torch, numpy and
safetensors once (what a user's script has imported before its first load; not devmapd, whose
import a measured fetch pays inside its timed region).
Every measured call then runs in its own forked child: no state from an earlier call (no open
daemon connection, no cached mapping, no allocator reuse), but no 5 s interpreter start either.
torch's thread pool and devmapd's lazily imported client/arena modules start inside the child,
inside the timed region, as they would for a user.
"""
from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# The production defaults (config/devmapd.toml) except what a benchmark must pin down: no GPU
# reserve (the simulated GPUs are small), quiet logs. settle_s is the shipped default (1.0 s):
# watch-to-ready reports it separately.
DAEMON_CONFIG = """
log_level = "warning"
[devices]
reserve_mib = 0
max_fraction = 1.0
[watch]
settle_s = {settle_s}
"""
DEFAULT_SETTLE_S = 1.0

_ctx: Any = None


def ctx() -> Any:
    """The forkserver context (started on first use; preloads what a user's script imports)."""
    global _ctx
    if _ctx is None:
        c = multiprocessing.get_context("forkserver")
        # Not devmapd: a measured devmapd fetch starts its clock before `import devmapd`.
        c.set_forkserver_preload(["torch", "numpy", "safetensors.torch", "benchmarks.workers"])
        _ctx = c
    return _ctx


def _trampoline(conn: Any, fn: Callable[..., Any], args: tuple) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # report any failure to the parent instead of dying silently
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_child(fn: Callable[..., Any], *args: Any, timeout: float = 600.0) -> Any:
    """Run ``fn(*args)`` in a fresh forked process and return its (picklable) result."""
    r, w = ctx().Pipe(duplex=False)
    p = ctx().Process(target=_trampoline, args=(w, fn, args), daemon=True)
    p.start()
    w.close()
    try:
        if not r.poll(timeout):
            raise TimeoutError(f"{fn.__name__}{args!r} did not finish within {timeout:g}s")
        status, value = r.recv()
    except EOFError:
        p.join(5)
        raise RuntimeError(f"{fn.__name__}{args!r} died (exit code {p.exitcode})") from None
    finally:
        r.close()
        if p.is_alive():
            p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
    if status != "ok":
        raise RuntimeError(f"{fn.__name__} failed in its child process: {value}")
    return value


def stop_holders(conns: Iterable[Any], procs: Iterable[Any]) -> None:
    """Ask each holder process to exit (it drops what it holds), then reap it; kill one that hangs."""
    for conn in conns:
        try:
            conn.send("exit")
        except OSError:
            pass
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


# ----------------------------------------------------------------------------- /proc

def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes that map them."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss line in /proc/{pid}/smaps_rollup")


def status_fields(pid: int) -> dict[str, int]:
    """The memory lines of /proc/<pid>/status (VmRSS, RssAnon, RssFile, RssShmem...) in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()   # the command name may hold spaces
    ticks = int(fields[11]) + int(fields[12])      # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def warm(*paths: Path) -> None:
    """Read every byte of each file so the page cache is warm for every peer alike."""
    for p in paths:
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(_WARM_BUF):
                    pass


_WARM_BUF = bytearray(8 << 20)


# ----------------------------------------------------------------------------- daemons

def write_simulate(path: Path, gpus: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(json.dumps({"gpus": gpus}))
    os.replace(tmp, path)


def sim_gpu(i: int, total_mib: int) -> dict[str, Any]:
    return {"name": f"Simulated GPU {i}", "uuid": f"GPU-bench-{i:04d}", "total_mib": total_mib,
            "used_by_others_mib": 0}


@dataclass
class Daemon:
    """A real ``devmapd serve`` process on its own socket, model dir and state dir."""
    proc: subprocess.Popen
    socket: str
    model_dir: Path
    base: Path
    started: float            # time.monotonic() just before Popen
    sockdir: str | None = None   # a short-path dir made for the socket, removed at stop

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self) -> Any:
        from devmapd.client import Client
        return Client(self.socket, timeout=60.0)

    def log(self) -> str:
        try:
            return (self.base / "daemon.log").read_text(errors="replace")
        except OSError:
            return ""

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return c.status()

    def wait_ready(self, count: int, timeout: float = 600.0, interval: float = 0.05) -> float:
        """Poll status until ``count`` models are ready; returns monotonic time it was seen.

        Raises with the daemon's log tail if a model fails or the daemon dies."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        from devmapd.client import Client, DevmapdError
        c: Client | None = None
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
                try:
                    if c is None:
                        c = self.client()
                    last = c.status()
                except DevmapdError:
                    if c is not None:
                        c.close()
                    c = None
                    time.sleep(interval)
                    continue
                models = last.get("models", [])
                failed = [m for m in models if m.get("state") == "failed"]
                if failed:
                    raise RuntimeError(f"model {failed[0]['name']} failed to load: {failed[0].get('error')}")
                if sum(m.get("state") == "ready" for m in models) >= count:
                    return time.monotonic()
                time.sleep(interval)
        finally:
            if c is not None:
                c.close()
        states = {m["name"]: m["state"] for m in last.get("models", [])}
        raise TimeoutError(f"{count} models not ready within {timeout:g}s: {states}\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.sockdir:
            shutil.rmtree(self.sockdir, ignore_errors=True)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_daemon(base: Path, model_dir: Path, gpus: list[dict[str, Any]] | None = None,
                 settle_s: float = DEFAULT_SETTLE_S) -> Daemon:
    """Start ``python -m devmapd serve`` under ``base`` (returns at once; see ``wait_ready``)."""
    base.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    sim = base / "gpus.json"
    write_simulate(sim, gpus or [])
    cfg = base / "devmapd.toml"
    cfg.write_text(DAEMON_CONFIG.format(settle_s=settle_s))
    sock, sockdir = str(base / "run" / "devmapd.sock"), None
    if len(sock.encode()) > 100:   # AF_UNIX paths are limited to 108 bytes (deep pytest tmp dirs)
        sockdir = tempfile.mkdtemp(prefix="dmb-", dir="/tmp")
        sock = os.path.join(sockdir, "devmapd.sock")
    argv = [sys.executable, "-m", "devmapd", "serve", "--config", str(cfg), "--model-dir", str(model_dir),
            "--socket", sock, "--simulate", str(sim), "--state-dir", str(base / "state")]
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}
    env["PYTHONUNBUFFERED"] = "1"
    started = time.monotonic()
    with open(base / "daemon.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    return Daemon(proc, sock, model_dir, base, started, sockdir)
