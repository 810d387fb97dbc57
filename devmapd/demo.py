"""`devmapd demo`: a newcomer's first command.

It writes a handful of small, real checkpoints of the kinds labs have (plain, DDP-prefixed,
fp16, saved on cuda:1, a sharded Hugging Face directory, one broken) into a temporary model
directory, starts a real daemon on two simulated GPUs, opens the dashboard on it, and removes
everything on exit — also on Ctrl-C, SIGTERM or an error.

Simulated pressure: `x` in the dashboard, or `devmapd demo --pressure on|off` from a second
terminal, rewrites the simulate file (new file + os.replace, which the daemon re-reads every
poll) so a simulated training job fills one GPU and devmapd visibly demotes a model. The second
terminal finds the running demo through a small state file (`state_file_path()`).

    devmapd demo                  # dashboard (needs a terminal)
    devmapd demo --no-tui         # headless: print status, then the daemon's decisions
    devmapd demo --pressure on    # from another terminal, while a demo runs
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MIB = 1 << 20

# Two small simulated GPUs, so the demo's few-MiB models visibly fill the memory bars.
DEMO_GPUS = [
    {"name": "Simulated A100 (demo)", "uuid": "GPU-de30a100-0000-4000-8000-000000000000",
     "total_mib": 512, "used_by_others_mib": 96, "utilization": 35},
    {"name": "Simulated RTX 4090 (demo)", "uuid": "GPU-de304090-0001-4000-8000-000000000001",
     "total_mib": 256, "used_by_others_mib": 48, "utilization": 8},
]

# Watermarks sized to the demo GPUs (the defaults are for real, multi-GiB cards).
LOW_MIB = 64
HIGH_MIB = 128
DEMO_CONFIG = f"""\
# Written by `devmapd demo`: defaults scaled down to two small simulated GPUs.
log_level = "info"
[devices]
poll_interval_s = 0.5
reserve_mib = 16
max_fraction = 0.95
[pressure]
low_watermark_mib = {LOW_MIB}
high_watermark_mib = {HIGH_MIB}
cooldown_s = 10.0
[watch]
settle_s = 0.3
"""

READY_TIMEOUT_S = 60.0


class DemoError(Exception):
    """The demo could not start; the message says why and what to try."""


@dataclass
class DemoInfo:
    """What a second terminal needs to reach a running demo (the state file's contents)."""
    pid: int
    workdir: str
    socket: str
    simulate: str
    model_dir: str
    log: str
    pressure: bool = False


def state_file_path() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "devmapd-demo.json"
    return Path(tempfile.gettempdir()) / f"devmapd-demo-{os.getuid()}.json"


def _write_json_atomic(path: Path, data: Any) -> None:
    # A new file renamed into place: the daemon (or a reader) never sees half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- sample models

def write_demo_models(model_dir: Path, *, tiny: bool = False) -> dict[str, Path]:
    """Real checkpoints written by torch/safetensors (devmapd.samples), under descriptive names.
    `tiny` leaves out the two MiB-sized ones (quick checks of the demo itself)."""
    import torch

    from devmapd import samples

    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir.parent / "staging"
    staging.mkdir(exist_ok=True)
    written = {
        "plain-state-dict.pt": samples.plain(staging),
        # A real DistributedDataParallel state dict. `tiny` uses nn.DataParallel, whose keys are
        # the same "module."-prefixed layout, because a gloo process group takes seconds to start.
        "ddp-module-prefix.pt": samples.dataparallel(staging) if tiny else samples.ddp(staging),
        "fp16-weights.pt": samples.fp16(staging),
        "saved-on-cuda1.pt": samples.saved_on_cuda(staging, devices=("cuda:1",), name="cuda1.pt"),
        "hf-sharded": samples.hf_safetensors(staging),
        "broken-truncated.pt": samples.truncated(staging),
    }
    if not tiny:
        # Two bigger ones so the memory bars and a demotion are visible at MiB scale.
        written["toy-llm-fp16.pt"] = samples.big(staging, 96 * MIB, count=24, dtype=torch.float16,
                                                 name="toy-llm.pt")
        written["toy-vit.pt"] = samples.big(staging, 40 * MIB, count=12, name="toy-vit.pt")
    out: dict[str, Path] = {}
    # Moved in complete, before the daemon starts, so it never sees a half-written file.
    for name, src in written.items():
        dest = model_dir / name
        os.replace(src, dest)
        out[name] = dest
    shutil.rmtree(staging, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- pressure

def apply_pressure(info: DemoInfo, on: bool) -> str:
    """Make a simulated job fill (or leave) the GPU where devmapd holds the most; returns a
    sentence saying what changed and what to watch for."""
    sim = Path(info.simulate)
    data = json.loads(sim.read_text())
    gpus = data.get("gpus") or []
    if not gpus:
        raise DemoError(f"{sim} lists no GPUs; is this a devmapd demo simulate file?")
    if not on:
        for g, base in zip(gpus, DEMO_GPUS):
            g["used_by_others_mib"] = base["used_by_others_mib"]
            g["utilization"] = base.get("utilization")
        _write_json_atomic(sim, {"gpus": gpus})
        return ("pressure OFF: the simulated job ended; after the cooldown devmapd moves demoted "
                "models back to a GPU")
    held = _held_per_gpu(info.socket)
    index = max(range(len(gpus)), key=lambda i: (held.get(f"cuda:{i}", 0), -i))
    gpu = gpus[index]
    total = int(gpu["total_mib"])
    held_mib = held.get(f"cuda:{index}", 0) // MIB
    # Leave free memory at half the low watermark: below it, so devmapd must act.
    others = max(0, total - held_mib - LOW_MIB // 2)
    gpu["used_by_others_mib"] = others
    gpu["utilization"] = 97
    _write_json_atomic(sim, {"gpus": gpus})
    return (f"pressure ON: a simulated training job now uses {others} MiB of cuda:{index}; its free "
            f"memory is below the {LOW_MIB} MiB low watermark, so devmapd demotes models from it")


def _held_per_gpu(socket: str) -> dict[str, int]:
    try:
        from devmapd.client import Client
        with Client(socket, timeout=5.0) as client:
            status = client.status()
    except Exception:
        return {}
    return {d["id"]: int(d.get("held") or 0) for d in status.get("devices", [])
            if str(d.get("id", "")).startswith("cuda:")}


class DemoControl:
    """Handed to the dashboard: its `x` key toggles pressure through this."""

    def __init__(self, info: DemoInfo) -> None:
        self.info = info

    @property
    def pressure(self) -> bool:
        # A second terminal may have changed it (`devmapd demo --pressure`): the state file knows.
        try:
            recorded = json.loads(state_file_path().read_text())
            if recorded.get("pid") == self.info.pid:
                return bool(recorded.get("pressure"))
        except (OSError, ValueError):
            pass
        return self.info.pressure

    def set_pressure(self, on: bool) -> str:
        message = apply_pressure(self.info, on)
        self.info.pressure = on
        try:
            _write_json_atomic(state_file_path(), asdict(self.info))
        except OSError:
            pass
        return message


def pressure_command(value: str) -> int:
    """`devmapd demo --pressure on|off` from a second terminal."""
    path = state_file_path()
    try:
        info = DemoInfo(**json.loads(path.read_text()))
    except FileNotFoundError:
        print(f"devmapd demo: no demo is running (no {path}); start one with `devmapd demo`",
              file=sys.stderr)
        return 1
    except (ValueError, TypeError) as exc:
        print(f"devmapd demo: {path} is not a demo state file ({exc}); remove it and start "
              "`devmapd demo` again", file=sys.stderr)
        return 1
    if not _alive(info.pid):
        print(f"devmapd demo: the demo recorded in {path} (pid {info.pid}) is gone; start one "
              "with `devmapd demo`", file=sys.stderr)
        return 1
    try:
        print(DemoControl(info).set_pressure(value == "on"))
    except (OSError, ValueError, DemoError) as exc:
        print(f"devmapd demo: could not change pressure: {exc}", file=sys.stderr)
        return 1
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- the daemon

class DemoDaemon:
    """`python -m devmapd serve` on the demo's files, in its own process group."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.model_dir = workdir / "models"
        self.socket = str(workdir / "run" / "devmapd.sock")
        self.simulate = workdir / "gpus.json"
        self.config = workdir / "devmapd.toml"
        self.state_dir = workdir / "state"
        self.log = workdir / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        _write_json_atomic(self.simulate, {"gpus": DEMO_GPUS})
        self.config.write_text(DEMO_CONFIG)
        argv = [sys.executable, "-m", "devmapd", "serve", "--config", str(self.config),
                "--model-dir", str(self.model_dir), "--socket", self.socket,
                "--simulate", str(self.simulate), "--state-dir", str(self.state_dir)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)   # the demo's daemon is not the system service
        with open(self.log, "ab") as log:
            # Own session: a Ctrl-C in the dashboard reaches us, and we stop the daemon in order.
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict:
        from devmapd.client import Client, DaemonUnavailable

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise DemoError(f"the demo daemon exited with status {self.proc.returncode}; "
                                f"its log ends with:\n{self.log_tail()}")
            try:
                with Client(self.socket, timeout=5.0) as client:
                    return client.status()
            except DaemonUnavailable:
                time.sleep(0.2)
        raise DemoError(f"the demo daemon did not answer on {self.socket} within {timeout:.0f}s; "
                        f"its log ends with:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- headless mode

def _mib(n: int | None) -> str:
    n = int(n or 0)
    if n < MIB:
        return f"{n / 1024:.1f} KiB" if n else "0 B"
    return f"{n / MIB:.1f} MiB" if n < (1 << 30) else f"{n / (1 << 30):.1f} GiB"


def format_status(status: dict) -> str:
    lines = ["devices:"]
    for d in status.get("devices", []):
        tag = " (simulated)" if d.get("simulated") else ""
        lines.append(f"  {d.get('id', '?'):<7} {d.get('name', '?')[:28]:<28} free {_mib(d.get('free')):>10}"
                     f" of {_mib(d.get('total')):>10}  devmapd holds {_mib(d.get('held'))}{tag}")
    lines.append("models:")
    for m in sorted(status.get("models", []), key=lambda m: m.get("name", "")):
        where = ", ".join(f"{k} {_mib(v)}" for k, v in (m.get("placement") or {}).items()) or "-"
        line = f"  {m.get('name', '?'):<22} {m.get('state', '?'):<8} {where}"
        diag = m.get("diagnosis") or {}
        if diag.get("code"):
            line += f"  [{diag['code']}] {diag.get('message', '')}"
        lines.append(line)
    return "\n".join(lines)


def _settle(socket: str, timeout: float = 30.0) -> dict:
    """Wait until no model is queued or loading (or the timeout), and return that status."""
    from devmapd.client import Client

    deadline = time.monotonic() + timeout
    with Client(socket, timeout=5.0) as client:
        while True:
            status = client.status()
            busy = [m for m in status.get("models", []) if m.get("state") in ("queued", "loading")]
            if (status.get("models") and not busy) or time.monotonic() > deadline:
                return status
            time.sleep(0.2)


def run_headless(daemon: DemoDaemon, exit_after: float | None) -> int:
    from devmapd.client import Client

    status = _settle(daemon.socket)
    print(format_status(status), flush=True)
    print(f"\ndemo ready: socket {daemon.socket}\n"
          f"  try:  DEVMAPD_SOCKET={daemon.socket} devmapd status\n"
          f"        devmapd demo --pressure on     (in another terminal: squeeze a GPU)\n"
          f"  Ctrl-C stops the demo and removes its files. Decisions follow:", flush=True)
    client = Client(daemon.socket, timeout=10.0)
    timer = None
    if exit_after is not None:
        # close() ends the event iteration from another thread (the client supports that).
        timer = threading.Timer(exit_after, client.close)
        timer.daemon = True
        timer.start()
    try:
        for event in client.events(reconnect=False):
            if event.get("type") in ("decision", "removed", "connection") and event.get("message"):
                print(f"  {time.strftime('%H:%M:%S')} {event['message']}", flush=True)
    finally:
        if timer is not None:
            timer.cancel()
        client.close()
    return 0


# ----------------------------------------------------------------------------- entry

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, for `devmapd demo` (cli.py adds them to its subparser)."""
    parser.add_argument("--pressure", choices=("on", "off"),
                        help="raise/clear simulated GPU pressure in the demo running elsewhere")
    parser.add_argument("--no-tui", action="store_true",
                        help="print status and the daemon's decisions instead of the dashboard "
                             "(the default when stdout is not a terminal)")
    parser.add_argument("--exit-after", type=float, metavar="SECONDS",
                        help="stop the demo after this long (scripts, CI)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the demo's temporary directory (models, log) on exit")
    # Tests and CI: skip the two MiB-sized models (generating them is most of the start-up).
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devmapd demo",
        description="Sample checkpoints + a daemon on two simulated GPUs + the dashboard. "
                    "Everything is removed on exit.")
    add_arguments(parser)
    return parser


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_demo(argv: list[str] | None = None) -> int:
    """`devmapd demo [options]` from an argument list."""
    return run(build_parser().parse_args(argv if argv is not None else []))


def run(args: argparse.Namespace) -> int:
    """`devmapd demo` from parsed arguments (see add_arguments)."""
    if args.pressure:
        return pressure_command(args.pressure)

    headless = args.no_tui or not (sys.stdout.isatty() and sys.stdin.isatty())
    workdir = Path(tempfile.mkdtemp(prefix="devmapd-demo-"))
    daemon = DemoDaemon(workdir)
    state_path = state_file_path()
    old_handlers = {}
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then keeps it
    # ignored, but the demo promises that Ctrl-C (or kill -INT) stops it and cleans up.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            old_handlers[sig] = signal.signal(sig, _raise_interrupt)
        except (ValueError, OSError):   # not the main thread: the caller handles signals
            pass
    try:
        print(f"devmapd demo: writing sample checkpoints to {daemon.model_dir} …", flush=True)
        write_demo_models(daemon.model_dir, tiny=args.tiny)
        print("devmapd demo: starting a daemon on two simulated GPUs …", flush=True)
        daemon.start()
        daemon.wait_ready()
        info = DemoInfo(pid=os.getpid(), workdir=str(workdir), socket=daemon.socket,
                        simulate=str(daemon.simulate), model_dir=str(daemon.model_dir),
                        log=str(daemon.log))
        _write_json_atomic(state_path, asdict(info))
        if headless:
            return run_headless(daemon, args.exit_after)
        from devmapd_tui.app import DevmapdApp

        # The app turns SIGTERM/SIGHUP into a normal exit itself (an exception raised from our
        # handler inside Textual would skip its terminal shutdown); this function's `finally`
        # then stops the daemon and removes the files.
        app = DevmapdApp(daemon.socket, demo=DemoControl(info), handle_signals=True)
        if args.exit_after is not None:
            timer = threading.Timer(args.exit_after, lambda: app.call_from_thread(app.exit))
            timer.daemon = True
            timer.start()
        app.run()
        return 0
    except KeyboardInterrupt:
        return 130
    except DemoError as exc:
        print(f"devmapd demo: {exc}", file=sys.stderr)
        return 1
    finally:
        daemon.stop()
        _remove_state_file(state_path)
        if args.keep:
            print(f"devmapd demo: kept {workdir} (daemon log: {daemon.log})", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def _remove_state_file(path: Path) -> None:
    """Remove the state file only if it is ours (a second demo may have replaced it)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(run_demo(sys.argv[1:]))
