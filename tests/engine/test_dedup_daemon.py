"""Storage sharing inside the daemon's load queue: served versions share storages by content.

The load queue, registry and CPU inventory are the daemon's own parts, built as the daemon builds
them, with a StorageStore handed in; checkpoints are written by torch at test time. Each check
fetches what a client would get (the served manifest and fds) and compares it with torch.load.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from devmapd.config import Config, DevicesConfig, PlacementConfig
from devmapd.daemon import handoff, names
from devmapd.daemon.inventory import Inventory
from devmapd.daemon.loading import LoadQueue
from devmapd.daemon.registry import ModelRecord, Registry
from devmapd.engine import arena
from devmapd.engine.dedup import StorageStore
from tests import harness
from tests.engine.helpers import assert_same, load


def _base(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(12)}


def _fetch(rec: ModelRecord) -> Any:
    v = rec.serving
    assert v is not None
    return arena.build(v.manifest_for_client(), v.fds)


class _Parts:
    def __init__(self, models: Path, cfg: Config | None = None) -> None:
        self.registry = Registry()
        self.cfg = cfg or Config(model_dir=str(models), devices=DevicesConfig(backend="none"))
        self.store = StorageStore(compact_dead_fraction=0.0)
        self.inventory = Inventory(self.registry, lambda: self.cfg)
        self.inventory.storages = self.store
        self.queue = LoadQueue(self.registry, self.inventory, lambda: self.cfg, models, store=self.store)
        self.models = models

    def record(self, name: str) -> ModelRecord:
        source = names.scan(self.models)[name]
        return self.registry.add(ModelRecord(name=name, path=str(source.path), source=source,
                                             fingerprint=names.fingerprint(source)))


async def test_served_versions_share_storages_and_survive_each_others_eviction(tmp_path: Path) -> None:
    base = _base()
    ft = {**base, "layer0.weight": base["layer0.weight"] + 1}
    torch.save(base, tmp_path / "base.pt")
    torch.save(ft, tmp_path / "ft.pt")
    parts = _Parts(tmp_path)
    await parts.inventory.open()
    rb, rf = parts.record("base"), parts.record("ft")
    worker = asyncio.create_task(parts.queue.worker())
    try:
        await asyncio.wait_for(parts.queue.load_now(rb, "base: fetched"), 60)
        await asyncio.wait_for(parts.queue.load_now(rf, "ft: fetched"), 60)
        assert rb.state == rf.state == "ready", (rb.error, rf.error)
        total = sum(t.nbytes for t in base.values())
        layer = base["layer0.weight"].nbytes
        # each model shows the bytes it serves; the device view counts shared storages once
        assert rb.placement == rf.placement == {"cpu": total}
        assert parts.inventory.held() == {"cpu": total + layer}
        assert not handoff.storable(rf.serving)   # shared segments are not parked per model
        held_by_client = _fetch(rb)
        assert_same(held_by_client, base)
        assert_same(_fetch(rf), ft)
        # evicting the base frees its own storage only; the fine-tune's manifest follows the
        # compaction, and the base's client keeps valid tensors after its fds are closed
        parts.queue.drop_version(rb)
        parts.registry.transition(rb, "evicted", "base: evicted")   # as the evict action does
        assert parts.inventory.held() == {"cpu": total}
        assert parts.store.usage()["cpu"].unique == total
        assert_same(_fetch(rf), ft)
        assert_same(held_by_client, base)
        # the base comes back: it shares again and its fetch equals torch.load
        await asyncio.wait_for(parts.queue.load_now(rb, "base: fetched again"), 60)
        assert_same(_fetch(rb), load(tmp_path / "base.pt"))
        assert parts.inventory.held() == {"cpu": total + layer}
        # replacing the fine-tune's file: the new version is read, the old released; the base
        # never changes
        ft2 = {**base, "layer1.weight": base["layer1.weight"] * 2}
        torch.save(ft2, tmp_path / "ft.tmp")
        (tmp_path / "ft.tmp").rename(tmp_path / "ft.pt")
        rf.source = names.scan(tmp_path)["ft"]
        await asyncio.wait_for(parts.queue.load_now(rf, "ft: replaced"), 60)
        assert_same(_fetch(rf), ft2)
        assert_same(_fetch(rb), base)
        assert parts.inventory.held() == {"cpu": total + layer}
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        for rec in (rb, rf):
            if rec.serving is not None:
                parts.queue.retire(rec.serving)
                rec.serving = None
        parts.store.close()
        parts.inventory.close()
    assert parts.store.fd_count() == 0


@pytest.mark.skipif(not hasattr(PlacementConfig(), "share_storages"),
                    reason="needs the [placement] share_storages config key")
def test_a_real_daemon_shares_and_reports_it(daemon_factory: Any) -> None:
    d = daemon_factory(gpus=[], extra_config="share_storages = true\n")
    base = _base()
    ft = {**base, "layer0.weight": base["layer0.weight"] + 1}
    torch.save(base, d.model_dir / "base.pt.tmp")
    (d.model_dir / "base.pt.tmp").rename(d.model_dir / "base.pt")
    d.wait_model("base")
    torch.save(ft, d.model_dir / "ft.pt.tmp")
    (d.model_dir / "ft.pt.tmp").rename(d.model_dir / "ft.pt")
    d.wait_model("ft")
    total = sum(t.nbytes for t in base.values())
    layer = base["layer0.weight"].nbytes
    sharing = d.status()["daemon"]["sharing"]
    assert sharing["devices"]["cpu"]["unique"] == total + layer
    assert sharing["models"]["ft"] == {"bytes": total, "own": layer, "shared": total - layer,
                                       "shared_with": {"base": total - layer}}
    with d.client() as c:
        held = c.fetch("base")
        assert_same(held, base)
        assert_same(c.fetch("ft"), ft)
        c.evict("base")
        d.wait_model("base", "evicted")
        assert d.status()["daemon"]["sharing"]["devices"]["cpu"]["unique"] == total
        assert_same(c.fetch("ft"), ft)
        assert_same(held, base)        # the client's tensors outlive the eviction
        c.reload("base")
        d.wait_for(lambda st: st["daemon"]["sharing"]["devices"]["cpu"]["unique"] == total + layer, what="base shared again")
        assert_same(c.fetch("base"), base)
    # a restart reads both again and shares them again
    d.stop()
    again = daemon_factory(model_dir=d.model_dir, state_dir=d.state_dir, name="again", gpus=[],
                           extra_config="share_storages = true\n")
    again.wait_model("base")
    again.wait_model("ft")
    assert again.status()["daemon"]["sharing"]["devices"]["cpu"]["unique"] == total + layer
    with again.client() as c:
        assert_same(c.fetch("base"), base)
        assert_same(c.fetch("ft"), ft)
    (again.model_dir / "ft.pt").unlink()
    again.wait_for(lambda st: st["daemon"]["sharing"]["devices"]["cpu"]["unique"] == total, what="ft's own storage freed")


async def test_moves_between_devices_share_per_device(tmp_path: Path) -> None:
    """A demotion or promotion re-reads the model onto the other device, where it shares with
    what that device holds; the device it left keeps only what others there still use."""
    models = tmp_path / "models"
    models.mkdir()
    sim = tmp_path / "gpus.json"
    harness.write_simulate(sim, [harness.sim_gpu(0, 1024)])
    base = _base()
    ft = {**base, "layer0.weight": base["layer0.weight"] + 1}
    torch.save(base, models / "base.pt")
    torch.save(ft, models / "ft.pt")
    parts = _Parts(models, Config(model_dir=str(models), devices=DevicesConfig(simulate=str(sim), reserve_mib=0)))
    await parts.inventory.open()
    rb, rf = parts.record("base"), parts.record("ft")
    worker = asyncio.create_task(parts.queue.worker())
    total = sum(t.nbytes for t in base.values())
    layer = base["layer0.weight"].nbytes
    try:
        for rec, where in ((rb, "cuda:0"), (rf, "cuda:0")):
            parts.queue.request_move(rec, where, "test", f"{rec.name}: to {where}")
            await asyncio.wait_for(parts.queue.load_now(rec, f"{rec.name}: load"), 60)
            assert list(rec.placement) == [where], (rec.placement, rec.reason)
        assert parts.store.usage()["cuda:0"].unique == total + layer
        # demote the fine-tune: on the CPU it holds all its bytes alone; the GPU keeps the base
        parts.queue.request_move(rf, "cpu", "pressure", "ft: demoted")
        await asyncio.wait_for(parts.queue.load_now(rf, "ft: demote"), 60)
        assert list(rf.placement) == ["cpu"]
        usage = parts.store.usage()
        assert usage["cuda:0"].unique == total and usage["cpu"].unique == total
        assert_same(_fetch(rf), ft)
        assert_same(_fetch(rb), base)
        # promote it back: shared with the base on the GPU again, nothing left on the CPU
        parts.queue.request_move(rf, "cuda:0", "pressure cleared", "ft: promoted")
        await asyncio.wait_for(parts.queue.load_now(rf, "ft: promote"), 60)
        assert parts.store.usage() == {"cuda:0": parts.store.usage()["cuda:0"]}
        assert parts.store.usage()["cuda:0"].unique == total + layer
        assert_same(_fetch(rf), ft)
        assert parts.inventory.held() == {"cuda:0": total + layer}
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        for rec in (rb, rf):
            if rec.serving is not None:
                parts.queue.retire(rec.serving)
                rec.serving = None
        parts.store.close()
        parts.inventory.close()
