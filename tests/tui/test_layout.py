"""The dashboard fits the terminal: at 80x24 and after a live resize the models table shows at
least four rows, the footer keeps `? Help` and `q Quit`, and the dialogs keep their buttons on
screen. Driven with Pilot on the frozen client (tests/tui/fixed.py), reading the screen as the
terminal shows it."""
from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from devmapd_tui.dialogs import ConfirmDialog, ProblemsScreen, RemapDialog
from devmapd_tui.help import HelpScreen
from devmapd_tui.models import MODELS_MIN_ROWS, column_plan, plan_layout
from tests.tui.fixed import FIXED_PROBLEMS, fixed_status
from tests.tui.helpers import screen_text, settle, wait_until
from tests.tui.test_snapshots import frozen_app, settled

MODEL_NAMES = [m["name"] for m in fixed_status()["models"]]


def visible_models(app: Any) -> list[str]:
    """Model names the operator can read in the table's rows on screen."""
    table = app._table
    region = table.region
    lines = screen_text(app).splitlines()
    rows = lines[region.y + 1: region.y + region.height]       # below the column header
    return [n for n in MODEL_NAMES if any(line.lstrip().startswith(n) for line in rows)]


def footer_line(app: Any) -> str:
    return screen_text(app).splitlines()[app.size[1] - 1]


async def check_fits(pilot: Any) -> None:
    app = pilot.app
    await wait_until(pilot, lambda: len(visible_models(app)) >= MODELS_MIN_ROWS,
                     what=f"{MODELS_MIN_ROWS} model rows on screen at {app.size}")
    footer = footer_line(app)
    assert "? Help" in footer.replace("?Help", "? Help") and "q Quit" in footer.replace("qQuit", "q Quit"), footer
    assert app._table.size.height - 1 >= MODELS_MIN_ROWS


@settings(max_examples=300, deadline=None)
@given(width=st.integers(60, 300), height=st.integers(16, 120), devices=st.integers(0, 9),
       extra=st.integers(0, 3), bottom=st.sampled_from(["auto", "shown", "hidden"]),
       rows=st.one_of(st.none(), st.integers(0, 600)))
def test_plan_always_leaves_the_models_table_its_minimum(width, height, devices, extra, bottom, rows):
    plan = plan_layout(width, height, devices, extra_rows=extra, bottom=bottom, table_rows=rows)
    avail = height - 2 - extra
    assert plan.models_rows >= MODELS_MIN_ROWS
    assert plan.devices_height + plan.bottom_height + plan.models_rows + 2 == avail
    assert plan.bottom_height == 0 or plan.bottom_height >= 4
    cols = column_plan(width)
    assert "name" in cols and "state" in cols
    assert sum(w + 2 for w in cols.values()) <= width - 2 or cols["name"] == 18


async def test_80x24_shows_models_and_the_help_and_quit_keys():
    app = frozen_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settled(pilot)
        await check_fits(pilot)
        # Nothing scrolls sideways: the table's columns fit its width.
        assert app._table.virtual_size.width <= app._table.size.width


async def test_live_resize_down_to_80x24_and_back():
    app = frozen_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await settled(pilot)
        await check_fits(pilot)
        assert "Last fetch" in screen_text(app)
        await pilot.resize_terminal(80, 24)
        await wait_until(pilot, lambda: app.size == (80, 24))
        await settle(pilot)
        await check_fits(pilot)
        assert "Last fetch" not in screen_text(app)        # dropped, not squeezed
        await pilot.resize_terminal(100, 30)
        await wait_until(pilot, lambda: app.size == (100, 30))
        await settle(pilot)
        await check_fits(pilot)
        assert "Decisions & events" in screen_text(app)     # wide enough for detail | log


async def test_panes_key_hides_and_cycles_the_bottom_panes():
    app = frozen_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settled(pilot)
        text = screen_text(app)
        assert "Selected model" in text and "Decisions & events" not in text
        rows_before = len(visible_models(app))
        await pilot.press("d")
        await wait_until(pilot, lambda: "Decisions & events" in screen_text(app), what="the log pane")
        assert "Selected model" not in screen_text(app)
        await pilot.press("d")
        await wait_until(pilot, lambda: "Decisions & events" not in screen_text(app)
                         and "Selected model" not in screen_text(app), what="panes hidden")
        assert len(visible_models(app)) > rows_before
        await pilot.press("d")
        await wait_until(pilot, lambda: "Selected model" in screen_text(app), what="detail again")


async def test_dialogs_fit_at_80x24():
    app = frozen_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await settled(pilot)
        await pilot.press("m")
        await wait_until(pilot, lambda: isinstance(app.screen, RemapDialog))
        await settle(pilot)
        text = screen_text(app)
        assert "Cancel" in text and "Remap" in text and "Pin there" in text, text
        for device in ("cuda:0", "cuda:1", "cpu"):
            assert any(line.strip("█▊▎ ").startswith(device) for line in text.splitlines()), device
        await pilot.press("escape")
        await wait_until(pilot, lambda: not app.screen.is_modal)

        await pilot.press("e")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog))
        await settle(pilot)
        assert "No (n)" in screen_text(app) and "Evict (y)" in screen_text(app)
        await pilot.press("n")
        await wait_until(pilot, lambda: not app.screen.is_modal)

        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        await settle(pilot)
        text = screen_text(app)
        assert "Esc closes" in text
        # The box ends inside the screen: its right border is drawn on every line it spans.
        assert all(len(line.rstrip()) <= 80 for line in text.splitlines())
        await pilot.press("escape")
        await wait_until(pilot, lambda: not app.screen.is_modal)

        await pilot.press("w")
        await wait_until(pilot, lambda: isinstance(app.screen, ProblemsScreen))
        await settle(pilot)
        text = screen_text(app)
        assert "st.pt" in text and "incoming/pipe.pt" in text and "FIFO" in text, text
        assert set(FIXED_PROBLEMS) <= set(app.state.daemon["problems"])


async def test_resize_within_a_width_band_keeps_the_rows():
    """Dragging a window edge changes the name column's width in place; no row is re-added."""
    app = frozen_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await settled(pilot)
        table = app._table
        keys = table.column_keys
        before = table.columns[next(iter(table.columns))].width
        added: list[Any] = []
        original_add = table.add_row
        table.add_row = lambda *a, **k: (added.append(a), original_add(*a, **k))[1]  # type: ignore[method-assign]
        await pilot.resize_terminal(132, 40)
        await wait_until(pilot, lambda: table.column_keys == keys
                         and table.columns[next(iter(table.columns))].width == before + 12,
                         what="the name column 12 cells wider")
        await settle(pilot)
        assert added == [] and table.row_count == len(MODEL_NAMES)
        assert "llama-7b-chat" in visible_models(app)


async def test_a_wide_terminal_shows_each_models_reason_in_a_column():
    app = frozen_app()
    async with app.run_test(size=(200, 40)) as pilot:
        await settled(pilot)
        assert "why" in app._table.column_keys
        text = screen_text(app)
        row = next(line for line in text.splitlines() if line.lstrip().startswith("llama-7b-chat"))
        assert "pinned by operator" in row, row
        row = next(line for line in text.splitlines() if line.lstrip().startswith("vit-large-split"))
        assert "split: no single GPU had room" in row, row
        await pilot.resize_terminal(120, 40)
        await wait_until(pilot, lambda: "why" not in app._table.column_keys, what="Why dropped at 120")


async def test_a_problems_event_updates_header_and_log():
    from devmapd_tui.app import DevmapdApp
    from tests.tui.fixed import NOW, FixedClient
    from tests.tui.test_snapshots import utc

    event = {"type": "problems", "ts": NOW, "problems": {"late.pt": "refused: a socket, not a regular file"},
             "pending": {}}
    client = FixedClient(problems={}, extra_events=[event])
    app = DevmapdApp("/run/devmapd/devmapd.sock", client_factory=lambda: client, clock=lambda: NOW,
                     time_format=utc, retry_backoff=(600.0,))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: "late.pt: refused" in app._event_log.text(), what="the problem logged")
        await settle(pilot)
        assert "1 problem (w)" in screen_text(app).splitlines()[0]
        assert app.check_action("problems", ()) is True
