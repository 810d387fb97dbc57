"""Lifecycle: signals at bad moments, a broken config on reload, a crash and a restart.

(The fourth lifecycle promise - nothing in the model directory is ever written - is checked after
EVERY test of this suite by the autouse guard in conftest.py.)
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from devmapd.client import DevmapdError
from devmapd.wire import protocol as P
from tests.harness import sim_gpu
from tests.reliability import inputs as I
from tests.reliability.conftest import ModelDirGuard, module_daemon

SHUTDOWN_LIMIT_S = 10.0   # daemon.SHUTDOWN_TIMEOUT_S: what the daemon promises systemd


def test_sigterm_during_loads_exits_cleanly_within_the_timeout(rdaemon, guard: ModelDirGuard) -> None:
    d = rdaemon(name="term", extra_config='[normalize]\ngpu_dtype = "bfloat16"\n')   # slow (casting) loads
    guard.save(I.versioned(1), d.model_dir / "small.pt")
    d.wait_model("small")
    staging = d.model_dir.parent / "stage"
    staging.mkdir()
    for i in range(4):
        torch.save(I.big_versioned(i, 64), staging / f"big{i}.pt")
    started = []
    trig = I.OnLoading(d.socket, "big0", lambda: (started.append(time.monotonic()), d.proc.send_signal(signal.SIGTERM)))
    try:
        for i in range(4):
            guard.replace(staging / f"big{i}.pt", d.model_dir / f"big{i}.pt")
        assert trig.fired.wait(30), trig.error or d.log()[-3000:]
    finally:
        trig.close()
    try:
        code = d.proc.wait(SHUTDOWN_LIMIT_S + 10)      # a deadline, not a performance figure
    except subprocess.TimeoutExpired:
        raise AssertionError("the daemon did not exit after SIGTERM during loads:\n" + d.log()[-3000:])
    log = d.log()
    assert code == 0, f"exit code {code}:\n{log[-3000:]}"
    assert "SIGTERM received" in log and "stopping" in log
    assert "Traceback" not in log, log[-3000:]
    assert not os.path.exists(d.socket), "the socket file was left behind"


def _subscribe(path: str):
    s = I.raw_connect(path, timeout=15)
    P.send_frame(s, P.request(1, "subscribe"))
    assert P.recv_frame(s, max_fds=0)[0]["ok"]
    return s


def _next_log_event(s) -> dict:
    while True:
        msg, _ = P.recv_frame(s, max_fds=0)
        ev = msg.get("event") or {}
        if ev.get("type") == "log" and not ev.get("replay"):   # a new subscriber is sent recent ones first
            return ev


def _admitted(path: str, n: int) -> tuple[list, int]:
    """Open n connections; return them and how many were refused as busy."""
    socks, busy = [], 0
    for i in range(n):
        s = I.raw_connect(path)
        socks.append(s)
        try:
            P.send_frame(s, P.request(i, "hello"))
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply, _ = P.recv_frame(s, max_fds=0)
        busy += (not reply["ok"]) and reply["error"]["code"] == "busy"
    return socks, busy


def _ready(d, name: str) -> bool:
    try:
        return d.model(name)["state"] == "ready"
    except DevmapdError:   # busy: the closed connections are not given back yet
        return False


def _close(socks) -> None:
    for s in socks:
        s.close()


@pytest.fixture(scope="module")
def hup(tmp_path_factory):
    extra = '[server]\nfetch_uids = [0]\nsocket_group = "nogroup"\nmax_connections_per_uid = 4\n'
    for handle in module_daemon(tmp_path_factory, "hup", extra_config=extra):
        from tests.reliability.conftest import _GUARD

        _GUARD.save(I.versioned(1), handle.model_dir / "m.pt")
        handle.wait_model("m")
        handle.good_config = handle.config_file.read_text()
        yield handle


def _reload(d, text: str, events) -> dict:
    d.config_file.write_text(text)
    d.proc.send_signal(signal.SIGHUP)
    return _next_log_event(events)


def test_sighup_with_a_broken_config_keeps_the_old_one_and_says_why(hup) -> None:
    """The new file would let uid nobody fetch and raise the connection cap, but misspells a key:
    the whole file is refused, the error names the key (log + an event to subscribers), and the
    running config stays in force: nobody is still refused, the cap is still 4."""
    d = hup
    events = _subscribe(d.socket)          # counts as one of uid 0's 4 connections
    try:
        broken = d.good_config.replace("fetch_uids = [0]", "fetch_uids = [0, 65534]").replace(
            "max_connections_per_uid = 4", "max_connections_per_uid = 100\nmax_conections_per_uid = 1")
        ev = _reload(d, broken, events)
        assert ev["level"] == "error" and "max_conections_per_uid" in ev["message"], ev
        assert "config reload failed" in d.log()
        assert I.as_nobody(d.socket)["fetch"]["code"] == "forbidden"
        socks, busy = _admitted(d.socket, 4)   # 1 subscriber + 3 admitted + 1 refused: the OLD cap
        _close(socks)
        assert busy == 1, busy
    finally:
        events.close()
        d.config_file.write_text(d.good_config)
    assert I.wait_until(lambda: _ready(d, "m"), 10)   # slots come back asynchronously
    with d.client() as c:
        assert I.version_of(c.fetch("m")) == 1


def test_sighup_with_a_good_config_applies_what_it_reports_reloaded(hup) -> None:
    """A valid reload reported as "config reloaded" must be in force: the new fetch list and the
    new per-uid connection cap (or the daemon must say which keys need a restart)."""
    d = hup
    events = _subscribe(d.socket)
    try:
        good = d.good_config.replace("fetch_uids = [0]", "fetch_uids = [0, 65534]").replace(
            "max_connections_per_uid = 4", "max_connections_per_uid = 100")
        ev = _reload(d, good, events)
        assert ev["level"] == "info" and "config reloaded" in ev["message"], ev
        assert I.as_nobody(d.socket)["fetch"]["ok"] is True
        socks, busy = _admitted(d.socket, 8)
        _close(socks)
        restart_note = "restart" in d.log().split("config reloaded")[-2][-500:]
        assert busy == 0 or restart_note, (f"{busy} of 8 connections refused after a reload that raised "
                                           "server.max_connections_per_uid from 4 to 100 and said nothing")
    finally:
        events.close()


def test_restart_after_a_crash_restores_pins_and_remaps(rdaemon, guard) -> None:
    gpus = [sim_gpu(0, 1024), sim_gpu(1, 1024)]
    d = rdaemon(name="crash", gpus=gpus)
    guard.save(I.versioned(1), d.model_dir / "pinned.pt")
    guard.save(I.versioned(2), d.model_dir / "remapped.pt")
    d.wait_model("pinned")
    d.wait_model("remapped")
    with d.client() as c:
        c.pin("pinned", "cuda:1")
        c.remap("remapped", "cpu")
    d.wait_for(lambda st: I.model_of(st, "pinned")["placement"].keys() == {"cuda:1"}
               and I.model_of(st, "remapped")["placement"].keys() == {"cpu"}, what="pin and remap applied")
    d.proc.kill()                      # a crash: no clean shutdown, nothing saved at exit
    d.proc.wait(10)
    again = rdaemon(name="crash2", model_dir=d.model_dir, state_dir=d.state_dir, gpus=gpus)
    p = again.wait_model("pinned")
    r = again.wait_model("remapped")
    assert p["pinned"] and p["pin"] == "cuda:1" and p["placement"].keys() == {"cuda:1"}, p
    assert r["placement"].keys() == {"cpu"} and not r["pinned"], r
    with again.client() as c:
        assert I.version_of(c.fetch("pinned")) == 1 and I.version_of(c.fetch("remapped")) == 2
