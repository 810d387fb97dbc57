"""Snapshot tests (pytest-textual-snapshot) of the main screen at 80x24, 100x30 and 120x40, the
remap dialog and the help screen at 80x24 and 120x40, and the unreachable and read-only states.

These feed the app a FROZEN status (tests/tui/fixed.py) through its injectable client factory and
clock, so the SVGs do not change with time, host or memory. Behaviour is tested against a real
daemon in test_live.py. Update after an intended UI change with:
    .venv/bin/python -m pytest tests/tui/test_snapshots.py --snapshot-update
"""
from __future__ import annotations

import time
from typing import Any

import pytest

from devmapd_tui.app import DevmapdApp
from devmapd_tui.dialogs import RemapDialog
from devmapd_tui.help import HelpScreen
from tests.tui.fixed import FIXED_EVENTS, NOW, FixedClient
from tests.tui.helpers import settle, wait_until

SIZE = (120, 40)
SIZES = {"80x24": (80, 24), "100x30": (100, 30), "120x40": (120, 40)}


def utc(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts))


def frozen_app(**client: Any) -> DevmapdApp:
    return DevmapdApp("/run/devmapd/devmapd.sock", client_factory=lambda: FixedClient(**client),
                      clock=lambda: NOW, time_format=utc, retry_backoff=(600.0,))


async def settled(pilot: Any) -> None:
    """Connected, every fixed event logged, and the selected model's detail fetched."""
    app = pilot.app
    await wait_until(pilot, lambda: app.connected and len(app._event_log.plain_lines) >= 1 + len(FIXED_EVENTS))
    await wait_until(pilot, lambda: app._table.selected_name in app._details, what="detail fetched")
    await wait_until(pilot, lambda: app._shown_detail_for == app._table.selected_name,
                     what="the fetched detail drawn")
    await settle(pilot)


@pytest.mark.parametrize("size", list(SIZES))
def test_main_screen(snap_compare, size):
    assert snap_compare(frozen_app(), terminal_size=SIZES[size], run_before=settled)


async def open_remap(pilot: Any) -> None:
    await settled(pilot)
    await pilot.press("down", "down")          # llama-7b-chat: pinned, on cuda:0
    await wait_until(pilot, lambda: pilot.app._table.selected_name == "llama-7b-chat")
    await wait_until(pilot, lambda: pilot.app._shown_detail_for == "llama-7b-chat")
    await pilot.press("m")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, RemapDialog))
    await settle(pilot)


async def open_help(pilot: Any) -> None:
    await settled(pilot)
    await pilot.press("question_mark")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, HelpScreen))
    await settle(pilot)


@pytest.mark.parametrize("size", ["80x24", "120x40"])
def test_remap_dialog(snap_compare, size):
    assert snap_compare(frozen_app(), terminal_size=SIZES[size], run_before=open_remap)


@pytest.mark.parametrize("size", ["80x24", "120x40"])
def test_help_screen(snap_compare, size):
    assert snap_compare(frozen_app(), terminal_size=SIZES[size], run_before=open_help)


def test_unreachable_state(snap_compare):
    async def down(pilot: Any) -> None:
        await wait_until(pilot, lambda: pilot.app.last_error is not None, what="first failed attempt")
        await settle(pilot)

    assert snap_compare(frozen_app(unreachable=True), terminal_size=SIZE, run_before=down)


def test_read_only_user_sees_actions_disabled(snap_compare):
    """A non-operator: remap/pin/evict/reload greyed out in the footer, the reason shown."""
    async def read_only(pilot: Any) -> None:
        await settled(pilot)
        app = pilot.app
        assert app.check_action("evict", ()) is None and app.check_action("remap", ()) is None
        await pilot.press("e", "m")                # disabled: nothing opens
        assert not app.screen.is_modal

    assert snap_compare(frozen_app(operator=False), terminal_size=SIZE, run_before=read_only)
