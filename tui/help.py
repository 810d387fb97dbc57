"""The `?` help screen: keys, what the bar and states mean, and where actions are allowed."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static

from .dialogs import FittedDialog
from .widgets import BAR_PARTS, STATE_STYLE

KEYS = (
    ("↑ ↓ / mouse", "select a model (click a column header to sort by it)"),
    ("m", "remap the selected model: pick a device (with fit shown) or auto"),
    ("p", "pin the model where it sits / unpin it"),
    ("e", "evict the model from memory (asks first)"),
    ("r", "reload the model from disk (asks first)"),
    ("/", "filter models by name, state, dtype or device; Esc clears"),
    ("s", "sort by the next column; again on a header reverses"),
    ("d", "show / hide the detail and log panes (narrow terminals: detail, then log, then none)"),
    ("w", "list the files the daemon does not serve, and why (shown when there are any)"),
    ("ctrl+r", "refresh the full status now"),
    ("x", "demo only: start / end a simulated training job that fills a GPU"),
    ("?", "this help"),
    ("q", "quit (the daemon keeps running)"),
)

STATES = (
    ("queued", "found in the model directory, waiting to be read"),
    ("loading", "being read once into shared memory (progress shown)"),
    ("ready", "preloaded; devmapd.load(name) returns it in milliseconds"),
    ("failed", "could not be loaded; select it to read the diagnosis and the fix"),
    ("evicted", "dropped from memory by an operator; reload brings it back"),
)


def help_text() -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column()
    grid.add_row(Text("Keys", style="bold underline"), "")
    for key, what in KEYS:
        grid.add_row(Text(key, style="bold cyan"), what)
    grid.add_row("", "")
    grid.add_row(Text("Memory bar", style="bold underline"), "")
    labels = {"models": "memory devmapd holds for preloaded models",
              "others": "memory used by other processes (training jobs, notebooks)",
              "reserve": "headroom devmapd keeps free and never fills",
              "free": "free memory"}
    for name, glyph, style in BAR_PARTS:
        grid.add_row(Text(glyph * 3, style=style), labels[name])
    grid.add_row("", "")
    grid.add_row(Text("Model states", style="bold underline"), "")
    for state, what in STATES:
        grid.add_row(Text(state, style=STATE_STYLE[state]), what)
    grid.add_row("", "")
    grid.add_row(Text("Actions", style="bold underline"), "")
    grid.add_row("", "Remap, pin, evict and reload need an operator: root, the daemon's own user, or "
                     "a uid or group listed in [server] operator_uids / operator_groups of the "
                     "daemon's config. Empty lists (the default) mean root only. Others see the "
                     "dashboard read-only. Results and refusals appear in the log.")
    grid.add_row("", "When GPU memory runs low, devmapd moves unpinned models to the CPU and "
                     "brings them back when it clears; the log says when and why, and the detail "
                     "pane's \"why\" says where each model sits and for what reason.")
    return grid


class HelpScreen(FittedDialog):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss_help", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box", classes="dialog"):
            yield Static(Text("devmapd dashboard — help   (Esc closes)", style="bold"),
                         classes="dialog-title")
            yield Static(help_text())

    def action_dismiss_help(self) -> None:
        self.dismiss(None)
