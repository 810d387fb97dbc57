"""StorageStore: checkpoints read by the real engine share the storages whose bytes are equal.

Every checkpoint here is written by torch at test time and read by ``checkpoint.read``; what a
client would build (``arena.build`` over the holding's manifest and sealed fds) is compared with
``torch.load`` of the same file.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devmapd.engine import arena, checkpoint, dedup
from devmapd.engine.dedup import DedupError, StorageStore
from tests.engine.helpers import adopt, assert_same, fetch, load, storage_bytes

N_TENSORS = 40


def base_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(16 + i, 32, generator=g) for i in range(N_TENSORS)}


def finetune(sd: dict[str, torch.Tensor], which: range, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    out = dict(sd)
    for i in which:
        k = f"layer{i}.weight"
        out[k] = sd[k] + torch.randn(sd[k].shape, generator=g)
    return out


def save(sd: object, path: Path) -> Path:
    torch.save(sd, path)
    return path


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def store() -> StorageStore:
    s = StorageStore(compact_dead_fraction=0.0)
    yield s
    s.close()


def test_fine_tunes_of_one_base_hold_the_base_once_plus_their_changes(tmp_path: Path, store: StorageStore) -> None:
    base = base_state()
    paths = [save(base, tmp_path / "base.pt")]
    for j in range(1, 4):
        paths.append(save(finetune(base, range(4 * j, 4 * j + 4), j), tmp_path / f"ft{j}.pt"))
    holdings = [adopt(store, p.stem, p) for p in paths]
    base_bytes = storage_bytes(base)
    changed = sum(base[f"layer{i}.weight"].nbytes for j in range(1, 4) for i in range(4 * j, 4 * j + 4))
    assert store.usage()["cpu"].unique == base_bytes + changed
    assert store.usage()["cpu"].resident == base_bytes + changed   # eager compaction: nothing dead
    for h, p in zip(holdings, paths):
        assert_same(fetch(h), load(p), p.name)
    u = store.owner_usage("ft1")
    assert u.bytes == base_bytes and u.own == sum(base[f"layer{i}.weight"].nbytes for i in range(4, 8))
    assert u.shared_with["base"] == base_bytes - u.own
    assert set(u.shared_with) == {"base", "ft2", "ft3"}
    assert store.exclusive_bytes("ft1") == u.own
    rep = store.report(lambda o: f"models/{o}")
    assert rep["devices"]["cpu"]["unique"] == base_bytes + changed
    assert rep["models"]["models/ft1"] == {"bytes": base_bytes, "own": u.own, "shared": base_bytes - u.own,
                                           "shared_with": {f"models/{o}": n for o, n in sorted(u.shared_with.items())}}
    assert store.report(lambda o: f"models/{o}") is rep   # cached until the next change
    assert holdings[1].placement() == {"cpu": base_bytes}
    assert store.savings() == {"cpu": 4 * base_bytes - (base_bytes + changed)}
    # ft1 and ft2 hold every base tensor between them, plus their own four each
    own12 = sum(base[f"layer{i}.weight"].nbytes for i in range(4, 12))
    assert store.savings(["ft1", "ft2"]) == {"cpu": 2 * base_bytes - (base_bytes + own12)}


def test_releasing_the_base_frees_only_what_nobody_else_uses(tmp_path: Path, store: StorageStore) -> None:
    base = base_state()
    pb = save(base, tmp_path / "base.pt")
    pf = save(finetune(base, range(4), 1), tmp_path / "ft.pt")
    hb = adopt(store, "base", pb)
    hf = adopt(store, "ft", pf)
    client_base = fetch(hb)                     # a client holding the base's tensors
    before_layout = hf.layout
    only_base = store.exclusive_bytes("base")
    assert only_base == sum(base[f"layer{i}.weight"].nbytes for i in range(4))
    unique = store.usage()["cpu"].unique
    assert store.release("base") == only_base
    assert store.usage()["cpu"].unique == unique - only_base
    assert store.usage()["cpu"].resident == unique - only_base   # compacted, not merely marked
    assert hf.layout > before_layout                               # its storages moved
    assert store.reap() >= 1                                       # the old segment closed
    assert_same(fetch(hf), load(pf), "ft after base left")
    assert_same(client_base, base, "the base's client after the base left and its fd closed")
    assert store.release("ft") > 0
    assert store.usage() == {}


def test_a_client_write_changes_nobody_elses_tensors(tmp_path: Path, store: StorageStore) -> None:
    base = base_state()
    pa = save(base, tmp_path / "a.pt")
    pb = save({k: v.clone() for k, v in base.items()}, tmp_path / "b.pt")
    ha, hb = adopt(store, "a", pa), adopt(store, "b", pb)
    assert store.owner_usage("b").own == 0          # fully shared
    mine = fetch(ha)
    mine["layer0.weight"].fill_(7.0)
    assert_same(fetch(hb), base, "b after a's client wrote")
    assert_same(fetch(ha), base, "a fetched again after its client wrote")


def test_equal_storages_inside_one_model_stay_separate(tmp_path: Path, store: StorageStore) -> None:
    sd = {"a.bias": torch.zeros(64), "b.bias": torch.zeros(64), "c": torch.ones(8)}
    p = save(sd, tmp_path / "zeros.pt")
    h = adopt(store, "z", p)
    got = fetch(h)
    assert_same(got, load(p))
    assert got["a.bias"].data_ptr() != got["b.bias"].data_ptr()
    got["a.bias"].fill_(1.0)
    assert torch.equal(got["b.bias"], torch.zeros(64))
    # a second model of the same bytes shares both copies, one each
    h2 = adopt(store, "z2", save(sd, tmp_path / "zeros2.pt"))
    assert store.owner_usage("z2").own == 0
    assert store.usage()["cpu"].unique == storage_bytes(sd)
    assert_same(fetch(h2), sd)


def test_tied_weights_and_views_keep_working(tmp_path: Path, store: StorageStore) -> None:
    w = torch.randn(10, 8)
    sd = {"emb.weight": w, "head.weight": w, "view": w[2:5], "t": w.t(), "other": torch.randn(4)}
    p1 = save(sd, tmp_path / "tied.pt")
    p2 = save({**sd, "other": torch.randn(4)}, tmp_path / "tied2.pt")
    adopt(store, "t1", p1)
    h2 = adopt(store, "t2", p2)
    want = load(p2)
    got = fetch(h2)
    assert_same(got, want)
    assert got["emb.weight"].untyped_storage().data_ptr() == got["head.weight"].untyped_storage().data_ptr()
    assert got["view"].untyped_storage().data_ptr() == got["emb.weight"].untyped_storage().data_ptr()
    assert store.owner_usage("t2").shared == w.nbytes


def test_files_that_differ_in_one_byte_never_share_that_storage(tmp_path: Path, store: StorageStore) -> None:
    sd = base_state()
    other = {k: v.clone() for k, v in sd.items()}
    raw = other["layer3.weight"].view(torch.uint8).reshape(-1)
    raw[100] ^= 1
    pa, pb = save(sd, tmp_path / "a.pt"), save(other, tmp_path / "b.pt")
    adopt(store, "a", pa)
    hb = adopt(store, "b", pb)
    assert store.owner_usage("b").own == other["layer3.weight"].nbytes
    assert_same(fetch(hb), load(pb))


def test_a_hash_collision_is_caught_by_the_byte_comparison(tmp_path: Path, store: StorageStore,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Every storage of one size collides: only the byte comparison keeps them apart.
    monkeypatch.setattr(dedup, "digest_of", lambda buf: b"\0" * 16)
    g = torch.Generator().manual_seed(5)
    sd_a = {f"t{i}": torch.randn(256, generator=g) for i in range(6)}
    sd_b = {k: (v if i % 2 else torch.randn(256, generator=g)) for i, (k, v) in enumerate(sd_a.items())}
    pa, pb = save(sd_a, tmp_path / "a.pt"), save(sd_b, tmp_path / "b.pt")
    ha, hb = adopt(store, "a", pa), adopt(store, "b", pb)
    assert_same(fetch(ha), load(pa))
    assert_same(fetch(hb), load(pb))
    assert store.owner_usage("b").shared == 3 * 256 * 4     # the three really equal storages


def test_served_bytes_are_compared_after_normalisation(tmp_path: Path, store: StorageStore) -> None:
    """A DDP ``module.`` copy, a safetensors copy and an fp16 file upcast to fp32 share storages."""
    sd = {f"l{i}.weight": torch.randn(32, 16).half().float() for i in range(4)}
    plain = save(sd, tmp_path / "plain.pt")
    ddp = save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")
    st = tmp_path / "model.safetensors"
    save_file(sd, str(st))
    half = save({k: v.half() for k, v in sd.items()}, tmp_path / "half.pt")
    adopt(store, "plain", plain)
    for name, p, opts in (("ddp", ddp, checkpoint.ReadOptions()), ("st", st, checkpoint.ReadOptions()),
                          ("half", half, checkpoint.ReadOptions(cpu_upcast_half=True))):
        h = adopt(store, name, p, options=opts)
        assert store.owner_usage(name).own == 0, name
        got = fetch(h)
        assert_same(got, sd, name)
    # without the cast the fp16 bytes are different bytes
    h = adopt(store, "half-raw", half)
    assert store.owner_usage("half-raw").own == storage_bytes(sd) // 2
    assert_same(fetch(h), load(half))


def test_sharing_is_per_device(tmp_path: Path, store: StorageStore) -> None:
    sd = base_state()
    pa = save(sd, tmp_path / "a.pt")
    pb = save(sd, tmp_path / "b.pt")
    # a: the first half on a (simulated, memfd) GPU; b: everything on the CPU
    adopt(store, "a", pa, device_of=lambda key: "cuda:0" if int(key[5:].split(".")[0]) < 20 else "cpu")
    hb = adopt(store, "b", pb)
    half = sum(sd[f"layer{i}.weight"].nbytes for i in range(20))
    assert store.owner_usage("b").own == half
    assert store.usage()["cuda:0"].unique == half
    assert store.cost_of("cuda:0", store.keys_of("b")) == storage_bytes(sd) - half
    assert store.cost_of("cpu", store.keys_of("b")) == 0
    assert_same(fetch(hb), load(pb))


def test_cost_of_a_known_model_is_what_it_would_add(tmp_path: Path, store: StorageStore) -> None:
    base = base_state()
    pb = save(base, tmp_path / "base.pt")
    pf = save(finetune(base, range(4), 1), tmp_path / "ft.pt")
    adopt(store, "base", pb)
    adopt(store, "ft", pf)
    keys = store.keys_of("ft")
    own = store.exclusive_bytes("ft")
    store.release("ft")
    assert store.cost_of("cpu", keys) == own
    store.release("base")
    assert store.cost_of("cpu", keys) == storage_bytes(base)


def test_segments_per_manifest_are_bounded(tmp_path: Path) -> None:
    store = StorageStore(compact_dead_fraction=0.0, max_segments=2)
    try:
        base = base_state()
        sds = [base]
        for j in range(1, 6):   # each epoch changes different layers: storages spread over segments
            sds.append(finetune(sds[-1], range(j * 5, j * 5 + 5), j))
        holdings = []
        for j, sd in enumerate(sds):
            p = save(sd, tmp_path / f"e{j}.pt")
            h = adopt(store, j, p)
            holdings.append((h, p))
            assert len(h.manifest.segments) <= 2
        for h, p in holdings:
            assert len(h.manifest.segments) <= 2
            assert_same(fetch(h), load(p))
    finally:
        store.close()


@pytest.mark.parametrize("per_owner", [1, 2])
def test_a_chain_of_replaced_versions_keeps_segments_bounded(tmp_path: Path, per_owner: int) -> None:
    """Each epoch replaces the last and keeps the embedding of the first: the store must not
    keep one segment per epoch that ever left storages behind."""
    store = StorageStore(compact_dead_fraction=0.25, segments_per_owner=per_owner)
    try:
        sd = base_state()
        prev = None
        for e in range(8):
            if e:
                sd = finetune(sd, range(30 + e % 10, 31 + e % 10), e)
            p = save(sd, tmp_path / f"epoch{e}.pt")
            h = adopt(store, e, p)
            if prev is not None:
                store.release(prev)
            prev = e
            store.reap()
            assert store.fd_count() <= per_owner
            assert_same(fetch(h), load(p), p.name)
            assert store.usage()["cpu"].unique == storage_bytes(sd)
    finally:
        store.close()


def test_models_of_empty_storages_only(tmp_path: Path, store: StorageStore) -> None:
    sd = {"a": torch.zeros(0), "b": torch.zeros(0, 3)}
    p = save(sd, tmp_path / "empty.pt")
    h1 = adopt(store, "e1", p)
    h2 = adopt(store, "e2", p)
    assert_same(fetch(h1), load(p))
    store.release("e1")
    store.reap()
    assert_same(fetch(h2), load(p))


def test_no_fd_outlives_its_storages(tmp_path: Path) -> None:
    before = open_fds()
    store = StorageStore(compact_dead_fraction=0.25)
    base = base_state()
    for j in range(4):
        p = save(finetune(base, range(j * 4, j * 4 + 4), j) if j else base, tmp_path / f"m{j}.pt")
        adopt(store, j, p)
    store.reap()   # the fine-tunes' read segments, compacted into their new storages
    assert store.fd_count() <= 4   # at most one segment per model read
    for j in range(4):
        store.release(j)
    store.reap()
    assert store.fd_count() == 0
    assert open_fds() == before


def test_a_failed_compaction_leaves_every_model_valid(tmp_path: Path, store: StorageStore,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base = base_state()
    pb = save(base, tmp_path / "base.pt")
    pf = save(finetune(base, range(4), 1), tmp_path / "ft.pt")
    adopt(store, "base", pb)
    hf = adopt(store, "ft", pf)
    real = dedup.ArenaBuilder

    def no_memory(name: str, nbytes: int) -> dedup.ArenaBuilder:
        raise arena.ArenaError(f"cannot size a {nbytes}-byte arena for {name}: No space left on device")

    monkeypatch.setattr(dedup, "ArenaBuilder", no_memory)
    freed = store.release("base")
    assert store.compaction_failures == 1 and "No space left" in store.last_compaction_error
    assert store.usage()["cpu"].reclaimable == freed     # still resident, and said so
    assert_same(fetch(hf), load(pf))
    monkeypatch.setattr(dedup, "ArenaBuilder", real)
    h2 = adopt(store, "ft2", pf)                        # fully shared with ft
    store.release("ft2")
    assert store.usage()["cpu"].reclaimable == 0         # compacted at the next release
    store.reap()
    assert_same(fetch(store.holding("ft")), load(pf))
    assert h2.owner == "ft2"


def test_a_failed_adopt_takes_nothing(tmp_path: Path, store: StorageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    p = save(base_state(), tmp_path / "a.pt")
    adopt(store, "a", p)

    def cannot_map(buf: memoryview) -> bytes:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(dedup, "digest_of", cannot_map)
    loaded = checkpoint.read(p)
    with pytest.raises(OSError):
        store.adopt("b", loaded.manifest, loaded.segments)
    assert store.holding("b") is None and all(s.fd >= 0 for s in loaded.segments)
    assert store.usage()["cpu"].segments == 1
    loaded.close()


def test_adopt_refuses_what_it_cannot_share(tmp_path: Path, store: StorageStore) -> None:
    p = save(base_state(), tmp_path / "a.pt")
    adopt(store, "a", p)
    loaded = checkpoint.read(p)
    with pytest.raises(DedupError, match="already holds"):
        store.adopt("a", loaded.manifest, loaded.segments)
    gpu = loaded.manifest.replace(segments=tuple(s.replace(kind="cuda-ipc") for s in loaded.manifest.segments))
    with pytest.raises(DedupError, match="only memfd segments"):
        store.adopt("b", gpu, loaded.segments)
    loaded.close()   # refused: still the caller's to close
    assert isinstance(arena.Manifest, type)


def test_adopts_and_releases_from_several_threads_keep_the_books(tmp_path: Path) -> None:
    """Loads run in worker threads while the event loop releases: the lock keeps them apart."""
    import threading

    store = StorageStore(compact_dead_fraction=0.0)
    base = base_state()
    paths = [save(finetune(base, range(j, j + 2), j), tmp_path / f"m{j}.pt") for j in range(6)]
    errors: list[BaseException] = []

    def churn(j: int) -> None:
        try:
            for round_ in range(3):
                adopt(store, (j, round_), paths[j])
                if round_:
                    store.release((j, round_ - 1))
        except BaseException as e:   # reported below: a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(j,)) for j in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        store.reap()
        assert sorted(store.owners()) == [(j, 2) for j in range(6)]
        for j in range(6):
            assert_same(fetch(store.holding((j, 2))), load(paths[j]))
        distinct = {t.numpy().tobytes() for p in paths for t in load(p).values()}
        assert store.usage()["cpu"].unique == sum(len(b) for b in distinct)
    finally:
        store.close()


def test_every_format_of_one_model_shares_one_copy(tmp_path: Path, store: StorageStore) -> None:
    """DataParallel, torch.compile, sharded safetensors and .bin directories of one model (the
    samples the engine is tested on) share every storage; so do the legacy and zip formats."""
    from devmapd import samples

    untied = [samples.dataparallel(tmp_path), samples.compiled(tmp_path), samples.hf_safetensors(tmp_path),
              samples.hf_bin(tmp_path)]
    first = adopt(store, "dataparallel", untied[0])
    for p in untied[1:]:
        h = adopt(store, p.name, p)
        assert store.owner_usage(p.name).own == 0, p.name
        got, want = fetch(h), fetch(first)
        assert_same(dict(sorted(got.items())), dict(sorted(want.items())), p.name)   # shards: own key order
    tied = [samples.plain(tmp_path), samples.legacy(tmp_path)]
    adopt(store, "plain", tied[0])
    h = adopt(store, "legacy", tied[1])
    assert store.owner_usage("legacy").own == 0
    assert_same(fetch(h), load(tied[1]))
