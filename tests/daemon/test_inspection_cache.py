"""The inspection cache: a stored parse is served only for the very files it was learned from.

Real torch checkpoints written here; the cache, the codec and the reader are the daemon's own.
A changed file (same size and mtime, other content: in place with the mtime put back, or a new
file renamed over it), a replaced file and a touched file are each parsed afresh, and reading
with the old parse serves what is on disk now. Corrupt, truncated, foreign and wrong-owner
cache files are ignored with a warning, never trusted.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from devmapd.daemon import inspection_cache
from devmapd.daemon.inspection_cache import InspectionCache
from devmapd.engine import arena, checkpoint, inspection_codec
from devmapd.engine.learned import learn, read_learned

OPTS = checkpoint.ReadOptions()


def _save(path: Path, seed: int, rows: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"enc.0.weight": torch.randn(rows, 8, generator=g), "enc.0.bias": torch.randn(8, generator=g),
          "head.weight": torch.randn(4, 8, generator=g).half()}
    sd["tied"] = sd["enc.0.weight"]
    torch.save(sd, path)
    return sd


def _served(loaded: checkpoint.LoadedModel) -> dict:
    try:
        return arena.build(loaded.manifest, [s.fd for s in loaded.segments])
    finally:
        loaded.close()


def _equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> InspectionCache:
    # Files written by the test are seconds young; the racy rule has its own test below.
    monkeypatch.setattr(inspection_cache, "RACY_NS", 0)
    return InspectionCache(tmp_path / "state")


def _stored(cache: InspectionCache, path: Path):
    learned = learn(path, OPTS)
    assert learned.ok, learned.inspection.diagnosis
    assert cache.store(str(path), learned, OPTS)
    return learned


def test_an_unchanged_file_is_served_from_the_cache_and_reads_like_torch_load(tmp_path, cache):
    path = tmp_path / "m.pt"
    sd = _save(path, 1)
    learned = _stored(cache, path)
    hit = cache.lookup(str(path), OPTS)
    assert hit is not None and cache.counts["hits"] == 1
    assert hit.inspection == learned.inspection == checkpoint.inspect(path)
    assert hit.fingerprint == learned.fingerprint
    assert _equal(_served(read_learned(hit, OPTS)), torch.load(path, weights_only=True))
    assert _equal(_served(read_learned(hit, OPTS)), sd)


def test_same_size_and_mtime_rewritten_in_place_is_never_served_stale(tmp_path, cache):
    path = tmp_path / "m.pt"
    _save(path, 1)
    old = _stored(cache, path)
    st = os.stat(path)
    other = tmp_path / "elsewhere" / "m.pt"   # same base name: torch.save names the archive after it
    other.parent.mkdir()
    new_sd = _save(other, 2)
    data = other.read_bytes()
    assert len(data) == st.st_size   # same structure, other values: the same size
    with open(path, "r+b") as fh:    # in place: same inode, same size
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))   # and the mtime put back
    now = os.stat(path)
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert cache.lookup(str(path), OPTS) is None and cache.counts["stale"] == 1
    # Even handed the old parse, the read notices (ctime) and serves what is on disk now.
    assert _equal(_served(read_learned(old, OPTS)), new_sd)


def test_a_new_file_renamed_over_with_the_same_size_and_mtime_is_never_served_stale(tmp_path, cache):
    path = tmp_path / "m.pt"
    _save(path, 1)
    old = _stored(cache, path)
    st = os.stat(path)
    tmp = tmp_path / "elsewhere" / "m.pt"
    tmp.parent.mkdir()
    new_sd = _save(tmp, 3)
    assert tmp.stat().st_size == st.st_size
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)
    assert cache.lookup(str(path), OPTS) is None
    assert _equal(_served(read_learned(old, OPTS)), new_sd)


def test_a_replaced_and_a_touched_file_are_parsed_afresh(tmp_path, cache):
    path = tmp_path / "m.pt"
    _save(path, 1)
    _stored(cache, path)
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns - 1_000_000_000))   # touched (to a past time)
    assert cache.lookup(str(path), OPTS) is None
    _stored(cache, path)                         # the touched version is learned again...
    assert cache.lookup(str(path), OPTS) is not None
    new_sd = _save(path, 4, rows=40)             # ...then replaced by a bigger model
    assert cache.lookup(str(path), OPTS) is None
    fresh = learn(path, OPTS)
    assert fresh.inspection.tensors == 3 and _equal(_served(read_learned(fresh, OPTS)), new_sd)


def test_a_hugging_face_directory_is_keyed_by_every_file(tmp_path, cache):
    model = tmp_path / "hf"
    _hf(model)
    learned = _stored(cache, model)
    assert learned.inspection.format == "hf-dir"
    assert cache.lookup(str(model), OPTS) is not None
    (model / "config.json").write_text('{"changed": true}')   # not a weight file, still part of the model
    assert cache.lookup(str(model), OPTS) is None


def _hf(model: Path) -> None:
    from safetensors.torch import save_file

    model.mkdir()
    save_file({"a.weight": torch.randn(4, 4)}, str(model / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.randn(4)}, str(model / "model-00002-of-00002.safetensors"))
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}}))
    (model / "config.json").write_text("{}")


def test_a_file_changed_just_before_it_was_parsed_is_not_stored(tmp_path):
    path = tmp_path / "m.pt"
    _save(path, 1)   # written now: within the timestamp granularity of the parse below
    cache = InspectionCache(tmp_path / "state")
    assert not cache.store(str(path), learn(path, OPTS), OPTS)
    assert cache.counts["racy"] == 1 and cache.lookup(str(path), OPTS) is None


def _entry_file(cache: InspectionCache) -> Path:
    (entry,) = list(cache.dir.glob("*.json"))
    return entry


def _tamper(entry: Path, change) -> None:
    head, _, body = entry.read_bytes().partition(b"\n")
    doc = json.loads(body)
    change(doc)
    body = json.dumps(doc).encode()
    header = dict(json.loads(head), sha256=InspectionCache._digest(body))   # a consistent forgery
    entry.write_bytes(json.dumps(header).encode() + b"\n" + body)


def _header(entry: Path, **changes) -> None:
    head, _, body = entry.read_bytes().partition(b"\n")
    entry.write_bytes(json.dumps(dict(json.loads(head), **changes)).encode() + b"\n" + body)


@pytest.mark.parametrize("damage, why", [
    (lambda e: e.write_bytes(e.read_bytes()[: len(e.read_bytes()) // 2]), "checksum"),   # truncated
    (lambda e: e.write_bytes(e.read_bytes()[:40]), "not valid JSON"),
    (lambda e: e.write_bytes(b"\x00garbage"), "not valid JSON"),
    (lambda e: _header(e, version=99), "version"),
    (lambda e: _header(e, format="something-else"), "not an inspection record"),
    (lambda e: e.write_bytes(e.read_bytes().replace(b'"enc.0', b'"ENC.0')), "checksum"),
    (lambda e: _tamper(e, lambda d: d.update(model="/elsewhere")), "another model"),
    (lambda e: _tamper(e, lambda d: d["record"].update(codec=2)), "codec version"),
    (lambda e: _tamper(e, lambda d: d["record"]["storages"][0].__setitem__(1, 1 << 40)), "past the end of its file"),
    (lambda e: _tamper(e, lambda d: d["record"]["storages"][0].__setitem__(3, "os.system")), "unknown dtype"),
    (lambda e: _tamper(e, lambda d: d["record"]["tensors"][0][2].__setitem__(0, 10**6)), "past the end of its storage"),
    (lambda e: _tamper(e, lambda d: d["record"].update(tree={"@": "tensor", "i": 99})), "does not decode"),
    (lambda e: os.chmod(e, 0o666), "others may write"),
    (lambda e: os.chown(e, 65534, 65534), "belongs to uid 65534"),
])
def test_a_corrupt_or_foreign_cache_file_is_ignored_with_a_warning(tmp_path, cache, caplog, damage, why):
    path = tmp_path / "m.pt"
    sd = _save(path, 1)
    _stored(cache, path)
    damage(_entry_file(cache))
    with caplog.at_level(logging.WARNING, logger="devmapd.cache"):
        assert cache.lookup(str(path), OPTS) is None
    assert cache.counts["rejected"] == 1 and cache.counts["hits"] == 0
    assert any(why in r.getMessage() and "parsed afresh" in r.getMessage() for r in caplog.records), caplog.text
    # The next store replaces the bad file with a good one.
    _stored(cache, path)
    hit = cache.lookup(str(path), OPTS)
    assert hit is not None and _equal(_served(read_learned(hit, OPTS)), sd)


def test_a_cache_directory_others_can_write_is_not_used(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(inspection_cache, "RACY_NS", 0)
    state = tmp_path / "state"
    (state / "inspections").mkdir(parents=True)
    os.chmod(state / "inspections", 0o777)
    cache = InspectionCache(state)
    path = tmp_path / "m.pt"
    _save(path, 1)
    with caplog.at_level(logging.WARNING, logger="devmapd.cache"):
        assert not cache.store(str(path), learn(path, OPTS), OPTS)
        assert cache.lookup(str(path), OPTS) is None
    assert "disabled" in caplog.text and list((state / "inspections").iterdir()) == []


def test_the_codec_round_trips_and_refuses_another_model(tmp_path):
    path = tmp_path / "m.pt"
    _save(path, 1)
    learned = learn(path, OPTS)
    doc = json.loads(json.dumps(inspection_codec.encode(learned)))
    back = inspection_codec.decode(doc, path=str(path))
    assert back == learned
    with pytest.raises(inspection_codec.CodecError, match="another model"):
        inspection_codec.decode(doc, path=str(tmp_path / "other.pt"))


def test_other_parse_options_are_another_entry(tmp_path, cache):
    path = tmp_path / "m.pt"
    _save(path, 1)
    _stored(cache, path)
    other = checkpoint.ReadOptions(strip_prefixes=())
    assert cache.lookup(str(path), other) is None
    assert cache.lookup(str(path), OPTS) is not None


def test_a_record_made_under_other_allowed_globals_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setattr(inspection_cache, "RACY_NS", 0)
    scope = ["collections.OrderedDict"]
    cache = InspectionCache(tmp_path / "state", scope=lambda: tuple(scope))
    path = tmp_path / "m.pt"
    _save(path, 1)
    _stored(cache, path)
    assert cache.lookup(str(path), OPTS) is not None
    scope.clear()   # the operator narrowed checkpoint.allowed_globals
    assert cache.lookup(str(path), OPTS) is None


def test_records_queued_for_the_writer_thread_are_written_by_close(tmp_path, cache):
    paths = [tmp_path / f"m{i}.pt" for i in range(5)]
    for i, p in enumerate(paths):
        _save(p, i)
        cache.store_later(str(p), learn(p, OPTS), OPTS)
    cache.close()
    assert cache.counts["stored"] == 5
    assert all(cache.lookup(str(p), OPTS) is not None for p in paths)
