"""Fixtures for the dashboard tests.

Behaviour tests drive DevmapdApp with Textual's Pilot against a REAL daemon process
(`python -m devmapd serve` with simulated GPUs, started through tests/harness.py) holding real
checkpoints written by torch (devmapd.samples). Only the snapshot tests use the frozen
FixedClient (tests/tui/fixed.py), because a snapshot must not depend on clocks or live memory.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import DaemonHandle, start_daemon
from tests.tui.helpers import DEFAULT_GPUS, require_serve, wait_answering, write_models


@pytest.fixture
def live_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonHandle]]:
    """Start real daemons on two simulated GPUs; each is stopped at teardown."""
    require_serve()
    started: list[DaemonHandle] = []

    def start(name: str = "d", models: bool = True, model_dir: Path | None = None,
              **kwargs: Any) -> DaemonHandle:
        model_dir = model_dir or tmp_path / f"{name}-models"
        if models and not model_dir.exists():
            write_models(model_dir)
        model_dir.mkdir(exist_ok=True)
        kwargs.setdefault("gpus", DEFAULT_GPUS())
        handle = start_daemon(tmp_path, model_dir=model_dir, name=name, wait=False, **kwargs)
        started.append(handle)
        wait_answering(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonHandle]:
    """One real daemon for a module's tests that only need *a* daemon (starting one costs
    seconds of CPU on a shared machine); each test puts back what it changes."""
    require_serve()
    base = tmp_path_factory.mktemp("tui-shared")
    write_models(base / "models")
    # The socket lives where an unprivileged user can reach it (pytest's tmp dirs are 0700) and
    # belongs to group nogroup, so the read-only test can connect as nobody.
    sock_base = Path(tempfile.mkdtemp(prefix="devmapd-tui-"))
    sock_base.chmod(0o755)
    handle = start_daemon(base, model_dir=base / "models", wait=False, gpus=DEFAULT_GPUS(),
                          socket=str(sock_base / "run" / "devmapd.sock"),
                          extra_config='[server]\nsocket_group = "nogroup"\n')
    try:
        wait_answering(handle)
        yield handle
    finally:
        handle.stop()
        shutil.rmtree(sock_base, ignore_errors=True)


