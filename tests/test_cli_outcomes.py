"""The CLI tells the operator what happened: action outcomes, reasons, problems, one size format.

An action used to print ``ok`` whatever the daemon did (a pin it could not honour, a remap that
only queued). The reply contract: the old keys plus ``outcome`` (applied | pending | unchanged)
and ``message`` (one plain sentence); a refused action is an error reply. The CLI prints the
outcome and the message, exits non-zero with the reason on a refusal, and says plainly when a
daemon predates the contract instead of claiming success. ``devmapd status`` shows each model's
reason and the files not served (daemon.problems), formatted by textfmt like every other view.

The contract itself is exercised through the wire test daemon (a real server whose replies the
test chooses); the rest against a real ``devmapd serve``.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from devmapd.textfmt import OUTCOMES, human_bytes, safe
from tests.harness import devmapd_cmd, sim_gpu, start_daemon
from tests.wire.conftest import start_wire_daemon

STALE_HINT = "this daemon does not report whether it was applied: see `devmapd status`"


def cli(sock: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEVMAPD_SOCKET": sock}
    return subprocess.run(devmapd_cmd(*args), capture_output=True, text=True, env=env, timeout=60)


# ----------------------------------------------------------------------------- the reply contract

@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory):
    mdir = tmp_path_factory.mktemp("outcome-models")
    names = ("old", "applied", "pending", "same", "nodev", "odd")
    for name in names:
        torch.save({"w": torch.zeros(2)}, mdir / f"{name}.pt")
    d = start_wire_daemon(
        tmp_path_factory.mktemp("outcome-daemon"), {n: mdir / f"{n}.pt" for n in names},
        reply_extra={
            "applied": {"outcome": "applied", "message": "applied moved to cpu."},
            "pending": {"state": "queued", "outcome": "pending",
                        "message": "pin to cuda:1 is kept but cannot be honoured now: cuda:1 has 0 B "
                                   "for devmapd, needs 16 B; waiting for room, on cpu meanwhile."},
            "same": {"outcome": "unchanged", "message": "same is already on cpu; nothing was reloaded."},
        },
        refuse={"nodev": ["bad_request", "no device cuda:7 on this machine (devices: cpu, cuda:0)"],
                "odd": ["refused", "odd cannot be pinned while it is failed; fix its file first"]})
    yield d
    d.stop()


def test_each_outcome_is_printed_with_the_daemons_message(scripted) -> None:
    r = cli(scripted.socket, "remap", "applied", "cpu")
    assert (r.returncode, r.stdout.strip()) == (0, "remap applied -> cpu: applied: applied moved to cpu."), r
    r = cli(scripted.socket, "pin", "pending", "cuda:1")
    assert r.returncode == 0 and r.stdout.startswith("pin pending -> cuda:1: pending: pin to cuda:1 is kept"), r
    assert "waiting for room" in r.stdout
    r = cli(scripted.socket, "remap", "same", "cpu")
    assert r.stdout.strip() == "remap same -> cpu: unchanged: same is already on cpu; nothing was reloaded."


def test_an_old_daemons_reply_is_not_reported_as_success(scripted) -> None:
    r = cli(scripted.socket, "evict", "old")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"evict old: accepted (state: ready); {STALE_HINT}"
    assert "ok" not in r.stdout.split(":")


@pytest.mark.parametrize("name,code", [("nodev", "bad_request"), ("odd", "refused")])
def test_a_refused_action_exits_non_zero_with_the_reason(scripted, name, code) -> None:
    r = cli(scripted.socket, "pin", name, "cuda:7")
    assert r.returncode == 1 and r.stdout == "", r
    reason = {"nodev": "no device cuda:7 on this machine (devices: cpu, cuda:0)",
              "odd": "odd cannot be pinned while it is failed; fix its file first"}[name]
    assert r.stderr.strip() == f"devmapd: pin {name} -> cuda:7 refused: {reason}", (code, r.stderr)


def test_action_json_is_the_reply_itself(scripted) -> None:
    r = cli(scripted.socket, "pin", "pending", "cuda:1", "--json")
    reply = json.loads(r.stdout)
    assert reply["outcome"] == "pending" and reply["name"] == "pending" and reply["state"] == "queued"
    assert cli(scripted.socket, "evict", "missing-model").returncode == 4


# ----------------------------------------------------------------------------- a real daemon

@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory):
    """Two 1 GiB simulated GPUs with the default 1 GiB reserve: nothing fits on a GPU (the
    situation of the report), so pins stay pending and every model has a reason to show."""
    base = tmp_path_factory.mktemp("outcome-real")
    d = start_daemon(base, gpus=[sim_gpu(0, 1024), sim_gpu(1, 1024)], reserve_mib=1024)
    mdir = d.model_dir
    torch.save({"w": torch.zeros(4)}, mdir / "tiny.pt")                         # 16 B
    torch.save({f"p{i}": torch.zeros(17, dtype=torch.float16) for i in range(100)}, mdir / "odd.pt")
    # Problems: a name clash, a symlink out of the model directory, a FIFO.
    torch.save({"w": torch.ones(3)}, mdir / "st.pt")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, str(mdir / "st.safetensors"))
    outside = base / "outside.pt"
    torch.save({"w": torch.ones(1)}, outside)
    os.symlink(outside, mdir / "escape.pt")
    os.mkfifo(mdir / "pipe.pt")
    for name in ("tiny", "odd", "st"):
        d.wait_model(name)
    d.wait_for(lambda st: {"escape.pt", "pipe.pt"} <= st["daemon"]["problems"].keys()
               and len(st["daemon"]["problems"]) >= 3, what="the three problems in daemon.problems")
    yield d
    d.stop()


def _row(text: str, name: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.split("  ")[0] == name]
    return line


def test_status_text_shows_reasons_problems_and_sizes_from_one_formatter(real) -> None:
    st = json.loads(cli(real.socket, "status", "--json").stdout)
    text = cli(real.socket, "status").stdout
    for m in st["models"]:
        row = _row(text, m["name"])
        assert m["reason"] and safe(m["reason"]) in row, (m["reason"], row)
        assert human_bytes(m["bytes"]) in row
        for dev, n in m["placement"].items():
            assert f"{dev} {human_bytes(n)}" in row
    problems = st["daemon"]["problems"]
    assert "not served (daemon.problems):" in text
    for path, why in problems.items():
        assert f"  {safe(path)}: {safe(why)}" in text
    clash = [p for p in problems if p.startswith("st.")]
    assert clash, problems               # st.pt vs st.safetensors: the loser is listed


def test_real_actions_say_what_happened_and_refuse_a_device_the_machine_lacks(real) -> None:
    bad = cli(real.socket, "pin", "tiny", "cuda:7")
    assert bad.returncode != 0 and "cuda:7" in bad.stderr and "refused" in bad.stderr, bad
    r = cli(real.socket, "pin", "tiny", "cuda:1")
    assert r.returncode == 0, r.stderr
    assert not r.stdout.rstrip().endswith(": ok") and r.stdout.startswith("pin tiny -> cuda:1: "), r.stdout
    # The text names the pin's own outcome and message; --json carries the same fields.
    outcome = r.stdout[len("pin tiny -> cuda:1: "):].split(":", 1)[0]
    assert outcome in OUTCOMES, r.stdout
    again = json.loads(cli(real.socket, "pin", "tiny", "cuda:1", "--json").stdout)
    assert again["outcome"] in OUTCOMES and again["message"], again
    reply = json.loads(cli(real.socket, "unpin", "tiny", "--json").stdout)
    assert reply["outcome"] in OUTCOMES and reply["message"], reply


def test_a_models_placement_adds_up_to_its_bytes(real) -> None:
    for name in ("tiny", "odd"):
        m = real.model(name)
        assert sum(m["placement"].values()) == m["bytes"], m


def test_no_room_reason_names_the_reserve(real) -> None:
    reason = real.model("odd")["reason"]
    assert "most: 0 B on cuda:0" in reason and "reserve_mib" in reason, reason


def test_stale_hint_is_the_one_the_renderer_prints() -> None:
    from devmapd.textfmt import action_text

    assert action_text("evict", "x", None, {"state": "ready"}).endswith(STALE_HINT)
    assert action_text("evict", "x", None, {"outcome": "applied", "message": "m"}) == "evict x: applied: m"


def test_status_text_says_how_many_fds_are_open_and_where_state_lives(real) -> None:
    st = json.loads(cli(real.socket, "status", "--json").stdout)
    fds, state = st["daemon"]["fds"], st["daemon"]["state_dir"]
    assert 0 < fds["open"] < fds["limit"] and fds["reserve"] > 0, fds
    text = cli(real.socket, "status").stdout
    assert f" of {fds['limit']} open (new loads stop {fds['reserve']} short)" in text, text
    assert f"state in {safe(state['path'])} (" in text, text
