"""Restart without reloading: the fd store round trip through a real datagram socket.

The test plays the first daemon (reads real torch checkpoints into sealed memfds with
devmapd.engine.checkpoint, stores them with fdstore.stash), FakeSystemd plays systemd (receives the
fds with recvmsg and keeps them), then a fresh process gets them back as LISTEN_FDS and
rebuilds the models without reading the files; changed and deleted files are dropped with
FDSTOREREMOVE.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from devmapd.daemon import names
from devmapd.engine import checkpoint
from devmapd.service import fdstore
from devmapd.service.systemd import Notifier

HERE = Path(__file__).resolve().parent


def _save(path: Path, seed: int, rows: int = 64) -> None:
    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "layer.weight": torch.randn(rows, 32, generator=g),
            "layer.bias": torch.randn(32, generator=g).to(torch.float16),
            "steps": torch.arange(7, dtype=torch.int64),
        },
        path,
    )


def _stash(notifier: Notifier, fake, model_dir: Path, name: str, generation: int) -> list[str]:
    source = names.source_for(model_dir, name)
    loaded = checkpoint.read(source)
    stored = fdstore.stash(
        notifier, name, generation, loaded.manifest.to_json(), [s.fd for s in loaded.segments],
        names.fingerprint(source), extra={"bytes": loaded.inspection.bytes},
    )
    # First a FDSTOREREMOVE per name (clears leftovers of an earlier run), then one FDSTORE each.
    removes = [fake.recv() for _ in stored]
    assert sorted(n.fields["FDNAME"] for n in removes if n.fields.get("FDSTOREREMOVE") == "1") == sorted(stored)
    for value in stored:
        note = fake.recv()
        assert note.fields["FDSTORE"] == "1" and note.fields["FDNAME"] == value
        assert note.pid == os.getpid() and len(note.fds) == 1
    # The first daemon goes away: from here on only systemd's duplicates keep the memory alive.
    for segment in loaded.segments:
        segment.close()
    return stored


def test_fd_store_round_trip_into_a_restarted_process(tmp_path, fake_systemd, listen_exec, child_env):
    model_dir = tmp_path / "models"
    _save(model_dir / "alpha.pt", seed=1)
    _save(model_dir / "team" / "beta.pt", seed=2)
    _save(model_dir / "gone.pt", seed=3)
    notifier = Notifier(fake_systemd.address)

    old_alpha = _stash(notifier, fake_systemd, model_dir, "alpha", generation=1)
    new_alpha = _stash(notifier, fake_systemd, model_dir, "alpha", generation=2)
    beta = _stash(notifier, fake_systemd, model_dir, "team/beta", generation=1)
    gone = _stash(notifier, fake_systemd, model_dir, "gone", generation=4)
    # A daemon killed mid-store: a data fd whose meta never arrived.
    orphan_fd = os.memfd_create("orphan", os.MFD_ALLOW_SEALING)
    orphan = fdstore.fdname("delta", 9, 0)
    notifier.fdstore([orphan_fd], orphan)
    fake_systemd.recv()
    os.close(orphan_fd)
    assert set(fake_systemd.store) == {*old_alpha, *new_alpha, *beta, *gone, orphan}

    # While the daemon is down: beta is rewritten, gone is deleted, alpha is untouched.
    _save(model_dir / "team" / "beta.pt", seed=22, rows=65)
    (model_dir / "gone.pt").unlink()

    # systemd restarts us with the socket unit's socket first, then the store.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "devmapd.sock"))
    listener.listen(1)
    named = [("devmapd-listen", listener.fileno())] + [
        (name, fd) for name, fds in fake_systemd.store.items() for fd in fds
    ]
    argv, pass_fds = listen_exec(named, [sys.executable, str(HERE / "restore_child.py"), str(model_dir)])
    env = dict(child_env, NOTIFY_SOCKET=fake_systemd.address)
    proc = subprocess.Popen(argv, pass_fds=pass_fds, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=120)
    listener.close()
    assert proc.returncode == 0, stderr
    report = json.loads(stdout)

    assert report["kept"] == ["alpha"]
    assert report["generations"] == {"alpha": 2}
    assert report["equal"] == {"alpha": True}  # same tensors as torch.load of the file
    assert report["extra"]["alpha"]["bytes"] > 0
    assert report["others"] == {"devmapd-listen": 1}  # the socket is left to the daemon
    assert sorted(report["stale"]) == sorted([*old_alpha, orphan])
    problems = " | ".join(report["problems"])
    assert "changed since it was stored" in problems and "team/beta" in problems
    assert "gone from the model directory" in problems
    assert "meta memfd is missing" in problems

    # The restarted process told "systemd" to drop exactly the stale entries, speaking as itself.
    removals = fake_systemd.drain(0.5)
    assert {n.fields["FDNAME"] for n in removals if n.fields.get("FDSTOREREMOVE") == "1"} == {
        *old_alpha, *beta, *gone, orphan
    }
    assert {n.pid for n in removals} == {proc.pid}  # exec kept the pid: LISTEN_PID was right
    assert set(fake_systemd.store) == set(new_alpha)


def test_recover_drops_corrupt_entries_and_closes_their_fds():
    meta = os.memfd_create("meta", os.MFD_ALLOW_SEALING)
    os.write(meta, b"{not json")
    import fcntl

    fcntl.fcntl(meta, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    unsealed = os.memfd_create("unsealed")
    other = os.memfd_create("other")
    bad_meta, bad_seal = fdstore.fdname("m1", 1, "m"), fdstore.fdname("m2", 1, "m")
    rec = fdstore.recover({bad_meta: [meta], bad_seal: [unsealed], "some-other-fd": [other]})
    assert rec.models == {}
    assert sorted(rec.stale) == sorted([bad_meta, bad_seal])
    assert rec.others == {"some-other-fd": [other]}
    for fd in (meta, unsealed):
        with pytest.raises(OSError):
            os.fstat(fd)  # closed by recover
    os.fstat(other)
    os.close(other)


def test_stash_refuses_unsealed_memory(fake_systemd):
    fd = os.memfd_create("writable", os.MFD_ALLOW_SEALING)
    try:
        with pytest.raises(ValueError, match="not a sealed memfd"):
            fdstore.stash(Notifier(fake_systemd.address), "m", 1, {"segments": [{"nbytes": 0}]}, [fd], ())
    finally:
        os.close(fd)
    assert fake_systemd.drain(0.05) == []


def test_stash_is_a_no_op_without_a_service_manager():
    assert fdstore.stash(Notifier(None), "m", 1, {"segments": []}, [], ()) == []


def test_fingerprints_compare_after_a_json_round_trip():
    fp = (("a.pt", 10, 123456789, 42),)
    assert fdstore.fingerprint_matches(json.loads(json.dumps(fp)), fp)
    assert not fdstore.fingerprint_matches(fp, (("a.pt", 11, 123456789, 42),))
    assert not fdstore.fingerprint_matches(None, fp)


@settings(max_examples=150, deadline=None)
@given(name=st.text(min_size=1, max_size=400), generation=st.integers(0, 10**12), part=st.integers(0, 9999))
def test_fdnames_are_valid_for_systemd_and_decode(name, generation, part):
    for p in ("m", part):
        value = fdstore.fdname(name, generation, p)
        assert len(value) <= 255 and ":" not in value
        assert all(32 <= ord(c) < 127 for c in value)
        key, gen, decoded_part = fdstore.decode_fdname(value)
        assert gen == generation and decoded_part == str(p)
        assert Notifier(None).fdstore_remove(value) is False  # accepted by the validator


def test_distinct_names_get_distinct_keys():
    names_ = ["a", "a/b", "a:b", "A", "llama/7b.tokenizer", "x" * 180, "x" * 181, "\u6a21\u578b/\u00e9"]
    keys = {fdstore.decode_fdname(fdstore.fdname(n, 1, "m"))[0] for n in names_}
    assert len(keys) == len(names_)
    assert fdstore.decode_fdname("devmapd-listen") is None
    assert fdstore.decode_fdname("dm1.nYQ.1.x") is None
