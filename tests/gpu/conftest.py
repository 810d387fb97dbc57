"""Shared helpers for the tests that need a real NVIDIA GPU (issue 7).

Everything in tests/gpu/ is skipped cleanly where torch sees no CUDA device; the NVML
fixtures also skip when pynvml cannot initialise. Nothing here simulates a GPU.

What lives here (used by test_nvml_inventory.py, test_daemon_gpu.py and bench_gpu_load.py):

* :func:`start_gpu_daemon` - a REAL ``python -m devmapd serve`` with the ``nvml`` device
  backend (no ``--simulate``), fast polls, its own model/state/socket directories. The
  harness in tests/harness.py always passes ``--simulate``; this is its real-hardware twin and
  returns the same :class:`tests.harness.DaemonHandle`.
* :class:`ClientProc` - an unrelated client process (a fresh interpreter, never a fork) driven
  line by line over stdin/stdout: ``init``, ``fetch NAME [MAP_LOCATION]``, ``check NAME``,
  ``drop NAME``, ``exit``. It can run as another uid (``setpriv``), as production clients do.
* :class:`GpuMemory` - the whole device's memory as NVML reports it (what other users see).
* :func:`write_int_checkpoint` - a checkpoint of int32 ``arange`` tensors whose sums are known
  in closed form, so a client can verify gigabytes it fetched without a second copy.
"""
from __future__ import annotations

import grp
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.harness import DaemonHandle, devmapd_cmd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MIB = 1 << 20
GIB = 1 << 30
HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False here)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test of this directory when there is no CUDA device (the hook sees all items)."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------ identity

def bare_uuid(uuid: str) -> str:
    """A GPU UUID without NVML's ``GPU-`` prefix, lower case (torch prints it without)."""
    u = str(uuid).strip().lower()
    return u[4:] if u.startswith("gpu-") else u


def torch_uuids() -> list[str]:
    """UUIDs of this process's cuda:0, cuda:1, ... exactly as torch prints them."""
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


# ------------------------------------------------------------------------------------ NVML

class GpuMemory:
    """One GPU's memory as NVML sees it: the whole device, every process counted."""

    def __init__(self, uuid: str):
        import pynvml

        self._nv = pynvml
        pynvml.nvmlInit()
        self.uuid = "GPU-" + bare_uuid(uuid)
        self.handle = pynvml.nvmlDeviceGetHandleByUUID(self.uuid)

    def info(self) -> tuple[int, int, int]:
        m = self._nv.nvmlDeviceGetMemoryInfo(self.handle)
        return int(m.total), int(m.free), int(m.used)

    def free(self) -> int:
        return self.info()[1]

    def used(self) -> int:
        return self.info()[2]

    def settled_free(self, samples: int = 3, gap_s: float = 0.1) -> int:
        """The smallest of a few readings (NVML lags allocations/frees by a moment)."""
        vals = []
        for _ in range(samples):
            vals.append(self.free())
            time.sleep(gap_s)
        return min(vals)

    def wait_free(self, at_least: int, timeout: float) -> tuple[bool, int]:
        """Poll until free >= at_least; returns (reached, last reading)."""
        deadline = time.monotonic() + timeout
        last = self.free()
        while last < at_least and time.monotonic() < deadline:
            time.sleep(0.1)
            last = self.free()
        return last >= at_least, last


def nvml_or_skip() -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as exc:  # noqa: BLE001 - any NVML failure means: cannot run these here
        pytest.skip(f"NVML is not usable here ({type(exc).__name__}: {exc})")


@pytest.fixture(scope="session")
def pynvml_mod() -> Any:
    return nvml_or_skip()


@pytest.fixture(scope="session")
def gpu0(pynvml_mod: Any) -> GpuMemory:
    """cuda:0 of this process, measured through NVML."""
    return GpuMemory(torch_uuids()[0])


# ------------------------------------------------------------------------------------ checkpoints

def write_int_checkpoint(path: Path, nbytes: int, *, tensors: int = 4, seed: int = 0) -> dict[str, int]:
    """Save ``tensors`` int32 tensors of ``nbytes`` in total; returns key -> exact int64 sum.

    Tensor k holds ``arange(n) + c_k`` with ``c_k = seed * 1000 + 7 * k``, so its sum is
    ``n (n - 1) / 2 + c_k n`` - checkable on the GPU with one reduction, no host copy.
    """
    n = nbytes // 4 // tensors
    sd, sums = {}, {}
    for k in range(tensors):
        c = seed * 1000 + 7 * k
        key = f"layers.{k}.weight"
        sd[key] = torch.arange(n, dtype=torch.int32) + c
        sums[key] = n * (n - 1) // 2 + c * n
    tmp = path.with_name(path.name + ".tmp")      # the watcher ignores *.tmp until the rename
    torch.save(sd, tmp)
    os.replace(tmp, path)
    return sums


# ------------------------------------------------------------------------------------ the daemon

GPU_CONFIG = """
log_level = "debug"
[server]
socket_group = "{socket_group}"
socket_mode = "0660"
[devices]
backend = "nvml"
poll_interval_s = {poll_s}
reserve_mib = 0
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
load_workers = 1
preload_order = "name"
keep_host_copy = {keep_host_copy}
"""


def open_dir(prefix: str = "devmapd-gpu-") -> Path:
    """A fresh 0755 directory under /tmp: an unprivileged client must traverse to the socket
    (pytest's tmp_path is 0700 under root's /tmp/pytest-of-root)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


def nobody_group() -> str | None:
    try:
        return grp.getgrgid(65534).gr_name
    except KeyError:
        return None


def start_gpu_daemon(base: Path, *, model_dir: Path | None = None, low_mib: int = 256, high_mib: int = 512,
                     cooldown_s: float = 1.0, poll_s: float = 0.2, socket_group: str = "",
                     keep_host_copy: bool = False, extra_config: str = "",
                     env: dict[str, str] | None = None, timeout: float = 60.0) -> DaemonHandle:
    """Start ``devmapd serve`` on the real NVML backend under ``base``; wait until it answers."""
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    mdir = model_dir or (base / "models")
    mdir.mkdir(exist_ok=True)
    sdir = base / "state"
    cfg = base / "devmapd.toml"
    cfg.write_text(GPU_CONFIG.format(socket_group=socket_group, poll_s=poll_s, low_mib=low_mib,
                                     high_mib=high_mib, cooldown_s=cooldown_s,
                                     keep_host_copy=str(keep_host_copy).lower()) + extra_config)
    sock = str(base / "run" / "devmapd.sock")
    log_file = base / "daemon.log"
    argv = devmapd_cmd("serve", "--config", str(cfg), "--model-dir", str(mdir), "--socket", sock,
                       "--state-dir", str(sdir))
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("NOTIFY_SOCKET", None)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(ROOT))
    handle = DaemonHandle(proc=proc, socket=sock, model_dir=mdir, state_dir=sdir, sim_file=cfg,
                          config_file=cfg, log_file=log_file, argv=argv)
    try:
        handle.wait_for(lambda st: True, timeout=timeout, what="the nvml daemon to answer on its socket")
    except BaseException:
        stop_daemon(handle)
        raise
    return handle


def stop_daemon(handle: DaemonHandle, label: str = "") -> None:
    """Stop it and keep its log where run-on-gpu.sh collects logs ($DEVMAPD_GPU_LOGS)."""
    try:
        handle.stop()
    finally:
        logs = os.environ.get("DEVMAPD_GPU_LOGS")
        if logs:
            Path(logs).mkdir(parents=True, exist_ok=True)
            name = (label or handle.log_file.parent.name).replace("/", "_")
            try:
                shutil.copy(handle.log_file, Path(logs) / f"{name}-daemon.log")
            except OSError:
                pass


def placement_of(handle: DaemonHandle, name: str) -> dict[str, int]:
    m = handle.model(name)
    return dict(m["placement"]) if m else {}


def wait_placed(handle: DaemonHandle, name: str, device: str, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until ``name`` is ready and sits entirely on ``device``."""
    def check(st: dict[str, Any]) -> dict[str, Any] | None:
        for m in st["models"]:
            if m["name"] == name and m["state"] == "ready" and set(m["placement"]) == {device}:
                return m
        return None

    return handle.wait_for(check, timeout, what=f"{name} to be ready on {device}")


@pytest.fixture
def gpu_daemon_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., DaemonHandle]]:
    """Start nvml daemons under fresh 0755 dirs; all stopped (logs kept) and removed at teardown."""
    started: list[tuple[DaemonHandle, Path]] = []

    def start(**kwargs: Any) -> DaemonHandle:
        base = open_dir()
        h = start_gpu_daemon(base, **kwargs)
        started.append((h, base))
        return h

    yield start
    for h, base in started:
        stop_daemon(h, request.node.name)
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------------ clients

CLIENT_SRC = r'''
import gc, json, os, sys, time, traceback, warnings
sock = sys.argv[1]
held = {}
client = None

def out(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()

import torch

def summary(obj):
    res = {}
    for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
        if not isinstance(v, torch.Tensor):
            continue
        if v.dtype.is_floating_point:
            s = v.sum(dtype=torch.float64).item()
        elif v.dtype == torch.bool:
            s = int(v.sum().item())
        else:
            s = int(v.sum(dtype=torch.int64).item())
        res[str(k)] = [str(v.device), str(v.dtype).replace("torch.", ""), s, v.numel()]
    return res

for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    try:
        if cmd == "init":
            # Pay every one-time cost before anything is measured: imports, the CUDA context,
            # the connection.
            import devmapd.engine.arena, devmapd.gpu.cuda_share, torch.multiprocessing.reductions
            from devmapd.client import Client
            torch.cuda.init()
            torch.ones(1, device="cuda").add_(1)
            torch.cuda.synchronize()
            client = Client(sock, timeout=120)
            client.hello()
            out(ok=True, pid=os.getpid(), uid=os.getuid(), devices=torch.cuda.device_count())
        elif cmd == "fetch":
            name, _, ml = arg.partition(" ")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                obj = client.fetch(name, ml or None)
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) * 1000
            held[name] = obj
            out(ok=True, ms=ms, summary=summary(obj), warnings=[str(w.message) for w in caught])
        elif cmd == "check":
            torch.cuda.synchronize()
            out(ok=True, summary=summary(held[arg]))
        elif cmd == "drop":
            held.pop(arg, None)
            gc.collect()
            torch.cuda.synchronize()
            client.release(arg)
            out(ok=True)
        elif cmd == "exit":
            out(ok=True)
            break        # a plain interpreter exit, still holding whatever it fetched
        else:
            out(ok=False, error=f"unknown command {cmd!r}")
    except Exception as e:
        out(ok=False, error=f"{type(e).__name__}: {e}", tb=traceback.format_exc())
'''


class ClientProc:
    """An unrelated client process, driven one command at a time (see CLIENT_SRC)."""

    def __init__(self, socket: str, *, env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
                 python: str = sys.executable, cwd: Path = ROOT):
        self.err = tempfile.TemporaryFile()
        # bufsize=0: stdout is a raw pipe, so select() never waits on a line already buffered here.
        self.proc = subprocess.Popen([*prefix, python, "-c", CLIENT_SRC, socket], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, cwd=str(cwd), bufsize=0,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-4000:]

    def cmd(self, line: str, timeout: float = 120.0, *, check: bool = True) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"client did not answer {line!r} within {timeout:g}s\n{self.stderr()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            raw = self.proc.stdout.readline()
            if not raw:
                raise AssertionError(f"client exited ({self.proc.poll()}) during {line!r}\n{self.stderr()}")
            text = raw.decode(errors="replace").strip()
            if not text.startswith("{"):
                continue           # stray prints from libraries
            reply = json.loads(text)
            if check and not reply.get("ok"):
                raise AssertionError(f"client {line!r} failed: {reply.get('error')}\n{reply.get('tb', '')}"
                                     f"\n{self.stderr()}")
            return reply

    def exit(self, timeout: float = 60.0) -> int:
        """Ask it to end with a plain interpreter exit (it keeps what it holds until then)."""
        if self.proc.poll() is None:
            try:
                self.cmd("exit", timeout)
            except (AssertionError, OSError):
                pass
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def kill(self) -> int:
        """SIGKILL: no deleter, no atexit - the way a crashed or OOM-killed client ends."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait(30)
        self.close()
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self.err.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., ClientProc]]:
    """Start ClientProc processes; any still running at teardown is killed."""
    made: list[ClientProc] = []

    def make(socket: str, **kwargs: Any) -> ClientProc:
        c = ClientProc(socket, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        if c.proc.poll() is None:
            c.kill()


HOG_SRC = r'''
import sys, torch
leave = int(sys.argv[1])
torch.ones(1, device="cuda")
free, total = torch.cuda.mem_get_info()
take = max(0, free - leave) // (2 << 20) * (2 << 20)
x = torch.empty(take, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print(f"took {take} left {torch.cuda.mem_get_info()[0]}", flush=True)
sys.stdin.readline()
'''


class Hog:
    """Another user's job: takes all of cuda:0 but ``leave`` bytes until told to exit."""

    def __init__(self, leave: int, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, "-c", HOG_SRC, str(leave)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                     env={**os.environ, **(env or {})})
        assert self.proc.stdout is not None
        self.line = self.proc.stdout.readline().decode(errors="replace").strip()
        if not self.line.startswith("took"):
            rest = self.proc.stdout.read().decode(errors="replace") if self.proc.poll() is not None else ""
            self.release()
            raise AssertionError(f"the memory hog failed: {self.line}\n{rest[-3000:]}")

    def release(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"\n")
                self.proc.stdin.flush()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(30)
