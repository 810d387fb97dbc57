"""Parsing in worker processes gives exactly what parsing in the daemon gives.

Real checkpoints, a real forkserver pool. What a worker learned comes back as the codec's JSON
and is checked like a stored record; a file that does not parse comes back with its diagnosis.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from devmapd.daemon.parsepool import ParsePool
from devmapd.engine import arena, checkpoint
from devmapd.engine.learned import learn, read_learned

OPTS = checkpoint.ReadOptions()


def _same(a, b) -> bool:
    """Equal parses (when each file was opened differs, of course)."""
    return dataclasses.replace(a, opened_ns=0) == dataclasses.replace(b, opened_ns=0)


def test_workers_learn_what_the_daemon_learns_and_it_reads_like_torch_load(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"m{i}.pt"
        torch.save({"w": torch.randn(8, 4) + i, "b": torch.arange(4)}, p)
        paths.append(p)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    pool = ParsePool((), workers=2, start_after=0, idle_s=0.5)
    try:
        for p in paths:
            got = pool.learn(p, OPTS)
            assert _same(got, learn(p, OPTS))
            loaded = read_learned(got, OPTS)
            try:
                obj = arena.build(loaded.manifest, [s.fd for s in loaded.segments])
                ref = torch.load(p, weights_only=True)
                assert all(torch.equal(obj[k], ref[k]) for k in ref)
            finally:
                loaded.close()
        failed = pool.learn(bad, OPTS)
        assert not failed.ok and failed.inspection.diagnosis == learn(bad, OPTS).inspection.diagnosis
        assert pool.parsed_in_workers == 3
        deadline = time.monotonic() + 30
        while pool._pool is not None and time.monotonic() < deadline:   # the idle reaper stops the workers
            time.sleep(0.05)
        assert pool._pool is None
        assert _same(pool.learn(paths[0], OPTS), learn(paths[0], OPTS))   # and a new parse starts them again
    finally:
        pool.close()


def test_the_pool_is_not_started_for_a_few_models(tmp_path):
    p = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, p)
    pool = ParsePool((), workers=1, start_after=5)
    try:
        for _ in range(5):
            assert pool.learn(p, OPTS).ok
        assert pool._pool is None and pool.parsed_in_workers == 0
    finally:
        pool.close()
