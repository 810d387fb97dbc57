"""End to end against the real ``devmapd serve`` (tests/harness.py starts it), when it exists."""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.wire.conftest import wait_for

harness = pytest.importorskip("tests.harness")
pytest.importorskip("devmapd.daemon")


def _start(tmp_path: Path, models: Path, sock: str, name: str):
    from devmapd.client import DevmapdError
    d = harness.start_daemon(tmp_path, gpus=[], model_dir=models, socket=sock, name=name, wait=False)

    def answers() -> bool:
        assert d.proc.poll() is None, d.log()
        try:
            d.status()
            return True
        except DevmapdError:
            return False
    if not wait_for(answers, 60, 0.1):
        d.stop()
        raise AssertionError(f"devmapd serve did not answer: {d.log()[-3000:]}")
    return d


def test_load_and_events_against_devmapd_serve(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    from devmapd.client import Client

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(ckpts["small"], models / "small.pt")
    sock = str(tmp_path / "run" / "devmapd.sock")
    d = _start(tmp_path, models, sock, "one")
    second = None
    try:
        d.wait_model("small", "ready", timeout=60)
        # This (pytest) process is unrelated to the daemon: a plain client.
        import torch
        ref = torch.load(ckpts["small"], weights_only=True)
        with Client(sock) as c:
            hello = c.hello()
            assert hello["protocol"] == 1 and hello["operator"] is True and hello["uid"] == 0
            got = c.fetch("small")
            assert list(got) == list(ref)
            for k, v in ref.items():
                if isinstance(v, torch.Tensor):
                    assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
            assert d.model("small")["clients"] == 1
        assert wait_for(lambda: d.model("small")["clients"] == 0, 10)   # closed: released

        # events(): survives a daemon restart, saying so with connection markers.
        seen: list[dict] = []
        client = Client(sock, timeout=5)
        done = threading.Event()

        def consume() -> None:
            for ev in client.events():
                seen.append(ev)
                if ev.get("type") == "connection" and ev.get("state") == "restored":
                    break
            done.set()

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        assert wait_for(lambda: d.status()["models"], 10)
        time.sleep(0.3)                      # let the subscription be established
        assert d.stop() == 0
        assert wait_for(lambda: any(e.get("state") == "lost" for e in seen), 15), seen
        second = _start(tmp_path, models, sock, "two")
        assert done.wait(30), seen
        states = [e["state"] for e in seen if e.get("type") == "connection"]
        assert states == ["lost", "restored"], seen
        assert all("message" in e for e in seen)
        client.close()
    finally:
        d.stop()
        if second is not None:
            second.stop()
