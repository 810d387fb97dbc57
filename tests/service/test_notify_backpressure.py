"""A service manager that stops reading must never hang the daemon's event loop."""

from __future__ import annotations

import socket
from pathlib import Path

from devmapd.service.systemd import Notifier


def test_a_full_notify_queue_costs_a_bounded_wait_and_reports_the_loss(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(path))  # bound, never read: the kernel queues ~10 datagrams, then blocks senders
    try:
        notifier = Notifier(str(path))
        results = []
        for i in range(100):
            results.append(notifier.status(f"update {i}"))
            if not results[-1]:
                break
        assert results[0] is True
        assert results[-1] is False, "a datagram that could not be queued is reported, not waited on forever"
        manager.recv(4096)  # the manager reads again: notifications flow again
        assert notifier.status("after") is True
    finally:
        manager.close()
