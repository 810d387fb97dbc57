"""Fixtures for the watcher tests: a real temp model dir, a real watchdog observer, and a helper
that reads ModelEvents off the asyncio queue with deadlines (no mocked observers anywhere)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devmapd.daemon.watcher import ModelEvent, ModelWatcher

SETTLE_S = 0.25


class Events:
    """Reads the watcher's queue; remembers when each event arrived (monotonic)."""

    def __init__(self, queue: asyncio.Queue[ModelEvent]) -> None:
        self.queue = queue
        self.log: list[tuple[float, ModelEvent]] = []

    async def _get(self, deadline: float) -> ModelEvent | None:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            ev = await asyncio.wait_for(self.queue.get(), left)
        except TimeoutError:
            return None
        self.log.append((time.monotonic(), ev))
        return ev

    async def until(self, pred: Callable[[list[ModelEvent]], bool], timeout: float = 10.0) -> list[ModelEvent]:
        """Collect events until pred(collected) holds; fail (with what came) on timeout."""
        got: list[ModelEvent] = []
        deadline = time.monotonic() + timeout
        while not pred(got):
            ev = await self._get(deadline)
            if ev is None:
                pytest.fail(f"timed out after {timeout}s; events so far: "
                            f"{[(e.kind, e.name) for e in got]}")
            got.append(ev)
        return got

    async def during(self, seconds: float) -> list[ModelEvent]:
        """Everything that arrives in the next `seconds`."""
        got = []
        deadline = time.monotonic() + seconds
        while (ev := await self._get(deadline)) is not None:
            got.append(ev)
        return got

    async def upsert(self, name: str, timeout: float = 10.0) -> ModelEvent:
        evs = await self.until(lambda g: any(e.kind == "upsert" and e.name == name for e in g), timeout)
        others = [(e.kind, e.name) for e in evs if e.name != name or e.kind != "upsert"]
        assert not others, f"unexpected events before upsert of {name}: {others}"
        return evs[-1]


def names_of(events: list[ModelEvent], kind: str) -> list[str]:
    return [e.name for e in events if e.kind == kind]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    return d


@pytest.fixture
async def start_watcher(model_dir: Path):
    """start_watcher(**kwargs) -> (watcher, Events); every watcher is stopped at teardown."""
    made: list[ModelWatcher] = []

    async def start(**kwargs) -> tuple[ModelWatcher, Events]:
        kwargs.setdefault("settle_s", SETTLE_S)
        q: asyncio.Queue[ModelEvent] = asyncio.Queue()
        w = ModelWatcher(kwargs.pop("directory", model_dir), q, asyncio.get_running_loop(), **kwargs)
        made.append(w)
        w.start()
        return w, Events(q)

    yield start
    for w in made:
        w.stop()
