"""Helpers shared by the dashboard tests (fixtures are in conftest.py).

Behaviour tests drive DevmapdApp with Textual's Pilot against a REAL daemon process
(`python -m devmapd serve` with simulated GPUs, started through tests/harness.py) holding real
checkpoints written by torch (devmapd.samples). Only the snapshot tests use the frozen
FixedClient (tests/tui/fixed.py), because a snapshot must not depend on clocks or live memory.
"""
from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tests.harness import ROOT, DaemonHandle, sim_gpu

MIB = 1 << 20


def serve_exists() -> bool:
    """Whether `devmapd serve` is there (the TUI cannot be tested live without it)."""
    probe = subprocess.run([sys.executable, "-m", "devmapd", "serve", "--help"], cwd=str(ROOT),
                           capture_output=True, text=True, timeout=60)
    return probe.returncode == 0


_SERVE: bool | None = None


def require_serve() -> None:
    global _SERVE
    if _SERVE is None:
        _SERVE = serve_exists()
    if not _SERVE:
        pytest.skip("`python -m devmapd serve` is not available yet (devmapd/cli.py serve)")


def wait_answering(handle: DaemonHandle, timeout: float = 120.0) -> None:
    """The harness waits for the socket too; this one also tolerates 'no socket yet'."""
    from devmapd.client import DaemonUnavailable

    deadline = time.monotonic() + timeout
    while True:
        if handle.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {handle.proc.returncode}:\n{handle.log()[-3000:]}")
        try:
            handle.status()
            return
        except DaemonUnavailable:
            if time.monotonic() > deadline:
                handle.stop()
                raise AssertionError(f"daemon did not answer within {timeout}s:\n{handle.log()[-3000:]}")
            time.sleep(0.1)


def write_models(model_dir: Path) -> dict[str, Path]:
    """A few real checkpoints: plain, fp16, a 4 MiB one, and a truncated (broken) one."""
    import torch

    from devmapd import samples

    model_dir.mkdir(parents=True, exist_ok=True)
    out = {
        "plain": samples.plain(model_dir),
        "fp16": samples.fp16(model_dir),
        "truncated": samples.truncated(model_dir),
        "big": samples.big(model_dir, 4 * MIB, count=4, dtype=torch.float32, name="big.pt"),
    }
    return out


def DEFAULT_GPUS() -> list[dict[str, Any]]:
    return [sim_gpu(0, 1024, 100), sim_gpu(1, 512, 50)]


# One overall deadline for "the app got there", generous so that a loaded machine (the suite runs
# across the cores with pytest-xdist, beside other work) is slow rather than failing; a passing
# run never waits for it, since each poll returns as soon as the condition holds.
DEADLINE_S = 120.0


async def wait_until(pilot: Any, predicate: Callable[[], Any], timeout: float = DEADLINE_S,
                     what: str = "") -> Any:
    """Let the app run until `predicate()` is truthy (the daemon answers asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await pilot.pause(0.05)


async def settle(pilot: Any) -> None:
    """Until the app has drawn what it was told: animations and scheduled refreshes done and the
    message queue drained (no clock involved)."""
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()


def screen_text(app: Any) -> str:
    """The screen as the terminal would show it, as plain text (what an operator reads)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), record=True,
                      color_system=None, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


def screen_raw(app: Any) -> str:
    """Every character the compositor would send, before any escaping by an exporter: a raw
    control character here would reach the operator's terminal."""
    update = app.screen._compositor.render_update(full=True, screen_stack=app._background_screens)
    console = Console(width=app.size[0], file=io.StringIO(), color_system=None)
    return "".join(segment.text for segment in console.render(update) if not segment.control)


def text_of(renderable: Any, width: int = 160) -> str:
    """Plain text of what a widget shows (Static.content, a Rich renderable)."""
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Blocking harness calls (status polling, process stop) must not freeze the app's loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)
