"""Pure view-model helpers for the dashboard: formatting and the local copy of daemon state.

Nothing here touches Textual or the socket, so it is cheap to unit-test and shared by the
widgets. The daemon's status JSON (docs/INTERNALS.md "status JSON") is the input; records are
kept as the plain dicts the daemon sends so a field the daemon adds later is never lost.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from devmapd.textfmt import safe as _safe_line

GIB = 1 << 30
MIB = 1 << 20
KIB = 1 << 10

SPARK_CHARS = "▁▂▃▄▅▆▇█"
HISTORY_LEN = 24
HISTORY_INTERVAL_S = 5.0     # one sparkline sample per 5 s: 12 cells show the last minute

# Model states in the order an operator cares about them when sorting by state.
STATE_ORDER = {"failed": 0, "loading": 1, "queued": 2, "ready": 3, "evicted": 4}


def safe(value: Any) -> str:
    """`value` as one printable line (devmapd.textfmt.safe: every control character escaped,
    ordinary Unicode kept), and "" for None. Every string that came from the daemon (a model name
    is a file name, a message may quote one) goes through this before it is shown; Rich markup is
    never parsed from such a string because the widgets build `Text` objects.

    >>> safe("evil\\n\\x1b[31mname\\x07")
    'evil\\\\n\\\\x1b[31mname\\\\x07'
    """
    return "" if value is None else _safe_line(value)


def human_bytes(n: int | float | None, *, short: bool = False) -> str:
    """Bytes as GiB/MiB/KiB with a precision that keeps columns narrow.

    >>> human_bytes(3 * GIB + GIB // 2)
    '3.5 GiB'
    """
    if n is None:
        return "-"
    n = int(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            value = n / size
            text = f"{value:.0f}" if value >= 100 else f"{value:.1f}"
            return f"{sign}{text}{unit[0] if short else ' ' + unit}"
    return f"{sign}{n}{'B' if short else ' B'}"


def short_uuid(uuid: str | None) -> str:
    """NVML UUIDs are long ('GPU-1a2b3c4d-...'): the prefix plus 8 hex digits identifies a card."""
    if not uuid:
        return "-"
    head, _, rest = uuid.partition("-")
    if rest:
        return f"{head}-{rest[:8]}"
    return uuid[:12]


def human_duration(seconds: float | None) -> str:
    """'3d 04h', '2h 05m', '4m 09s', '12s' — two units at most, to fit the header."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h:02d}h"
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"


def human_age(ts: float | None, now: float) -> str:
    """A past timestamp as 'never' / '5s ago' / '3m ago' / '2h ago' / '4d ago'."""
    if not ts:
        return "never"
    age = max(0.0, now - float(ts))
    if age < 60:
        return f"{int(age)}s ago"
    if age < 3600:
        return f"{int(age // 60)}m ago"
    if age < 86400:
        return f"{int(age // 3600)}h ago"
    return f"{int(age // 86400)}d ago"


def load_time_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"


def progress_fraction(progress: Any) -> float | None:
    """The daemon reports progress as a fraction, a percentage or {done, total}; accept each."""
    if progress is None:
        return None
    if isinstance(progress, dict):
        done, total = progress.get("done"), progress.get("total")
        if isinstance(done, (int, float)) and isinstance(total, (int, float)) and total > 0:
            return max(0.0, min(1.0, done / total))
        return None
    if isinstance(progress, (int, float)):
        value = float(progress)
        return max(0.0, min(1.0, value / 100.0 if value > 1.0 else value))
    return None


def utilization_percent(util: Any) -> float | None:
    """Percent 0-100 (NVML and the simulate file both use percent); None when unknown."""
    if not isinstance(util, (int, float)):
        return None
    value = float(util)
    return value


def dtype_text(dtypes: dict[str, int] | None) -> str:
    """The dominant dtype, with '+' when the checkpoint mixes several."""
    if not dtypes:
        return "-"
    ordered = sorted(dtypes.items(), key=lambda kv: -kv[1])
    main = ordered[0][0]
    return f"{main}+" if len(ordered) > 1 else main


def placement_items(placement: dict[str, int] | None) -> list[tuple[str, int]]:
    """Placement entries, GPUs first (by index), host last: the order the device panel uses."""
    if not placement:
        return []
    return sorted(placement.items(), key=lambda kv: device_sort_key(kv[0]))


def placement_text(placement: dict[str, int] | None) -> str:
    items = placement_items(placement)
    if not items:
        return "-"
    if len(items) == 1:
        return items[0][0]
    return "+".join(f"{dev} {human_bytes(b, short=True)}" for dev, b in items)


def device_sort_key(device_id: str) -> tuple[int, int, str]:
    if device_id.startswith("cuda:"):
        try:
            return (0, int(device_id[5:]), device_id)
        except ValueError:
            pass
    if device_id == "cpu":
        return (2, 0, device_id)
    return (1, 0, device_id)


def main_device(record: dict[str, Any]) -> str | None:
    """Where most of a model's bytes sit (the device a 'pin here' means)."""
    items = placement_items(record.get("placement"))
    if not items:
        return None
    return max(items, key=lambda kv: kv[1])[0]


def model_matches(record: dict[str, Any], needle: str) -> bool:
    """The filter box matches name, state, dtype and device ids, case-insensitively."""
    if not needle:
        return True
    needle = needle.lower()
    hay = [record.get("name", ""), record.get("state", ""), *(record.get("dtypes") or {}).keys(),
           *(record.get("placement") or {}).keys(), record.get("format") or ""]
    return any(needle in str(h).lower() for h in hay)


@dataclass(frozen=True)
class SortSpec:
    column: str
    reverse: bool = False


SORT_COLUMNS = ("name", "state", "placement", "size", "dtype", "clients", "last_fetch", "load", "pinned")


def sort_key(column: str, record: dict[str, Any]) -> Any:
    """A total order per column; the name breaks ties so the order never jumps between refreshes."""
    name = record.get("name", "")
    if column == "state":
        primary: Any = STATE_ORDER.get(record.get("state", ""), 9)
    elif column == "placement":
        primary = device_sort_key(main_device(record) or "~")
    elif column == "size":
        primary = -(record.get("bytes") or 0)          # biggest first reads naturally
    elif column == "dtype":
        primary = dtype_text(record.get("dtypes"))
    elif column == "clients":
        primary = -(record.get("clients") or 0)
    elif column == "last_fetch":
        primary = -(record.get("last_fetch") or 0)     # most recent first
    elif column == "load":
        primary = -(record.get("load_time_s") or 0)
    elif column == "pinned":
        primary = 0 if record.get("pinned") else 1
    else:
        primary = name.lower()
    return (primary, name)


@dataclass
class DeviceHistory:
    """A short ring of free-memory samples per device for the sparkline."""
    maxlen: int = HISTORY_LEN
    samples: dict[str, deque[float]] = field(default_factory=dict)

    def add(self, device: dict[str, Any]) -> None:
        total = device.get("total") or 0
        if total <= 0:
            return
        ring = self.samples.setdefault(device["id"], deque(maxlen=self.maxlen))
        ring.append(max(0.0, min(1.0, (device.get("free") or 0) / total)))

    def sparkline(self, device_id: str, width: int = 12) -> str:
        ring = list(self.samples.get(device_id, ()))[-width:]
        if not ring:
            return " " * width
        chars = [SPARK_CHARS[min(len(SPARK_CHARS) - 1, int(v * (len(SPARK_CHARS) - 1) + 0.5))] for v in ring]
        return "".join(chars).rjust(width)


@dataclass(frozen=True)
class MemorySplit:
    """A device's memory split the way the bar draws it; the four parts sum to total."""
    models: int
    others: int
    reserve: int
    free: int
    total: int


def memory_split(device: dict[str, Any]) -> MemorySplit:
    total = max(0, int(device.get("total") or 0))
    free = max(0, int(device.get("free") or 0))
    used = device.get("used")
    used = max(0, int(used)) if used is not None else max(0, total - free)
    held = max(0, int(device.get("held") or 0))
    reserve = max(0, int(device.get("reserve") or 0))
    models = min(held, used) if used else held
    models = min(models, total)
    others = max(0, min(used - models, total - models))
    reserve = min(reserve, free, max(0, total - models - others))
    free_part = max(0, total - models - others - reserve)
    return MemorySplit(models, others, reserve, free_part, total)


class DaemonState:
    """The dashboard's copy of the daemon's state, updated from status replies and events.

    `apply_*` return what changed so the widgets redraw only that (a 500-model table must not be
    rebuilt on every event).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.daemon: dict[str, Any] = {}
        self.devices: list[dict[str, Any]] = []
        self.models: dict[str, dict[str, Any]] = {}
        self.history = DeviceHistory()
        self.loaded = False
        self._last_sample = float("-inf")
        self._sampled_once = False

    def apply_status(self, status: dict[str, Any]) -> tuple[set[str], set[str]]:
        """Replace everything; returns (changed or new model names, removed model names)."""
        self.daemon = dict(status.get("daemon") or {})
        self.apply_devices(status.get("devices") or [])
        new = {m["name"]: m for m in status.get("models") or [] if "name" in m}
        removed = set(self.models) - set(new)
        changed = {name for name, rec in new.items() if self.models.get(name) != rec}
        self.models = new
        self.loaded = True
        return changed, removed

    def apply_devices(self, devices: Iterable[dict[str, Any]]) -> bool:
        """Store the device list; returns whether anything shown changed (list or history)."""
        new = sorted((dict(d) for d in devices), key=lambda d: device_sort_key(d.get("id", "")))
        changed = new != self.devices
        self.devices = new
        now = self.clock()
        # The daemon reports at every poll (often sub-second): sample the sparkline at a fixed
        # pace so its width means the same span of time on every machine.
        if now - self._last_sample >= HISTORY_INTERVAL_S or changed and not self._sampled_once:
            self._last_sample = now
            self._sampled_once = True
            for dev in self.devices:
                self.history.add(dev)
            changed = True
        return changed

    def apply_model(self, record: dict[str, Any]) -> str | None:
        """Store one model record; returns the previous state (None when new)."""
        name = record.get("name")
        if not name:
            return None
        prev = self.models.get(name)
        self.models[name] = record
        return prev.get("state") if prev else None

    def remove_model(self, name: str) -> bool:
        return self.models.pop(name, None) is not None

    def device(self, device_id: str) -> dict[str, Any] | None:
        for dev in self.devices:
            if dev.get("id") == device_id:
                return dev
        return None

    def uptime(self) -> float | None:
        started = self.daemon.get("started_at")
        if isinstance(started, (int, float)):
            return self.clock() - started
        up = self.daemon.get("uptime_s")
        return float(up) if isinstance(up, (int, float)) else None


@dataclass(frozen=True)
class Fit:
    """How well a model fits on one device, as the remap dialog shows it."""
    device: str
    ok: bool
    label: str          # one short phrase: "fits — 9.1 GiB left", "needs 2.0 GiB more", "lost"
    headroom: int       # bytes left after placing it (negative when it does not fit)


def fit_on(device: dict[str, Any], record: dict[str, Any]) -> Fit:
    """Whether `record` fits on `device`: its free memory less the reserve, plus what the model
    already holds there (moving within a device frees its own bytes first)."""
    dev_id = device.get("id", "?")
    need = int(record.get("bytes") or 0)
    if device.get("lost"):
        return Fit(dev_id, False, "device lost", -need)
    if device.get("error"):
        return Fit(dev_id, False, f"error: {device['error']}", -need)
    here = int((record.get("placement") or {}).get(dev_id, 0))
    available = int(device.get("free") or 0) - int(device.get("reserve") or 0) + here
    headroom = available - need
    if here and here >= need:
        return Fit(dev_id, True, "already here", headroom)
    if headroom < 0:
        return Fit(dev_id, False, f"does not fit: needs {human_bytes(-headroom)} more", headroom)
    total = int(device.get("total") or 0)
    tight = total and headroom < total * 0.05
    label = f"{'tight' if tight else 'fits'}: {human_bytes(headroom)} left after"
    return Fit(dev_id, True, label, headroom)


# -- layout for the terminal's size -------------------------------------------------------------

MODELS_MIN_ROWS = 4          # the models table never shows fewer rows than this
BOTTOM_FULL = 13             # detail | log height when there is room
BOTTOM_MIN = 6               # below this a bordered pane shows too little to be worth its rows
BOTTOM_MAX = 22              # with few models the bottom panes take the rows the table leaves
WIDE_BOTTOM = 100            # below this width detail and log share the bottom in turns


@dataclass(frozen=True)
class Layout:
    """How the main screen divides a terminal: what is shown and how tall it is.

    Heights are in rows. The models table takes what is left (`models_rows` of it for data),
    and the plan guarantees `models_rows >= MODELS_MIN_ROWS` whenever the terminal has room for
    the table at all.
    """
    device_legend: bool          # the bar legend under the devices table
    device_rows: int             # device rows shown (the rest scroll inside the panel)
    devices_height: int          # 0: the devices panel is hidden
    bottom_height: int           # 0: detail and log are hidden
    bottom_panes: tuple[str, ...]   # which of "detail", "log" the bottom shows
    models_rows: int


def plan_layout(width: int, height: int, n_devices: int, *, extra_rows: int = 0,
                bottom: str = "auto", narrow_pane: str = "detail", table_rows: int | None = None) -> Layout:
    """Divide a `width` x `height` terminal. `extra_rows` are taken by the banner and the
    filter box; `bottom` is the operator's choice ("auto", "shown", "hidden", toggled with
    `d`); `narrow_pane` is the pane a narrow terminal shows ("detail" or "log"). `table_rows`
    (the rows the table holds now, when known) lets the bottom panes take rows the table would
    leave empty, up to BOTTOM_MAX.

    Priorities, from first to give way to last: the bar legend, the bottom panes' height
    (down to BOTTOM_MIN, then hidden), the device rows, and never the models table's minimum.
    Header and footer (one row each) always stay: the footer carries `? Help` and `q Quit`.
    """
    avail = max(0, height - 2 - extra_rows)
    models_min = 2 + MODELS_MIN_ROWS                 # border title row + column header + rows
    # Beyond the minimum, the table should get about a third of the screen before the bottom
    # panes take their full height: at 100x30 that is 7 rows of models rather than 4.
    models_target = max(models_min, avail // 3)
    dev_rows = max(1, n_devices)
    legend = True

    def dev_height() -> int:
        return 2 + dev_rows + (1 if legend else 0)   # border title row + column header + rows

    def bottom_for(devices: int) -> int:
        return min(BOTTOM_FULL, avail - devices - models_target)

    bottom_h = bottom_for(dev_height())
    if bottom_h < BOTTOM_FULL - 4 and bottom != "hidden":
        legend = False
        bottom_h = bottom_for(dev_height())
    if bottom == "hidden":
        bottom_h = 0
    elif bottom_h < BOTTOM_MIN:
        # "shown" takes rows from the table down to its minimum; "auto" hides the panes.
        room = avail - dev_height() - models_min
        bottom_h = min(BOTTOM_FULL, max(room, 0)) if bottom == "shown" else 0
        if bottom_h < BOTTOM_MIN - 2:
            bottom_h = 0
    if bottom_h >= BOTTOM_FULL and table_rows is not None:
        unused = avail - dev_height() - bottom_h - (2 + max(MODELS_MIN_ROWS, table_rows))
        if unused > 0:
            bottom_h = min(BOTTOM_MAX, bottom_h + unused)
    devices_h = dev_height()
    spare = avail - bottom_h - models_min
    if devices_h > spare:
        # Too many devices for the height: show what fits (the panel scrolls), or none at all.
        legend = False
        dev_rows = max(0, min(dev_rows, spare - 2))
        devices_h = 2 + dev_rows if dev_rows >= 1 else 0
    models_h = avail - bottom_h - devices_h
    if width >= WIDE_BOTTOM:
        panes: tuple[str, ...] = ("detail", "log")
    else:
        panes = (narrow_pane if narrow_pane in ("detail", "log") else "detail",)
    return Layout(device_legend=legend, device_rows=dev_rows, devices_height=devices_h,
                  bottom_height=bottom_h, bottom_panes=panes if bottom_h else (),
                  models_rows=max(0, models_h - 2))


# -- models table columns for the terminal's width ---------------------------------------------

# key -> (header, fixed width in cells or None for "the rest"); the display order.
MODEL_COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("name", "Name", None), ("state", "State", 16), ("placement", "Placement", 16),
    ("size", "Size", 9), ("dtype", "Dtype", 9), ("clients", "Clients", 7),
    ("last_fetch", "Last fetch", 10), ("load", "Load", 7), ("pinned", "Pinned", 7),
    ("why", "Why", None),
)
# Narrow terminals drop these first, so the name keeps a readable width and nothing scrolls
# sideways (a horizontal scrollbar would also cost the table a row).
COLUMN_DROP_ORDER = ("why", "load", "last_fetch", "dtype", "clients", "pinned", "placement", "size")
NAME_MIN = 18
WHY_MIN = 28
CELL_PADDING = 2             # DataTable pads each cell by one column either side
SCROLLBAR = 2                # the table's vertical scrollbar


def column_plan(width: int) -> dict[str, int]:
    """The models table's columns for a terminal `width` wide: key -> cell width.

    The name takes what the fixed columns leave; a "Why" column (each model's reason) joins
    when the terminal is wide enough for it without squeezing the name.
    """
    usable = max(0, width - SCROLLBAR)
    wide = width >= 140
    fixed = {key: (24 if key == "placement" and wide else w) for key, _, w in MODEL_COLUMNS if w}
    keep = [key for key, _, _ in MODEL_COLUMNS]

    def used(cols: list[str]) -> int:
        return sum(fixed[k] + CELL_PADDING for k in cols if k in fixed) + \
            CELL_PADDING * sum(1 for k in cols if k not in fixed)

    for drop in COLUMN_DROP_ORDER:
        rest = usable - used(keep)
        need = NAME_MIN + (WHY_MIN if "why" in keep else 0)
        if rest >= need:
            break
        keep.remove(drop)
    rest = max(NAME_MIN, usable - used(keep))
    plan: dict[str, int] = {}
    for key in keep:
        if key in fixed:
            plan[key] = fixed[key]
        elif key == "name":
            plan[key] = min(rest - WHY_MIN, 40) if "why" in keep else rest
        else:
            plan[key] = 0          # why: filled in below, after the name
    if "why" in plan:
        plan["why"] = max(WHY_MIN, rest - plan["name"])
    return plan
