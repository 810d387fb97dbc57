"""A restart that has learned, against real daemons: unchanged files are not parsed again.

The first daemon parses every model and stores what it learned in its state directory; a second
daemon on the same state directory (not under systemd, so no fd store) serves the unchanged
models from those records (``status`` counts the hits) and parses afresh the file that changed
while it was down. Every model it serves equals torch.load of the file on disk now.

CI runs a dozen models; ``DEVMAPD_SLOW=1`` runs the 1,000-model directory of issue 14.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SLOW = os.environ.get("DEVMAPD_SLOW") == "1"
N = 1000 if SLOW else 12
TIMEOUT = 600 if SLOW else 60


def _save(path: Path, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer.{i}.weight": torch.randn(4, 8, generator=g) for i in range(4)}
    torch.save(sd, path)
    return sd


def _all_ready(n: int):
    def check(st):
        models = st["models"]
        failed = [m for m in models if m["state"] == "failed"]
        assert not failed, failed[0]
        return len(models) == n and all(m["state"] == "ready" for m in models)
    return check


def test_a_restart_reuses_every_unchanged_parse_and_reparses_the_changed_file(daemon_factory, tmp_path):
    models = tmp_path / "d" / "models"
    models.mkdir(parents=True)
    for i in range(N):
        _save(models / f"m{i:04d}.pt", i)
    first = daemon_factory(model_dir=models)
    first.wait_for(_all_ready(N), timeout=TIMEOUT, what=f"{N} models ready")
    # Records are written by the cache's writer thread, just after each load.
    cache = first.wait_for(lambda st: st["daemon"]["inspection_cache"]["stored"] == N and
                           st["daemon"]["inspection_cache"], timeout=TIMEOUT, what=f"{N} parses stored")
    assert cache["hits"] == 0, cache
    assert Path(cache["dir"]).is_relative_to(first.state_dir)
    assert not any(p.name.startswith(".") or p.suffix == ".json" for p in models.iterdir())  # model dir untouched
    first.stop()

    changed = _save(models / "m0001.pt", 10_001)   # rewritten while no daemon ran
    second = daemon_factory(model_dir=models)
    second.wait_for(_all_ready(N), timeout=TIMEOUT, what=f"{N} models ready after the restart")
    cache = second.status()["daemon"]["inspection_cache"]
    assert cache["hits"] == N - 1 and cache["rejected"] == 0, cache
    assert cache["stale"] + cache["misses"] == 1, cache
    with second.client() as c:
        assert all(torch.equal(a, b) for a, b in zip(c.fetch("m0001").values(), changed.values()))
        for name in ("m0000", f"m{N - 1:04d}"):
            got = c.fetch(name)
            ref = torch.load(models / f"{name}.pt", weights_only=True)
            assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_corrupt_cache_file_is_ignored_with_a_warning_by_the_daemon(daemon_factory, tmp_path):
    models = tmp_path / "d" / "models"
    models.mkdir(parents=True)
    sd = _save(models / "only.pt", 1)
    first = daemon_factory(model_dir=models)
    first.wait_for(_all_ready(1), timeout=TIMEOUT, what="the model ready")
    first.stop()
    (entry,) = list((first.state_dir / "inspections").glob("*.json"))
    entry.write_bytes(entry.read_bytes()[:-40])   # truncated
    second = daemon_factory(model_dir=models)
    second.wait_for(_all_ready(1), timeout=TIMEOUT, what="the model ready after the restart")
    cache = second.status()["daemon"]["inspection_cache"]
    assert cache["rejected"] == 1 and cache["hits"] == 0 and cache["stored"] == 1, cache
    assert "ignoring inspection cache file" in second.log_file.read_text()
    with second.client() as c:
        got = c.fetch("only")
        assert all(torch.equal(got[k], sd[k]) for k in sd)
