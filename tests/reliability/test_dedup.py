"""Random groups of checkpoints under random operations: sharing never changes what anyone gets.

Hypothesis draws a pool of storages, a group of checkpoints built from them (shared, tied,
viewed, modified in one byte, duplicated inside one model) and a sequence of add, evict,
replace, delete and reload operations on a StorageStore fed by the real checkpoint reader.
After every step:

* every live model builds exactly what ``torch.load`` returns for the file it was read from,
  and so does a client that fetched a model before it was evicted or replaced (its mapping
  outlives the store's fds);
* the store holds, per device, exactly the bytes of the distinct live storages (with eager
  compaction; with lazy compaction no more than that plus the reclaimable dead bytes, and no
  segment more dead than its threshold allows);
* each model's own + shared bytes are its storages' bytes, and no fd outlives its storages.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devmapd.engine.dedup import StorageStore
from tests.engine.helpers import adopt, assert_same, fetch, load

POOL = 6           # distinct base storages models draw from
SIZES = (0, 4, 48, 300, 1024)   # elements per base storage (float32): empty, tiny, multi-page


def _pool(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SIZES[i % len(SIZES)], generator=g) for i in range(POOL)]


@st.composite
def model_spec(draw: st.DrawFn) -> list[tuple[str, int, str]]:
    """Keys -> (pool index, how it is used): plain, a one-byte change, a tie, a view, a copy."""
    n = draw(st.integers(1, 5))
    spec = []
    for k in range(n):
        spec.append((f"t{k}", draw(st.integers(0, POOL - 1)),
                     draw(st.sampled_from(["plain", "plain", "flip", "tie", "view", "copy"]))))
    return spec


def _state(spec: list[tuple[str, int, str]], pool: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for key, idx, how in spec:
        t = pool[idx]
        if how == "flip" and t.numel():
            t = t.clone()
            t.view(torch.uint8).reshape(-1)[0] ^= 1
        elif how == "tie" and sd:
            t = next(iter(sd.values()))        # the same storage under a second key
        elif how == "view" and t.numel() > 2:
            t = t[1:]                          # a view: saved with its whole storage
        elif how == "copy":
            t = t.clone()                      # equal bytes, its own storage
        sd[key] = t
    return sd


def _expected_unique(live: dict[Any, dict[str, torch.Tensor]]) -> int:
    """Bytes of the distinct storages of the live models: equal bytes count once across models,
    but as often as one model holds them (one model's equal storages stay separate)."""
    need: dict[bytes, tuple[int, int]] = {}
    for sd in live.values():
        counts: dict[bytes, int] = {}
        seen: set[int] = set()
        for t in sd.values():
            s = t.untyped_storage()
            if s.data_ptr() in seen or s.nbytes() == 0:
                continue
            seen.add(s.data_ptr())
            b = bytes(torch.empty(0, dtype=torch.uint8).set_(s).numpy())
            counts[b] = counts.get(b, 0) + 1
        for b, c in counts.items():
            _n, had = need.get(b, (len(b), 0))
            need[b] = (len(b), max(had, c))
    return sum(n * c for n, c in need.values())


OPS = st.lists(st.tuples(st.sampled_from(["add", "evict", "replace", "delete", "reload"]),
                         st.integers(0, 3), model_spec()), min_size=1, max_size=10)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 3), fraction=st.sampled_from([0.0, 0.5]), per_owner=st.sampled_from([1, 2]), ops=OPS)
def test_random_operations_keep_accounting_and_equality(seed: int, fraction: float, per_owner: int,
                                                        ops: list[tuple[str, int, list[Any]]]) -> None:
    pool = _pool(seed)
    fds_before = len(os.listdir("/proc/self/fd"))
    store = StorageStore(compact_dead_fraction=fraction, segments_per_owner=per_owner)
    clients: list[tuple[Any, Any]] = []     # (what a client built, what it must stay equal to)
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[int, Path] = {}
        read_from: dict[Any, tuple[int, dict[str, torch.Tensor]]] = {}   # owner -> (model, expected)
        gen = 0
        try:
            for op, m, spec in ops:
                current = [o for o, (mm, _) in read_from.items() if mm == m]
                if op in ("add", "replace") or (op == "reload" and m in files):
                    if op in ("add", "replace") or m not in files:
                        files[m] = Path(tmp) / f"m{m}-{gen}.pt"
                        torch.save(_state(spec, pool), files[m])
                    gen += 1
                    owner = (m, gen)
                    h = adopt(store, owner, files[m])
                    read_from[owner] = (m, load(files[m]))
                    for old in current:        # the new version replaces the old one
                        clients.append((fetch(store.holding(old)), read_from[old][1]))
                        store.release(old)
                        del read_from[old]
                    assert h.owner == owner
                elif op in ("evict", "delete"):
                    for old in current:
                        clients.append((fetch(store.holding(old)), read_from[old][1]))
                        store.release(old)
                        del read_from[old]
                    if op == "delete" and m in files:
                        files.pop(m).unlink()
                store.reap()
                # equality for every live model and every client that still holds tensors
                for owner, (_m, want) in read_from.items():
                    h = store.holding(owner)
                    assert h is not None
                    assert_same(fetch(h), want, f"{owner}")
                    u = store.owner_usage(owner)
                    assert u.own + u.shared == u.bytes == h.nbytes
                for got, want in clients:
                    assert_same(got, want, "a client's tensors after eviction")
                # accounting: unique bytes == bytes of distinct live storages
                usage = store.usage()
                unique = sum(u.unique for u in usage.values())
                assert unique == _expected_unique({o: sd for o, (_m, sd) in read_from.items()})
                resident = sum(u.resident for u in usage.values())
                if fraction == 0.0:
                    assert resident == unique
                else:
                    assert unique <= resident <= unique + sum(u.reclaimable for u in usage.values())
                    assert all(u.reclaimable <= fraction * u.resident for u in usage.values())
                assert store.fd_count() <= store.segments_per_owner * len(read_from)
        finally:
            store.close()
            clients.clear()
    assert len(os.listdir("/proc/self/fd")) == fds_before
