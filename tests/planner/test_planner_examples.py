"""Readable placement examples: the policies, capacity rules, splits, rules, pins, stability."""

from __future__ import annotations

import pytest

from devmapd.planner import DeviceCapacity, ModelDemand, Placement, Policy, capacity, charge, plan

G = 1 << 30
EXACT = Policy(max_fraction=1.0, overhead=0.0)  # arithmetic in whole GiB for readability


def gpu(i: int, total_gib: float, free_gib: float | None = None, held_gib: float = 0, lost: bool = False) -> DeviceCapacity:
    free = total_gib if free_gib is None else free_gib
    return DeviceCapacity(f"cuda:{i}", int(total_gib * G), int(free * G), int(held_gib * G), lost)


HOST = DeviceCapacity("cpu", 256 * G, 200 * G, 0)


def layers(n: int, each_gib: float = 1, prefix: str = "model.layers") -> tuple[tuple[str, int], ...]:
    return tuple((f"{prefix}.{i}", int(each_gib * G)) for i in range(n))


def one(gpus, model: ModelDemand, policy: Policy = EXACT, host: DeviceCapacity = HOST) -> Placement:
    return plan(gpus, host, [model], policy)[model.name]


# ---- capacity -------------------------------------------------------------------------------

def test_capacity_formula() -> None:
    # 24 GiB card, 10 GiB free, devmapd holds 4 -> others use 10; devmapd may use min(14, 21.6) - 1
    g = gpu(0, 24, free_gib=10, held_gib=4)
    assert capacity(g, Policy(max_fraction=0.9, reserve=1 * G)) == 13 * G
    # with little used by others the max_fraction cap binds: min(24, 12) - 0
    assert capacity(gpu(0, 24), Policy(max_fraction=0.5)) == 12 * G
    assert capacity(gpu(0, 24, lost=True), Policy()) == 0
    assert capacity(gpu(0, 1), Policy(reserve=2 * G)) == 0
    assert charge(1000, 0.02) == 1020


def test_overhead_is_charged() -> None:
    # 10 GiB of room; a 9.9 GiB model fits exactly, not with a 2 % allocator margin
    m = ModelDemand("m", int(9.9 * G))
    assert one([gpu(0, 10)], m, Policy(max_fraction=1.0, overhead=0.0)).kind == "gpu"
    assert one([gpu(0, 10)], m, Policy(max_fraction=1.0, overhead=0.02)).kind == "cpu"


def test_other_processes_usage_is_respected() -> None:
    # a 16 GiB card where someone else uses 12: a 6 GiB model must not go there
    p = one([gpu(0, 16, free_gib=4), gpu(1, 8)], ModelDemand("m", 6 * G))
    assert p.devices == (("cuda:1", 6 * G),)


# ---- policies -------------------------------------------------------------------------------

def test_best_fit_picks_the_tightest_gpu_that_fits() -> None:
    gpus = [gpu(0, 80), gpu(1, 24), gpu(2, 12)]
    p = one(gpus, ModelDemand("m", 10 * G))
    assert p.kind == "gpu" and p.devices == (("cuda:2", 10 * G),)
    assert "best-fit" in p.reason
    # 14 GiB no longer fits cuda:2: the next tightest
    assert one(gpus, ModelDemand("m", 14 * G)).devices == (("cuda:1", 14 * G),)


def test_spread_picks_the_gpu_with_most_room() -> None:
    gpus = [gpu(0, 24), gpu(1, 80, free_gib=70), gpu(2, 12)]
    p = one(gpus, ModelDemand("m", 10 * G), Policy(mode="spread", max_fraction=1.0, overhead=0.0))
    assert p.devices == (("cuda:1", 10 * G),) and "spread" in p.reason


def test_spread_balances_several_models_best_fit_packs_them() -> None:
    gpus = [gpu(0, 24), gpu(1, 24)]
    models = [ModelDemand(f"m{i}", 5 * G) for i in range(4)]
    spread = plan(gpus, HOST, models, Policy(mode="spread", max_fraction=1.0, overhead=0.0))
    packed = plan(gpus, HOST, models, EXACT)
    assert sorted(p.devices[0][0] for p in spread.values()) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert sorted(p.devices[0][0] for p in packed.values()) == ["cuda:0"] * 4


def test_unknown_policy_and_duplicates_are_refused() -> None:
    with pytest.raises(ValueError, match="policy"):
        plan([], HOST, [], Policy(mode="random"))
    with pytest.raises(ValueError, match="duplicate model"):
        plan([], HOST, [ModelDemand("a", 1), ModelDemand("a", 2)], EXACT)
    with pytest.raises(ValueError, match="duplicate device"):
        plan([gpu(0, 1), gpu(0, 2)], HOST, [], EXACT)


# ---- no GPU / lost / host cap ---------------------------------------------------------------

def test_zero_gpus_means_cpu() -> None:
    p = one([], ModelDemand("m", 3 * G, groups=layers(3)))
    assert p.kind == "cpu" and p.devices == (("cpu", 3 * G),) and "no GPUs" in p.reason


def test_lost_gpu_gets_nothing_and_its_models_move() -> None:
    gpus = [gpu(0, 80, lost=True), gpu(1, 24)]
    p = one(gpus, ModelDemand("m", 10 * G, current=(("cuda:0", 10 * G),)))
    assert p.devices == (("cuda:1", 10 * G),)
    p = one([gpu(0, 80, lost=True)], ModelDemand("m", 10 * G))
    assert p.kind == "cpu" and "every GPU is lost" in p.reason


def test_host_cap_defers_with_reason_and_lazy_defers() -> None:
    policy = Policy(max_fraction=1.0, overhead=0.0, host_cap=5 * G)
    out = plan([], HOST, [ModelDemand("a", 4 * G), ModelDemand("b", 3 * G), ModelDemand("c", 1 * G),
                          ModelDemand("lazy", 1, lazy=True)], policy)
    assert out["a"].kind == "cpu" and out["c"].kind == "cpu"  # biggest first, then what still fits
    assert out["b"].kind == "deferred" and out["b"].devices == ()
    assert "host cap" in out["b"].reason and "first fetch" in out["b"].reason
    assert out["lazy"].kind == "deferred" and out["lazy"].reason.startswith("lazy: loads on first fetch")


def test_lazy_model_already_placed_keeps_its_place() -> None:
    m = ModelDemand("m", 2 * G, lazy=True, current=(("cuda:0", 2 * G),))
    assert one([gpu(0, 8)], m).devices == (("cuda:0", 2 * G),)


# ---- splits ---------------------------------------------------------------------------------

def test_too_big_model_is_split_across_two_gpus_and_cpu_by_group() -> None:
    gpus = [gpu(0, 10), gpu(1, 6)]
    m = ModelDemand("llm", 20 * G, groups=(("model.embed_tokens", 2 * G),) + layers(16) + (("lm_head", 2 * G),))
    p = one(gpus, m)
    assert p.kind == "split"
    assert p.devices == (("cuda:0", 10 * G), ("cuda:1", 6 * G), ("cpu", 4 * G))
    assert sum(b for _, b in p.devices) == m.bytes
    where = dict(p.group_devices)
    assert [g for g, _ in m.groups] == [g for g, _ in p.group_devices]  # every group once, file order
    # contiguous runs: embed + layers 0-7 on cuda:0, 8-13 on cuda:1, the rest on the CPU
    runs = [where[g] for g, _ in m.groups]
    assert runs == ["cuda:0"] * 9 + ["cuda:1"] * 6 + ["cpu"] * 3
    assert "split" in p.reason


def test_split_never_breaks_a_group() -> None:
    # one 7 GiB group cannot go on a 6 GiB card: it goes with its neighbours to the next device
    m = ModelDemand("m", 12 * G, groups=(("a", 3 * G), ("b", 7 * G), ("c", 2 * G)))
    p = one([gpu(0, 6), gpu(1, 5)], m)
    assert dict(p.group_devices) == {"a": "cuda:0", "b": "cpu", "c": "cpu"}
    assert p.devices == (("cuda:0", 3 * G), ("cpu", 9 * G))


def test_no_split_when_disabled_or_single_group() -> None:
    m = ModelDemand("m", 12 * G, groups=layers(12))
    assert one([gpu(0, 8)], m, Policy(max_fraction=1, overhead=0, allow_split=False)).kind == "cpu"
    assert one([gpu(0, 8)], ModelDemand("m", 12 * G, groups=(("all", 12 * G),))).kind == "cpu"


def test_whole_models_are_placed_before_a_big_one_is_split() -> None:
    gpus = [gpu(0, 16), gpu(1, 8)]
    out = plan(gpus, HOST, [ModelDemand("big", 30 * G, groups=layers(30)), ModelDemand("a", 4 * G),
                            ModelDemand("b", 6 * G)], EXACT)
    assert out["a"].kind == out["b"].kind == "gpu"
    assert out["big"].kind == "split"


def test_missing_group_bytes_travel_with_the_first_group() -> None:
    m = ModelDemand("m", 10 * G, groups=(("a", 4 * G), ("b", 4 * G)))  # 2 GiB outside any group
    p = one([gpu(0, 7)], m)
    assert p.kind == "split" and p.devices == (("cuda:0", 6 * G), ("cpu", 4 * G))


# ---- device_map rules -----------------------------------------------------------------------

ENC_DEC = (("encoder.0", 1 * G), ("encoder.1", 1 * G), ("decoder.0", 1 * G), ("decoder.1", 1 * G), ("lm_head", 1 * G))


def test_device_map_encoder_on_gpu_rest_on_cpu() -> None:
    m = ModelDemand("t5", 5 * G, groups=ENC_DEC, device_map=(("encoder.*", "cuda:1"), ("*", "cpu")))
    p = one([gpu(0, 80), gpu(1, 24)], m)
    assert p.kind == "split"
    assert dict(p.group_devices) == {"encoder.0": "cuda:1", "encoder.1": "cuda:1",
                                     "decoder.0": "cpu", "decoder.1": "cpu", "lm_head": "cpu"}
    assert p.devices == (("cuda:1", 2 * G), ("cpu", 3 * G))


def test_device_map_unmatched_groups_are_placed_automatically() -> None:
    m = ModelDemand("t5", 5 * G, groups=ENC_DEC, device_map=(("lm_head", "cpu"),))
    p = one([gpu(0, 80)], m)
    assert dict(p.group_devices)["lm_head"] == "cpu"
    assert {g for g, d in p.group_devices if d == "cuda:0"} == {"encoder.0", "encoder.1", "decoder.0", "decoder.1"}


def test_device_map_rule_that_cannot_be_honoured_says_so() -> None:
    m = ModelDemand("t5", 5 * G, groups=ENC_DEC, device_map=(("encoder.*", "cuda:1"),))
    p = one([gpu(0, 80), gpu(1, 1)], m)  # encoder needs 2 GiB, cuda:1 has 1
    assert "encoder.* -> cuda:1 cannot be honoured now" in p.reason
    assert p.devices == (("cuda:0", 5 * G),)  # so it is placed like any model
    p = one([gpu(0, 80)], ModelDemand("x", 5 * G, groups=ENC_DEC, device_map=(("encoder.*", "cuda:7"),)))
    assert "no device cuda:7" in p.reason


def test_device_map_without_groups_is_ignored_with_a_note() -> None:
    p = one([gpu(0, 8)], ModelDemand("m", 1 * G, device_map=(("*", "cpu"),)))
    assert p.devices == (("cuda:0", 1 * G),) and "no module groups" in p.reason


# ---- pins / preferred -----------------------------------------------------------------------

def test_pin_that_fits_is_honoured_even_against_the_policy() -> None:
    p = one([gpu(0, 80), gpu(1, 24)], ModelDemand("m", 4 * G, pin="cuda:0"))
    assert p.devices == (("cuda:0", 4 * G),) and p.reason == "pinned to cuda:0"
    assert one([gpu(0, 80)], ModelDemand("m", 4 * G, pin="cpu")).kind == "cpu"


def test_pin_that_does_not_fit_is_reported_and_placed_elsewhere() -> None:
    p = one([gpu(0, 8, free_gib=2), gpu(1, 24)], ModelDemand("m", 4 * G, pin="cuda:0"))
    assert p.devices == (("cuda:1", 4 * G),)
    assert p.reason.startswith("pin to cuda:0 cannot be honoured now")
    p = one([gpu(0, 8)], ModelDemand("m", 4 * G, pin="cuda:3"))
    assert "cannot be honoured" in p.reason and "no device cuda:3" in p.reason


def test_pins_outrank_other_models() -> None:
    out = plan([gpu(0, 10)], HOST, [ModelDemand("big", 8 * G, priority=5), ModelDemand("pinned", 4 * G, pin="cuda:0")], EXACT)
    assert out["pinned"].devices == (("cuda:0", 4 * G),)
    assert out["big"].kind == "cpu"


def test_preferred_devices_are_tried_first_in_order() -> None:
    gpus = [gpu(0, 80), gpu(1, 24), gpu(2, 8, free_gib=1)]
    p = one(gpus, ModelDemand("m", 4 * G, preferred=("cuda:2", "cuda:0")))
    assert p.devices == (("cuda:0", 4 * G),)
    assert "preferred cuda:2 skipped" in p.reason and "preferred device cuda:0" in p.reason
    assert one(gpus, ModelDemand("m", 4 * G, preferred=("cpu",))).kind == "cpu"


# ---- stability, order, determinism ----------------------------------------------------------

def test_current_placement_is_kept_while_valid() -> None:
    gpus = [gpu(0, 80), gpu(1, 24, free_gib=20, held_gib=4)]
    m = ModelDemand("m", 4 * G, current=(("cuda:1", 4 * G),))
    p = one(gpus, m, Policy(mode="spread", max_fraction=1.0, overhead=0.0))  # spread would pick cuda:0
    assert p.devices == (("cuda:1", 4 * G),) and p.reason.startswith("kept")
    # the file changed size: placed afresh
    changed = ModelDemand("m", 5 * G, current=(("cuda:1", 4 * G),))
    assert one(gpus, changed, Policy(mode="spread", max_fraction=1.0, overhead=0.0)).devices[0][0] == "cuda:0"


def test_current_no_longer_fitting_is_replaced() -> None:
    # someone else grabbed cuda:1: 24 total, 1 free, devmapd holds 4 -> room 5 - 4... too small for 4 + 2
    gpus = [gpu(0, 80), gpu(1, 24, free_gib=1, held_gib=4)]
    out = plan(gpus, HOST, [ModelDemand("a", 4 * G, current=(("cuda:1", 4 * G),)),
                            ModelDemand("b", 2 * G, current=(("cuda:1", 2 * G),))], EXACT)
    assert out["a"].devices == (("cuda:1", 4 * G),)  # bigger first keeps its place
    assert out["b"].devices == (("cuda:0", 2 * G),)


def test_kept_split_is_reconstructed_from_device_bytes() -> None:
    gpus = [gpu(0, 10), gpu(1, 6)]
    m = ModelDemand("llm", 20 * G, groups=layers(20))
    first = one(gpus, m)
    # the daemon passes current sorted by device id, not in fill order
    again = one(gpus, ModelDemand("llm", 20 * G, groups=layers(20), current=tuple(sorted(first.devices))))
    assert again.reason.startswith("kept split")
    assert again.group_devices == first.group_devices and dict(again.devices) == dict(first.devices)


def test_priority_then_size_then_name() -> None:
    out = plan([gpu(0, 10)], HOST, [ModelDemand("small-important", 3 * G, priority=1),
                                    ModelDemand("big", 8 * G), ModelDemand("b", 2 * G), ModelDemand("a", 2 * G)], EXACT)
    assert out["small-important"].kind == "gpu"
    assert out["big"].kind == "cpu"  # 7 GiB left after the important one
    assert out["a"].kind == out["b"].kind == "gpu"


def test_output_is_deterministic_and_in_input_order() -> None:
    gpus = [gpu(0, 24), gpu(1, 24), gpu(2, 12)]
    models = [ModelDemand(f"m{i}", (i % 5 + 1) * G, groups=layers(i % 5 + 1)) for i in range(12)]
    a = plan(gpus, HOST, models, Policy())
    b = plan(gpus, HOST, list(models), Policy())
    assert a == b and list(a) == [m.name for m in models]
    assert plan(gpus, HOST, list(reversed(models)), Policy()) == a


def test_a_reserve_that_leaves_no_room_is_named_in_the_reason() -> None:
    # A 1 GiB simulated GPU with the default 1 GiB reserve holds nothing: the reason must say
    # that the reserve is why, not only "most: 0 B on cuda:0".
    policy = Policy(max_fraction=1.0, overhead=0.0, reserve=1 * G)
    p = one([gpu(0, 1)], ModelDemand("m", 1 << 20), policy)
    assert p.kind == "cpu"
    assert "after the 1.0 GiB reserve (devices.reserve_mib)" in p.reason, p.reason
    p = one([gpu(0, 1)], ModelDemand("m", 1 << 20, preferred=("cuda:0",)), policy)
    assert "reserve (devices.reserve_mib)" in p.reason, p.reason
    assert "reserve" not in one([gpu(0, 1)], ModelDemand("m", 2 * G)).reason
