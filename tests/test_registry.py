"""The registry's state machine and its events."""

from __future__ import annotations

import pytest

from devmapd.daemon.registry import ModelRecord, Registry, TransitionError


def test_transitions_emit_one_event_each_with_the_status_record() -> None:
    reg = Registry()
    events: list[dict] = []
    reg.listen(events.append)
    rec = reg.add(ModelRecord(name="m", path="/models/m.pt"))
    reg.transition(rec, "loading", "m: loading", progress=0.0)
    reg.transition(rec, "ready", "m: ready", placement={"cuda:0": 10}, progress=None)
    assert [e["type"] for e in events] == ["model", "model", "model"]
    assert events[-1]["model"]["state"] == "ready"
    assert events[-1]["model"]["placement"] == {"cuda:0": 10}
    assert all(isinstance(e["ts"], float) and e["message"] for e in events)
    assert reg.counts()["ready"] == 1


@pytest.mark.parametrize(("start", "bad"), [("queued", "ready"), ("evicted", "ready")])
def test_illegal_transitions_are_refused(start: str, bad: str) -> None:
    reg = Registry()
    rec = reg.add(ModelRecord(name="m", path="p", state=start))
    with pytest.raises(TransitionError):
        reg.transition(rec, bad, "nope")
    assert rec.state == start


def test_clients_count_leases_and_removal_is_an_event() -> None:
    reg = Registry()
    events: list[dict] = []
    rec = reg.add(ModelRecord(name="m", path="p"))
    rec.leases[1] = 1
    rec.leases[2] = 1
    assert rec.to_status()["clients"] == 2
    unlisten = reg.listen(events.append)
    reg.remove("m", "m: file removed")
    unlisten()
    reg.add(ModelRecord(name="n", path="q"))
    assert [e["type"] for e in events] == ["removed"]
    assert "m" not in reg
