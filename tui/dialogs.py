"""Modal dialogs: remap (with how well the model fits on each device), a yes/no confirm, and the
daemon's problems.

Each fits the terminal: width and height are capped in percent of the screen (app.tcss), the
long part scrolls, and in a short or narrow terminal (`fit_small`) buttons and checkbox turn
compact so the Cancel/No button stays on screen at 80x24.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Label, OptionList, Static
from textual.widgets.option_list import Option

from .models import fit_on, human_bytes, main_device, safe
from .widgets import problems_renderable

SMALL_WIDTH = 100
SMALL_HEIGHT = 30


class FittedDialog(ModalScreen):  # type: ignore[type-arg]
    """A modal whose widgets go compact (no button borders, less padding) in a small terminal."""

    def fit_small(self) -> None:
        width, height = self.app.size
        small = width < SMALL_WIDTH or height < SMALL_HEIGHT
        self.set_class(small, "-small")
        for widget in self.query("Button, Checkbox"):
            widget.compact = small  # type: ignore[attr-defined]

    def on_mount(self) -> None:
        self.fit_small()

    def on_resize(self, event: events.Resize) -> None:
        self.fit_small()


@dataclass(frozen=True)
class RemapChoice:
    device: str      # a device id or "auto"
    pin: bool        # pin there as well (stays put under pressure)


def fit_prompt(device: dict[str, Any], record: dict[str, Any], names: bool = True) -> Text:
    """One device in the remap list; `names=False` (a narrow terminal) leaves out the device's
    name so each choice stays on one line."""
    fit = fit_on(device, record)
    text = Text()
    text.append(f"{safe(device.get('id', '?')):<8}", style="bold")
    if names:
        name = safe(device.get("name") or ("Host RAM" if device.get("id") == "cpu" else ""))
        text.append(f"{name[:22]:<23}", style="grey70")
    text.append(f"free {human_bytes(device.get('free')):>10}  ", style="grey62")
    if fit.label == "already here":
        text.append("● current placement", style="cyan")
    elif fit.ok:
        tight = fit.label.startswith("tight")
        text.append(("◐ " if tight else "✓ ") + fit.label, style="yellow" if tight else "green")
    else:
        text.append("✗ " + fit.label, style="red")
    return text


def pin_label(on: bool) -> str:
    if on:
        return "Pin there: YES — it stays put under memory pressure (p toggles)"
    return "Pin there: no — devmapd may move it under memory pressure (p toggles)"


class RemapDialog(FittedDialog):
    """Pick where a model should live; the list says whether and how well it fits each device."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("p", "toggle_pin", "Toggle pin", show=False),
    ]

    def __init__(self, record: dict[str, Any], devices: list[dict[str, Any]],
                 pin: bool | None = None) -> None:
        super().__init__()
        self.record = record
        self.devices = devices
        self.pin = bool(record.get("pinned")) if pin is None else pin

    def compose(self) -> ComposeResult:
        name = safe(self.record.get("name", "?"))
        current = safe(main_device(self.record))
        with Vertical(id="remap-box", classes="dialog"):
            yield Label(Text.assemble(("Remap ", "bold"), (name, "bold cyan"),
                                      f"  ({human_bytes(self.record.get('bytes'))}, "
                                      + (f"now on {current})" if current else "not in memory now)")),
                        classes="dialog-title")
            options = [Option(Text.assemble(("auto    ", "bold"),
                                            ("let devmapd choose the best fit (clears a pin)", "grey70")),
                              id="auto")]
            names = self.app.size.width >= SMALL_WIDTH
            for dev in self.devices:
                options.append(Option(fit_prompt(dev, self.record, names), id=dev.get("id"),
                                      disabled=bool(dev.get("lost"))))
            yield OptionList(*options, id="remap-options")
            yield Checkbox(pin_label(self.pin), id="remap-pin", value=self.pin)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Remap", variant="primary", id="remap-ok")
                yield Button("Cancel", id="remap-cancel")

    def on_mount(self) -> None:
        self.fit_small()
        options = self.query_one(OptionList)
        options.focus()
        options.highlighted = 0

    def _choose(self) -> None:
        options = self.query_one(OptionList)
        if options.highlighted is None:
            return
        option = options.get_option_at_index(options.highlighted)
        if option.disabled or option.id is None:
            return
        pin = self.query_one("#remap-pin", Checkbox).value
        self.dismiss(RemapChoice(option.id, pin and option.id != "auto"))

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self._choose()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "remap-ok":
            self._choose()
        else:
            self.dismiss(None)

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        # The checkbox glyph reads the same on and off in a plain-text capture: say it in words.
        event.checkbox.label = pin_label(event.value)

    def action_toggle_pin(self) -> None:
        box = self.query_one("#remap-pin", Checkbox)
        box.value = not box.value

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmDialog(FittedDialog):
    """Yes/no for actions that drop memory; `y` / `n` / Esc from the keyboard."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, title: str, body: str, confirm_label: str = "Yes") -> None:
        super().__init__()
        self.title_text = title
        self.body = body
        self.confirm_label = confirm_label

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box", classes="dialog"):
            # Title and body quote a model name: literal text with control characters escaped.
            yield Label(Text(safe(self.title_text), style="bold"), classes="dialog-title")
            yield Label(Text(safe(self.body)), id="confirm-body")
            with Horizontal(classes="dialog-buttons"):
                yield Button(f"{self.confirm_label} (y)", variant="error", id="confirm-yes")
                yield Button("No (n)", id="confirm-no")

    def on_mount(self) -> None:
        self.fit_small()
        self.query_one("#confirm-no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "confirm-yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class ProblemsScreen(FittedDialog):
    """`w`: the files the daemon will not serve (name clashes, refused symlinks and FIFOs), and
    why, plus models waiting for missing parts. Esc closes."""

    BINDINGS = [Binding("escape,w,q", "close", "Close")]

    def __init__(self, daemon: dict[str, Any]) -> None:
        super().__init__()
        self.daemon = dict(daemon)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="problems-box", classes="dialog"):
            yield Static(Text(f"Problems in {safe(self.daemon.get('model_dir') or 'the model directory')}"
                              "   (Esc closes)", style="bold"), classes="dialog-title")
            yield Static(problems_renderable(self.daemon), id="problems-body")

    def action_close(self) -> None:
        self.dismiss(None)
