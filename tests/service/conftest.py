"""Fixtures for the service tests: a stand-in for systemd's notify socket and fd store.

``FakeSystemd`` is a REAL AF_UNIX datagram socket with SO_PASSCRED, read the way systemd reads
NOTIFY_SOCKET: the sender's pid from SCM_CREDENTIALS, fds from SCM_RIGHTS, and FDSTORE=1 /
FDSTOREREMOVE=1 applied to an in-memory fd store keyed by FDNAME. ``listen_exec_argv`` hands
stored fds to a fresh process the way systemd does (fds renumbered from 3, LISTEN_PID,
LISTEN_FDS, LISTEN_FDNAMES) through the small exec wrapper in listen_exec.py.
"""

from __future__ import annotations

import array
import os
import select
import shutil
import socket
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@dataclass
class Notification:
    lines: list[str]
    fields: dict[str, str]
    pid: int | None
    fds: list[int] = field(default_factory=list)


class FakeSystemd:
    def __init__(self, address: str) -> None:
        self.address = address  # the NOTIFY_SOCKET value ('@name' = abstract)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.store: dict[str, list[int]] = {}
        self.received: list[Notification] = []

    def recv(self, timeout: float = 10.0) -> Notification:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            raise AssertionError(f"no notification within {timeout}s; got so far: {[n.lines for n in self.received]}")
        fd_size = socket.CMSG_SPACE(253 * 4)
        cred_size = socket.CMSG_SPACE(struct.calcsize("3i"))
        data, ancdata, flags, _ = self.sock.recvmsg(65536, fd_size + cred_size, socket.MSG_CMSG_CLOEXEC)
        assert not flags & socket.MSG_CTRUNC, "ancillary data truncated"
        pid, fds = None, []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
            elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        lines = data.decode().split("\n")
        fields = dict(line.split("=", 1) for line in lines if "=" in line)
        note = Notification(lines=lines, fields=fields, pid=pid, fds=fds)
        self.received.append(note)
        self._apply(note)
        return note

    def drain(self, timeout: float = 0.2) -> list[Notification]:
        out = []
        while True:
            try:
                out.append(self.recv(timeout))
            except AssertionError:
                return out

    def _apply(self, note: Notification) -> None:
        # What systemd's service_notify_message() does with the fd store fields.
        if note.fields.get("FDSTORE") == "1":
            self.store.setdefault(note.fields.get("FDNAME", "stored"), []).extend(note.fds)
        else:
            for fd in note.fds:  # systemd closes fds that come without FDSTORE=1
                os.close(fd)
        if note.fields.get("FDSTOREREMOVE") == "1":
            for fd in self.store.pop(note.fields["FDNAME"], []):
                os.close(fd)

    def clear_store(self) -> None:
        """What `systemctl stop` does to the fd store: close everything in it."""
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)
        self.store.clear()

    def close(self) -> None:
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)
        self.store.clear()
        self.sock.close()
        if not self.address.startswith("@"):
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(tmp_path / "notify.sock"))
    yield fake
    fake.close()


@pytest.fixture
def make_fake_systemd() -> Iterator:
    made: list[FakeSystemd] = []

    def make(address: str) -> FakeSystemd:
        made.append(FakeSystemd(address))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def listen_exec_argv(named_fds: Sequence[tuple[str, int]], command: Sequence[str]) -> tuple[list[str], list[int]]:
    """(argv, pass_fds) that run ``command`` with ``named_fds`` as LISTEN_FDS from fd 3."""
    specs = [f"{name}={fd}" for name, fd in named_fds]
    return [sys.executable, str(HERE / "listen_exec.py"), *specs, "--", *command], [fd for _, fd in named_fds]


@pytest.fixture
def listen_exec():
    return listen_exec_argv


def systemd_analyze() -> str | None:
    return shutil.which("systemd-analyze")


@pytest.fixture
def child_env() -> dict[str, str]:
    """Environment for child Python processes: the repo importable, no inherited systemd vars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    env.pop("INVOCATION_ID", None)
    env.pop("JOURNAL_STREAM", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env
