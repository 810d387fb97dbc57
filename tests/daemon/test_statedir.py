"""Where state lives when nobody said: per model directory under the user's state directory.

Unit rules of ``statedir.resolve``, then real daemons started without ``--state-dir`` and
without systemd: a pin made on one model directory lands in that directory's own state dir,
``status`` says where, and a daemon on another model directory does not see it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

from devmapd.daemon import statedir
from tests.harness import FAST_CONFIG, ROOT, DaemonHandle, devmapd_cmd, sim_gpu, write_simulate


def test_the_configured_dir_wins_then_systemd_then_one_per_model_dir(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    env = {"HOME": str(tmp_path / "home"), "STATE_DIRECTORY": "/var/lib/devmapd:/var/lib/other"}
    assert statedir.resolve("/srv/state", models, env) == statedir.StateDir(Path("/srv/state"), "config")
    assert statedir.resolve("", models, env) == statedir.StateDir(Path("/var/lib/devmapd"), "systemd")
    del env["STATE_DIRECTORY"]
    got = statedir.resolve(None, models, env)
    assert got.source == "per-model-dir"
    assert got.path == tmp_path / "home" / ".local" / "state" / "devmapd" / statedir.name_for(models)
    env["XDG_STATE_HOME"] = str(tmp_path / "xdg")
    assert statedir.resolve("", models, env).path.parent == tmp_path / "xdg" / "devmapd"
    env["XDG_STATE_HOME"] = "relative/dir"   # the XDG spec says to ignore a relative path
    assert statedir.resolve("", models, env).path.parent == tmp_path / "home" / ".local" / "state" / "devmapd"


def test_the_name_follows_the_real_path(tmp_path):
    a, b = tmp_path / "runs" / "models", tmp_path / "other" / "models"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    (tmp_path / "link").symlink_to(a)
    assert statedir.name_for(a) == statedir.name_for(tmp_path / "link") == statedir.name_for(f"{a}/")
    assert statedir.name_for(a) != statedir.name_for(b)
    assert statedir.name_for(a).startswith("models-")
    odd = tmp_path / "we ird\nname"
    odd.mkdir()
    assert "\n" not in statedir.name_for(odd) and "/" not in statedir.name_for(odd)


def _start(tmp_path: Path, name: str, models: Path, xdg: Path) -> DaemonHandle:
    base = tmp_path / name
    base.mkdir()
    sim = base / "gpus.json"
    write_simulate(sim, [sim_gpu(0, 1024)])
    cfg = base / "devmapd.toml"
    cfg.write_text(FAST_CONFIG.format(reserve_mib=0, low_mib=64, high_mib=128, cooldown_s=1.0))
    sock = str(base / "run" / "devmapd.sock")
    argv = devmapd_cmd("serve", "--config", str(cfg), "--model-dir", str(models), "--socket", sock,
                       "--simulate", str(sim))   # no --state-dir
    env = {k: v for k, v in os.environ.items() if k not in ("STATE_DIRECTORY", "NOTIFY_SOCKET", "LISTEN_FDS")}
    env.update(XDG_STATE_HOME=str(xdg), PYTHONUNBUFFERED="1")
    log_file = base / "daemon.log"
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    handle = DaemonHandle(proc=proc, socket=sock, model_dir=models, state_dir=Path(), sim_file=sim,
                          config_file=cfg, log_file=log_file, argv=argv)
    try:
        handle.wait_for(lambda st: True, timeout=30, what="the daemon to answer")
    except BaseException:
        handle.stop()
        raise
    return handle


def test_unrelated_daemons_keep_their_pins_apart_and_status_says_where(tmp_path):
    xdg = tmp_path / "xdg"
    one, two = tmp_path / "one" / "models", tmp_path / "two" / "models"
    for d in (one, two):
        d.mkdir(parents=True)
        torch.save({"w": torch.ones(4)}, d / "shared.pt")
    first = _start(tmp_path, "d1", one, xdg)
    try:
        first.wait_model("shared")
        with first.client() as c:
            c.pin("shared", "cuda:0")
        where = first.status()["daemon"]["state_dir"]
        assert where["path"] == str(xdg / "devmapd" / statedir.name_for(one))
        assert where["source"] == "per-model-dir"
        assert (Path(where["path"]) / "state.json").is_file()
        assert not (one / "state.json").exists() and sorted(p.name for p in one.iterdir()) == ["shared.pt"]
    finally:
        first.stop()
    second = _start(tmp_path, "d2", two, xdg)
    try:
        model = second.wait_model("shared")
        assert model["pin"] is None and not model["pinned"]
        assert second.status()["daemon"]["state_dir"]["path"] == str(xdg / "devmapd" / statedir.name_for(two))
    finally:
        second.stop()
    again = _start(tmp_path, "d3", one, xdg)   # the same model dir finds its own pin again
    try:
        assert again.wait_model("shared")["pin"] == "cuda:0"
    finally:
        again.stop()
