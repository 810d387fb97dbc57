"""DevmapdApp: the dashboard an operator keeps open all day.

Data flow: an EventPump thread connects, posts the full status (Connected), then one message per
daemon event (DaemonEvent); the app applies each to its DaemonState and redraws only what changed.
A slow periodic status refresh is a safety net, not the update path. Actions run in thread
workers through devmapd.client and report results and refusals into the event log.
"""
from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from rich.text import Text
from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Input, Static

from .connection import (
    ClientFactory,
    Connected,
    DaemonEvent,
    DaemonUnavailable,
    DevmapdError,
    EventPump,
    PermissionDenied,
    Requests,
    StatusRefreshed,
    Unreachable,
    default_factory,
    error_text,
)
from .dialogs import ConfirmDialog, ProblemsScreen, RemapChoice, RemapDialog
from .help import HelpScreen
from .models import (
    SORT_COLUMNS,
    WIDE_BOTTOM,
    DaemonState,
    Layout,
    column_plan,
    human_bytes,
    main_device,
    plan_layout,
    safe,
)
from .widgets import (
    COLUMNS,
    AppFooter,
    DetailPane,
    DevicePanel,
    EventLog,
    HeaderBar,
    ModelTable,
    detail_renderable,
)

ACTIONS_NEEDING_OPERATOR = ("remap", "pin", "evict", "reload")
MOVES = ("demoted", "promoted", "remapped", "pinned")


class DemoHooks(Protocol):
    """What `devmapd demo` hands the app so the `x` key can squeeze a simulated GPU."""
    pressure: bool

    def set_pressure(self, on: bool) -> str: ...   # returns a sentence for the log


def local_time(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def socket_label(socket: str | None) -> str:
    if socket:
        return socket
    try:
        from devmapd.client import default_socket
        return default_socket()
    except Exception:
        return "default socket"


class MainArea(Vertical):
    """Everything between header and footer. A terminal resize reaches the screen and its
    widgets (not the App's own handlers each time), so this is where the app hears of one."""

    def on_resize(self, event: events.Resize) -> None:
        app = self.app
        if isinstance(app, DevmapdApp):
            app._apply_layout()


class DevmapdApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "devmapd"

    BINDINGS = [
        Binding("m", "remap", "Remap"),
        Binding("p", "pin", "Pin"),
        Binding("e", "evict", "Evict"),
        Binding("r", "reload", "Reload"),
        Binding("slash", "filter", "Filter"),
        Binding("s", "cycle_sort", "Sort"),
        Binding("x", "pressure", "Pressure"),
        Binding("w", "problems", "Problems"),
        Binding("d", "toggle_panes", "Panes"),
        Binding("ctrl+r", "refresh", "Refresh", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self, socket: str | None = None, *, client_factory: ClientFactory | None = None,
                 clock: Callable[[], float] = time.time, demo: DemoHooks | None = None,
                 refresh_s: float = 8.0, time_format: Callable[[float], str] = local_time,
                 retry_backoff: tuple[float, ...] | None = None, handle_signals: bool = False) -> None:
        super().__init__()
        self.socket = socket
        self.factory = client_factory or default_factory(socket)
        self.clock = clock
        self.demo = demo
        self.refresh_s = refresh_s
        self.time_format = time_format
        self.retry_backoff = retry_backoff
        self.handle_signals = handle_signals
        self._signals: list[int] = []
        self.state = DaemonState(clock)
        self.requests = Requests(self.factory)
        self.pump: EventPump | None = None
        self.connected = False
        self.operator = False
        self.hello: dict[str, Any] = {}
        self.outage_logged = False
        self.last_error: str | None = None
        self._pending: set[str] = set()
        self._flush_scheduled = False
        self._details: dict[str, dict[str, Any]] = {}
        self._detail_for: str | None = None
        self._shown_detail_for: str | None = None
        self._last_move: dict[str, tuple[Any, float]] = {}
        self._problems_seen: dict[str, str] = {}
        self._bottom_pref = "auto"          # "auto" | "shown" | "hidden": the `d` key
        self._narrow_pane = "detail"        # the pane a narrow terminal's bottom shows
        self._layout: Layout | None = None
        self._layout_inputs: tuple | None = None

    # -- layout -------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield HeaderBar(self.state, id="header")
        yield Static("", id="banner")
        with MainArea(id="main"):
            yield DevicePanel(self.state, id="devices")
            yield Input(placeholder="filter: name, state, dtype or device — Enter keeps it, Esc clears",
                        id="filter")
            yield ModelTable(self.state, id="models")
            with Horizontal(id="bottom"):
                with VerticalScroll(id="detail-box"):
                    yield DetailPane(id="detail")
                yield EventLog(self.time_format, id="log")
        yield AppFooter()

    def on_mount(self) -> None:
        # Kept as attributes: while a dialog is open, query_one() searches the dialog's screen.
        self._table = self.query_one(ModelTable)
        self._header = self.query_one(HeaderBar)
        self._devices_panel = self.query_one(DevicePanel)
        self._event_log = self.query_one(EventLog)
        self._detail = self.query_one(DetailPane)
        self._main = self.query_one("#main", MainArea)
        self._banner = self.query_one("#banner", Static)
        self._filter_box = self.query_one("#filter", Input)
        self._bottom = self.query_one("#bottom", Horizontal)
        self._detail_box = self.query_one("#detail-box", VerticalScroll)
        header = self._header
        header.socket = socket_label(self.socket)
        header.update_from()
        self._devices_panel.border_title = "Devices"
        self.query_one("#detail-box").border_title = "Selected model"
        self._event_log.border_title = "Decisions & events"
        self._set_banner(f"connecting to {header.socket} …", "connecting")
        self._apply_layout()
        self._title_models()
        self._devices_panel.update_from()
        self._show_detail()
        self._table.focus()
        if self.handle_signals:
            self._install_signal_handlers()
        self.pump = EventPump(self.factory, self.post_message, self.retry_backoff)
        self.pump.start()
        self.set_interval(self.refresh_s, self._safety_refresh)
        self.set_interval(10.0, self._tick)

    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGHUP (terminal closed) end the app the normal way. Left to Python, SIGHUP
        kills the process without restoring the terminal, and an exception raised from a signal
        handler skips Textual's shutdown, leaving its input thread spinning on the dead tty."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                loop.add_signal_handler(sig, self.exit)
                self._signals.append(sig)
            except (ValueError, RuntimeError, NotImplementedError):
                pass   # not the main thread: the embedding program owns signals

    def on_unmount(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals.clear()
        if self.pump is not None:
            self.pump.stop()
        self.requests.close()

    def _apply_layout(self, force: bool = False) -> None:
        """Fit the panels to the terminal (models.plan_layout): legend, device rows and
        the bottom panes give way before the models table drops under its minimum rows."""
        if not hasattr(self, "_bottom"):
            return
        width, height = self.size
        banner = self._banner
        extra = 0
        if banner.has_class("visible"):
            extra += max(1, -(-(len(str(banner.content)) + 2) // max(1, width)))
        if self._filter_box.has_class("visible"):
            extra += 1
        rows = self._table.row_count
        inputs = (width, height, len(self.state.devices), extra, self._bottom_pref, self._narrow_pane,
                  min(rows, height))     # past a screenful the row count changes nothing
        if inputs == self._layout_inputs and not force:
            return
        self._layout_inputs = inputs
        plan = plan_layout(width, height, len(self.state.devices), extra_rows=extra,
                           bottom=self._bottom_pref, narrow_pane=self._narrow_pane, table_rows=rows)
        self._layout = plan
        devices = self._devices_panel
        devices.display = plan.devices_height > 0
        devices.styles.max_height = max(1, plan.devices_height)
        devices.set_legend(plan.device_legend)
        self._bottom.display = plan.bottom_height > 0
        self._bottom.styles.height = max(1, plan.bottom_height)
        self._detail_box.display = "detail" in plan.bottom_panes
        self._event_log.display = "log" in plan.bottom_panes
        footer = self.query_one(AppFooter)
        footer.show_command_palette = width >= 120    # ctrl+p works anyway; room for keys first
        footer.compact = width < 100
        if self._table.set_columns(column_plan(width)):
            self._title_models()

    def action_toggle_panes(self) -> None:
        """`d`: wide terminals show or hide detail | log; narrow ones go detail -> log -> none."""
        shown = bool(self._layout and self._layout.bottom_height)
        if not shown:
            self._bottom_pref, self._narrow_pane = "shown", "detail"
        elif self.size.width < WIDE_BOTTOM and self._narrow_pane == "detail":
            self._narrow_pane = "log"
        else:
            self._bottom_pref, self._narrow_pane = "hidden", "detail"
        self._apply_layout()
        self._show_detail()

    # -- connection state ---------------------------------------------------------------------

    def on_connected(self, message: Connected) -> None:
        self.connected = True
        self.hello = message.hello or {}
        self.operator = bool(self.hello.get("operator"))
        self._set_banner(None)
        self._main.remove_class("stale")
        changed, removed = self.state.apply_status(message.status)
        self._redraw_all(changed, removed)
        self._apply_layout()
        header = self._header
        header.hello = self.hello
        header.mode = "operator" if self.operator else "read-only"
        header.update_from()
        log = self._event_log
        now = self.clock()
        version = self.state.daemon.get("version") or self.hello.get("version") or "?"
        if message.reconnected or self.outage_logged:
            log.add(now, "info", f"reconnected to devmapd {version}; status refreshed")
        else:
            n = len(self.state.models)
            log.add(now, "info", f"connected to devmapd {version}: {n} model{'s' if n != 1 else ''}, "
                                 f"{len(self.state.devices)} devices")
            if not self.operator:
                log.add(now, "info", self._read_only_reason())
            if self.demo is not None:
                log.add(now, "info", "demo: press x to start a simulated training job on the GPU "
                                     "devmapd uses most and watch it demote models; x again ends it")
        self._note_problems()
        self.outage_logged = False
        self._update_bindings()

    def on_unreachable(self, message: Unreachable) -> None:
        self.connected = False
        self.last_error = message.error
        sock = self._header.socket
        stale = "; the data below is from before the outage" if self.state.loaded else ""
        self._set_banner(f"⚠ daemon unreachable at {sock}: {message.error} — retrying "
                         f"(attempt {message.attempt}, next in {message.retry_in:g}s){stale}", "down")
        self._apply_layout()
        self._main.add_class("stale")
        self._show_detail()
        if not self.outage_logged:
            self._event_log.add(self.clock(), "error",
                                         f"lost the daemon ({message.error}); retrying")
            self.outage_logged = True
        self._update_bindings()

    def _set_banner(self, text: str | None, kind: str = "down") -> None:
        banner = self._banner
        banner.set_class(text is not None, "visible")
        banner.set_class(kind == "connecting", "connecting")
        banner.update(Text(safe(text)))   # quotes socket paths and error messages: literal

    # -- events -------------------------------------------------------------------------------

    def on_daemon_event(self, message: DaemonEvent) -> None:
        event = message.event
        kind = event.get("type")
        ts = event.get("ts") or self.clock()
        log = self._event_log
        if kind == "model":
            record = event.get("model") or {}
            name = record.get("name")
            if not name:
                return
            # The daemon's own "placed"/"failed" decisions go to the log; a state change alone
            # is shown in the table, not repeated as a log line.
            self.state.apply_model(record)
            self._details.pop(name, None)
            self._queue(name)
        elif kind == "removed":
            name = event.get("name")
            if name and self.state.remove_model(name):
                log.add(ts, "removed", event.get("message") or f"{name} left the model directory")
                self._queue(name)
        elif kind == "devices":
            # Sent at every inventory poll; redraw only when something visible changed.
            if self.state.apply_devices(event.get("devices") or []):
                self._devices_panel.update_from()
                self._header.update_from()
                self._apply_layout()     # a device appeared or went: the panel's height changes
        elif kind == "problems":
            # Sent when the daemon's rescan finds new problems or clears old ones (without it
            # the dashboard learns them at connect and at each safety refresh).
            for key in ("problems", "pending"):
                if isinstance(event.get(key), dict):
                    self.state.daemon[key] = dict(event[key])
            self._header.update_from()
            self._note_problems()
        elif kind == "decision":
            action = event.get("action") or "decision"
            name = str(event.get("name") or "")
            if action in MOVES:
                self._last_move[name] = (event.get("to"), ts)
            elif action == "placed" and self._is_move_echo(name, event.get("to"), ts):
                return   # the move just logged already says where it went
            text = event.get("message") or self._decision_text(event)
            log.add(ts, action, text)
        elif event.get("message"):
            log.add(ts, "info", event["message"])

    def _is_move_echo(self, name: str, to: Any, ts: float) -> bool:
        """A move (demote, promote, remap, pin) is followed by the model's "placed" decision
        once it lands; in a log that is the same fact twice."""
        last = self._last_move.pop(name, None)
        return last is not None and last[0] == to and ts - last[1] < 60

    @staticmethod
    def _decision_text(event: dict[str, Any]) -> str:
        parts = [str(event.get("name") or "?")]
        if event.get("from") or event.get("to"):
            parts.append(f"{event.get('from') or '-'} → {event.get('to') or '-'}")
        return " ".join(parts)

    def _queue(self, name: str) -> None:
        """Coalesce bursts (a directory of 500 models landing) into one table pass per tick."""
        self._pending.add(name)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.set_timer(0.05, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        names, self._pending = self._pending, set()
        table = self._table
        table.sync(names, self.clock())
        self._title_models()
        self._apply_layout()      # a few models more or less: the bottom panes may use the room
        if self._detail_for in names or table.selected_name != self._detail_for:
            self._show_detail()

    def on_status_refreshed(self, message: StatusRefreshed) -> None:
        changed, removed = self.state.apply_status(message.status)
        self._redraw_all(changed, removed)
        self._apply_layout()
        self._note_problems()

    def _note_problems(self) -> None:
        """Log each of the daemon's problems (files it will not serve, and why) once when it
        appears and once when it is gone; the header counts them and `w` lists them."""
        problems = {str(k): str(v) for k, v in (self.state.daemon.get("problems") or {}).items()}
        if problems == self._problems_seen:
            return
        log = self._event_log
        now = self.clock()
        for path, why in sorted(problems.items()):
            if self._problems_seen.get(path) != why:
                log.add(now, "problem", f"{path}: {why}")
        for path in sorted(set(self._problems_seen) - set(problems)):
            log.add(now, "resolved", f"{path} is no longer a problem")
        self._problems_seen = problems
        self._update_bindings()

    def _redraw_all(self, changed: set[str], removed: set[str]) -> None:
        table = self._table
        table.sync(changed | removed, self.clock())
        self._devices_panel.update_from()
        self._header.update_from()
        self._title_models()
        self._show_detail()

    def _safety_refresh(self) -> None:
        if self.connected:
            self._fetch_status()

    @work(thread=True, exclusive=True, group="status")
    def _fetch_status(self) -> None:
        try:
            status = self.requests.call("status")
        except Exception:
            return  # the event pump owns reporting outages
        self.post_message(StatusRefreshed(status))

    def _tick(self) -> None:
        self._header.update_from()
        self._table.refresh_ages(self.clock())

    # -- selection and detail -----------------------------------------------------------------

    def _title_models(self) -> None:
        table = self._table
        spec = table.sort_spec
        label = dict(COLUMNS)[spec.column].lower()
        title = f"Models ({table.row_count} of {len(self.state.models)}) · sorted by {label} " \
                f"{'▼' if spec.reverse else '▲'}"
        if table.filter_text:
            title += f" · filter “{safe(table.filter_text)}”"
        table.border_title = Text(title)    # what the operator typed is shown, never parsed

    def _selected_record(self) -> dict[str, Any] | None:
        table = getattr(self, "_table", None)   # check_action can run before on_mount
        name = table.selected_name if table is not None else None
        return self.state.models.get(name) if name else None

    def _read_only_reason(self) -> str:
        uid = self.hello.get("uid")
        who = f"uid {uid}" if uid is not None else "you"
        return (f"read-only: {who} is not a devmapd operator, so remap/pin/evict/reload are "
                f"disabled (operators: root, the daemon's own user, and the [server] "
                f"operator_uids / operator_groups of its config; empty lists mean root only)")

    def _actions_note(self) -> str | None:
        if not self.connected:
            return "Actions are disabled while the daemon is unreachable."
        if not self.operator:
            uid = self.hello.get("uid")
            return (f"Read-only: {'uid ' + str(uid) if uid is not None else 'you'} is not a devmapd "
                    f"operator, so remap/pin/evict/reload are disabled.")
        return None

    def _show_detail(self) -> None:
        record = self._selected_record()
        name = record.get("name") if record else None
        self._detail_for = name
        detail = self._details.get(name) if name else None
        # Which model's fetched detail is on screen (tests and snapshots wait on it).
        self._shown_detail_for = name if detail is not None else None
        self._detail.update(
            detail_renderable(record, detail, self.clock(), self._actions_note()))
        if name and detail is None and self.connected:
            self._fetch_detail(name)

    @work(thread=True, exclusive=True, group="detail")
    def _fetch_detail(self, name: str) -> None:
        time.sleep(0.15)   # debounce: scrolling through 500 rows must not fire 500 requests
        try:
            detail = self.requests.call("model", name)
        except Exception:
            return
        self.call_from_thread(self._detail_arrived, name, detail)

    def _detail_arrived(self, name: str, detail: dict[str, Any]) -> None:
        self._details[name] = detail if isinstance(detail, dict) else {}
        if self._detail_for == name:
            self._show_detail()

    @on(DataTable.RowHighlighted, "#models")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail()
        self._update_bindings()

    @on(DataTable.HeaderSelected, "#models")
    def _header_selected(self, event: DataTable.HeaderSelected) -> None:
        table = self._table
        table.set_sort(str(event.column_key.value))
        self._title_models()

    # -- bindings -----------------------------------------------------------------------------

    def _update_bindings(self) -> None:
        # Events keep arriving while the app shuts down, when there is no screen left to ask.
        if self.screen_stack:
            self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "pressure":
            return self.demo is not None
        if action == "problems":
            return bool(self.state.daemon.get("problems") or self.state.daemon.get("pending"))
        if action in ACTIONS_NEEDING_OPERATOR:
            if not self.connected or not self.operator:
                return None   # shown greyed out; the reason is in the header and detail pane
            if self._selected_record() is None:
                return None
        return True

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_problems(self) -> None:
        self.push_screen(ProblemsScreen(self.state.daemon))

    def action_cycle_sort(self) -> None:
        table = self._table
        index = SORT_COLUMNS.index(table.sort_spec.column) if table.sort_spec.column in SORT_COLUMNS else -1
        table.set_sort(SORT_COLUMNS[(index + 1) % len(SORT_COLUMNS)], reverse=False)
        self._title_models()

    def action_filter(self) -> None:
        box = self._filter_box
        box.add_class("visible")
        self._apply_layout()
        box.focus()

    def action_clear_filter(self) -> None:
        box = self._filter_box
        if box.value:
            box.value = ""
        box.remove_class("visible")
        self._apply_layout()
        self._table.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        table = self._table
        table.filter_text = event.value.strip()
        table.rebuild(self.clock())
        self._title_models()
        self._apply_layout()
        self._show_detail()

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        if not event.value.strip():
            event.input.remove_class("visible")
            self._apply_layout()
        self._table.focus()

    def action_refresh(self) -> None:
        self._fetch_status()

    def action_pressure(self) -> None:
        if self.demo is None:
            return
        try:
            text = self.demo.set_pressure(not self.demo.pressure)
        except Exception as exc:
            text = f"could not change simulated pressure: {error_text(exc)}"
        self._event_log.add(self.clock(), "info", text)

    def action_remap(self, pin: bool | None = None) -> None:
        record = self._selected_record()
        if record is None:
            return
        name = record["name"]

        def chosen(choice: RemapChoice | None) -> None:
            if choice is None:
                return
            if choice.pin:
                self._run_op("pin", name, choice.device)
            else:
                self._run_op("remap", name, choice.device)

        self.push_screen(RemapDialog(record, list(self.state.devices), pin=pin), chosen)

    def action_pin(self) -> None:
        record = self._selected_record()
        if record is None:
            return
        if record.get("pinned"):
            self._run_op("unpin", record["name"])
        elif main_device(record):
            self._run_op("pin", record["name"], main_device(record))
        else:
            # Not in memory (evicted, failed, queued): "pin where it sits" means nothing, so ask
            # where, with "pin there" already ticked.
            self.action_remap(pin=True)

    def action_evict(self) -> None:
        record = self._selected_record()
        if record is None:
            return
        name = record["name"]
        where = ", ".join(f"{d} {human_bytes(b)}" for d, b in (record.get("placement") or {}).items())
        clients = record.get("clients") or 0
        body = (f"Drop {name} from memory{f' ({where})' if where else ''}? Processes that already "
                f"fetched it keep their copy{f' ({clients} now)' if clients else ''}; the next fetch "
                f"waits for a reload.")
        self.push_screen(ConfirmDialog(f"Evict {name}?", body, "Evict"),
                         lambda yes: self._run_op("evict", name) if yes else None)

    def action_reload(self) -> None:
        record = self._selected_record()
        if record is None:
            return
        name = record["name"]
        body = (f"Read {name} again from disk? Its memory is dropped and it is placed anew; "
                f"fetches wait until it is ready.")
        self.push_screen(ConfirmDialog(f"Reload {name}?", body, "Reload"),
                         lambda yes: self._run_op("reload", name) if yes else None)

    @work(thread=True, group="actions")
    def _run_op(self, op: str, name: str, *args: str) -> None:
        try:
            result = self.requests.call(op, name, *args)
        except PermissionDenied as exc:
            self.call_from_thread(self._op_done, op, name, args, None, "refused", error_text(exc))
        except DaemonUnavailable as exc:
            self.call_from_thread(self._op_done, op, name, args, None, "error",
                                  f"daemon unreachable: {error_text(exc)}")
        except DevmapdError as exc:
            self.call_from_thread(self._op_done, op, name, args, None, "refused", error_text(exc))
        except Exception as exc:  # a bug or a broken socket must not kill the dashboard
            self.call_from_thread(self._op_done, op, name, args, None, "error", error_text(exc))
        else:
            self.call_from_thread(self._op_done, op, name, args, result, None, None)

    def _op_done(self, op: str, name: str, args: tuple[str, ...], result: Any,
                 failure: str | None, error: str | None) -> None:
        log = self._event_log
        target = f" → {args[0]}" if args else ""
        if failure:
            log.add(self.clock(), failure, f"{op} {name}{target}: {error}")
            self.notify(safe(f"{op} {name}: {error}"), severity="error", timeout=6, markup=False)
            return
        message = result.get("message") if isinstance(result, dict) else None
        outcome = result.get("outcome") if isinstance(result, dict) else None
        if not message and isinstance(result, dict) and result.get("state"):
            message = f"accepted, now {result['state']}"
        # The daemon says what happened (applied | pending | unchanged): show it, not "ok".
        said = f"{outcome}: {message}" if outcome and message else (outcome or message or "accepted")
        log.add(self.clock(), "pending" if outcome == "pending" else "info", f"{op} {name}{target}: {said}")
        record = result.get("model") if isinstance(result, dict) else None
        if isinstance(record, dict) and record.get("name"):
            self.state.apply_model(record)
            self._queue(record["name"])


def run(socket: str | None = None, *, demo: DemoHooks | None = None) -> int:
    """Entry for `devmapd tui [--socket S]` (and `devmapd demo`): returns the exit status."""
    app = DevmapdApp(socket, demo=demo, handle_signals=True)
    result = app.run()
    return int(result or 0)


def stylesheet_path() -> Path:
    return Path(__file__).with_name(DevmapdApp.CSS_PATH)
