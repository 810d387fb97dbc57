"""The model-dir guard itself must be able to fail: a check that cannot fail proves nothing."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability.conftest import ModelDirGuard


def test_guard_sees_every_kind_of_write_it_did_not_make(tmp_path: Path) -> None:
    g = ModelDirGuard()
    root = g.track(tmp_path / "models")
    g.write(root / "a.pt", b"0123456789")
    g.mkfifo(root / "p.pt")
    g.verify()                                     # the guard's own changes are expected

    st = os.stat(root / "a.pt")
    with open(root / "a.pt", "r+b") as fh:         # same size, mtime put back: only content + ctime differ
        fh.write(b"X")
    os.utime(root / "a.pt", ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(AssertionError, match="a.pt"):
        g.verify()
    g.note(root / "a.pt")

    for change, name in [(lambda: (root / "new.pt").write_bytes(b""), "new.pt"),
                         (lambda: os.chmod(root / "a.pt", 0o600), "a.pt"),
                         (lambda: os.rename(root / "a.pt", root / "b.pt"), "a.pt"),
                         (lambda: os.unlink(root / "p.pt"), "p.pt")]:
        change()
        with pytest.raises(AssertionError, match=name):
            g.verify()
        g.note(root)
        for p in root.iterdir():
            g.note(p)
        g.expected[root] = {k: v for k, v in g.expected[root].items() if (root / k).exists() or k == "."}
        g.verify()


def test_guard_hashes_sparse_files_by_extent(tmp_path: Path) -> None:
    g = ModelDirGuard()
    root = g.track(tmp_path / "models")
    with open(root / "sparse.bin", "wb") as fh:
        fh.truncate(64 << 30)                      # 64 GiB of hole: hashed in no time
    g.note(root / "sparse.bin")
    st = os.stat(root / "sparse.bin")
    with open(root / "sparse.bin", "r+b") as fh:
        fh.seek(40 << 30)
        fh.write(b"!")
    os.utime(root / "sparse.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(AssertionError, match="sparse.bin"):
        g.verify()
