"""The simulated backend: a JSON file re-read at every snapshot, errors simulated per GPU."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from devmapd.devices import open_backend
from devmapd.devices.simulated import SimulatedBackend, parse_simulate

MIB = 1 << 20


def write(path: Path, gpus: list[dict], **extra) -> None:
    """Write a new file and rename it into place, as tests and demos are told to."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpus": gpus, **extra}))
    os.replace(tmp, path)


def gpu(i: int, total: int = 8192, others: int = 0, **extra) -> dict:
    return {"name": f"Sim GPU {i}", "uuid": f"GPU-sim-{i}", "total_mib": total, "used_by_others_mib": others, **extra}


@pytest.fixture
def sim(tmp_path: Path):
    path = tmp_path / "gpus.json"
    write(path, [gpu(0, 16384, 1024), gpu(1, 8192)])
    b = SimulatedBackend(path, call_timeout_s=1.0)
    yield path, b
    b.close()


def test_devices_in_file_order_with_free_from_others_and_held(sim) -> None:
    path, b = sim
    snap = b.snapshot()
    assert snap.backend == "simulated" and snap.warning is None
    assert [(d.id, d.index, d.uuid, d.name) for d in snap.gpus] == [
        ("cuda:0", 0, "GPU-sim-0", "Sim GPU 0"), ("cuda:1", 1, "GPU-sim-1", "Sim GPU 1")]
    d0 = snap.gpus[0]
    assert d0.simulated and (d0.total, d0.free, d0.used) == (16384 * MIB, 15360 * MIB, 1024 * MIB)
    b.set_held({"cuda:0": 2048 * MIB})
    d0 = b.snapshot().gpus[0]
    assert (d0.free, d0.used) == (13312 * MIB, 3072 * MIB)
    assert [(p.pid, p.used) for p in d0.processes] == [(os.getpid(), 2048 * MIB)]
    b.set_held({})
    assert b.snapshot().gpus[0].free == 15360 * MIB
    assert snap.host.id == "cpu" and snap.host.kind == "cpu" and snap.host.total > 0


def test_free_never_negative(sim) -> None:
    path, b = sim
    write(path, [gpu(0, 1024, 1000)])
    b.set_held({"cuda:0": 512 * MIB})
    d = b.snapshot().gpus[0]
    assert d.free == 0 and d.used == d.total


def test_re_read_at_every_snapshot(sim) -> None:
    path, b = sim
    assert b.snapshot().gpus[1].free == 8192 * MIB
    write(path, [gpu(0, 16384, 1024), gpu(1, 8192, 7000, utilization=93.5,
                                              processes=[{"pid": 31337, "used_mib": 7000, "name": "train.py"}])])
    d1 = b.snapshot().gpus[1]
    assert d1.free == 1192 * MIB and d1.utilization == 93.5
    assert [(p.pid, p.used, p.name) for p in d1.processes] == [(31337, 7000 * MIB, "train.py")]
    write(path, [gpu(5, 4096)])  # GPUs can disappear too
    assert [d.uuid for d in b.snapshot().gpus] == ["GPU-sim-5"]


@pytest.mark.parametrize("content, words", [
    ("{not json", "not valid JSON"),
    ('{"gpus": {}}', '"gpus" list'),
    ('{"gpus": [{"name": "x", "uuid": "u", "total_mib": -1}]}', "total_mib"),
    ('{"gpus": [{"name": "x", "uuid": "u", "total_mib": 10, "error": "melted"}]}', "error must be one of"),
    ('{"gpus": [{"name": "x", "uuid": "u", "total_mib": 10}, {"name": "y", "uuid": "u", "total_mib": 10}]}', "repeats uuid"),
])
def test_bad_file_keeps_last_good_snapshot_with_warning(sim, content, words) -> None:
    path, b = sim
    good = b.snapshot()
    path.write_text(content)
    snap = b.snapshot()
    assert words in snap.warning and "keeping the last good" in snap.warning
    assert [(d.uuid, d.free) for d in snap.gpus] == [(d.uuid, d.free) for d in good.gpus]
    write(path, [gpu(0, 16384, 1024), gpu(1, 8192)])
    assert b.snapshot().warning is None


def test_missing_file(tmp_path: Path) -> None:
    b = SimulatedBackend(tmp_path / "nope.json")
    snap = b.snapshot()
    assert snap.gpus == () and "does not exist" in snap.warning


def test_lost_gpu_only_that_one(sim) -> None:
    path, b = sim
    write(path, [gpu(0, 16384, 1024, error="lost"), gpu(1, 8192)])
    lost, ok = b.snapshot().gpus
    assert lost.lost and lost.free == 0 and "lost" in lost.error
    assert not ok.lost and ok.error is None and ok.free == 8192 * MIB


@pytest.mark.parametrize("error, words", [("driver_mismatch", "versions differ"), ("no_driver", "not loaded")])
def test_driver_errors_degrade_whole_backend_to_cpu_only(sim, error, words) -> None:
    path, b = sim
    write(path, [gpu(0), gpu(1, error=error)])
    snap = b.snapshot()
    assert snap.gpus == () and words in snap.warning and "CPU-only" in snap.warning
    write(path, [gpu(0), gpu(1)])
    assert len(b.snapshot().gpus) == 2


def test_hang_times_out_once_then_is_not_waited_on_until_removed(sim) -> None:
    path, b = sim
    good = b.snapshot()
    write(path, [gpu(0, 16384, 9999, error="hang"), gpu(1, 8192, 100)])
    t0 = time.monotonic()
    snap = b.snapshot()
    assert 0.9 <= time.monotonic() - t0 < 5.0
    hung, ok = snap.gpus
    assert "degraded" in snap.warning and "cuda:0" in snap.warning
    assert hung.error and "timed out" in hung.error and not hung.lost
    assert hung.free == good.gpus[0].free  # last known numbers, not the file's new ones
    assert ok.error is None and ok.free == 8092 * MIB  # the other GPU is fresh
    t0 = time.monotonic()
    snap = b.snapshot()
    assert time.monotonic() - t0 < 0.5  # would be >= 1.0 if it waited again
    assert snap.gpus[0].error and "degraded" in snap.warning
    write(path, [gpu(0, 16384, 2048), gpu(1, 8192)])
    snap = b.snapshot()
    assert snap.warning is None and snap.gpus[0].error is None and snap.gpus[0].free == 14336 * MIB


def test_parse_simulate_defaults() -> None:
    (g,) = parse_simulate({"gpus": [{"name": "n", "uuid": "u", "total_mib": 1.5}]})
    assert g.total == int(1.5 * MIB) and g.used_by_others == 0 and g.error is None


def test_open_backend_kinds(tmp_path: Path) -> None:
    path = tmp_path / "g.json"
    write(path, [gpu(0)])
    b = open_backend("auto", str(path))
    assert b.name == "simulated" and b.snapshot().gpus[0].simulated
    b.close()
    assert open_backend("none").snapshot().gpus == ()
    with pytest.raises(ValueError, match="needs a file"):
        open_backend("simulated")
    with pytest.raises(ValueError, match="unknown device backend"):
        open_backend("cuda")
    with pytest.raises(ValueError, match="--simulate"):
        open_backend("none", str(path))
