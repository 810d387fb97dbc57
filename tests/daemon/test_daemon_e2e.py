"""End to end: a real daemon process, real files, real watchdog events, simulated GPUs.

Each test drives the daemon the way a lab would: drop files into the model
directory, change GPU pressure through the simulate file, act as an operator
through the client, and read back ``status`` and fetched tensors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.harness import devmapd_cmd, sim_gpu

MIB = 1 << 20


def state_dict(mib: float, *, seed: int = 0, layers: int = 2) -> dict[str, torch.Tensor]:
    """A small model of about ``mib`` MiB of float32 spread over ``layers`` layers."""
    g = torch.Generator().manual_seed(seed)
    per_layer = int(mib * MIB / 4 / layers)
    return {f"layers.{i}.weight": torch.randn(per_layer, generator=g) for i in range(layers)}


def drop(model_dir: Path, name: str, obj: object) -> Path:
    """Save to a temp name and rename into place: the normal way a file arrives."""
    final = model_dir / name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, final)
    return final


def fetch(handle, name: str):
    with handle.client() as c:
        return c.fetch(name)


def assert_same(fetched: dict, expected: dict) -> None:
    assert set(fetched) == set(expected)
    for key, value in expected.items():
        assert torch.equal(fetched[key], value), key


def only_device(model: dict) -> str:
    assert len(model["placement"]) == 1, model["placement"]
    return next(iter(model["placement"]))


def test_best_fit_placement_and_slow_writes(daemon_factory) -> None:
    d = daemon_factory(gpus=[sim_gpu(0, 1024, 200), sim_gpu(1, 1024, 600)])
    a = state_dict(2, seed=1)
    drop(d.model_dir, "a.pt", a)
    model = d.wait_model("a")
    assert only_device(model) == "cuda:1", "best-fit puts a model on the tightest GPU that fits"
    assert model["bytes"] == sum(t.numel() * 4 for t in a.values())
    assert model["dtypes"] == {"float32": model["bytes"]}
    assert_same(fetch(d, "a"), a)

    # A file written slowly, in chunks, is loaded once, after it settles, never half-written.
    b = state_dict(1, seed=2)
    staged = d.model_dir.parent / "b.staged"
    torch.save(b, staged)
    payload = staged.read_bytes()
    with open(d.model_dir / "b.pt", "wb") as fh:
        step = len(payload) // 8 + 1
        for i in range(0, len(payload), step):
            fh.write(payload[i:i + step])
            fh.flush()
            time.sleep(0.08)
    model = d.wait_model("b")
    assert_same(fetch(d, "b"), b)
    assert "b: failed" not in d.log(), "a half-written file must never be loaded"
    status = d.status()
    assert {dev["id"] for dev in status["devices"]} == {"cuda:0", "cuda:1", "cpu"}
    assert all(dev["simulated"] for dev in status["devices"] if dev["id"] != "cpu")


def test_pressure_demotes_and_promotes_with_hysteresis(daemon_factory) -> None:
    d = daemon_factory(gpus=[sim_gpu(0, 1024, 0), sim_gpu(1, 1024, 0)], low_mib=64, high_mib=128, cooldown_s=1.0)
    m = state_dict(4, seed=3)
    drop(d.model_dir, "m.pt", m)
    home = only_device(d.wait_model("m"))
    other = "cuda:1" if home == "cuda:0" else "cuda:0"
    idx = {"cuda:0": 0, "cuda:1": 1}

    # Another process grows on the model's GPU: free drops under the low watermark.
    gpus = [sim_gpu(0, 1024, 0), sim_gpu(1, 1024, 0)]
    gpus[idx[home]] = sim_gpu(idx[home], 1024, 1024 - 40)
    d.set_gpus(gpus)
    moved = d.wait_for(lambda st: next((m for m in st["models"] if m["name"] == "m"
                                        and m["state"] == "ready" and other in m["placement"]), None),
                       timeout=15, what="demotion to the other GPU")
    assert only_device(moved) == other
    assert_same(fetch(d, "m"), m)  # still served, same values

    # Both GPUs under pressure: the model goes to the CPU.
    d.set_gpus([sim_gpu(0, 1024, 1024 - 40), sim_gpu(1, 1024, 1024 - 40)])
    d.wait_for(lambda st: any(m["name"] == "m" and m["placement"] == {"cpu": m["bytes"]} for m in st["models"]),
               timeout=15, what="demotion to cpu")

    # Pressure clears: after the cooldown it is promoted back to a GPU, and stays there.
    d.set_gpus([sim_gpu(0, 1024, 0), sim_gpu(1, 1024, 0)])
    back = d.wait_for(lambda st: next((m for m in st["models"] if m["name"] == "m" and m["state"] == "ready"
                                       and "cpu" not in m["placement"]), None),
                      timeout=20, what="promotion back to a GPU")
    settled_on = only_device(back)
    time.sleep(2.0)
    assert only_device(d.model("m")) == settled_on, "no flapping once pressure has cleared"
    assert "demoted" in d.log() and "promoted" in d.log()


def test_pins_survive_a_restart_and_are_never_demoted(daemon_factory) -> None:
    d = daemon_factory(gpus=[sim_gpu(0, 1024, 0), sim_gpu(1, 1024, 0)], name="pin")
    drop(d.model_dir, "p.pt", state_dict(2, seed=4))
    d.wait_model("p")
    with d.client() as c:
        c.pin("p", "cuda:0")
    d.wait_for(lambda st: any(m["name"] == "p" and m["placement"].keys() == {"cuda:0"} and m["pinned"]
                              for m in st["models"]), what="pin to cuda:0")
    # Pressure on the pinned GPU does not move a pinned model.
    d.set_gpus([sim_gpu(0, 1024, 1000), sim_gpu(1, 1024, 0)])
    time.sleep(1.5)
    assert only_device(d.model("p")) == "cuda:0"
    d.set_gpus([sim_gpu(0, 1024, 0), sim_gpu(1, 1024, 0)])
    assert d.stop() == 0

    again = daemon_factory(model_dir=d.model_dir, state_dir=d.state_dir, name="pin2",
                           gpus=[sim_gpu(0, 1024, 0), sim_gpu(1, 1024, 0)])
    model = again.wait_model("p")
    assert model["pinned"] and model["pin"] == "cuda:0"
    assert only_device(model) == "cuda:0"


def test_broken_checkpoints_fail_alone(daemon_factory) -> None:
    d = daemon_factory()
    good = state_dict(1, seed=5)
    drop(d.model_dir, "good.pt", good)
    (d.model_dir / "random.pt").write_bytes(os.urandom(4096))
    (d.model_dir / "empty.pth").write_bytes(b"")
    src = d.model_dir.parent / "t.staged"
    torch.save(state_dict(1, seed=6), src)
    (d.model_dir / "truncated.pt").write_bytes(src.read_bytes()[:5000])
    for name in ("random", "empty", "truncated"):
        model = d.wait_model(name, "failed")
        assert model["diagnosis"]["code"] and model["diagnosis"]["message"]
        assert model["placement"] == {}
    assert_same(fetch(d, "good"), good)
    from devmapd.client import DevmapdError

    with pytest.raises(DevmapdError, match="random"):
        fetch(d, "random")
    assert d.proc.poll() is None


def test_replace_and_delete(daemon_factory) -> None:
    d = daemon_factory()
    v1 = state_dict(1, seed=7)
    drop(d.model_dir, "sub/r.pt", v1)
    first = d.wait_model("sub/r")
    assert_same(fetch(d, "sub/r"), v1)
    v2 = state_dict(1, seed=8)
    drop(d.model_dir, "sub/r.pt", v2)
    d.wait_for(lambda st: any(m["name"] == "sub/r" and m["state"] == "ready"
                              and m["generation"] > first["generation"] for m in st["models"]),
               what="the new version")
    assert_same(fetch(d, "sub/r"), v2)
    (d.model_dir / "sub" / "r.pt").unlink()
    d.wait_for(lambda st: all(m["name"] != "sub/r" for m in st["models"]), what="removal")


def test_burst_of_300_files_none_lost(daemon_factory) -> None:
    d = daemon_factory()
    tmp = d.model_dir.parent / "staging"
    tmp.mkdir()
    for i in range(300):
        torch.save({"w": torch.full((8,), float(i))}, tmp / f"m{i:03d}.pt")
    (tmp / "m299.pt").write_bytes(b"not a checkpoint at all")
    for path in sorted(tmp.iterdir()):
        os.replace(path, d.model_dir / path.name)
    final = d.wait_for(lambda st: len(st["models"]) == 300 and all(m["state"] in ("ready", "failed")
                                                                     for m in st["models"]) and st,
                       timeout=120, what="300 models ready or failed")
    states = [m["state"] for m in final["models"]]
    assert states.count("failed") == 1 and states.count("ready") == 299
    assert torch.equal(fetch(d, "m123")["w"], torch.full((8,), 123.0))


def test_too_big_for_one_gpu_is_split_by_module(daemon_factory) -> None:
    d = daemon_factory(gpus=[sim_gpu(0, 4), sim_gpu(1, 4)], low_mib=0, high_mib=0)
    big = state_dict(10, seed=9, layers=10)  # 10 layers of 1 MiB; 8 MiB of GPU in all
    drop(d.model_dir, "big.pt", big)
    model = d.wait_model("big")
    placement = model["placement"]
    assert set(placement) == {"cuda:0", "cuda:1", "cpu"}, placement
    assert sum(placement.values()) == model["bytes"]
    assert placement["cuda:0"] <= 4 * MIB and placement["cuda:1"] <= 4 * MIB
    assert_same(fetch(d, "big"), big)


def test_cli_contracts_and_exit_codes(daemon_factory) -> None:
    d = daemon_factory()
    drop(d.model_dir, "c.pt", state_dict(1, seed=10))
    d.wait_model("c")
    env = {**os.environ, "DEVMAPD_SOCKET": d.socket}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(devmapd_cmd(*args), capture_output=True, text=True, env=env, timeout=60)

    out = cli("status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    for dev in status["devices"]:
        assert {"id", "uuid", "name", "total", "free", "used", "simulated"} <= dev.keys()
    (model,) = status["models"]
    assert {"name", "path", "state", "placement", "bytes", "dtypes", "clients", "pinned", "error",
            "diagnosis"} <= model.keys()
    assert cli("status").returncode == 0
    assert cli("remap", "c", "cpu").returncode == 0
    d.wait_for(lambda st: any(m["name"] == "c" and m["placement"].keys() == {"cpu"} and m["state"] == "ready"
                              for m in st["models"]), what="remap to cpu")
    assert cli("remap", "c", "auto").returncode == 0
    fetched = cli("fetch", "c")
    assert fetched.returncode == 0 and "2 tensors" in fetched.stdout and "ms" in fetched.stdout
    missing = cli("evict", "nope")
    assert missing.returncode == 4 and "nope" in missing.stderr
    bad_device = cli("pin", "c", "cuda:7")
    assert bad_device.returncode != 0 and "cuda:7" in bad_device.stderr
    assert cli("evict", "c").returncode == 0
    d.wait_model("c", "evicted")
    assert cli("reload", "c").returncode == 0
    d.wait_model("c", "ready")
    d.stop()
    down = cli("status")
    assert down.returncode == 3 and "unreachable" in down.stderr


def test_sighup_with_broken_config_keeps_running_and_sigterm_exits_cleanly(daemon_factory) -> None:
    d = daemon_factory()
    drop(d.model_dir, "h.pt", state_dict(1, seed=11))
    d.wait_model("h")
    d.config_file.write_text(d.config_file.read_text() + "\nthis is = = not toml\n")
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "config reload failed" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "config reload failed" in d.log()
    assert d.wait_model("h")["state"] == "ready"
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 10


def test_host_cap_and_lazy_rules_load_on_first_fetch(daemon_factory) -> None:
    # No GPU room at all (reserve eats it), a 3 MiB host cap, and a lazy rule for "eval/*".
    d = daemon_factory(gpus=[sim_gpu(0, 64)], reserve_mib=64, low_mib=0, high_mib=0,
                       extra_config='[[rules]]\nmatch = "eval/*"\npreload = "lazy"\n')
    text = d.config_file.read_text().replace("[placement]\n", "[placement]\nhost_memory_cap_mib = 3\n")
    d.config_file.write_text(text)
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "config reloaded" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "config reloaded" in d.log()
    first, second = state_dict(2, seed=12), state_dict(2, seed=13)
    drop(d.model_dir, "first.pt", first)
    d.wait_model("first")
    drop(d.model_dir, "second.pt", second)
    deferred = d.wait_for(lambda st: next((m for m in st["models"] if m["name"] == "second"
                                           and m["state"] == "queued" and m["reason"]), None),
                          what="second deferred by the host cap")
    assert "cap" in deferred["reason"] or "host" in deferred["reason"], deferred["reason"]
    assert_same(fetch(d, "second"), second)  # loads on first fetch
    assert "on demand" in d.model("second")["reason"]

    lazy = state_dict(0.5, seed=14)
    drop(d.model_dir, "eval/probe.pt", lazy)
    model = d.wait_for(lambda st: next((m for m in st["models"] if m["name"] == "eval/probe"), None),
                       what="the lazy model registered")
    time.sleep(0.5)
    model = d.model("eval/probe")
    assert model["state"] == "queued" and model["lazy"] and model["placement"] == {}
    assert_same(fetch(d, "eval/probe"), lazy)
    assert d.model("eval/probe")["state"] == "ready"


def test_a_late_subscriber_sees_recent_decisions(daemon_factory) -> None:
    import threading

    d = daemon_factory()
    drop(d.model_dir, "early.pt", state_dict(1, seed=15))
    d.wait_model("early")
    seen: list[dict] = []

    def listen() -> None:
        with d.client() as c:
            for event in c.events(reconnect=False):
                seen.append(event)
                if event.get("type") == "decision" and event.get("name") == "early":
                    return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    t.join(15)
    placed = [e for e in seen if e.get("type") == "decision" and e.get("name") == "early"]
    assert placed and placed[0]["action"] == "placed" and placed[0]["replay"] is True
    assert "early" in placed[0]["message"]
