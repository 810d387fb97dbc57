"""A file the daemon refuses (a FIFO named like a checkpoint) reaches subscribers as a
``problems`` event as soon as a scan sees it, and again when it is gone: dashboards need not
wait for their next status refresh. Real daemon, real FIFO, real event stream."""
from __future__ import annotations

import os
import queue
import threading

import torch

import devmapd
from tests.harness import start_daemon


def test_problems_are_published_as_they_change(tmp_path) -> None:
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    torch.save({"w": torch.ones(2)}, model_dir / "ok.pt")
    d = start_daemon(tmp_path, model_dir=model_dir)
    got: queue.Queue = queue.Queue()
    client = devmapd.Client(d.socket)
    try:
        d.wait_model("ok", "ready")

        def listen() -> None:
            for event in client.events(reconnect=False):
                if event.get("type") == "problems":
                    got.put(event)

        threading.Thread(target=listen, daemon=True).start()
        os.mkfifo(model_dir / "pipe.pt")
        # An event-driven wait: the deadline only bounds a daemon that never says anything.
        event = got.get(timeout=60)
        while "pipe.pt" not in event["problems"]:
            event = got.get(timeout=60)
        assert "FIFO" in event["problems"]["pipe.pt"] or "fifo" in event["problems"]["pipe.pt"].lower(), event
        assert event["message"].startswith("1 files not served"), event
        os.unlink(model_dir / "pipe.pt")
        event = got.get(timeout=60)
        while "pipe.pt" in event["problems"]:
            event = got.get(timeout=60)
        assert event["problems"] == {} and event["pending"] == {}, event
    finally:
        client.close()
        assert d.stop() == 0, d.log()[-3000:]


def test_a_failed_model_names_the_format_inspect_recognised(tmp_path) -> None:
    from devmapd.engine import checkpoint

    model_dir = tmp_path / "models"
    model_dir.mkdir()
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.ones(1000)}, whole)
    data = whole.read_bytes()
    (model_dir / "cut.pt").write_bytes(data[: len(data) // 3])
    expected = checkpoint.inspect(model_dir / "cut.pt")
    assert expected.diagnosis is not None and expected.format not in (None, "unknown"), expected
    d = start_daemon(tmp_path, model_dir=model_dir)
    try:
        m = d.wait_model("cut", "failed")
        assert m["format"] == expected.format, m
    finally:
        assert d.stop() == 0, d.log()[-3000:]
