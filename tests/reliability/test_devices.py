"""Devices: a broken or missing driver, a lost GPU, a hung NVML call, memory pressure that spikes
and flaps - all through the simulate file's ``"error"`` field and free-memory numbers, which the
daemon re-reads at every poll (DESIGN.md "Simulated devices"), against a REAL daemon.
"""
from __future__ import annotations

import time

import pytest

from tests.harness import sim_gpu
from tests.reliability import inputs as I
from tests.reliability.conftest import ModelDirGuard

MIB = 1 << 20


def fetch_version(d, name: str) -> int:
    with d.client() as c:
        return I.version_of(c.fetch(name))


def devices(st: dict) -> dict[str, dict]:
    return {dev["id"]: dev for dev in st["devices"]}


def test_no_driver_at_start_then_driver_mismatch_serve_cpu_only_with_a_warning(rdaemon, guard) -> None:
    """NVML absent at start: the daemon comes up CPU-only, says why in status daemon.warning, and
    serves from the CPU. When the driver appears, GPUs are used for new models. A later
    library/driver mismatch degrades again with its own warning; serving never stops."""
    d = rdaemon(gpus=[sim_gpu(0, 1024, error="no_driver"), sim_gpu(1, 1024)])
    st = d.status()
    assert "driver is not loaded" in (st["daemon"]["warning"] or ""), st["daemon"]
    assert set(devices(st)) == {"cpu"}
    guard.save(I.versioned(1), d.model_dir / "early.pt")
    m = d.wait_model("early")
    assert m["placement"] == {"cpu": m["bytes"]}
    assert fetch_version(d, "early") == 1

    d.set_gpus([sim_gpu(0, 1024), sim_gpu(1, 1024)])
    d.wait_for(lambda st: {"cuda:0", "cuda:1"} <= set(devices(st)) and not st["daemon"]["warning"], timeout=15,
               what="the GPUs once the driver is back")
    guard.save(I.versioned(2), d.model_dir / "later.pt")
    m = d.wait_model("later")
    assert set(m["placement"]) <= {"cuda:0", "cuda:1"} and m["placement"], m["placement"]

    d.set_gpus([sim_gpu(0, 1024, error="driver_mismatch"), sim_gpu(1, 1024)])
    st = d.wait_for(lambda st: "versions differ" in (st["daemon"]["warning"] or "") and st, timeout=15,
                    what="the driver mismatch warning")
    assert set(devices(st)) == {"cpu"}
    assert fetch_version(d, "early") == 1 and fetch_version(d, "later") == 2   # nothing lost
    guard.save(I.versioned(3), d.model_dir / "during.pt")
    m = d.wait_model("during")
    assert m["placement"] == {"cpu": m["bytes"]}, "nothing new is placed on a GPU NVML cannot see"


RULES = ('[[rules]]\nmatch = "on0"\ndevices = ["cuda:0"]\n'
         '[[rules]]\nmatch = "on1"\ndevices = ["cuda:1"]\n')


@pytest.fixture
def two(rdaemon, guard: ModelDirGuard):
    d = rdaemon(name="two", gpus=[sim_gpu(0, 1024), sim_gpu(1, 1024)], extra_config=RULES)
    guard.save(I.versioned(10, numel=1 << 16), d.model_dir / "on0.pt")
    guard.save(I.versioned(11, numel=1 << 16), d.model_dir / "on1.pt")
    assert set(d.wait_model("on0")["placement"]) == {"cuda:0"}
    assert set(d.wait_model("on1")["placement"]) == {"cuda:1"}
    return d


def test_one_gpu_lost_its_models_move_off_and_the_other_keeps_serving(two) -> None:
    d = two
    d.set_gpus([sim_gpu(0, 1024, error="lost"), sim_gpu(1, 1024)])
    st = d.wait_for(lambda st: devices(st)["cuda:0"]["lost"] and st, timeout=15, what="cuda:0 lost")
    assert "lost" in devices(st)["cuda:0"]["error"]
    # The other GPU's model is untouched and served throughout.
    assert set(I.model_of(st, "on1")["placement"]) == {"cuda:1"}
    assert fetch_version(d, "on1") == 11
    # The lost GPU's model must not stay "on" a GPU that fell off the bus: it is re-placed.
    moved = d.wait_for(lambda st: (m := I.model_of(st, "on0")) and m["state"] == "ready" and m["placement"]
                       and "cuda:0" not in m["placement"] and m, timeout=20,
                       what="on0 moved off the lost cuda:0")
    assert set(moved["placement"]) <= {"cuda:1", "cpu"}
    assert fetch_version(d, "on0") == 10
    assert d.proc.poll() is None


def test_a_hung_nvml_call_does_not_stop_the_poll_loop(two) -> None:
    """cuda:1's query hangs: status keeps answering, cuda:1 shows the timeout, the poll loop still
    runs (a change on cuda:0 shows up), fetches are served; when the hang ends it recovers."""
    d = two
    d.set_gpus([sim_gpu(0, 1024), sim_gpu(1, 1024, error="hang")])
    st = d.wait_for(lambda st: devices(st)["cuda:1"]["error"] and st, timeout=20, what="cuda:1 hang reported")
    assert "timed out" in devices(st)["cuda:1"]["error"] or "hung" in devices(st)["cuda:1"]["error"]
    assert "degraded" in (st["daemon"]["warning"] or ""), st["daemon"]["warning"]
    # The loop is alive: a new reading for cuda:0 arrives while cuda:1 is still hung.
    d.set_gpus([sim_gpu(0, 1024, used_by_others_mib=300), sim_gpu(1, 1024, error="hang")])
    d.wait_for(lambda st: devices(st)["cuda:0"]["used"] >= 300 * MIB, timeout=15, what="cuda:0 re-polled")
    for _ in range(5):
        assert d.status()["daemon"]["pid"] == d.proc.pid
    assert fetch_version(d, "on0") == 10 and fetch_version(d, "on1") == 11
    d.set_gpus([sim_gpu(0, 1024), sim_gpu(1, 1024)])
    d.wait_for(lambda st: not devices(st)["cuda:1"]["error"] and not st["daemon"]["warning"], timeout=20,
               what="cuda:1 recovered after the hang ended")


def test_pressure_spikes_and_flapping_move_a_model_once_each_way(rdaemon, guard) -> None:
    """Free memory oscillating around the watermarks for many polls (poll 0.2 s): hysteresis and
    the cooldown allow exactly one demotion while it flaps and one promotion once it is steady."""
    d = rdaemon(name="flap", gpus=[sim_gpu(0, 1024)], low_mib=64, high_mib=128, cooldown_s=2.0)
    guard.save(I.versioned(5, tensors=2, numel=MIB), d.model_dir / "flapper.pt")   # 8 MiB
    assert set(d.wait_model("flapper")["placement"]) == {"cuda:0"}

    def moves() -> tuple[int, int]:
        log = d.log()
        return log.count("flapper: demoted "), log.count("flapper: promoted ")

    def oscillate(others: tuple[int, int], seconds: float) -> None:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            d.set_gpus([sim_gpu(0, 1024, used_by_others_mib=others[i % 2])])
            i += 1
            time.sleep(0.3)

    # A: free flips between ~42 MiB (< low) and ~100 MiB (between low and high + model).
    oscillate((974, 924), 3.0)
    assert d.wait_for(lambda st: I.model_of(st, "flapper")["placement"].keys() == {"cpu"}, timeout=10)
    assert moves() == (1, 0), moves()
    # B: spikes across both watermarks, each shorter than the cooldown: no promotion, no new demotion.
    oscillate((24, 1004), 3.0)
    assert moves() == (1, 0), moves()
    # C: steady room: promoted back once after the cooldown, and it stays.
    d.set_gpus([sim_gpu(0, 1024, used_by_others_mib=0)])
    d.wait_for(lambda st: I.model_of(st, "flapper")["placement"].keys() == {"cuda:0"}, timeout=20,
               what="promotion back home")
    time.sleep(1.5)
    assert moves() == (1, 1), moves()
    assert fetch_version(d, "flapper") == 5
