"""The dashboard's panels: header line, connection banner, devices, models table, detail, log."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import HorizontalGroup
from textual.widget import Widget
from textual.widgets import DataTable, Footer, RichLog, Static
from textual.widgets._footer import FooterKey
from textual.widgets.data_table import ColumnKey

from .models import (
    MODEL_COLUMNS,
    DaemonState,
    SortSpec,
    dtype_text,
    human_age,
    human_bytes,
    human_duration,
    load_time_text,
    memory_split,
    model_matches,
    placement_items,
    placement_text,
    progress_fraction,
    safe,
    short_uuid,
    sort_key,
    utilization_percent,
)

BAR_WIDTH = 20
# Distinct glyphs as well as colours, so the bar still reads in a plain-text capture.
BAR_PARTS = (
    ("models", "█", "green"),
    ("others", "▒", "yellow"),
    ("reserve", "░", "red"),
    ("free", "·", "grey50"),
)
STATE_STYLE = {"ready": "green", "loading": "yellow", "queued": "cyan", "failed": "bold red",
               "evicted": "grey50"}
ACTION_STYLE = {"placed": "green", "promoted": "green", "loaded": "green", "reloaded": "green",
                "demoted": "yellow", "remapped": "cyan", "pinned": "cyan", "unpinned": "cyan",
                "evicted": "magenta", "failed": "bold red", "removed": "magenta", "refused": "red",
                "error": "red", "info": "grey62", "problem": "yellow", "resolved": "green",
                "pending": "yellow"}


def memory_bar(device: dict[str, Any], width: int = BAR_WIDTH) -> Text:
    """models | others | reserve | free, with largest-remainder rounding so it is always `width`."""
    split = memory_split(device)
    text = Text()
    if split.total <= 0:
        return Text("·" * width, style="grey35")
    parts = [getattr(split, name) for name, _, _ in BAR_PARTS]
    exact = [p * width / split.total for p in parts]
    cells = [int(e) for e in exact]
    # Any non-zero part gets at least one cell so a small holding is still visible.
    for i, p in enumerate(parts):
        if p > 0 and cells[i] == 0:
            cells[i] = 1
    while sum(cells) > width:
        i = max(range(len(cells)), key=lambda k: (cells[k] - exact[k], cells[k]))
        cells[i] -= 1
    order = sorted(range(len(cells)), key=lambda k: exact[k] - int(exact[k]), reverse=True)
    k = 0
    while sum(cells) < width:
        cells[order[k % len(order)]] += 1
        k += 1
    for (_, glyph, style), n in zip(BAR_PARTS, cells):
        text.append(glyph * n, style=style)
    return text


def bar_legend(history: bool = True) -> Text:
    legend = Text("  ")
    labels = {"models": "devmapd models", "others": "other processes", "reserve": "reserve",
              "free": "free"}
    for name, glyph, style in BAR_PARTS:
        legend.append(glyph * 2, style=style)
        legend.append(f" {labels[name]}   ", style="grey62")
    if history:
        legend.append("history: free memory, newest right", style="grey50")
    return legend


class HeaderBar(Static):
    """One line: who we talk to, how long it has run, and whether we may act."""

    def __init__(self, state: DaemonState, **kwargs: Any) -> None:
        super().__init__("", **kwargs)
        self.state = state
        self.socket = "?"
        self.hello: dict[str, Any] = {}
        self.mode = ""
        self._shown: str | None = None

    def update_from(self) -> None:
        d = self.state.daemon
        hello = self.hello
        # (text, style, drop rank): a narrow terminal drops the highest ranks first; the mode
        # (operator / read-only) and the problem count are what an operator must always see.
        parts: list[tuple[str, str, int]] = []
        version = d.get("version") or hello.get("version")
        host = d.get("host") or hello.get("host")
        if host:
            parts.append((safe(host), "bold", 3))
        up = self.state.uptime()
        if up is not None:
            parts.append((f"up {uptime_text(up)}", "", 2))
        backend = d.get("backend") or hello.get("backend")
        if backend or self.state.loaded:
            parts.append((backend_text(backend, self.state), "cyan", 1))
        parts.append((safe(d.get("socket") or hello.get("socket") or self.socket), "grey62", 4))
        problems = len(d.get("problems") or {})
        if problems:
            parts.append((f"⚠ {problems} problem{'s' if problems != 1 else ''} (w)", "bold yellow", 0))
        if self.mode:
            parts.append((self.mode, "bold green" if self.mode == "operator" else "bold yellow", 0))
        width = self.size.width or 120
        sep = "  │  "
        head = " devmapd " + (f" {safe(version)}" if version else "")

        def length(items: list[tuple[str, str, int]]) -> int:
            return len(head) + sum(len(sep) + len(t) for t, _, _ in items)

        for rank in (4, 3, 2, 1):
            if length(parts) <= width:
                break
            parts = [p for p in parts if p[2] != rank]
        text = Text()
        text.append(" devmapd ", style="bold reverse")
        if version:
            text.append(f" {safe(version)}", style="bold")
        for value, style, _ in parts:
            text.append(sep, style="grey42")
            text.append(value, style=style)
        if text.plain != self._shown:   # called at every device report; redraw only on change
            self._shown = text.plain
            self.update(text)

    def on_resize(self) -> None:
        self._shown = None
        self.update_from()


def uptime_text(seconds: float) -> str:
    # Minute resolution past the first minute: the header refreshes every few seconds only.
    if 60 <= seconds < 3600:
        return f"{int(seconds // 60)}m"
    return human_duration(seconds)


def backend_text(backend: str | None, state: DaemonState) -> str:
    gpus = sum(1 for d in state.devices if d.get("kind", "gpu") == "gpu" and d.get("id") != "cpu")
    if backend == "nvml":
        return f"NVML · {gpus} GPU{'s' if gpus != 1 else ''}"
    if backend == "simulated":
        return f"simulated · {gpus} GPU{'s' if gpus != 1 else ''}"
    if backend in ("none", None, ""):
        return "CPU only (no GPU inventory)"
    return safe(backend)


# key -> (header, Rich column options); in display order.
DEVICE_COLUMNS: dict[str, tuple[str, dict[str, Any]]] = {
    "id": ("Device", {"no_wrap": True}),
    "name": ("Name", {"no_wrap": True, "max_width": 19, "overflow": "ellipsis"}),
    "uuid": ("UUID", {"no_wrap": True, "style": "grey62"}),
    "bar": ("Memory", {"no_wrap": True, "width": BAR_WIDTH}),
    "models": ("Models", {"justify": "right", "no_wrap": True}),
    "others": ("Others", {"justify": "right", "no_wrap": True}),
    "free": ("Free", {"justify": "right", "no_wrap": True}),
    "total": ("Total", {"justify": "right", "no_wrap": True}),
    "util": ("Util", {"justify": "right", "no_wrap": True}),
    "history": ("History", {"no_wrap": True, "style": "blue"}),
    "flags": ("", {"no_wrap": True}),
}
DEVICE_WIDTHS = {"id": 6, "name": 19, "uuid": 12, "bar": BAR_WIDTH, "models": 8, "others": 8,
                 "free": 8, "total": 8, "util": 4, "history": 12, "flags": 3}
DEVICE_DROP_ORDER = ("uuid", "history", "total", "others", "util", "flags")


class DevicePanel(Static):
    """A row per GPU and one for host RAM; redrawn whole, which is cheap for at most ~9 rows."""

    def __init__(self, state: DaemonState, **kwargs: Any) -> None:
        super().__init__("", **kwargs)
        self.state = state
        self.legend = True      # the app drops the legend when the terminal is short
        self._shown: tuple | None = None
        self._rows: tuple[int, int] | None = None

    def _signature(self) -> tuple:
        """What the panel would show, at display precision: host RAM's free bytes change at
        every poll, but a redraw is only worth it when a printed number or a bar cell moves."""
        rows = []
        for dev in self.state.devices:
            split = memory_split(dev)
            rows.append((dev.get("id"), dev.get("name"), dev.get("lost"), dev.get("error"),
                         dev.get("simulated"), memory_bar(dev).plain, human_bytes(split.models),
                         human_bytes(split.others), human_bytes(dev.get("free")),
                         human_bytes(split.total), dev.get("utilization"),
                         self.state.history.sparkline(dev.get("id", ""), 12)))
        return (self.legend, tuple(rows))

    def set_legend(self, on: bool) -> None:
        if on != self.legend:
            self.legend = on
            self._shown = None
            self.update_from()

    def update_from(self) -> None:
        signature = self._signature()
        if signature == self._shown:
            return
        self._shown = signature
        if not self.state.devices:
            self.update(Text("  no device inventory yet", style="grey50"))
            return
        table = Table(box=None, expand=False, pad_edge=False, padding=(0, 1, 0, 0),
                      header_style="bold grey70", show_edge=False)
        columns = self._columns_for(self.content_size.width or 118)
        for key in columns:
            label, kwargs = DEVICE_COLUMNS[key]
            table.add_column(label, **kwargs)
        for dev in self.state.devices:
            split = memory_split(dev)
            is_host = dev.get("kind") == "cpu" or dev.get("id") == "cpu"
            util = utilization_percent(dev.get("utilization"))
            flags = Text()
            if dev.get("lost"):
                flags.append("LOST ", style="bold red")
            if dev.get("error"):
                flags.append("error ", style="red")
            if dev.get("simulated"):
                flags.append("sim", style="magenta")
            cells = {
                "id": Text(safe(dev.get("id", "?")), style="bold" if not dev.get("lost") else "strike red"),
                "name": Text(safe(dev.get("name") or ("Host RAM" if is_host else "?"))),
                "uuid": "-" if is_host else safe(short_uuid(dev.get("uuid"))),
                "bar": memory_bar(dev),
                "models": Text(human_bytes(split.models), style="green"),
                "others": Text(human_bytes(split.others), style="yellow"),
                "free": human_bytes(dev.get("free")),
                "total": human_bytes(split.total),
                "util": "-" if util is None else f"{util:.0f}%",
                "history": self.state.history.sparkline(dev.get("id", ""), 12),
                "flags": flags,
            }
            table.add_row(*(cells[k] for k in columns))
        parts: list[RenderableType] = [table]
        if self.legend:
            parts.append(bar_legend("history" in columns))
        # Same number of rows: no relayout of the screen needed, just a repaint of this panel.
        height = (len(self.state.devices), len(parts))
        same_height = self._rows == height
        self._rows = height
        self.update(Group(*parts), layout=not same_height)

    @staticmethod
    def _columns_for(width: int) -> list[str]:
        """Narrow terminals drop the least needed columns first rather than squeezing all."""
        keep = list(DEVICE_COLUMNS)
        for drop in DEVICE_DROP_ORDER:
            if sum(DEVICE_WIDTHS[k] + 1 for k in keep) - 1 <= width:
                break
            keep.remove(drop)
        return keep

    def on_resize(self) -> None:
        self._shown = None      # the column set (and the legend's wrapping) depend on the width
        self._rows = None
        self.update_from()
        # Height is "auto": measured again only on a layout pass, so ask for one after this
        # resize has settled (the first measure may have used the pre-resize legend wrapping).
        self.call_after_refresh(self.refresh, layout=True)


# -- the models table -------------------------------------------------------------------------

COLUMNS = tuple((key, label) for key, label, _ in MODEL_COLUMNS)


def cell(value: Any, style: str = "", justify: str | None = None) -> Text:
    """One table cell: literal text (DataTable parses a plain str as markup), control characters
    escaped, cut with an ellipsis rather than wrapped when the column is narrower."""
    return Text(safe(value), style=style, no_wrap=True, overflow="ellipsis",
                justify=justify)  # type: ignore[arg-type]


def state_cell(record: dict[str, Any]) -> Text:
    state = record.get("state", "?")
    text = cell(state, STATE_STYLE.get(state, ""))
    if state == "loading":
        frac = progress_fraction(record.get("progress"))
        if frac is not None:
            text.append(f" {frac * 100:.0f}%", style="bold yellow")
    elif state == "failed":
        diag = record.get("diagnosis") or {}
        if diag.get("code"):
            text.append(f" {safe(diag['code'])}", style="red")
    return text


def row_cells(record: dict[str, Any], now: float) -> dict[str, Any]:
    name = cell(record.get("name", "?"), "red" if record.get("state") == "failed" else "")
    pin = record.get("pin") or ("yes" if record.get("pinned") else "")
    return {
        "name": name,
        "state": state_cell(record),
        "placement": cell(placement_text(record.get("placement"))),
        "size": cell(human_bytes(record.get("bytes")), justify="right"),
        "dtype": cell(dtype_text(record.get("dtypes"))),
        "clients": cell(record.get("clients") or 0, justify="right"),
        "last_fetch": cell(human_age(record.get("last_fetch"), now)),
        "load": cell(load_time_text(record.get("load_time_s")), justify="right"),
        "pinned": cell(pin, "cyan"),
        "why": cell(record.get("reason") or "", "grey70"),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Text) and isinstance(b, Text):
        return a.plain == b.plain and a.spans == b.spans and a.style == b.style
    return a == b


class ModelTable(DataTable):
    """The models table, kept in step with DaemonState row by row (never rebuilt on an event)."""

    def __init__(self, state: DaemonState, **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.state = state
        self.filter_text = ""
        self.sort_spec = SortSpec("name")
        self._cells: dict[str, dict[str, Any]] = {}
        self._plan: dict[str, int] = {}

    def on_mount(self) -> None:
        if not self._plan:
            self.set_columns({key: 0 for key, _ in COLUMNS if key != "why"})

    @property
    def column_keys(self) -> list[str]:
        return list(self._plan)

    def set_columns(self, plan: dict[str, int]) -> bool:
        """Show the columns of `plan` (key -> width; 0 fits the content). A no-op when nothing
        changes; otherwise the rows are laid out again (a resize, not an event, gets here)."""
        if plan == self._plan:
            return False
        if list(plan) == list(self._plan) and self._resize_columns(plan):
            return True
        keep = self.selected_name
        self._plan = dict(plan)
        labels = dict(COLUMNS)
        self.clear(columns=True)
        self._cells = {}
        for key, width in plan.items():
            self.add_column(labels[key], key=key, width=width or None)
        self._label_columns()
        self.sync(list(self.state.models))
        if keep is not None:
            self.select(keep)
        return True

    @property
    def selected_name(self) -> str | None:
        if self.row_count == 0:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:
            return None
        return key.value if key is not None else None

    def _resize_columns(self, plan: dict[str, int]) -> bool:
        """Same columns, new widths (a terminal resized within one width band): change the
        widths in place, so dragging a window edge never re-adds 500 rows. False when this
        DataTable lacks the internals used here (a Textual upgrade): the caller rebuilds."""
        try:
            for key, width in plan.items():
                column = self.columns[ColumnKey(key)]
                column.width = width or column.content_width
                column.auto_width = not width
            self._clear_caches()
            self._require_update_dimensions = True
        except (AttributeError, KeyError):
            return False
        self._plan = dict(plan)
        self.refresh()
        return True

    def sync(self, names: set[str] | list[str], now: float | None = None) -> None:
        """Bring the given rows in line with the state: update in place, add, or drop."""
        now = time.time() if now is None else now
        resort = False
        keep = self.selected_name
        for name in names:
            record = self.state.models.get(name)
            visible = record is not None and model_matches(record, self.filter_text)
            if not visible:
                if name in self._cells:
                    self.remove_row(name)
                    del self._cells[name]
                continue
            cells = row_cells(record, now)
            old = self._cells.get(name)
            if old is None:
                self.add_row(*(cells[k] for k in self._plan), key=name)
                self._cells[name] = cells
                resort = True
                continue
            for key, width in self._plan.items():
                if not _same(old[key], cells[key]):
                    self.update_cell(name, key, cells[key], update_width=not width)
                    if key == self.sort_spec.column:
                        resort = True
            self._cells[name] = cells
        if resort:
            self.apply_sort(keep)

    def rebuild(self, now: float | None = None) -> None:
        """Filter changed or full status replaced: drop rows that vanished, sync the rest."""
        gone = [n for n in self._cells if n not in self.state.models]
        for name in gone:
            self.remove_row(name)
            del self._cells[name]
        self.sync(list(self.state.models), now)

    def refresh_ages(self, now: float) -> None:
        """Re-render the 'last fetch' column only (relative times age without events)."""
        for name, cells in self._cells.items():
            record = self.state.models.get(name)
            if record is None:
                continue
            age = cell(human_age(record.get("last_fetch"), now))
            if age.plain != cells["last_fetch"].plain:
                cells["last_fetch"] = age
                if "last_fetch" in self._plan:
                    self.update_cell(name, "last_fetch", age)

    def set_sort(self, column: str, reverse: bool | None = None) -> None:
        if reverse is None:
            reverse = (not self.sort_spec.reverse) if column == self.sort_spec.column else False
        self.sort_spec = SortSpec(column, reverse)
        self.apply_sort(self.selected_name)
        self._label_columns()

    def _label_columns(self) -> None:
        for key, label in COLUMNS:
            if key not in self._plan:
                continue
            column = self.columns.get(key)  # type: ignore[call-overload]
            if column is None:
                continue
            arrow = (" ▼" if self.sort_spec.reverse else " ▲") if key == self.sort_spec.column else ""
            column.label = Text(label + arrow)
        self.refresh()

    def apply_sort(self, keep: str | None = None) -> None:
        column = self.sort_spec.column
        models = self.state.models

        def key(name_cell: Any) -> Any:
            name = name_cell.plain if isinstance(name_cell, Text) else str(name_cell)
            return sort_key(column, models.get(name, {"name": name}))

        self.sort("name", key=key, reverse=self.sort_spec.reverse)
        if keep is not None and keep in self._cells:
            self.move_cursor(row=self.get_row_index(keep), scroll=False)

    def select(self, name: str) -> bool:
        if name not in self._cells:
            return False
        self.move_cursor(row=self.get_row_index(name))
        return True


# -- detail pane and event log ----------------------------------------------------------------

def detail_renderable(record: dict[str, Any] | None, detail: dict[str, Any] | None, now: float,
                      actions_note: str | None = None) -> RenderableType:
    if record is None:
        return Text("Select a model to see where it sits, why, and what is in it.", style="grey50")
    title = Text()
    state = record.get("state", "?")
    title.append(safe(record.get("name", "?")), style="bold")
    title.append("  ")
    title.append(safe(state), style=STATE_STYLE.get(state, ""))
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="grey62", no_wrap=True, width=9)
    grid.add_column(ratio=1, overflow="fold")

    def row(label: str, value: str | Text, style: str = "") -> None:
        # Every value here quotes the daemon (names, paths, messages): escaped, never markup.
        grid.add_row(label, value if isinstance(value, Text) else Text(safe(value), style=style))

    row("why", record.get("reason") or why_missing(record), "grey85")
    diag = record.get("diagnosis") or (detail or {}).get("diagnosis")
    if diag:
        row(Text("diagnosis", style="bold red"),  # type: ignore[arg-type]
            Text.assemble((f"[{safe(diag.get('code', '?'))}] ", "bold red"), (safe(diag.get("message")), "red")))
    elif state == "failed" and record.get("error"):
        row("error", str(record["error"]), "red")
    items = placement_items(record.get("placement"))
    if items:
        row("placement", ", ".join(f"{dev} {human_bytes(b)}" for dev, b in items))
    insp = (detail or {}).get("inspection") or {}
    fmt = insp.get("format") or record.get("format")
    tensors = insp.get("tensors", record.get("tensors"))
    size = insp.get("bytes", record.get("bytes"))
    summary = [s for s in (fmt, f"{tensors} tensors" if tensors is not None else None,
                           human_bytes(size) if size is not None else None) if s]
    files = insp.get("files") or ()
    if len(files) > 1:
        summary.append(f"{len(files)} files")
    if summary:
        row("contents", " · ".join(summary))
    dtypes = insp.get("dtypes") or record.get("dtypes") or {}
    if dtypes:
        row("dtypes", ", ".join(f"{k} {human_bytes(v)}" for k, v in
                                sorted(dtypes.items(), key=lambda kv: -kv[1])))
    locations = insp.get("locations") or record.get("locations") or {}
    if locations:
        row("saved on", ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(locations.items())))
    prefixes = insp.get("prefixes") or record.get("prefixes") or ()
    if prefixes:
        row("prefixes", ", ".join(safe(p) for p in prefixes) + " (stripped on load)")
    if insp.get("groups"):
        row("groups", f"{len(insp['groups'])} · largest tensor {human_bytes(insp.get('largest_tensor'))}")
    pin = record.get("pin")
    row("usage", f"{record.get('clients') or 0} clients · {record.get('fetches') or 0} fetches · "
                 f"last {human_age(record.get('last_fetch'), now)}")
    row("load", f"{load_time_text(record.get('load_time_s'))} · pinned: "
                + (f"yes, to {pin}" if pin else ("yes" if record.get("pinned") else "no")))
    if record.get("path"):
        row("path", str(record["path"]), "grey62")
    parts: list[RenderableType] = [title]
    if actions_note:   # first, so a long detail never scrolls the reason out of sight
        parts.append(Text(actions_note, style="yellow"))
    parts.append(grid)
    return Group(*parts)


def why_missing(record: dict[str, Any]) -> str:
    """What to say when the daemon gave no reason (an older daemon, or a state with none)."""
    state = record.get("state")
    if state == "queued":
        return "waiting to be read"
    if state == "loading":
        return "being read"
    if state == "failed":
        return "could not be loaded: the diagnosis below says why and what to do"
    return "-"


class DetailPane(Static):
    pass


class EventLog(RichLog):
    """The daemon's decisions, newest at the bottom, capped so a long day stays cheap."""

    def __init__(self, fmt_time: Callable[[float], str], **kwargs: Any) -> None:
        # min_width: RichLog renders at >= 78 columns by default and crops the rest in a
        # narrower pane; wrap at the pane's real width instead.
        super().__init__(max_lines=1000, wrap=True, markup=False, highlight=False,
                         auto_scroll=True, min_width=20, **kwargs)
        self.fmt_time = fmt_time
        self.plain_lines: deque[str] = deque(maxlen=1000)   # the same lines as text (tests, copy)

    def add(self, ts: float, action: str, message: str) -> None:
        line = Text()
        line.append(self.fmt_time(ts) + " ", style="grey50")
        line.append(f"{safe(action):<9}", style=ACTION_STYLE.get(action, "white"))
        line.append(" " + safe(message))
        self.plain_lines.append(line.plain)
        self.write(line)

    def text(self) -> str:
        return "\n".join(self.plain_lines)


# Keys the footer keeps on screen at any width: grouped and docked at the right, so a narrow
# terminal cuts (or scrolls) the other keys, never these.
ALWAYS_SHOWN = ("help", "quit")


class AppFooter(Footer):
    """The footer with `? Help` and `q Quit` always visible, however narrow the terminal."""

    DEFAULT_CSS = """
    AppFooter #footer-always { dock: right; width: auto; height: 1; }
    AppFooter #footer-always FooterKey.-command-palette { dock: none; }
    """

    def compose(self) -> ComposeResult:
        pinned: dict[str, Widget] = {}
        for widget in super().compose():
            action = getattr(widget, "action", None)
            if isinstance(widget, FooterKey) and action in ALWAYS_SHOWN and action not in pinned:
                pinned[action] = widget
            elif isinstance(widget, FooterKey) and widget.has_class("-command-palette"):
                pinned["palette"] = widget
            else:
                yield widget
        if pinned:
            with HorizontalGroup(id="footer-always"):
                for key in ("palette", *ALWAYS_SHOWN):
                    if key in pinned:
                        yield pinned[key]


def problems_renderable(daemon: dict[str, Any]) -> RenderableType:
    """The daemon's `problems` (path -> why it is not served) and `pending` (model -> what it
    waits for), for the problems dialog. Paths are file names: escaped, never markup."""
    problems = daemon.get("problems") or {}
    pending = daemon.get("pending") or {}
    if not problems and not pending:
        return Text("No problems: every file in the model directory is served or ignored on purpose.",
                    style="green")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True, max_width=36, overflow="ellipsis", style="bold")
    grid.add_column(ratio=1, overflow="fold")
    if problems:
        grid.add_row(Text("Not served", style="bold underline yellow"), "")
        for path, why in sorted(problems.items()):
            grid.add_row(Text(safe(path)), Text(safe(why)))
    if pending:
        if problems:
            grid.add_row("", "")
        grid.add_row(Text("Waiting", style="bold underline cyan"), "")
        for name, what in sorted(pending.items()):
            grid.add_row(Text(safe(name)), Text(safe(what)))
    return grid
