"""sd_notify, watchdog, LISTEN_FDS and journald logging against real sockets and processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from devmapd.service import systemd
from devmapd.service.systemd import Notifier


def test_notify_sequence_over_a_real_datagram_socket(fake_systemd):
    n = Notifier(fake_systemd.address)
    assert n.enabled

    assert n.ready("2 models ready, 1 loading, 2 GPUs")
    ready = fake_systemd.recv()
    assert ready.lines == ["READY=1", "STATUS=2 models ready, 1 loading, 2 GPUs"]
    # systemd's NotifyAccess=main compares this pid (SCM_CREDENTIALS) with the main pid.
    assert ready.pid == os.getpid()

    assert n.status("3 models ready\n  0 loading")  # one line, whatever the caller passes
    assert fake_systemd.recv().lines == ["STATUS=3 models ready 0 loading"]
    assert n.watchdog()
    assert fake_systemd.recv().lines == ["WATCHDOG=1"]

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading = fake_systemd.recv()
    assert reloading.lines[0] == "RELOADING=1"
    assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after
    assert n.ready()
    assert fake_systemd.recv().lines == ["READY=1"]

    assert n.stopping()
    assert fake_systemd.recv().lines == ["STOPPING=1"]
    n.close()


def test_abstract_socket_address(make_fake_systemd):
    fake = make_fake_systemd(f"@devmapd-test-{os.getpid()}-{time.monotonic_ns()}")
    n = Notifier.from_env({"NOTIFY_SOCKET": fake.address})
    assert n.ready("abstract")
    note = fake.recv()
    assert note.lines == ["READY=1", "STATUS=abstract"] and note.pid == os.getpid()


def test_notifier_without_notify_socket_is_a_silent_no_op():
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.ready("x") is False
    assert n.watchdog() is False
    assert n.fdstore([0], "name") is False
    assert n.watchdog_interval() is None


def test_lost_service_manager_does_not_raise(tmp_path):
    # The socket path does not exist (systemd went away): report False, log once, never raise.
    n = Notifier(str(tmp_path / "gone.sock"))
    assert n.ready() is False
    assert n.status("still fine") is False


def test_bad_notify_socket_value_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="absolute path"):
        Notifier("relative/notify.sock")


def test_fd_names_are_validated_like_systemd(fake_systemd):
    n = Notifier(fake_systemd.address)
    for bad in ("", "a:b", "x" * 256, "tab\there", "caf\u00e9"):
        with pytest.raises(ValueError):
            n.fdstore([0], bad)
    assert fake_systemd.drain(0.05) == []


def test_watchdog_interval_follows_watchdog_pid():
    me = str(os.getpid())
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert systemd.watchdog_timeout({"WATCHDOG_USEC": "4000000"}) == 4.0
    n = Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": me})
    assert n.watchdog_interval() == 1.0


def test_running_under_systemd_detection():
    assert systemd.running_under_systemd({"INVOCATION_ID": "0123abcd"})
    assert not systemd.running_under_systemd({})
    st = os.fstat(2)
    assert systemd.journal_stream_matches(2, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not systemd.journal_stream_matches(2, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not systemd.journal_stream_matches(2, {"JOURNAL_STREAM": "garbage"})


LISTEN_CHILD = r"""
import fcntl, json, os, sys
from devmapd.service import systemd
before = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
fds = systemd.listen_fds()
sock = systemd.listen_socket(fds)
out = {
    "fds": fds,
    "cloexec": {str(fd): bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for v in fds.values() for fd in v},
    "env_left": [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ],
    "contents": {name: [os.pread(fd, 64, 0).decode() for fd in v] for name, v in fds.items() if name != "devmapd-listen"},
}
if sock is not None:
    sock.setblocking(True)
    conn, _ = sock.accept()
    conn.sendall(b"hello from the activated child")
    conn.close()
print(json.dumps(out))
"""


def test_listen_fds_in_a_process_started_like_systemd_does(tmp_path, listen_exec, child_env):
    sock_path = str(tmp_path / "devmapd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(4)
    files = []
    for text in ("first", "second", "third"):
        fd = os.memfd_create(text)
        os.write(fd, text.encode())
        files.append(fd)
    try:
        named = [("devmapd-listen", listener.fileno()), ("alpha", files[0]), ("beta", files[1]), ("alpha", files[2])]
        argv, pass_fds = listen_exec(named, [sys.executable, "-c", LISTEN_CHILD])
        proc = subprocess.Popen(argv, pass_fds=pass_fds, env=child_env, stdout=subprocess.PIPE, text=True)
        # The socket was handed over before we connect: the child accepts on the inherited fd.
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(20)
        client.connect(sock_path)
        assert client.recv(100) == b"hello from the activated child"
        client.close()
        stdout, _ = proc.communicate(timeout=60)
    finally:
        listener.close()
        for fd in files:
            os.close(fd)
    assert proc.returncode == 0
    out = json.loads(stdout)
    assert out["fds"] == {"devmapd-listen": [3], "alpha": [4, 6], "beta": [5]}
    assert out["contents"] == {"alpha": ["first", "third"], "beta": ["second"]}
    assert all(out["cloexec"].values()), out["cloexec"]
    assert out["env_left"] == []


def test_listen_fds_ignores_fds_meant_for_another_pid(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "2")
    assert systemd.listen_fds() == {}
    assert "LISTEN_FDS" not in os.environ


JOURNAL_CHILD = r"""
import logging, sys
from devmapd.service.systemd import configure_logging
configure_logging("debug", under_systemd=None)
configure_logging("debug", under_systemd=None)   # idempotent: still one handler
log = logging.getLogger("devmapd.test")
log.debug("dbg")
log.info("model ready")
log.warning("pressure on cuda:0")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("load failed")
log.critical("giving up")
"""


def test_journald_logging_prefixes_every_line_and_drops_timestamps(tmp_path, child_env):
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        st = os.fstat(f.fileno())
        env = dict(child_env, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", INVOCATION_ID="abc123")
        subprocess.run([sys.executable, "-c", JOURNAL_CHILD], stderr=f, env=env, check=True, timeout=60)
    lines = err.read_text().splitlines()
    assert lines[:3] == ["<7>devmapd.test: dbg", "<6>devmapd.test: model ready", "<4>devmapd.test: pressure on cuda:0"]
    assert lines[3] == "<3>devmapd.test: load failed"
    traceback_lines = lines[4:-1]
    assert traceback_lines and all(line.startswith("<3>") for line in traceback_lines)
    assert any("ZeroDivisionError" in line for line in traceback_lines)
    assert lines[-1] == "<2>devmapd.test: giving up"


def test_logging_outside_systemd_has_timestamps_and_no_prefix(tmp_path, child_env):
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        subprocess.run([sys.executable, "-c", JOURNAL_CHILD], stderr=f, env=child_env, check=True, timeout=60)
    lines = err.read_text().splitlines()
    assert lines[1].endswith(" INFO devmapd.test: model ready")
    assert lines[1][:4].isdigit()  # the year of the asctime stamp
    assert not any(line.startswith("<") for line in lines)


def test_under_systemd_but_not_the_journal_drops_timestamps_only(tmp_path, child_env):
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        env = dict(child_env, INVOCATION_ID="abc123")  # e.g. StandardError=file:...
        subprocess.run([sys.executable, "-c", JOURNAL_CHILD], stderr=f, env=env, check=True, timeout=60)
    assert err.read_text().splitlines()[1] == "devmapd.test: model ready"


def test_bad_log_level_is_refused():
    with pytest.raises(ValueError, match="unknown log level"):
        systemd.configure_logging("loud", under_systemd=False)


FORGING_CHILD = r"""
import logging
from devmapd.service.systemd import configure_logging
configure_logging("debug", under_systemd=None)
log = logging.getLogger("devmapd.test")
name = "evil\n2026-01-01 00:00:00,000 CRITICAL devmapd: FAKE\n<2>devmapd: FAKE\x1b[31m\x07"
log.info("%s: placed on cpu", name)
try:
    raise ValueError(f"cannot read {name}")
except ValueError:
    log.exception("load of %s failed", name)
log.warning("after")
"""


@pytest.mark.parametrize("journal", [False, True], ids=["plain", "journal"])
def test_a_name_cannot_forge_a_log_line_or_reach_the_terminal(tmp_path, child_env, journal):
    """A newline in a logged name would write a whole fake record, ESC/BEL would reach the
    terminal of whoever tails the log: the message becomes one line with them escaped, and
    every continuation line (traceback, exception text) is marked, so none reads as a record."""
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        env = dict(child_env)
        if journal:
            st = os.fstat(f.fileno())
            env.update(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", INVOCATION_ID="abc123")
        subprocess.run([sys.executable, "-c", FORGING_CHILD], stderr=f, env=env, check=True, timeout=60)
    raw = err.read_bytes()
    assert not any(b < 32 and b != 10 for b in raw), raw       # no ESC, BEL, CR... only newlines
    lines = raw.decode().splitlines()
    strip = (lambda ln: ln[3:]) if journal else (lambda ln: ln)
    records = [ln for ln in map(strip, lines) if not ln.startswith(systemd.CONTINUATION)]
    # Exactly the three records logged, none forged; the name is there, escaped.
    assert len(records) == 3, lines
    assert "FAKE" not in "".join(ln.split(": ", 1)[0] for ln in records)
    assert records[0].endswith(r"evil\n2026-01-01 00:00:00,000 CRITICAL devmapd: FAKE\n<2>devmapd: FAKE"
                               r"\x1b[31m\x07: placed on cpu"), records[0]
    assert "load of evil\\n" in records[1] and records[2].endswith("after")
    assert any("Traceback" in ln for ln in lines) and any("ValueError: cannot read evil" in ln for ln in lines)
    if journal:
        assert all(ln[:3] in ("<6>", "<3>", "<4>") for ln in lines), lines
