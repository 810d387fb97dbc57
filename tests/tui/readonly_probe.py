"""Run as an unprivileged user by test_live.py: open the dashboard headless on a real daemon and
report, as JSON on stdout, what a non-operator sees and whether action keys did anything."""
from __future__ import annotations

import asyncio
import io
import json
import sys
import time

from rich.console import Console

from devmapd_tui.app import DevmapdApp


def plain(renderable) -> str:
    console = Console(width=160, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


async def probe(socket: str) -> dict:
    app = DevmapdApp(socket)
    async with app.run_test(size=(120, 40)) as pilot:
        deadline = time.monotonic() + 120      # generous: a loaded machine is slow, not wrong
        while not (app.connected and app.state.models and app._table.selected_name):
            if time.monotonic() > deadline:
                return {"error": f"not connected: {app.last_error}"}
            await pilot.pause(0.05)
        selected = app._table.selected_name
        checks = {a: app.check_action(a, ()) for a in ("remap", "pin", "evict", "reload", "help")}
        await pilot.press("e", "m", "p", "r")
        # Each press has been processed when press() returns; let any screen they pushed draw.
        await pilot.wait_for_scheduled_animations()
        await pilot.pause()
        return {"operator": app.operator, "uid": app.hello.get("uid"), "selected": selected,
                "checks": checks, "modal_opened": app.screen.is_modal,
                "header": plain(app._header.content), "detail": plain(app._detail.content),
                "log": app._event_log.text()}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(probe(sys.argv[1]))))
