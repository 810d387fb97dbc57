"""The parts that keep per-load and per-status work independent of the number of models.

Driven through a real Registry with random sequences of what the daemon does (register, load
planned, ready on a placement, move, evict, remove): the incremental per-device totals always
equal a sum from scratch, and the cached status records always equal freshly built ones.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from devmapd.daemon.holdings import Holdings
from devmapd.daemon.registry import ModelRecord, Registry
from devmapd.daemon.statuscache import StatusCache

DEVICES = ("cpu", "cuda:0", "cuda:1")
NAMES = tuple(f"m{i}" for i in range(6))

placements = st.dictionaries(st.sampled_from(DEVICES), st.integers(1, 1 << 30), max_size=2)
ops = st.lists(st.tuples(st.sampled_from(("add", "plan", "ready", "evict", "remove", "fetch")),
                         st.sampled_from(NAMES), placements), max_size=60)


def _apply(reg: Registry, holdings: Holdings, op: str, name: str, placement: dict[str, int]) -> None:
    rec = reg.get(name)
    if op == "add":
        if rec is None:
            reg.add(ModelRecord(name=name, path=f"/models/{name}.pt"))
        return
    if rec is None:
        return
    if op == "plan":   # a load about to start: planned bytes set without an event, then told
        rec.planned = dict(placement)
        holdings.update(rec)
        if rec.state != "loading":
            reg.transition(rec, "loading", f"{name}: loading", progress=0.0)
    elif op == "ready" and rec.state == "loading":
        rec.planned = {}
        reg.transition(rec, "ready", f"{name}: ready", placement=dict(placement), generation=rec.generation + 1)
    elif op == "evict" and rec.state in ("ready", "failed", "queued"):
        rec.placement = {}
        reg.transition(rec, "evicted", f"{name}: evicted")
    elif op == "remove":
        reg.remove(name, f"{name}: removed")
    elif op == "fetch":
        rec.fetches += 1
        reg.changed(rec, f"{name}: fetched")


@settings(max_examples=150, deadline=None)
@given(ops)
def test_incremental_totals_equal_a_sum_from_scratch(sequence):
    reg = Registry()
    holdings = Holdings(reg)
    for op, name, placement in sequence:
        _apply(reg, holdings, op, name, placement)
        assert holdings.totals() == Holdings.verify(reg.records())
        for rec in reg.records():
            others = Holdings.verify(r for r in reg.records() if r is not rec)
            expect = dict(others[0])
            for d, n in others[1].items():
                expect[d] = expect.get(d, 0) + n
            assert holdings.occupied_by_others(rec) == {d: n for d, n in expect.items() if n}


@settings(max_examples=150, deadline=None)
@given(ops)
def test_cached_status_records_equal_fresh_ones(sequence):
    reg = Registry()
    cache = StatusCache(reg)
    holdings = Holdings(reg)
    for op, name, placement in sequence:
        _apply(reg, holdings, op, name, placement)
        fresh = [r.to_status() for r in reg.records()]
        assert cache.models() == fresh
        assert json.loads(cache.models_json()) == json.loads(json.dumps(fresh))
        assert cache.counts() == {k: v for k, v in reg.counts().items() if v}


def test_status_does_no_work_per_model_that_did_not_change():
    reg = Registry()
    for i in range(300):
        reg.add(ModelRecord(name=f"m{i:03d}", path=f"/models/m{i:03d}.pt"))
    cache = StatusCache(reg)
    first = cache.status_json({"daemon": {"pid": 1}, "devices": []})
    builds = cache.builds
    assert cache.status_json({"daemon": {"pid": 1}, "devices": []}) == first
    assert cache.builds == builds   # nothing rebuilt for an unchanged registry
    rec = reg.get("m007")
    rec.fetches += 1
    reg.changed(rec, "m007: fetched")
    again = json.loads(cache.status_json({"daemon": {"pid": 1}, "devices": []}))
    assert cache.builds == builds + 1   # exactly the one record that changed
    assert again["models"][7]["fetches"] == 1 and again["daemon"] == {"pid": 1}
    assert [m["name"] for m in again["models"]] == sorted(f"m{i:03d}" for i in range(300))
