"""The daemon's parts on their own: the load queue's order, dedup and rerun rule, and the
pressure controller's demotions, promotions and lost-GPU evacuation.

Each part is built the way the daemon builds it, with its dependencies handed in: a real
registry, a real checkpoint and the real CPU inventory for the load queue; a capacity view and a
mover of the test's own for the pressure controller, whose rules (devmapd.pressure) are the real
ones, driven by a clock the test sets.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch

from devmapd import planner
from devmapd.config import Config, DevicesConfig, PlacementConfig, PressureConfig
from devmapd.daemon import names
from devmapd.daemon.actions import Actions
from devmapd.daemon.inventory import Inventory
from devmapd.daemon.loading import LoadQueue
from devmapd.daemon.pressurectl import PressureController
from devmapd.daemon.registry import ModelRecord, Registry
from tests import harness

MIB = 1 << 20
GIB = 1 << 30


# ---------------------------------------------------------------------------------- load queue
def _queue(registry: Registry, cfg: Config, model_dir: Path) -> tuple[LoadQueue, Inventory]:
    inventory = Inventory(registry, lambda: cfg)
    return LoadQueue(registry, inventory, lambda: cfg, model_dir), inventory


def _record(registry: Registry, name: str, size: int) -> ModelRecord:
    return registry.add(ModelRecord(name=name, path=f"/models/{name}.pt", fingerprint=((f"{name}.pt", size, 0, 1),)))


@pytest.mark.parametrize(("order", "expected"), [
    ("bigger-first", ["huge", "a-mid", "b-mid", "small"]),  # equal sizes go by name
    ("name", ["a-mid", "b-mid", "huge", "small"]),
])
async def test_load_queue_order(tmp_path: Path, order: str, expected: list[str]) -> None:
    registry = Registry()
    cfg = Config(model_dir=str(tmp_path), placement=PlacementConfig(preload_order=order))
    queue, _ = _queue(registry, cfg, tmp_path)
    for name, size in [("small", 10), ("b-mid", 500), ("huge", 9000), ("a-mid", 500)]:
        queue.enqueue(_record(registry, name, size), f"{name}: queued")
    assert queue.queued() == sorted(expected)
    assert [await queue.next_name() for _ in expected] == expected
    assert queue.queued() == []


async def test_load_queue_holds_a_model_once(tmp_path: Path) -> None:
    registry = Registry()
    queue, _ = _queue(registry, Config(model_dir=str(tmp_path)), tmp_path)
    big = _record(registry, "big", 1000)
    queue.enqueue(big, "big: queued")
    queue.enqueue(big, "big: queued again")
    queue.enqueue(_record(registry, "tiny", 1), "tiny: queued")
    assert queue.busy("big") and queue.queued() == ["big", "tiny"]
    # Had the second request been queued too, "big" would come out twice before "tiny".
    assert [await queue.next_name(), await queue.next_name()] == ["big", "tiny"]
    assert not queue.busy("big") and queue.queued() == []


async def test_a_request_during_a_load_runs_once_after_it(tmp_path: Path) -> None:
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, tmp_path / "m.pt")
    source = names.scan(tmp_path)["m"]
    registry = Registry()
    cfg = Config(model_dir=str(tmp_path), devices=DevicesConfig(backend="none"))
    queue, inventory = _queue(registry, cfg, tmp_path)
    await inventory.open()
    rec = registry.add(ModelRecord(name="m", path=str(source.path), source=source, fingerprint=names.fingerprint(source)))
    states: list[str] = []
    second_ready = asyncio.Event()

    def watch(event: dict) -> None:
        if event.get("type") != "model":
            return
        state = event["model"]["state"]
        if state == "loading" and "loading" not in states:
            queue.enqueue(rec, "m: asked for again while it loads")  # must not start a second load beside it
        states.append(state)
        if states.count("ready") == 2:
            second_ready.set()

    registry.listen(watch)
    queue.enqueue(rec, "m: queued")
    workers = [asyncio.create_task(queue.worker()) for _ in range(2)]
    try:
        await asyncio.wait_for(second_ready.wait(), 60)
        loaded = rec.serving
        assert loaded is not None and not queue.busy("m")
        # The two loads ran one after the other, the second queued once the first was done
        # (progress events between are folded).
        compact = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
        assert compact == ["loading", "ready", "queued", "loading", "ready"]
        assert rec.attempt == 2 and list(rec.placement) == ["cpu"]
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if rec.serving is not None:
            rec.serving.close()
        inventory.close()


async def test_a_fetch_waits_for_the_attempt_and_a_dropped_load_is_not_installed(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(4)}, tmp_path / "m.pt")
    source = names.scan(tmp_path)["m"]
    registry = Registry()
    cfg = Config(model_dir=str(tmp_path), devices=DevicesConfig(backend="none"))
    queue, inventory = _queue(registry, cfg, tmp_path)
    await inventory.open()
    rec = registry.add(ModelRecord(name="m", path=str(source.path), source=source, fingerprint=names.fingerprint(source),
                                   state="evicted"))

    def evict_while_loading(event: dict) -> None:
        if event.get("type") == "model" and event["model"]["state"] == "loading" and rec.attempt == 1:
            queue.drop_version(rec)  # as an evict does: the attempt token goes stale
            registry.transition(rec, "evicted", "m: evicted while loading")

    unlisten = registry.listen(evict_while_loading)
    worker = asyncio.create_task(queue.worker())
    try:
        await asyncio.wait_for(queue.load_now(rec, "m: first fetch"), 60)
        assert rec.state == "evicted" and rec.serving is None and rec.placement == {}
        unlisten()
        await asyncio.wait_for(queue.load_now(rec, "m: fetched again"), 60)
        assert rec.state == "ready" and rec.serving is not None and rec.attempt == 3
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        if rec.serving is not None:
            rec.serving.close()
        inventory.close()


class ClaimsARealGpu(Inventory):
    """The simulated inventory, except that it says cuda:0 is a real GPU: the load then really
    tries the CUDA upload, which the CPU-only torch here refuses (as a daemon whose torch cannot
    use CUDA, or a GPU out of memory since the snapshot, would)."""

    def cuda_index_of(self, device_id: str) -> int | None:
        return 0 if device_id == "cuda:0" else None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA to make the upload fail")
async def test_a_failed_gpu_upload_leaves_the_model_on_the_cpu_not_failed(tmp_path: Path) -> None:
    models, sim = tmp_path / "models", tmp_path / "gpus.json"
    models.mkdir()
    expected = {"w": torch.arange(10, dtype=torch.float32)}
    torch.save(expected, models / "m.pt")
    harness.write_simulate(sim, [harness.sim_gpu(0, 1024)])
    source = names.scan(models)["m"]
    registry = Registry()
    cfg = Config(model_dir=str(models), devices=DevicesConfig(simulate=str(sim), reserve_mib=0))
    inventory = ClaimsARealGpu(registry, lambda: cfg)
    await inventory.open()
    queue = LoadQueue(registry, inventory, lambda: cfg, models)
    rec = registry.add(ModelRecord(name="m", path=str(source.path), source=source, fingerprint=names.fingerprint(source)))
    worker = asyncio.create_task(queue.worker())
    try:
        await asyncio.wait_for(queue.load_now(rec, "m: fetched"), 60)
        assert rec.state == "ready" and rec.diagnosis is None, (rec.state, rec.error)
        assert list(rec.placement) == ["cpu"]
        assert "upload to cuda:0 failed" in rec.reason and "CUDA is not available" in rec.reason
        assert rec.serving.gpu_segments == {}
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        if rec.serving is not None:
            rec.serving.close()
        inventory.close()


# ---------------------------------------------------------------------------------- actions
async def test_actions_say_what_happened_and_a_pin_where_the_model_sits_does_not_reload_it(tmp_path: Path) -> None:
    from devmapd.wire.protocol import ApiError

    models, sim = tmp_path / "models", tmp_path / "gpus.json"
    models.mkdir()
    torch.save({"w": torch.ones(8)}, models / "m.pt")
    # One simulated GPU too small for the model once its reserve is kept: a pin there must wait.
    harness.write_simulate(sim, [harness.sim_gpu(0, 1)])
    source = names.scan(models)["m"]
    registry = Registry()
    cfg = Config(model_dir=str(models), state_dir=str(tmp_path / "state"),
                 devices=DevicesConfig(simulate=str(sim), reserve_mib=1))
    inventory = Inventory(registry, lambda: cfg)
    await inventory.open()
    queue = LoadQueue(registry, inventory, lambda: cfg, models)
    actions = Actions(registry, queue, inventory, lambda: cfg)
    rec = registry.add(ModelRecord(name="m", path=str(source.path), source=source, fingerprint=names.fingerprint(source)))
    worker = asyncio.create_task(queue.worker())
    try:
        await asyncio.wait_for(queue.load_now(rec, "m: fetched"), 60)
        assert rec.state == "ready" and list(rec.placement) == ["cpu"]
        attempts = rec.attempt

        same = await actions.action("pin", {"name": "m", "device": "cpu"}, None)
        assert same["outcome"] == "unchanged" and "nothing was reloaded" in same["message"]
        assert rec.pin == "cpu" and not queue.busy("m") and rec.attempt == attempts

        waits = await actions.action("pin", {"name": "m", "device": "cuda:0"}, None)
        assert waits["outcome"] == "pending" and "cannot be honoured now" in waits["message"]
        assert "once cuda:0 has room" in waits["message"] and not queue.busy("m") and rec.attempt == attempts
        assert rec.reason.startswith("pinned to cuda:0") and "until cuda:0 has room" in rec.reason

        with pytest.raises(ApiError) as refused:
            await actions.action("remap", {"name": "m", "device": "cuda:7"}, None)
        assert refused.value.code == "bad_request" and "cuda:7" in str(refused.value)

        assert (await actions.action("unpin", {"name": "m"}, None))["outcome"] == "applied"
        assert (await actions.action("unpin", {"name": "m"}, None))["outcome"] == "unchanged"
        assert (await actions.action("evict", {"name": "m"}, None))["outcome"] == "applied"
        assert rec.state == "evicted" and rec.serving is None
        assert (await actions.action("evict", {"name": "m"}, None))["outcome"] == "unchanged"
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        if rec.serving is not None:
            rec.serving.close()
        inventory.close()


# ---------------------------------------------------------------------------------- pressure
@dataclasses.dataclass
class Gpus:
    """A capacity view the test sets: free bytes per GPU, some of them lost."""

    free: dict[str, int]
    registry: Registry
    lost: dict[str, str] = dataclasses.field(default_factory=dict)

    def capacities(self) -> tuple[list[planner.DeviceCapacity], planner.DeviceCapacity]:
        held: dict[str, int] = {}
        for rec in self.registry.records():
            for device, nbytes in rec.placement.items():
                held[device] = held.get(device, 0) + nbytes
        gpus = [planner.DeviceCapacity(id=g, total=16 * GIB, free=f, held=held.get(g, 0), lost=g in self.lost)
                for g, f in sorted(self.free.items())]
        return gpus, planner.DeviceCapacity(id="cpu", total=64 * GIB, free=60 * GIB, held=held.get("cpu", 0))

    def policy(self) -> planner.Policy:
        return planner.Policy(reserve=0, host_cap=32 * GIB)

    def lost_gpus(self) -> dict[str, str]:
        return dict(self.lost)


class Mover:
    """Takes moves the way the load queue does (the record goes to queued, the move is in
    flight) and lands them when the test says so."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.moves: list[tuple[str, str, str]] = []
        self.busy_names: set[str] = set()
        self.inflight: dict[str, str] = {}

    def busy(self, name: str) -> bool:
        return name in self.busy_names or name in self.inflight

    def moves_in_flight(self) -> dict[str, str]:
        return dict(self.inflight)

    def request_move(self, rec: ModelRecord, target: str, why: str, message: str) -> None:
        self.moves.append((rec.name, target, why))
        self.inflight[rec.name] = target
        self.registry.transition(rec, "queued", message)

    def land(self, name: str, device: str) -> None:
        rec = self.registry.get(name)
        assert rec is not None
        del self.inflight[name]
        self.registry.transition(rec, "loading", f"{name}: loading")
        self.registry.transition(rec, "ready", f"{name}: ready", placement={device: sum(rec.placement.values())})


def _ready(registry: Registry, name: str, device: str, nbytes: int, *, last_fetch: float = 0.0,
           pin: str | None = None) -> ModelRecord:
    return registry.add(ModelRecord(name=name, path=f"/m/{name}", state="ready", serving=object(),
                                    placement={device: nbytes}, last_fetch=last_fetch, pin=pin))


def _controller(registry: Registry, gpus: Gpus, mover: Mover, now: list[float],
                demoted: list[str] | None = None) -> PressureController:
    cfg = Config(pressure=PressureConfig(low_watermark_mib=2048, high_watermark_mib=4096, cooldown_s=10.0))
    return PressureController(registry, gpus, mover, lambda: cfg,
                              on_demote=(demoted.append if demoted is not None else None), clock=lambda: now[0])


def test_pressure_demotes_the_stalest_unpinned_model_and_brings_it_home_after_the_cooldown() -> None:
    registry = Registry()
    decisions: list[dict] = []
    registry.listen(lambda e: decisions.append(e) if e["type"] == "decision" else None)
    stale = _ready(registry, "stale", "cuda:0", 3 * GIB, last_fetch=100.0)
    _ready(registry, "fresh", "cuda:0", 3 * GIB, last_fetch=900.0)
    _ready(registry, "pinned", "cuda:0", 5 * GIB, pin="cuda:0")
    gpus = Gpus(free={"cuda:0": 1 * GIB, "cuda:1": 12 * GIB}, registry=registry)
    mover, now, demoted = Mover(registry), [1000.0], []
    ctl = _controller(registry, gpus, mover, now, demoted)

    ctl.poll()  # 1 GiB free < 2 GiB low: one 3 GiB model off brings it to 4 GiB = high
    assert mover.moves == [("stale", "cuda:1", mover.moves[0][2])]
    assert mover.moves[0][2].startswith("demoted from cuda:0: ")
    assert stale.home == "cuda:0" and demoted == ["stale"]
    assert decisions[-1]["action"] == "demoted" and decisions[-1]["from"] == "cuda:0"

    # While that move is under way the GPU still reads 1 GiB free: no second demotion for the
    # same squeeze (the move in flight counts as made).
    now[0] = 1000.5
    ctl.poll()
    assert [n for n, _, _ in mover.moves] == ["stale"]

    # It landed on cuda:1; cuda:0 has room again. Nothing comes back before the cooldown.
    mover.land("stale", "cuda:1")
    gpus.free = {"cuda:0": 4 * GIB, "cuda:1": 9 * GIB}
    mover.moves.clear()
    ctl.poll()
    gpus.free = {"cuda:0": 12 * GIB, "cuda:1": 9 * GIB}
    for t in (1001.0, 1005.0):
        now[0] = t
        ctl.poll()
    assert mover.moves == []
    now[0] = 1012.0  # 11 s of room, past the 10 s cooldown
    ctl.poll()
    assert [(n, t) for n, t, _ in mover.moves] == [("stale", "cuda:0")]
    assert mover.moves[0][2].startswith("promoted from cuda:1: ")
    assert decisions[-1]["action"] == "promoted"
    assert stale.home == "cuda:0"  # kept until the promotion has landed there
    now[0] = 1013.0
    mover.land("stale", "cuda:0")
    ctl.poll()
    assert stale.home is None and len(mover.moves) == 1


def test_a_promotion_that_did_not_land_is_tried_again() -> None:
    registry = Registry()
    m = _ready(registry, "m", "cpu", 1 * GIB)
    m.home = "cuda:0"
    gpus = Gpus(free={"cuda:0": 12 * GIB}, registry=registry)
    mover, now = Mover(registry), [0.0]
    ctl = _controller(registry, gpus, mover, now)
    ctl.poll()
    now[0] = 11.0
    ctl.poll()
    assert [(n, t) for n, t, _ in mover.moves] == [("m", "cuda:0")]
    mover.land("m", "cpu")  # the planner deferred it: it stays on the CPU
    for t in (12.0, 23.0):
        now[0] = t
        ctl.poll()
    assert m.home == "cuda:0" and [(n, t) for n, t, _ in mover.moves] == [("m", "cuda:0")] * 2


def test_pressure_leaves_busy_and_pinned_models_alone() -> None:
    registry = Registry()
    _ready(registry, "loading-already", "cuda:0", 3 * GIB)
    _ready(registry, "pinned", "cuda:0", 3 * GIB, pin="cuda:0")
    gpus = Gpus(free={"cuda:0": 1 * GIB}, registry=registry)
    mover = Mover(registry)
    mover.busy_names.add("loading-already")
    _controller(registry, gpus, mover, [0.0]).poll()
    assert mover.moves == []
    assert registry.get("loading-already").home is None


def test_models_leave_a_lost_gpu_for_wherever_the_planner_finds_room() -> None:
    registry = Registry()
    _ready(registry, "a", "cuda:0", 1 * GIB)
    _ready(registry, "b", "cuda:1", 1 * GIB)
    gpus = Gpus(free={"cuda:0": 15 * GIB, "cuda:1": 15 * GIB}, registry=registry, lost={"cuda:0": "fell off the bus"})
    mover = Mover(registry)
    _controller(registry, gpus, mover, [0.0]).poll()
    assert mover.moves == [("a", "", "demoted from cuda:0: cuda:0 was lost (fell off the bus)")]


def test_fd_budget_recounts_only_when_stale_or_near_the_limit(monkeypatch) -> None:
    from devmapd.daemon import fdbudget

    counts = iter([100, 100, 980, 980])
    listed: list[int] = []

    def fake_open(limit: int) -> int:
        listed.append(limit)
        return next(counts)

    now = [0.0]
    budget = fdbudget.FdBudget(reserve_min=64, reserve_fraction=0.0, clock=lambda: now[0])
    monkeypatch.setattr(fdbudget, "current_limit", lambda: 1024)
    monkeypatch.setattr(budget, "open_fds", fake_open)
    assert budget.refusal("a") is None and len(listed) == 1
    assert budget.refusal("b") is None and len(listed) == 1        # fresh and far from the limit: reused
    now[0] = 1.5
    assert budget.refusal("c") is None and len(listed) == 2        # stale: listed again
    now[0] = 2.6
    assert budget.refusal("d") is not None and len(listed) == 3    # 980 of 1024: under the reserve
    assert budget.refusal("e") is not None and len(listed) == 4    # near the limit: always listed
