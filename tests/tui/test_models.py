"""The dashboard's pure view-model: byte formatting, the memory bar split, fit, sorting, state."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from devmapd_tui.models import (
    GIB,
    MIB,
    DaemonState,
    fit_on,
    human_age,
    human_bytes,
    memory_split,
    placement_text,
    progress_fraction,
    short_uuid,
    sort_key,
)
from devmapd_tui.widgets import BAR_WIDTH, memory_bar


def test_human_bytes_uses_binary_units():
    assert human_bytes(0) == "0 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(98 * MIB) == "98.0 MiB"
    assert human_bytes(13 * GIB + GIB // 2) == "13.5 GiB"
    assert human_bytes(512 * MIB) == "512 MiB"
    assert human_bytes(700 * MIB, short=True) == "700M"
    assert human_bytes(None) == "-"


def test_small_formatters():
    assert short_uuid("GPU-5f3c9a21-0b7e-4c1d-9a7f-2d8e6b1c0a11") == "GPU-5f3c9a21"
    assert human_age(None, 100.0) == "never"
    assert human_age(40.0, 100.0) == "1m ago"
    assert progress_fraction(0.45) == 0.45 and progress_fraction(45) == 0.45
    assert progress_fraction({"done": 1, "total": 4}) == 0.25
    assert placement_text({"cpu": 3 * MIB, "cuda:1": 500 * MIB, "cuda:0": 700 * MIB}) == \
        "cuda:0 700M+cuda:1 500M+cpu 3.0M"


@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, 1 << 40), free=st.integers(0, 1 << 40), held=st.integers(0, 1 << 40),
       reserve=st.integers(0, 1 << 36))
def test_memory_split_always_sums_to_total_and_bar_to_width(total, free, held, reserve):
    free = min(free, total)
    dev = {"id": "cuda:0", "total": total, "free": free, "used": total - free, "held": held,
           "reserve": reserve}
    split = memory_split(dev)
    assert min(split.models, split.others, split.reserve, split.free) >= 0
    assert split.models + split.others + split.reserve + split.free == total
    assert len(memory_bar(dev).plain) == BAR_WIDTH


def test_fit_on_counts_reserve_and_the_models_own_bytes():
    dev = {"id": "cuda:0", "total": 24 * GIB, "free": 10 * GIB, "reserve": 1 * GIB}
    rec = {"name": "m", "bytes": 4 * GIB, "placement": {"cpu": 4 * GIB}}
    fit = fit_on(dev, rec)
    assert fit.ok and fit.headroom == 5 * GIB and fit.label.startswith("fits")
    big = dict(rec, bytes=12 * GIB)
    assert not fit_on(dev, big).ok and "needs 3.0 GiB more" in fit_on(dev, big).label
    here = dict(rec, placement={"cuda:0": 4 * GIB})
    assert fit_on(dev, here).label == "already here"
    assert not fit_on(dict(dev, lost=True), rec).ok


def test_sort_keys_put_failures_and_big_models_first():
    recs = [{"name": "b", "state": "ready", "bytes": 1}, {"name": "a", "state": "failed", "bytes": 5},
            {"name": "c", "state": "loading", "bytes": 9}]
    assert [r["name"] for r in sorted(recs, key=lambda r: sort_key("state", r))] == ["a", "c", "b"]
    assert [r["name"] for r in sorted(recs, key=lambda r: sort_key("size", r))] == ["c", "a", "b"]
    assert [r["name"] for r in sorted(recs, key=lambda r: sort_key("name", r))] == ["a", "b", "c"]


def test_state_reports_what_changed():
    clock = [1000.0]
    state = DaemonState(lambda: clock[0])
    status = {"daemon": {"started_at": 400.0}, "devices": [{"id": "cuda:0", "total": 10, "free": 5}],
              "models": [{"name": "a", "state": "ready"}, {"name": "b", "state": "queued"}]}
    changed, removed = state.apply_status(status)
    assert changed == {"a", "b"} and removed == set() and state.uptime() == 600.0
    status["models"] = [{"name": "a", "state": "ready"}, {"name": "c", "state": "ready"}]
    changed, removed = state.apply_status(status)
    assert changed == {"c"} and removed == {"b"}
    # Identical device reports are not redraws; a new sample is taken only every few seconds.
    assert state.apply_devices([{"id": "cuda:0", "total": 10, "free": 5}]) is False
    clock[0] += 6
    assert state.apply_devices([{"id": "cuda:0", "total": 10, "free": 5}]) is True
    assert len(state.history.samples["cuda:0"]) == 2


def test_help_says_who_is_an_operator_the_way_the_config_does():
    """config/devmapd.toml: empty operator lists mean root only (plus the daemon's own user, see
    devmapd/wire/peercred.py); the help must not promise a "devmapd group" that is not there."""
    from pathlib import Path

    from devmapd_tui.help import help_text
    from tests.tui.helpers import text_of

    config = (Path(__file__).parents[2] / "config" / "devmapd.toml").read_text()
    assert "Empty lists mean: root only." in config
    shown = " ".join(text_of(help_text(), width=100).split())
    assert "devmapd group" not in shown
    assert "operator_uids / operator_groups" in shown and "Empty lists (the default) mean root only" in shown
