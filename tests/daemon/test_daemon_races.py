"""Races the first review found: operators and files acting while models load.

Each case ran against a real daemon and broke it before the load pipeline got
attempt tokens, one-load-per-model, and in-flight bytes counted in placement.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from tests.harness import sim_gpu

MIB = 1 << 20


def drop(model_dir: Path, name: str, obj: object) -> None:
    tmp = model_dir / f".{name}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, model_dir / name)


def memfds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:devmapd"):
                count += 1
        except OSError:
            pass
    return count


def wait_state(d, name: str, states: set[str], timeout: float = 20.0) -> dict:
    return d.wait_for(lambda st: next((m for m in st["models"] if m["name"] == name and m["state"] in states), None),
                      timeout, what=f"{name} in {states}")


def test_evict_while_loading_keeps_the_workers_alive(daemon_factory) -> None:
    d = daemon_factory(extra_config="")
    # Many tensors make the load long enough to evict it midway.
    drop(d.model_dir, "big.pt", {f"t{i}": torch.full((16384,), float(i)) for i in range(3000)})
    wait_state(d, "big", {"loading"})
    with d.client() as c:
        c.evict("big")
    wait_state(d, "big", {"evicted"})
    time.sleep(1.5)
    assert d.model("big")["state"] == "evicted" and d.model("big")["placement"] == {}
    # Both workers still serve: two more models load.
    drop(d.model_dir, "small1.pt", {"w": torch.ones(4)})
    drop(d.model_dir, "small2.pt", {"w": torch.zeros(4)})
    d.wait_model("small1")
    d.wait_model("small2")
    assert "died" not in d.log()
    assert memfds(d.proc.pid) == 2, "the evicted load's arena must not stay open"


def test_repeated_reloads_never_load_one_model_twice_at_once(daemon_factory) -> None:
    d = daemon_factory()
    drop(d.model_dir, "big.pt", {f"t{i}": torch.full((16384,), float(i)) for i in range(2000)})
    d.wait_model("big")
    with d.client() as c:
        c.reload("big")
        c.reload("big")
        c.reload("big")
    time.sleep(0.5)
    model = wait_state(d, "big", {"ready"})
    time.sleep(2.0)
    model = d.model("big")
    assert model["state"] == "ready" and model["error"] is None, model
    assert memfds(d.proc.pid) == 1, "replaced versions are closed"
    with d.client() as c:
        assert torch.equal(c.fetch("big")["t1999"], torch.full((16384,), 1999.0))


def test_parallel_loads_never_overcommit_a_gpu(daemon_factory) -> None:
    d = daemon_factory(gpus=[sim_gpu(0, 4)], low_mib=0, high_mib=0)
    staging = d.model_dir.parent / "staging"
    staging.mkdir()
    for name in ("a", "b"):
        torch.save({"w": torch.randn(int(2.4 * MIB / 4))}, staging / f"{name}.pt")
    for name in ("a", "b"):
        os.replace(staging / f"{name}.pt", d.model_dir / f"{name}.pt")
    st = d.wait_for(lambda s: len(s["models"]) == 2 and all(m["state"] == "ready" for m in s["models"]) and s,
                    what="both ready")
    on_gpu = sum(m["placement"].get("cuda:0", 0) for m in st["models"])
    assert on_gpu <= 4 * MIB, st["models"]
    assert sorted(next(iter(m["placement"])) for m in st["models"]) == ["cpu", "cuda:0"]


def test_new_placements_respect_where_other_models_really_sit(daemon_factory) -> None:
    d = daemon_factory(gpus=[sim_gpu(0, 10), sim_gpu(1, 10)], low_mib=0, high_mib=0)
    drop(d.model_dir, "b.pt", {"w": torch.randn(6 * MIB // 4)})
    d.wait_model("b")
    with d.client() as c:
        c.remap("b", "cuda:1")
    d.wait_for(lambda s: any(m["name"] == "b" and m["state"] == "ready" and "cuda:1" in m["placement"]
                             for m in s["models"]), what="b on cuda:1")
    drop(d.model_dir, "a.pt", {"w": torch.randn(6 * MIB // 4)})
    a = d.wait_model("a")
    assert "cuda:1" not in a["placement"], "cuda:1 holds b: a 6 MiB model cannot fit beside it"
    for dev in d.status()["devices"]:
        if dev["id"].startswith("cuda"):
            assert dev["held"] <= dev["total"], dev


def test_sighup_with_an_unknown_group_applies_nothing(daemon_factory) -> None:
    d = daemon_factory()
    drop(d.model_dir, "m.pt", {"w": torch.ones(3)})
    d.wait_model("m")
    d.config_file.write_text(d.config_file.read_text().replace(
        "[devices]", "[server]\noperator_groups = [\"no-such-group-devmapd\"]\n[devices]"))
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "config reload failed" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "config reload failed" in d.log() and "no-such-group-devmapd" in d.log()
    with d.client() as c:  # still an operator under the old policy, still serving
        c.pin("m", "cpu")
        assert torch.equal(c.fetch("m")["w"], torch.ones(3))
