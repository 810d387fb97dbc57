"""Hypothesis properties of plan(): the guarantees the daemon relies on."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from devmapd.planner import DeviceCapacity, ModelDemand, Policy, capacity, charge, plan

MIB = 1 << 20
SETTINGS = settings(max_examples=120, deadline=None)


@st.composite
def devices(draw, max_gpus: int = 4):
    n = draw(st.integers(0, max_gpus))
    gpus = []
    for i in range(n):
        total = draw(st.integers(1, 64)) * 256 * MIB
        held = draw(st.integers(0, total // 2))
        free = draw(st.integers(0, total - held))
        gpus.append(DeviceCapacity(f"cuda:{i}", total, free, held, draw(st.booleans()) and draw(st.booleans())))
    host = DeviceCapacity("cpu", 1 << 40, 1 << 39, 0)
    return gpus, host


@st.composite
def models(draw, gpu_ids: list[str], max_models: int = 8):
    n = draw(st.integers(0, max_models))
    out = []
    targets = gpu_ids + ["cpu", "cuda:9"]
    for i in range(n):
        ngroups = draw(st.integers(0, 6))
        groups = tuple((f"layer.{j}" if j % 3 else f"enc.{j}", draw(st.integers(0, 4096)) * MIB) for j in range(ngroups))
        size = sum(b for _, b in groups) if groups else draw(st.integers(0, 8192)) * MIB
        pin = draw(st.sampled_from([None, None, None] + targets))
        preferred = tuple(draw(st.lists(st.sampled_from(targets), max_size=2)))
        device_map = tuple(draw(st.lists(st.tuples(st.sampled_from(["enc.*", "layer.*", "*", "nomatch"]),
                                                   st.sampled_from(targets + ["auto"])), max_size=2)))
        current = ()
        if draw(st.booleans()):
            current = ((draw(st.sampled_from(targets)), size),)
        out.append(ModelDemand(f"m{i}", size, groups, current, pin, preferred, device_map,
                               lazy=draw(st.booleans()) and draw(st.booleans()), priority=draw(st.integers(0, 2))))
    return out


@st.composite
def problems(draw):
    gpus, host = draw(devices())
    ms = draw(models([g.id for g in gpus]))
    policy = Policy(mode=draw(st.sampled_from(["best-fit", "spread"])),
                    reserve=draw(st.integers(0, 1024)) * MIB,
                    max_fraction=draw(st.sampled_from([0.5, 0.9, 1.0])),
                    overhead=draw(st.sampled_from([0.0, 0.02, 0.1])),
                    host_cap=draw(st.sampled_from([None, 0, 4096 * MIB, 16384 * MIB])),
                    allow_split=draw(st.booleans()))
    return gpus, host, ms, policy


@SETTINGS
@given(problems())
def test_never_over_commits_a_device(problem) -> None:
    gpus, host, ms, policy = problem
    out = plan(gpus, host, ms, policy)
    for g in gpus:
        charged = sum(charge(b, policy.overhead) for p in out.values() for d, b in p.devices if d == g.id)
        assert charged <= capacity(g, policy), (g, charged)
        if g.lost:
            assert charged == 0
    if policy.host_cap is not None:
        assert sum(b for p in out.values() for d, b in p.devices if d == "cpu") <= policy.host_cap


@SETTINGS
@given(problems())
def test_every_model_placed_exactly_once_or_deferred_with_reason(problem) -> None:
    gpus, host, ms, policy = problem
    out = plan(gpus, host, ms, policy)
    assert list(out) == [m.name for m in ms]
    known = {g.id for g in gpus if not g.lost} | {"cpu"}
    for m in ms:
        p = out[m.name]
        assert p.name == m.name and p.kind in ("gpu", "split", "cpu", "deferred")
        if p.kind == "deferred":
            assert p.devices == () and p.reason
            continue
        devs = [d for d, _ in p.devices]
        assert len(devs) == len(set(devs)) and set(devs) <= known
        if p.kind == "gpu":
            assert len(devs) == 1 and devs[0] != "cpu"
        if p.kind == "cpu":
            assert devs == ["cpu"]
        if p.kind != "split":
            assert p.devices[0][1] == m.bytes


@SETTINGS
@given(problems())
def test_splits_never_split_a_group_and_sum_to_the_model(problem) -> None:
    gpus, host, ms, policy = problem
    out = plan(gpus, host, ms, policy)
    for m in ms:
        p = out[m.name]
        if p.kind != "split":
            continue
        assert len(p.devices) >= 2
        assert [g for g, _ in p.group_devices] == [g for g, _ in m.groups]  # each group exactly once
        per: dict[str, int] = {}
        for (g, b), (g2, d) in zip(m.groups, p.group_devices):
            per[d] = per.get(d, 0) + b
        assert per == dict(p.devices)
        assert sum(b for _, b in p.devices) == m.bytes


@SETTINGS
@given(problems())
def test_deterministic(problem) -> None:
    gpus, host, ms, policy = problem
    first = plan(gpus, host, ms, policy)
    assert plan(list(gpus), host, list(ms), policy) == first
    assert plan(gpus, host, list(reversed(ms)), policy) == first


@SETTINGS
@given(problems())
def test_zero_gpus_means_cpu_or_deferred(problem) -> None:
    _gpus, host, ms, policy = problem
    out = plan([], host, ms, policy)
    for p in out.values():
        assert p.kind in ("cpu", "deferred")
        if policy.host_cap is None and p.kind == "deferred":
            assert p.reason.startswith("lazy")


@SETTINGS
@given(problems())
def test_pins_are_honoured_when_they_fit(problem) -> None:
    gpus, host, ms, policy = problem
    out = plan(gpus, host, ms, policy)
    # pins are placed first, by priority/size/name: replay that order to know which fit
    room = {g.id: capacity(g, policy) for g in gpus if not g.lost}
    host_room = policy.host_cap
    pinned = sorted((m for m in ms if m.pin and not (m.lazy and not m.current)),
                    key=lambda m: (-m.priority, -m.bytes, m.name))
    for m in pinned:
        p = out[m.name]
        if m.pin == "cpu":
            fits = host_room is None or m.bytes <= host_room
            if fits and host_room is not None:
                host_room -= m.bytes
        elif m.pin in room:
            fits = charge(m.bytes, policy.overhead) <= room[m.pin]
            if fits:
                room[m.pin] -= charge(m.bytes, policy.overhead)
        else:
            fits = False
        if fits:
            assert p.devices == ((m.pin, m.bytes),), (m, p)
        else:
            assert "cannot be honoured now" in p.reason


@SETTINGS
@given(problems())
def test_replanning_with_the_result_as_current_changes_nothing(problem) -> None:
    gpus, host, ms, policy = problem
    first = plan(gpus, host, ms, policy)
    # the daemon's next replan: same devices, each model's placement as its current
    again_models = [ModelDemand(m.name, m.bytes, m.groups, tuple(sorted(first[m.name].devices)), m.pin,
                                m.preferred, m.device_map, m.lazy, m.priority) for m in ms]
    second = plan(gpus, host, again_models, policy)
    for m in ms:
        if first[m.name].kind != "deferred":
            assert dict(second[m.name].devices) == dict(first[m.name].devices), (m, first[m.name], second[m.name])
