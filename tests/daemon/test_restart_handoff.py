"""Restart without reloading, and the sd_notify sequence, against a real daemon.

A real AF_UNIX datagram socket stands in for systemd: it is the daemon's
NOTIFY_SOCKET, it receives READY/STATUS/STOPPING and the FDSTORE=1 memfds,
and it hands those fds to a restarted daemon as LISTEN_FDS/LISTEN_FDNAMES,
exactly as systemd's file descriptor store does.
"""

from __future__ import annotations

import array
import os
import socket
import threading
import time
from pathlib import Path

import torch

from tests.harness import start_daemon


class FakeSystemd:
    """The service manager's notify socket and fd store."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.path = path
        self.messages: list[dict[str, str]] = []
        self.store: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Like systemd, read every datagram as it arrives (the kernel queues only ~10).
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            with self._lock:
                self._handle(data, anc)

    def pump(self, seconds: float = 0.0) -> None:
        """Give in-flight datagrams time to arrive."""
        time.sleep(seconds)

    def _handle(self, data: bytes, anc: list) -> None:
        fds: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        if fields.get("FDSTORE") == "1":
            (fd,) = fds
            old = self.store.pop(fields["FDNAME"], None)
            if old is not None:
                os.close(old)
            self.store[fields["FDNAME"]] = fd
        elif fields.get("FDSTOREREMOVE") == "1":
            fd = self.store.pop(fields["FDNAME"], None)
            if fd is not None:
                os.close(fd)
        else:
            for fd in fds:
                os.close(fd)

    def seen(self, key: str, value: str | None = None) -> bool:
        with self._lock:
            return any(key in m and (value is None or m[key] == value) for m in self.messages)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for fd in self.store.values():
            os.close(fd)
        self.sock.close()


def test_fd_store_round_trip_serves_after_restart_without_reading_the_disk(tmp_path: Path) -> None:
    systemd = FakeSystemd(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(systemd.path)}
    first = start_daemon(tmp_path, name="one", env=env)
    try:
        weights = {"layers.0.weight": torch.randn(256, 256), "layers.1.weight": torch.randn(256)}
        torch.save(weights, first.model_dir / "m.tmp")  # rename into place: one version only
        os.replace(first.model_dir / "m.tmp", first.model_dir / "m.pt")
        torch.save({"x": torch.ones(3)}, first.model_dir / "gone.tmp")
        os.replace(first.model_dir / "gone.tmp", first.model_dir / "gone.pt")
        first.wait_model("m")
        first.wait_model("gone")
        systemd.pump(1.0)
        assert systemd.seen("READY", "1")
        with systemd._lock:
            status_lines = [m["STATUS"] for m in systemd.messages if "STATUS" in m]
        assert any("2 models ready" in line for line in status_lines), status_lines
        assert len([n for n in systemd.store if n.endswith(".m")]) == 2, "a meta memfd per model"
        assert first.stop() == 0
        systemd.pump(0.5)
        assert systemd.seen("STOPPING", "1")
    finally:
        first.stop()

    # While it is down, one file goes away: its parked copy must be dropped, not served.
    (first.model_dir / "gone.pt").unlink()
    with systemd._lock:
        handed = sorted(systemd.store.items())
    second = start_daemon(tmp_path, name="two", model_dir=first.model_dir, env=env,
                          listen_fds=[(name, fd) for name, fd in handed])
    try:
        model = second.wait_model("m", timeout=10)
        assert "restored from the systemd fd store" in model["reason"], second.log()[-3000:]
        with second.client() as c:
            fetched = c.fetch("m")
        for key, value in weights.items():
            assert torch.equal(fetched[key], value)
        log = second.log()
        assert "m: inspecting" not in log, "a restored model must not be read from disk again"
        assert second.model("gone") is None
        systemd.pump(0.5)
        with systemd._lock:
            removed = {m["FDNAME"] for m in systemd.messages if m.get("FDSTOREREMOVE") == "1"}
        assert any(name.startswith("dm1.") for name in removed), "the stale entry is removed from the store"
    finally:
        second.stop()
        systemd.close()
