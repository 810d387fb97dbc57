"""pressure.evaluate: demote under pressure, promote after a cooldown, never flap, never move pins."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from devmapd.planner import DeviceCapacity, Policy
from devmapd.pressure import Holding, Move, PressureState, Watermarks, evaluate

G = 1 << 30
MARKS = Watermarks(low=2 * G, high=4 * G, cooldown_s=30.0)
POLICY = Policy(max_fraction=1.0, overhead=0.0)


def gpu(i: int, free_gib: float, held_gib: float = 0, total_gib: float = 24, lost: bool = False) -> DeviceCapacity:
    return DeviceCapacity(f"cuda:{i}", int(total_gib * G), int(free_gib * G), int(held_gib * G), lost)


def hold(name: str, device: str, gib: float, last_fetch: float = 0, pinned: bool = False, home: str | None = None) -> Holding:
    return Holding(name, device, int(gib * G), last_fetch, pinned, home)


def names(moves: list[Move]) -> list[tuple[str, str, str]]:
    return [(m.name, m.source, m.target) for m in moves]


# ---- demotion -------------------------------------------------------------------------------

def test_demotes_least_recently_fetched_until_above_high_to_another_gpu() -> None:
    holdings = [hold("a", "cuda:0", 2, last_fetch=100), hold("b", "cuda:0", 2, last_fetch=50),
                hold("c", "cuda:0", 2, last_fetch=200), hold("pinned", "cuda:0", 2, pinned=True)]
    moves, _ = evaluate([gpu(0, 1, held_gib=8), gpu(1, 20)], holdings, PressureState(), 1000.0, MARKS, POLICY)
    # free 1 -> +2 (b) = 3 < 4 -> +2 (a) = 5 >= 4: stop; c is the most recently fetched, kept
    assert names(moves) == [("b", "cuda:0", "cuda:1"), ("a", "cuda:0", "cuda:1")]
    assert "low watermark" in moves[0].reason


def test_among_equally_stale_models_the_biggest_goes_first() -> None:
    # Nothing fetched yet (a fresh daemon): moving the 4 GiB model alone clears the pressure;
    # moving the tiny ones first would only churn them back and forth.
    holdings = [hold("a-tiny", "cuda:0", 0.01), hold("b-tiny", "cuda:0", 0.01), hold("z-big", "cuda:0", 4)]
    moves, _ = evaluate([gpu(0, 1, held_gib=4.02), gpu(1, 20)], holdings, PressureState(), 0.0, MARKS, POLICY)
    assert names(moves) == [("z-big", "cuda:0", "cuda:1")]


def test_demotes_to_cpu_when_no_gpu_stays_above_high() -> None:
    # cuda:1 has 5 GiB free: taking 2 would leave 3 < high, so it is not a target
    moves, _ = evaluate([gpu(0, 1, held_gib=2), gpu(1, 5)], [hold("a", "cuda:0", 2)], PressureState(), 0.0, MARKS, POLICY)
    assert names(moves) == [("a", "cuda:0", "cpu")]


def test_target_respects_max_fraction_and_reserve() -> None:
    policy = Policy(max_fraction=0.5, overhead=0.0)  # devmapd may use 12 of cuda:1's 24, already holds 11
    moves, _ = evaluate([gpu(0, 1, held_gib=2), gpu(1, 13, held_gib=11)], [hold("a", "cuda:0", 2)],
                        PressureState(), 0.0, MARKS, policy)
    assert names(moves) == [("a", "cuda:0", "cpu")]


def test_spread_and_best_fit_choose_different_targets() -> None:
    gpus = [gpu(0, 1, held_gib=2), gpu(1, 20), gpu(2, 8)]
    h = [hold("a", "cuda:0", 2)]
    assert names(evaluate(gpus, h, PressureState(), 0.0, MARKS, POLICY)[0]) == [("a", "cuda:0", "cuda:2")]
    spread = Policy(mode="spread", max_fraction=1.0, overhead=0.0)
    assert names(evaluate(gpus, h, PressureState(), 0.0, MARKS, spread)[0]) == [("a", "cuda:0", "cuda:1")]


def test_no_moves_without_pressure_or_without_unpinned_models() -> None:
    h = [hold("a", "cuda:0", 2), hold("p", "cuda:1", 2, pinned=True)]
    assert evaluate([gpu(0, 3, 2), gpu(1, 20, 2)], h, PressureState(), 0.0, MARKS, POLICY)[0] == []  # 3 >= low
    assert evaluate([gpu(0, 3), gpu(1, 0.5, 2)], h, PressureState(), 0.0, MARKS, POLICY)[0] == []  # only a pin there
    assert evaluate([gpu(0, 1, lost=True)], [hold("a", "cuda:0", 2)], PressureState(), 0.0, MARKS, POLICY)[0] == []


def test_part_of_a_split_model_goes_to_cpu() -> None:
    h = [hold("llm", "cuda:0", 6), hold("llm", "cuda:1", 3), hold("llm", "cpu", 1)]
    moves, _ = evaluate([gpu(0, 1, 6), gpu(1, 20, 3)], h, PressureState(), 0.0, MARKS, POLICY)
    assert names(moves) == [("llm", "cuda:0", "cpu")]


# ---- promotion ------------------------------------------------------------------------------

def test_promotes_home_only_after_room_for_a_full_cooldown() -> None:
    h = [hold("a", "cpu", 2, home="cuda:0")]
    state = PressureState()
    free_at = {0: 10, 10: 10, 15: 5, 20: 7, 40: 7, 49: 7, 50: 7}  # needs high + 2 = 6 GiB free
    promoted_at = None
    for t, free in free_at.items():
        moves, state = evaluate([gpu(0, free)], h, state, float(t), MARKS, POLICY)
        if moves:
            promoted_at = t
            assert names(moves) == [("a", "cpu", "cuda:0")] and "back home" in moves[0].reason
            break
    assert promoted_at == 50  # the dip at t=15 restarted the clock at t=20


def test_promotions_share_the_room() -> None:
    h = [hold("a", "cpu", 2, last_fetch=5, home="cuda:0"), hold("b", "cpu", 2, last_fetch=9, home="cuda:0")]
    state = PressureState()
    _, state = evaluate([gpu(0, 7)], h, state, 0.0, MARKS, POLICY)
    moves, _ = evaluate([gpu(0, 7)], h, state, 31.0, MARKS, POLICY)
    assert names(moves) == [("b", "cpu", "cuda:0")]  # most recently fetched first; 7-2 = 5 < 4+2 for a


def test_no_promotion_to_a_lost_home_and_pins_never_move() -> None:
    h = [hold("a", "cpu", 2, home="cuda:0"), hold("p", "cpu", 2, pinned=True, home="cuda:0")]
    state = PressureState()
    for t in (0.0, 100.0):
        moves, state = evaluate([gpu(0, 20, lost=True)], h, state, t, MARKS, POLICY)
        assert moves == []
    for t in (200.0, 300.0):
        moves, state = evaluate([gpu(0, 20)], h, state, t, MARKS, POLICY)
    assert names(moves) == [("a", "cpu", "cuda:0")]


# ---- no flapping ----------------------------------------------------------------------------

def test_recently_promoted_model_is_not_demoted_within_cooldown() -> None:
    h = [hold("a", "cpu", 2, home="cuda:0")]
    state = PressureState()
    _, state = evaluate([gpu(0, 20)], h, state, 0.0, MARKS, POLICY)
    moves, state = evaluate([gpu(0, 20)], h, state, 30.0, MARKS, POLICY)
    assert names(moves) == [("a", "cpu", "cuda:0")]
    now_home = [hold("a", "cuda:0", 2), hold("old", "cuda:0", 2, last_fetch=999)]
    moves, state = evaluate([gpu(0, 1, 4)], now_home, state, 40.0, MARKS, POLICY)
    assert names(moves) == [("old", "cuda:0", "cpu")]  # a is skipped though least recently fetched
    moves, _ = evaluate([gpu(0, 1, 4)], now_home, state, 61.0, MARKS, POLICY)
    assert ("a", "cuda:0", "cpu") in names(moves)  # after the cooldown it may go


# ---- properties over random traces ----------------------------------------------------------

@dataclass
class Sim:
    device: str
    home: str | None
    nbytes: int
    pinned: bool
    last_fetch: float


@st.composite
def scenarios(draw):
    ngpus = draw(st.integers(1, 3))
    totals = [draw(st.integers(8, 24)) * G for _ in range(ngpus)]
    models = {}
    for i in range(draw(st.integers(1, 6))):
        dev = draw(st.integers(0, ngpus))
        device = "cpu" if dev == ngpus else f"cuda:{dev}"
        models[f"m{i}"] = Sim(device, None, draw(st.integers(1, 8)) * G // 2, draw(st.booleans()) and draw(st.booleans()),
                              float(draw(st.integers(0, 100))))
    polls = draw(st.integers(5, 40))
    # others' usage per GPU per poll: a random walk in half-GiB steps, with sudden jobs
    # starting or ending (big jumps) - the case that tempts a naive loop to flap
    trace = []
    level = [draw(st.integers(0, t // G)) * G for t in totals]
    step = st.one_of(st.integers(-2, 2), st.integers(-24, 24))
    for _ in range(polls):
        level = [max(0, min(t, lv + draw(step) * G // 2)) for lv, t in zip(level, totals)]
        trace.append(list(level))
    dt = draw(st.sampled_from([1.0, 5.0, 10.0]))
    return totals, models, trace, dt


def run(totals, models, trace, dt, marks=MARKS):
    state = PressureState()
    history: list[tuple[float, str, str, str]] = []  # (time, model, direction, move)
    for step, others in enumerate(trace):
        now = step * dt
        held = {f"cuda:{i}": 0 for i in range(len(totals))}
        for m in models.values():
            if m.device in held:
                held[m.device] += m.nbytes
        gpus = [DeviceCapacity(f"cuda:{i}", t, max(0, t - others[i] - held[f"cuda:{i}"]), held[f"cuda:{i}"])
                for i, t in enumerate(totals)]
        holdings = [Holding(n, m.device, m.nbytes, m.last_fetch, m.pinned, m.home) for n, m in models.items()]
        moves, state = evaluate(gpus, holdings, state, now, marks, POLICY)
        for mv in moves:
            m = models[mv.name]
            assert mv.source == m.device
            direction = "promote" if mv.target == m.home else "demote"
            m.home = None if direction == "promote" else (m.home or mv.source)
            m.device = mv.target
            history.append((now, mv.name, direction, f"{mv.source}->{mv.target}"))
    return history


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_no_flapping_and_pins_never_move(scenario) -> None:
    totals, models, trace, dt = scenario
    pinned = {n for n, m in models.items() if m.pinned}
    history = run(totals, models, trace, dt)
    last: dict[str, tuple[float, str]] = {}
    for now, name, direction, _ in history:
        assert name not in pinned
        if name in last and last[name][1] != direction:
            assert now - last[name][0] >= MARKS.cooldown_s, history
        last[name] = (now, direction)


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.data())
def test_demotion_restores_high_watermark_when_enough_unpinned_bytes(scenario, data) -> None:
    totals, models, trace, _ = scenario
    others = trace[0]
    held = {f"cuda:{i}": 0 for i in range(len(totals))}
    for m in models.values():
        if m.device in held:
            held[m.device] += m.nbytes
    gpus = [DeviceCapacity(f"cuda:{i}", t, max(0, t - others[i] - held[f"cuda:{i}"]), held[f"cuda:{i}"])
            for i, t in enumerate(totals)]
    holdings = [Holding(n, m.device, m.nbytes, m.last_fetch, m.pinned, m.home) for n, m in models.items()]
    moves, _ = evaluate(gpus, holdings, PressureState(), 0.0, MARKS, POLICY)
    for g in gpus:
        off = sum(h.bytes for h in holdings for mv in moves if mv.name == h.name and mv.source == g.id == h.device)
        onto = sum(h.bytes for h in holdings for mv in moves if mv.name == h.name and mv.target == g.id)
        unpinned = sum(h.bytes for h in holdings if h.device == g.id and not h.pinned)
        if g.free < MARKS.low:
            projected = g.free + off
            assert projected >= MARKS.high or off == unpinned
            assert onto == 0  # nothing is pushed onto a GPU under pressure
        else:
            assert off == 0  # no pressure, no demotion
            if onto:
                assert g.free - onto >= MARKS.high  # a target is never pushed under high


# ---- clients, and getting everyone back ----------------------------------------------------

def test_models_no_client_holds_are_demoted_before_held_ones() -> None:
    # "held" is the least recently fetched, but a client holds it: demoting it frees nothing now.
    holdings = [Holding("held", "cuda:0", 3 * G, 10.0, False, None, clients=2),
                Holding("free", "cuda:0", 3 * G, 500.0, False, None)]
    moves, _ = evaluate([gpu(0, 1, held_gib=6), gpu(1, 20)], holdings, PressureState(), 1000.0, MARKS, POLICY)
    assert names(moves) == [("free", "cuda:0", "cuda:1")]


def test_a_demoted_model_whose_home_is_full_goes_to_another_gpu_after_the_cooldown() -> None:
    # cuda:0 (home) took other work; cuda:1 has room: after the cooldown the model leaves the CPU.
    holdings = [hold("m", "cpu", 2, home="cuda:0")]
    gpus = [gpu(0, 3), gpu(1, 20)]
    moves, state = evaluate(gpus, holdings, PressureState(), 0.0, MARKS, POLICY)
    assert moves == []
    moves, _ = evaluate(gpus, holdings, state, 31.0, MARKS, POLICY)
    assert names(moves) == [("m", "cpu", "cuda:1")] and moves[0].direction == "promote"
    assert "cuda:1 has had free" in moves[0].reason and "cuda:0" in moves[0].reason


def test_home_is_preferred_when_it_has_room() -> None:
    holdings = [hold("m", "cpu", 2, home="cuda:1")]
    gpus = [gpu(0, 20), gpu(1, 20)]
    _, state = evaluate(gpus, holdings, PressureState(), 0.0, MARKS, POLICY)
    moves, _ = evaluate(gpus, holdings, state, 31.0, MARKS, POLICY)
    assert names(moves) == [("m", "cpu", "cuda:1")] and moves[0].reason.endswith("back home")


def test_a_demoted_model_that_cannot_go_home_says_what_it_waits_for() -> None:
    # "m" was demoted from cuda:1 to cuda:0; cuda:1 has 3 GiB free, it needs high (4) + 2 GiB.
    gpus = [gpu(0, 20, held_gib=2), gpu(1, 3)]
    holdings = [hold("m", "cuda:0", 2, home="cuda:1")]
    moves, state = evaluate(gpus, holdings, PressureState(), 1000.0, MARKS, POLICY)
    assert moves == []
    wait = state.waiting_for("m")
    assert wait is not None and "stays on cuda:0" in wait and "cuda:1" in wait and "6.0 GiB" in wait, wait
    # Once cuda:1 has room, it waits for the cooldown, and says so; then it goes home.
    moves, state = evaluate([gpu(0, 20, held_gib=2), gpu(1, 10)], holdings, state, 1001.0, MARKS, POLICY)
    assert moves == [] and "cooldown" in (state.waiting_for("m") or ""), state
    moves, state = evaluate([gpu(0, 20, held_gib=2), gpu(1, 10)], holdings, state, 1032.0, MARKS, POLICY)
    assert names(moves) == [("m", "cuda:0", "cuda:1")] and state.waiting_for("m") is None
