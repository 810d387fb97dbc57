"""Property: whatever a damaged file holds, devmapd gives a diagnosis or exactly what torch.load gives.

Real small checkpoints of each format (torch zip, legacy, safetensors, a sharded Hugging Face
directory) are mutated at random by hypothesis: bit flips, byte overwrites, truncations,
insertions, deletions and duplicated ranges. For every mutated file:

* the format parsers (detection, zip, pickle, safetensors header, HF index) raise nothing but
  ``CheckpointError``; ``inspect`` never raises at all;
* ``read`` + ``arena.build`` either raise ``CheckpointError`` or give the same structure and the
  same tensors as the reference reader (``torch.load(weights_only=True)``, safetensors'
  ``load_file``): same dtype, shape, stride, storage offset and the same bytes;
* when the reference refuses the file, devmapd refuses it too (a diagnosis, never guessed data);
* each example finishes within a few seconds (a worker thread joined with a timeout).

``DEVMAPD_SLOW=1`` runs ten times as many examples and lets hypothesis explore freely; the default
run is derandomized so CI sees the same examples every time.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

from devmapd.engine import arena, checkpoint
from devmapd.engine.checkpoint import CheckpointError, ReadOptions

SLOW = os.environ.get("DEVMAPD_SLOW") == "1"
EXAMPLES = 1000 if SLOW else 100
EXAMPLE_TIMEOUT_S = 20.0   # generous: a loaded CI box; a hang is unbounded, not a few seconds
OPTS = ReadOptions(strip_prefixes=(), threads=1)

warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")

FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not SLOW,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- seeds

def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=g)
    return {
        "w": w,
        "w_t": w.t(),                                  # a view: shared storage, other strides
        "b": torch.arange(5, dtype=torch.int64),
        "h": torch.randn(3, generator=g).to(torch.bfloat16),
        "flag": torch.tensor([True, False]),
        "meta": {"step": 7, "name": "seed", "lr": [0.1, 0.01]},
    }


def _seed_zip(d: Path) -> Path:
    s = _state()
    s["u16"] = torch.tensor([1, 65535, 300], dtype=torch.int32).to(torch.uint16)  # untyped storage
    s["f8"] = torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn)
    p = d / "seed.pt"
    torch.save(s, p)
    return p


def _seed_legacy(d: Path) -> Path:
    p = d / "seed_legacy.pt"   # typed storages only: torch.load cannot read untyped legacy ones
    torch.save(_state(), p, _use_new_zipfile_serialization=False)
    return p


def _flat() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.arange(6, dtype=torch.int32),
            "c": torch.randn(2, generator=g).to(torch.float16),
            "d": torch.tensor([1, 2], dtype=torch.int32).to(torch.uint16)}


def _seed_safetensors(d: Path) -> Path:
    p = d / "seed.safetensors"
    st_save(_flat(), str(p), metadata={"format": "pt"})
    return p


def _seed_hf(d: Path) -> Path:
    root = d / "hf"
    root.mkdir()
    flat = _flat()
    (root / "config.json").write_text(json.dumps({"model_type": "toy"}))
    shards = {"model-00001-of-00002.safetensors": ["a", "b"], "model-00002-of-00002.safetensors": ["c", "d"]}
    for name, keys in shards.items():
        st_save({k: flat[k] for k in keys}, str(root / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 1}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


SEEDS = {"torch-zip": _seed_zip, "torch-legacy": _seed_legacy, "safetensors": _seed_safetensors,
         "hf-dir": _seed_hf}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fuzz-seeds")
    return {fmt: make(d) for fmt, make in SEEDS.items()}


# ----------------------------------------------------------------------------- mutations

_OP = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
    st.tuples(st.just("set"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 64)),
    st.tuples(st.just("duplicate"), st.floats(0, 1), st.integers(1, 256), st.floats(0, 1)),
)
MUTATIONS = st.lists(_OP, min_size=1, max_size=3)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    b = bytearray(data)
    for op in ops:
        at = min(int(op[1] * len(b)), max(len(b) - 1, 0))
        kind = op[0]
        if kind == "flip" and b:
            b[at] ^= 1 << op[2]
        elif kind == "set" and b:
            b[at] = op[2]
        elif kind == "truncate":
            del b[at:]
        elif kind == "insert":
            b[at:at] = op[2]
        elif kind == "delete":
            del b[at:at + op[2]]
        elif kind == "duplicate":
            chunk = bytes(b[at:at + op[2]])
            to = int(op[3] * len(b))
            b[to:to] = chunk
    return bytes(b)


# ----------------------------------------------------------------------------- references

class Refused(Exception):
    """The reference reader refused the file."""


def _reference(path: Path, fmt: str) -> Any:
    try:
        if fmt == "safetensors":
            return st_load(str(path))
        if fmt == "hf-dir":
            index = json.loads((path / "model.safetensors.index.json").read_bytes())
            merged: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                part = st_load(str(path / shard))
                if set(part) & set(merged):
                    raise Refused("a tensor in two shards")
                merged.update(part)
            return merged
        return torch.load(path, weights_only=True, map_location="cpu")
    except Refused:
        raise
    except Exception as e:   # noqa: BLE001 - any refusal of the reference counts as a refusal
        raise Refused(f"{type(e).__name__}: {e}") from None


def _bytes_of(t: torch.Tensor) -> bytes:
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).numpy().tobytes()


def assert_same(got: Any, want: Any, where: str = "<top>") -> None:
    """Same structure; tensors with the same dtype, shape, stride, offset and bytes."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got).__name__} is not a tensor"
        assert (got.dtype, tuple(got.shape), got.stride(), got.storage_offset()) == \
            (want.dtype, tuple(want.shape), want.stride(), want.storage_offset()), where
        if want.numel():
            # the bytes the view covers (the storages may differ only outside the view)
            lo = want.storage_offset() * want.element_size()
            hi = (want.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(want.shape, want.stride()))) \
                * want.element_size()
            assert _bytes_of(got)[lo:hi] == _bytes_of(want)[lo:hi], f"{where}: values differ"
        return
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), f"{where}: keys differ"
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
        return
    if isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), f"{where}: {type(got)} != {type(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}.{i}")
        return
    assert type(got) is type(want) and (got == want or (got != got and want != want)), \
        f"{where}: {got!r:.80} != {want!r:.80}"


# ----------------------------------------------------------------------------- the property

def _check_one(path: Path, fmt: str) -> None:
    # 1. the parsers alone: only CheckpointError may come out
    opened: list = []
    try:
        checkpoint._open_and_parse(str(path), OPTS, True, checkpoint._Guess(), opened)
    except CheckpointError:
        pass
    finally:
        for f in opened:
            f.close()
    # 2. inspect never raises
    insp = checkpoint.inspect(path)
    assert isinstance(insp, checkpoint.Inspection)
    # 3. read: a diagnosis, or the reference's exact tensors
    try:
        lm = checkpoint.read(path, OPTS)
    except CheckpointError as e:
        assert e.diagnosis.code and e.diagnosis.message
        return
    try:
        got = arena.build(lm.manifest, [s.fd for s in lm.segments])
        try:
            want = _reference(path, fmt)
        except Refused as e:
            raise AssertionError(f"devmapd served a file the reference refuses ({e})") from None
        assert_same(got, want)
        assert insp.diagnosis is None, insp.diagnosis
    finally:
        lm.close()


def _bounded(fn, *args: Any) -> None:
    """Run fn in a worker thread; fail if it is still running after EXAMPLE_TIMEOUT_S."""
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            fn(*args)
        except BaseException as e:   # noqa: BLE001 - handed to the test thread below
            box["error"] = e

    th = threading.Thread(target=run, name="fuzz-example", daemon=True)
    th.start()
    th.join(EXAMPLE_TIMEOUT_S)
    assert not th.is_alive(), f"an example ran past {EXAMPLE_TIMEOUT_S} s: {args}"
    if "error" in box:
        raise box["error"]


def _materialise(seed: Path, fmt: str, ops: list[tuple], which: int, work: Path) -> Path:
    if fmt != "hf-dir":
        p = work / seed.name
        p.write_bytes(mutate(seed.read_bytes(), ops))
        return p
    root = work / "hf"
    shutil.copytree(seed, root)
    targets = sorted(n.name for n in root.iterdir() if n.name != "config.json")
    target = root / targets[which % len(targets)]
    target.write_bytes(mutate(target.read_bytes(), ops))
    return root


@pytest.mark.parametrize("fmt", list(SEEDS))
def test_mutated_checkpoints_give_a_diagnosis_or_the_same_tensors(seeds, fmt):
    seed = seeds[fmt]
    _check_one(seed, fmt)   # the unmutated seed is served, and equals the reference
    ran = [0]

    @FUZZ_SETTINGS
    @given(ops=MUTATIONS, which=st.integers(0, 2))
    def prop(ops: list[tuple], which: int) -> None:
        with tempfile.TemporaryDirectory(prefix="devmapd-fuzz-") as work:
            path = _materialise(seed, fmt, ops, which, Path(work))
            _bounded(_check_one, path, fmt)
        ran[0] += 1

    prop()
    print(f"{fmt}: {ran[0]} mutated files checked")   # the figure docs/reliability.md quotes
    assert ran[0] >= min(EXAMPLES, 20), ran[0]
