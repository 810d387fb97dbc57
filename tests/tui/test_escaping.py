"""Names are file names, and a file name may hold anything: newlines, ESC sequences, BEL, and
text that looks like Rich markup. The dashboard shows each literally, with control characters
escaped (`\\n`, `\\x1b`, `\\x07`), in the table, the detail pane, the log and the dialogs; no raw
control character reaches the terminal and no markup is interpreted."""
from __future__ import annotations

from typing import Any

from devmapd_tui.app import DevmapdApp
from devmapd_tui.dialogs import ConfirmDialog, ProblemsScreen, RemapDialog
from devmapd_tui.models import safe
from tests.tui.fixed import NOW, FixedClient, model_record
from tests.tui.helpers import screen_raw, screen_text, settle, wait_until
from tests.tui.test_snapshots import utc

EVIL = "aa-evil\nCRITICAL fake\x1b[31mred\x07"
MARKUP = "aa-[bold]x[/]"
SHOWN_EVIL = "aa-evil\\nCRITICAL fake\\x1b[31mred\\x07"


def hostile_client() -> FixedClient:
    records = [model_record(EVIL, reason=f"placed \x1b]0;pwned\x07 {EVIL}"),
               model_record(MARKUP, reason="[red]not red[/red]")]
    events = [{"type": "decision", "ts": NOW - 5, "action": "placed", "name": EVIL, "from": None,
               "to": "cpu", "message": f"placed {EVIL} on cpu"},
              {"type": "decision", "ts": NOW - 4, "action": "placed", "name": MARKUP, "from": None,
               "to": "cpu", "message": f"placed {MARKUP} on cpu"}]
    problems = {f"{EVIL}.pt": "refused: FIFO, not a regular file", "[b]clash[/b].pt": "same model name"}
    return FixedClient(extra_models=records, extra_events=events, problems=problems)


def frozen(client: FixedClient) -> DevmapdApp:
    return DevmapdApp("/run/devmapd/devmapd.sock", client_factory=lambda: client,
                      clock=lambda: NOW, time_format=utc, retry_backoff=(600.0,))


def assert_clean(app: Any) -> str:
    raw = screen_raw(app)
    for ch in ("\x1b", "\x07"):
        assert ch not in raw, f"raw {ch!r} would reach the terminal"
    return screen_text(app)


def test_safe_escapes_controls_and_keeps_unicode():
    assert safe(EVIL) == SHOWN_EVIL
    assert safe("modèle-中文 [b]x[/b]") == "modèle-中文 [b]x[/b]"
    assert safe("\u202eevil") == "\\u202eevil" and safe("\udcff") == "\\xff"


async def test_hostile_names_render_literally_everywhere():
    app = frozen(hostile_client())
    async with app.run_test(size=(160, 50)) as pilot:
        await wait_until(pilot, lambda: app.connected and "on cpu" in app._event_log.text()
                         and MARKUP in app._event_log.text(), what="connected, events logged")
        # Names sort first ("aa-", and "[" before "e"): the cursor starts on the markup one.
        await wait_until(pilot, lambda: app._shown_detail_for == MARKUP, what="detail of the markup name")
        await settle(pilot)
        text = assert_clean(app)
        lines = text.splitlines()
        assert any(line.lstrip().startswith(MARKUP) for line in lines), text   # table row, literal
        assert "[red]not red[/red]" in text and f"{MARKUP}  ready" in text, text
        assert f"placed {MARKUP} on cpu" in text

        await pilot.press("down")
        await wait_until(pilot, lambda: app._shown_detail_for == EVIL, what="detail of the evil name")
        await settle(pilot)
        text = assert_clean(app)
        lines = text.splitlines()
        # Table row, detail title, log line: escaped, each on one line; no forged log line.
        assert sum(SHOWN_EVIL[:30] in line for line in lines) >= 3, text
        assert not any(line.strip().startswith("CRITICAL") for line in lines), text
        assert "placed \\x1b]0;pwned\\x07" in text                             # the reason, escaped

        # Dialogs quote the name too.
        await pilot.press("e")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog))
        await settle(pilot)
        assert f"Evict {SHOWN_EVIL}?" in assert_clean(app)
        await pilot.press("n")
        await wait_until(pilot, lambda: not app.screen.is_modal)
        await pilot.press("m")
        await wait_until(pilot, lambda: isinstance(app.screen, RemapDialog))
        await settle(pilot)
        assert f"Remap {SHOWN_EVIL}" in assert_clean(app)
        await pilot.press("escape")
        await wait_until(pilot, lambda: not app.screen.is_modal)

        # The filter box: what the operator types is shown, not parsed.
        await pilot.press("slash", *"[b]")
        await wait_until(pilot, lambda: app._table.filter_text == "[b]")
        await settle(pilot)
        assert "filter “[b]”" in assert_clean(app)
        await pilot.press("escape")

        await pilot.press("w")
        await wait_until(pilot, lambda: isinstance(app.screen, ProblemsScreen))
        await settle(pilot)
        text = assert_clean(app)
        assert "[b]clash[/b].pt" in text and f"{SHOWN_EVIL}.pt"[:40] in text, text
