"""The dashboard against a REAL daemon process (simulated GPUs, real checkpoints): bindings,
dialogs, actions, pressure, and recovery after the daemon restarts."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from textual.widgets import OptionList

from devmapd_tui.app import DevmapdApp
from devmapd_tui.dialogs import ConfirmDialog, RemapDialog
from devmapd_tui.help import HelpScreen
from devmapd_tui.widgets import DetailPane, DevicePanel, EventLog, HeaderBar, ModelTable
from tests.tui.helpers import DEFAULT_GPUS, in_thread, text_of, wait_until

SIZE = (120, 40)


@asynccontextmanager
async def dashboard(handle: Any, models: int = 4) -> AsyncIterator[tuple[DevmapdApp, Any]]:
    app = DevmapdApp(handle.socket)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.connected and len(app.state.models) >= models,
                         what=f"the dashboard to connect and list {models} models")
        yield app, pilot


def record(app: DevmapdApp, name: str) -> dict:
    return app.state.models.get(name) or {}


def log_text(app: DevmapdApp) -> str:
    return app.query_one(EventLog).text()


async def select(app: DevmapdApp, pilot: Any, name: str) -> None:
    """Select a model the way a user does: filter to it, Enter, then it is the only row."""
    await pilot.press("slash", *name, "enter")
    table = app.query_one(ModelTable)
    await wait_until(pilot, lambda: table.selected_name == name, what=f"{name} selected")


async def test_shows_devices_models_and_a_diagnosis(shared_daemon):
    handle = shared_daemon
    await in_thread(handle.wait_model, "big")
    await in_thread(handle.wait_model, "truncated", "failed")
    async with dashboard(handle) as (app, pilot):
        await wait_until(pilot, lambda: record(app, "big").get("state") == "ready"
                         and record(app, "truncated").get("state") == "failed")
        table = app.query_one(ModelTable)
        assert table.row_count == 4
        header = text_of(app.query_one(HeaderBar).content)
        assert "simulated · 2 GPUs" in header and "operator" in header and handle.socket in header
        devices = text_of(app.query_one(DevicePanel).content)
        for dev in ("cuda:0", "cuda:1", "cpu", "sim", "Simulated GPU 0", "1.0 GiB", "512 MiB"):
            assert dev in devices, dev
        big = record(app, "big")
        (where,) = big["placement"]
        row = [text_of(c).strip() for c in table.get_row("big")]
        assert row[:4] == ["big", "ready", where, "4.0 MiB"]

        await select(app, pilot, "truncated")
        await wait_until(pilot, lambda: "[truncated]" in text_of(app.query_one(DetailPane).content),
                         what="the diagnosis in the detail pane")
        detail = text_of(app.query_one(DetailPane).content)
        assert "diagnosis" in detail and "truncated.pt" in detail


async def test_remap_dialog_moves_the_model(shared_daemon):
    handle = shared_daemon
    before = await in_thread(handle.wait_model, "big")
    (source,) = before["placement"]
    target = "cuda:1" if source != "cuda:1" else "cuda:0"
    async with dashboard(handle) as (app, pilot):
        await select(app, pilot, "big")
        await pilot.press("m")
        await wait_until(pilot, lambda: isinstance(app.screen, RemapDialog), what="remap dialog")
        options = app.screen.query_one(OptionList)
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        assert ids[0] == "auto" and {"cuda:0", "cuda:1", "cpu"} <= set(ids)
        prompt = text_of(options.get_option(target).prompt)
        assert "fits" in prompt, prompt
        assert "current placement" in text_of(options.get_option(source).prompt)
        for _ in range(ids.index(target)):
            await pilot.press("down")
        await pilot.press("enter")
        await wait_until(pilot, lambda: not isinstance(app.screen, RemapDialog))
        await wait_until(pilot, lambda: set(record(app, "big").get("placement") or {}) == {target}
                         and record(app, "big").get("state") == "ready",
                         what=f"big to show on {target}")
        assert "remapped" in log_text(app) and f"remap big → {target}" in log_text(app)
    status = await in_thread(handle.model, "big")
    assert set(status["placement"]) == {target}


async def test_pin_unpin_evict_and_reload_with_confirmation(shared_daemon):
    handle = shared_daemon
    await in_thread(handle.wait_model, "big")
    async with dashboard(handle) as (app, pilot):
        await select(app, pilot, "big")
        await pilot.press("p")
        await wait_until(pilot, lambda: record(app, "big").get("pinned") is True, what="pinned")
        assert (await in_thread(handle.model, "big"))["pinned"] is True
        await pilot.press("p")
        await wait_until(pilot, lambda: record(app, "big").get("pinned") is False, what="unpinned")

        # Evict asks first; "n" leaves the model alone.
        await pilot.press("e")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), what="confirm")
        await pilot.press("n")
        await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmDialog))
        # "n" sends nothing: no action worker was started and the log records none.
        assert not [w for w in app.workers if w.group == "actions"]
        assert "evict big" not in log_text(app)
        assert (await in_thread(handle.model, "big"))["state"] == "ready"

        await pilot.press("e")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), what="confirm")
        await pilot.press("y")
        await wait_until(pilot, lambda: record(app, "big").get("state") == "evicted", what="evicted")
        assert (await in_thread(handle.model, "big"))["state"] == "evicted"
        assert "evict big: applied: " in log_text(app)   # the daemon's outcome and message

        # Pinning a model that is not in memory asks where, with "pin there" ticked.
        await pilot.press("p")
        await wait_until(pilot, lambda: isinstance(app.screen, RemapDialog), what="remap dialog")
        assert app.screen.query_one("#remap-pin").value is True
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, RemapDialog))
        assert (await in_thread(handle.model, "big"))["pinned"] is False

        await pilot.press("r")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmDialog), what="confirm")
        await pilot.press("y")
        await wait_until(pilot, lambda: record(app, "big").get("state") == "ready", what="reloaded")


async def test_sort_filter_help_and_header_click(shared_daemon):
    handle = shared_daemon
    await in_thread(handle.wait_model, "big")
    await in_thread(handle.wait_model, "truncated", "failed")
    async with dashboard(handle) as (app, pilot):
        table = app.query_one(ModelTable)
        await wait_until(pilot, lambda: table.row_count == 4)
        names = lambda: [table.coordinate_to_cell_key((i, 0)).row_key.value for i in range(table.row_count)]
        assert names() == sorted(names())
        await pilot.press("s")                       # next column: state, failed first
        assert table.sort_spec.column == "state" and names()[0] == "truncated"

        # Clicking the "Size" header sorts by size, biggest first.
        x = 0
        for key, column in table.columns.items():
            if key.value == "size":
                break
            x += column.get_render_width(table)
        await pilot.click("#models", offset=(x + 2, 1))
        assert table.sort_spec.column == "size" and names()[0] == "big"

        await pilot.press("slash", *"fp1")
        await wait_until(pilot, lambda: table.row_count == 1)
        assert names() == ["fp16"] and "filter “fp1”" in str(table.border_title)
        await pilot.press("escape")
        await wait_until(pilot, lambda: table.row_count == 4)

        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, HelpScreen))


async def test_pressure_demotion_appears_in_the_log(shared_daemon):
    handle = shared_daemon
    big = await in_thread(handle.wait_model, "big")
    (home,) = big["placement"]
    assert home.startswith("cuda:")
    async with dashboard(handle) as (app, pilot):
        gpus = DEFAULT_GPUS()
        squeezed = int(home[5:])
        gpus[squeezed]["used_by_others_mib"] = gpus[squeezed]["total_mib"] - 32
        handle.set_gpus(gpus)
        try:
            await wait_until(pilot, lambda: home not in (record(app, "big").get("placement") or {home: 1}),
                             what="big demoted off its GPU")
            await wait_until(pilot, lambda: "demoted" in log_text(app), what="a demotion in the log")
            # The squeezed GPU's bar now shows other processes filling it.
            devices = text_of(app.query_one(DevicePanel).content)
            line = next(l for l in devices.splitlines() if l.strip().startswith(home))
            assert "▒" * 10 in line, line
        finally:
            handle.set_gpus(DEFAULT_GPUS())


async def test_recovers_after_the_daemon_restarts(live_daemon):
    handle = live_daemon()
    await in_thread(handle.wait_model, "big")
    async with dashboard(handle) as (app, pilot):
        await in_thread(handle.stop)
        await wait_until(pilot, lambda: not app.connected, what="the outage to show")
        banner = app.query_one("#banner")
        assert banner.has_class("visible")
        assert "daemon unreachable" in text_of(banner.content) and "retrying" in text_of(banner.content)
        assert app.check_action("evict", ()) is None        # actions greyed out while down
        assert "lost the daemon" in log_text(app)

        again = await in_thread(live_daemon, name="d2", models=False, socket=handle.socket,
                                model_dir=handle.model_dir)
        await wait_until(pilot, lambda: app.connected, what="reconnection")
        assert not banner.has_class("visible")
        await in_thread(again.wait_model, "big")
        await wait_until(pilot, lambda: record(app, "big").get("state") == "ready")
        assert "reconnected" in log_text(app)


async def test_non_operator_sees_actions_disabled_with_the_reason(shared_daemon):
    """The dashboard run as uid 65534 (nobody) against the real daemon: connected, read-only."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    handle = shared_daemon
    await in_thread(handle.wait_model, "big")
    # Every model settled first: a load still running would change states by itself.
    await in_thread(handle.wait_for, lambda st: all(m["state"] not in ("queued", "loading") for m in st["models"]),
                    120, "every model settled")
    before = {m["name"]: (m["pinned"], m["state"]) for m in (await in_thread(handle.status))["models"]}
    probe = Path(__file__).with_name("readonly_probe.py")
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
            sys.executable, str(probe), handle.socket]
    done = await in_thread(subprocess.run, argv, capture_output=True, text=True, timeout=90,
                           cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TERM": "xterm"})
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in seen, seen
    assert seen["operator"] is False and seen["uid"] == 65534
    assert seen["checks"] == {"remap": None, "pin": None, "evict": None, "reload": None, "help": True}
    assert seen["modal_opened"] is False
    assert "read-only" in seen["header"]
    assert "uid 65534 is not a devmapd operator" in seen["detail"]
    assert "remap/pin/evict/reload are disabled" in seen["log"]
    after = {m["name"]: (m["pinned"], m["state"]) for m in (await in_thread(handle.status))["models"]}
    assert after == before


async def test_problems_and_reasons_from_a_real_daemon(live_daemon, tmp_path):
    """A name clash (st.pt beside st.safetensors) and a FIFO named like a checkpoint: the daemon
    serves neither as a second model and says why in status.daemon.problems; the dashboard shows
    the count in the header, one log line each, the list under `w`, and each model's reason."""
    import os

    import torch
    from safetensors.torch import save_file

    from devmapd_tui.dialogs import ProblemsScreen
    from tests.tui.helpers import screen_text, settle

    model_dir = tmp_path / "clash-models"
    model_dir.mkdir()
    torch.save({"w": torch.arange(16, dtype=torch.float32)}, model_dir / "st.pt")
    save_file({"w": torch.ones(8)}, str(model_dir / "st.safetensors"))
    os.mkfifo(model_dir / "pipe.pt")
    handle = live_daemon(name="clash", models=False, model_dir=model_dir)
    served = await in_thread(handle.wait_model, "st")
    assert served["reason"], served
    async with dashboard(handle, models=1) as (app, pilot):
        await wait_until(pilot, lambda: len(app.state.daemon.get("problems") or {}) == 2,
                         what="both problems in the dashboard's status")
        problems = app.state.daemon["problems"]
        clash = next(p for p in problems if p.startswith("st."))
        assert "same model name 'st'" in problems[clash] and "FIFO" in problems["pipe.pt"]
        await wait_until(pilot, lambda: "2 problems" in text_of(app.query_one(HeaderBar).content))
        log = log_text(app)
        assert f"problem   {clash}: same model name 'st'" in log, log
        assert "problem   pipe.pt: refused: a FIFO" in log, log

        await select(app, pilot, "st")
        await wait_until(pilot, lambda: app._shown_detail_for == "st", what="st's detail")
        reason = record(app, "st").get("reason")
        detail = text_of(app.query_one(DetailPane).content)
        assert reason and "why" in detail and reason[:30] in " ".join(detail.split()), detail

        await pilot.press("w")
        await wait_until(pilot, lambda: isinstance(app.screen, ProblemsScreen), what="problems list")
        await settle(pilot)
        shown = screen_text(app)
        assert clash in shown and "pipe.pt" in shown and "not a regular file" in shown, shown
    assert sorted(p.name for p in model_dir.iterdir()) == ["pipe.pt", "st.pt", "st.safetensors"]
