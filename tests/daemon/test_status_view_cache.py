"""The daemon's status view serves cached model records: same answer as building them afresh.

A real Registry, Inventory and StatusView (the parts the daemon composes), driven the way the
daemon drives them. ``status_json`` (what the server can splice into a reply) decodes to exactly
``status()``; the records equal freshly built ones after every change; the start-up progress
counts follow the states.
"""

from __future__ import annotations

import json
from pathlib import Path

from devmapd.config import Config
from devmapd.daemon.inventory import Inventory
from devmapd.daemon.registry import ModelRecord, Registry
from devmapd.daemon.statusview import StatusView


def _view(registry: Registry) -> StatusView:
    cfg = Config(model_dir="/models")
    inventory = Inventory(registry, lambda: cfg)
    return StatusView(registry, inventory, lambda: cfg, Path("/models"), watcher=lambda: None)


def test_status_json_is_status_and_records_follow_every_change():
    reg = Registry()
    view = _view(reg)
    for i in range(50):
        reg.add(ModelRecord(name=f"m{i:02d}", path=f"/models/m{i:02d}.pt"))
    for i in range(0, 50, 3):
        rec = reg.get(f"m{i:02d}")
        reg.transition(rec, "loading", "loading", progress=0.0)
        reg.transition(rec, "ready", "ready", placement={"cpu": 1000 + i}, progress=None)
    reg.remove("m07", "gone")
    rec = reg.get("m09")
    rec.fetches += 1
    reg.changed(rec, "fetched")

    st = view.status()
    assert st["models"] == [r.to_status() for r in reg.records()]
    spliced = json.loads(view.status_json())
    fresh = json.loads(json.dumps(st))
    spliced["daemon"].pop("uptime_s")
    fresh["daemon"].pop("uptime_s")
    assert spliced == fresh
    assert st["daemon"]["models_by_state"] == {"queued": 32, "loading": 0, "ready": 17, "failed": 0, "evicted": 0}
    assert [m["name"] for m in spliced["models"]] == sorted(f"m{i:02d}" for i in range(50) if i != 7)
    assert view.summary().startswith("17 models ready, 32 queued")
