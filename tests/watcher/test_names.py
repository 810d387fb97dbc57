"""names.py on real directories: naming, HF dirs, conflicts, refusals (never blocking), source_for."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devmapd.daemon import names

pytestmark = pytest.mark.timeout(30)


def ckpt(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.arange(8, dtype=torch.float32) + seed}, path)
    return path


def hf_dir(d: Path, shards: int = 0) -> Path:
    """A Hugging Face layout: config.json + one model.safetensors, or an index + N shards."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text('{"model_type": "toy"}')
    if not shards:
        save_file({"w": torch.zeros(4)}, str(d / "model.safetensors"))
        return d
    files = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    (d / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {' + ", ".join(f'"t{i}": "{f}"' for i, f in enumerate(files)) + "}}")
    for i, f in enumerate(files):
        save_file({f"t{i}": torch.full((4,), float(i))}, str(d / f))
    return d


def run_with_timeout(fn, seconds: float = 5.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it blocks, e.g. on a FIFO."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # pragma: no cover - surfaced below
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} blocked for more than {seconds}s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_names_are_relative_posix_paths_without_extension(tmp_path: Path):
    for rel in ["a.pt", "b.pth", "c.bin", "d.ckpt", "e.safetensors", "group/f.pt", "group/deep/g.v2.pt",
                "UPPER.PT"]:
        ckpt(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not a model")
    found = names.scan(tmp_path)
    assert sorted(found) == ["UPPER", "a", "b", "c", "d", "e", "group/deep/g.v2", "group/f"]
    src = found["group/f"]
    assert src.kind == "file" and src.path == tmp_path / "group/f.pt" and src.files == (src.path,)


def test_temporary_and_hidden_names_are_ignored(tmp_path: Path):
    for rel in ["a.pt.tmp", "b.part", "c.safetensors.incomplete", ".d.pt", "e.pt~", "#f.pt#",
                ".cache/g.pt", "h.incomplete/i.pt", "real.pt"]:
        ckpt(tmp_path / rel)
    scan = names.scan_all(tmp_path)
    assert list(scan.models) == ["real"] and scan.problems == {}
    for n in ["x.tmp", "x.part", "x.incomplete", ".x", "x~", "#x#", "dir/.x"]:
        assert names.is_temporary(n), n
    for n in ["x.pt", "x", "a#b.pt", "tmp.pt"]:
        assert not names.is_temporary(n), n


def test_hf_dir_is_one_model_and_its_files_and_subdirs_are_not(tmp_path: Path):
    hf_dir(tmp_path / "org/llama", shards=3)
    ckpt(tmp_path / "org/llama/extra/nested.pt")          # nested under an HF dir: part of it
    hf_dir(tmp_path / "org/small")                        # non-sharded HF layout
    ckpt(tmp_path / "org/plain.pt")
    found = names.scan(tmp_path)
    assert sorted(found) == ["org/llama", "org/plain", "org/small"]
    llama = found["org/llama"]
    assert llama.kind == "hf-dir" and llama.path == tmp_path / "org/llama"
    assert [p.name for p in llama.files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    # config.json without weights beside it (diffusers' top-level model_index.json) is not a model
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe/model_index.json").write_text("{}")
    hf_dir(tmp_path / "pipe/unet")
    assert "pipe" not in names.scan(tmp_path) and "pipe/unet" in names.scan(tmp_path)


def test_hf_dir_with_missing_shards_is_pending(tmp_path: Path):
    d = hf_dir(tmp_path / "m", shards=3)
    (d / "model-00002-of-00003.safetensors").unlink()
    scan = names.scan_all(tmp_path)
    assert "m" in scan.models and "model-00002-of-00003.safetensors" in scan.pending["m"]
    (d / "x.part").write_bytes(b"...")
    hf_dir(tmp_path / "m", shards=3)
    assert "temporary files" in names.scan_all(tmp_path).pending["m"]
    (d / "x.part").unlink()
    assert names.scan_all(tmp_path).pending == {}



def test_an_unusable_index_is_not_pending_for_ever_and_the_load_says_why(tmp_path: Path):
    """An index cut short (a copy in progress) keeps the directory pending; one over the side-file
    cap never becomes readable, so the directory is not held back: the load refuses it as
    too_large, naming the index, without reading it (a sparse 65 MiB file: nothing to read)."""
    from devmapd.engine import checkpoint

    d = hf_dir(tmp_path / "m", shards=1)
    index = d / "model.safetensors.index.json"
    whole = index.read_bytes()
    index.write_bytes(whole[: len(whole) // 2])
    assert "not readable JSON yet" in names.scan_all(tmp_path).pending["m"]
    with open(index, "r+b") as fh:
        fh.truncate(names._MAX_INDEX_BYTES + 1)
    scan = run_with_timeout(lambda: names.scan_all(tmp_path))
    assert "m" in scan.models and "m" not in scan.pending
    insp = run_with_timeout(lambda: checkpoint.inspect(scan.models["m"], root=str(tmp_path)))
    assert insp.diagnosis is not None and insp.diagnosis.code == "too_large", insp.diagnosis
    assert "model.safetensors.index.json" in insp.diagnosis.message
    assert "safety.max_side_file_mib" in insp.diagnosis.message

def test_name_conflicts_are_deterministic_and_reported(tmp_path: Path):
    ckpt(tmp_path / "a.pt")
    ckpt(tmp_path / "a.pth")
    ckpt(tmp_path / "a.safetensors")
    ckpt(tmp_path / "b.bin")
    ckpt(tmp_path / "b.pth")
    ckpt(tmp_path / "x.pt")
    hf_dir(tmp_path / "x")                    # the HF dir would also be named "x"
    scan = names.scan_all(tmp_path)
    assert scan.models["a"].path.name == "a.safetensors"
    assert scan.models["b"].path.name == "b.pth"
    assert scan.models["x"].kind == "file"
    assert set(scan.problems) == {"a.pt", "a.pth", "b.bin", "x"}
    assert "a.safetensors is used" in scan.problems["a.pt"]
    for _ in range(3):   # same answer every time
        assert names.scan_all(tmp_path) == scan
    assert names.source_for(tmp_path, "a").path.name == "a.safetensors"


def test_fifo_device_and_escaping_symlinks_are_refused_without_blocking(tmp_path: Path):
    root = tmp_path / "models"
    root.mkdir()
    ckpt(root / "good.pt")
    os.mkfifo(root / "pipe.pt")
    secret = ckpt(tmp_path / "outside" / "secret.pt")
    os.symlink(secret, root / "escape.pt")
    os.symlink(tmp_path / "outside", root / "outdir")
    os.symlink(root / "nowhere.pt", root / "dangling.pt")
    os.symlink("good.pt", root / "alias.pt")              # a link that stays inside is fine
    os.symlink("/dev/zero", root / "zero.pt")             # a device, and outside
    d = root / "hf"
    d.mkdir()
    (d / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(d / "model-00001-of-00001.safetensors"))
    os.mkfifo(d / "model.safetensors.index.json")          # an index that is a FIFO: never opened
    scan = run_with_timeout(lambda: names.scan_all(root))
    assert sorted(scan.models) == ["alias", "good", "hf"]
    assert "FIFO" in scan.problems["pipe.pt"]
    assert "outside the model directory" in scan.problems["escape.pt"]
    assert "outside the model directory" in scan.problems["outdir"]
    assert "outside" in scan.problems["zero.pt"]
    assert "dangling" in scan.problems["dangling.pt"]
    assert "FIFO" in scan.problems["hf/model.safetensors.index.json"]
    assert run_with_timeout(lambda: names.scan_problems(root)) == scan.problems
    for bad in ["escape", "pipe", "outdir/secret"]:
        with pytest.raises(names.NameError_):
            run_with_timeout(lambda: names.source_for(root, bad))
    assert names.source_for(root, "alias").path == root / "alias.pt"
    # the scan's own fingerprints (file models) are exactly fingerprint(source), links followed
    assert set(scan.fingerprints) == {"alias", "good"}
    for name, fp in scan.fingerprints.items():
        assert fp == names.fingerprint(scan.models[name])
    assert scan.fingerprints["alias"][0][1:] == scan.fingerprints["good"][0][1:]


def test_source_for_rejects_malformed_and_escaping_names(tmp_path: Path):
    root = tmp_path / "models"
    ckpt(root / "sub/a.pt")
    ckpt(tmp_path / "evil.pt")
    hf_dir(root / "hf", shards=2)
    for bad in ["../evil", "sub/../../evil", "/etc/passwd", str(tmp_path / "evil"), "a\x00b", "", ".",
                "sub//a", "sub/./a", "..", "sub/.."]:
        with pytest.raises(names.NameError_):
            names.source_for(root, bad)
    for unknown in ["nope", "sub", "sub/b", "hf/model-00001-of-00002", ".hidden", "sub/a.pt"]:
        with pytest.raises(names.UnknownModel):
            names.source_for(root, unknown)
    # a symlinked directory whose target is outside: the name goes through it -> escape
    os.symlink(tmp_path, root / "up")
    with pytest.raises(names.NameError_, match="leaves the model directory"):
        names.source_for(root, "up/evil")
    # every scanned model resolves to exactly what scan said
    for name, src in names.scan(root).items():
        assert names.source_for(root, name) == src


def test_fingerprint_is_stat_only_and_changes_with_content(tmp_path: Path):
    p = ckpt(tmp_path / "a.pt")
    src = names.source_for(tmp_path, "a")
    fp1 = names.fingerprint(src)
    st = p.stat()
    assert fp1 == (("a.pt", st.st_size, st.st_mtime_ns, st.st_ino),)
    time.sleep(0.01)
    ckpt(p, seed=1)
    torch.save({"w": torch.zeros(100)}, p)
    assert names.fingerprint(src) != fp1
    d = hf_dir(tmp_path / "hf", shards=2)
    hf = names.source_for(tmp_path, "hf")
    fp = names.fingerprint(hf)
    assert [e[0] for e in fp] == ["config.json", "model-00001-of-00002.safetensors",
                                  "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    (d / "config.json").write_text('{"model_type": "toy", "changed": true}')
    assert names.fingerprint(hf) != fp
