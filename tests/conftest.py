"""Shared fixtures. The daemon harness itself lives in tests/harness.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import DaemonHandle, start_daemon


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonHandle]]:
    """Start real daemons (see tests/harness.start_daemon); every one is stopped at teardown."""
    started: list[DaemonHandle] = []

    def start(**kwargs: Any) -> DaemonHandle:
        handle = start_daemon(tmp_path, **kwargs)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()
