"""8 GPUs and 500 models: the table is filled once and then updated row by row in place.

The data path under test is the app's own (status -> table, event -> one row), so a generated
status is fed through the injectable client factory; the live behaviour is in test_live.py.
The test waits on state (rows present, the burst applied), never on a clock: a loaded machine
makes it slower, not failing. How fast the table fills is measured in the benchmarks, not here.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from typing import Any

from devmapd_tui.app import DevmapdApp
from devmapd_tui.widgets import ModelTable
from tests.tui.helpers import wait_until

GIB = 1 << 30
N_MODELS = 500


def big_status() -> dict[str, Any]:
    devices = [{"id": f"cuda:{i}", "uuid": f"GPU-{i:08x}-0000", "name": f"GPU {i}", "total": 80 * GIB,
                "free": 40 * GIB, "used": 40 * GIB, "held": 20 * GIB, "reserve": GIB, "kind": "gpu",
                "simulated": True, "lost": False, "error": None, "utilization": 50, "processes": []}
               for i in range(8)]
    devices.append({"id": "cpu", "uuid": "host", "name": "host memory", "total": 512 * GIB,
                    "free": 300 * GIB, "used": 212 * GIB, "held": 10 * GIB, "reserve": 0, "kind": "cpu"})
    models = [{"name": f"team{i % 7}/model-{i:03d}", "state": "ready", "placement": {f"cuda:{i % 8}": 1 << 28},
               "bytes": 1 << 28, "dtypes": {"float16": 1 << 28}, "clients": i % 3, "pinned": False,
               "pin": None, "error": None, "diagnosis": None, "load_time_s": 0.5, "last_fetch": None}
              for i in range(N_MODELS)]
    return {"daemon": {"version": "0.1.0", "host": "big-box", "backend": "nvml", "started_at": 0.0},
            "devices": devices, "models": models}


class BurstClient:
    """Serves big_status(), then on request a burst of one 'model' event per model."""

    def __init__(self) -> None:
        self.burst = threading.Event()
        self.closed = threading.Event()

    def hello(self) -> dict:
        return {"version": "0.1.0", "operator": True, "uid": 0}

    def status(self) -> dict:
        return big_status()

    def model(self, name: str) -> dict:
        return {}

    def events(self, *, reconnect: bool = True) -> Iterator[dict]:
        while not self.burst.wait(0.05):
            if self.closed.is_set():
                return
        for rec in big_status()["models"]:
            rec = copy.deepcopy(rec)
            rec["state"], rec["clients"] = "loading", 9
            rec["progress"] = 0.5
            yield {"type": "model", "ts": 0.0, "model": rec, "message": ""}
        self.closed.wait()

    def close(self) -> None:
        self.closed.set()


async def test_500_models_on_8_gpus_update_in_place():
    client = BurstClient()
    app = DevmapdApp("/tmp/none.sock", client_factory=lambda: client)
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.query_one(ModelTable)
        await wait_until(pilot, lambda: table.row_count == N_MODELS, what="500 rows")

        added: list[Any] = []
        original_add = table.add_row
        table.add_row = lambda *a, **k: (added.append(a), original_add(*a, **k))[1]  # type: ignore[method-assign]
        cursor_name = table.selected_name
        client.burst.set()
        await wait_until(pilot, lambda: all(m.get("state") == "loading" for m in app.state.models.values())
                         and "loading 50%" in str(table.get_row(cursor_name)[1]),
                         what="the burst applied")
        assert added == [], "rows must be updated in place, not re-added"
        assert table.row_count == N_MODELS and table.selected_name == cursor_name
