"""Files: every bad or changing thing that can land in a model directory, against a REAL daemon.

One daemon serves the whole module (a start costs ~5 s here). Each test asserts the correct
outcome - the precise diagnosis, the version served, what status reports - not just survival;
the autouse guard (conftest.py) checks after each test that the daemon wrote nothing in the dir.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from devmapd.client import DevmapdError
from tests.harness import sim_gpu
from tests.reliability import inputs as I
from tests.reliability.conftest import ModelDirGuard, module_daemon

MIB = 1 << 20


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    # gpu_dtype = bfloat16 puts GPU-placed floats on the casting (chunked pread) path: a big load
    # then lasts long enough for a file change to land in the middle of the copy. Values in these
    # tests are small integers, exact in bfloat16, so versions still compare exactly.
    yield from module_daemon(tmp_path_factory, "files", gpus=[sim_gpu(0, 1024), sim_gpu(1, 1024)],
                             extra_config='[normalize]\ngpu_dtype = "bfloat16"\n')


def fetch(d, name: str):
    with d.client() as c:
        return c.fetch(name)


def failed(d, name: str, timeout: float = 30.0) -> dict:
    m = d.wait_model(name, "failed", timeout=timeout)
    assert m["placement"] == {} and m["error"], m
    assert m["diagnosis"]["message"] and name in m["path"], m
    return m


def alive(d) -> None:
    assert d.proc.poll() is None, d.log()[-3000:]
    assert d.status()["daemon"]["pid"] == d.proc.pid


# ----------------------------------------------------------------------------- static bad files

def test_bad_files_each_fail_alone_with_the_right_diagnosis(d, guard: ModelDirGuard) -> None:
    """zero bytes, random bytes, a torch file cut short, safetensors headers larger than the file
    or over the cap, absurd declared sizes, a zip bomb: each one failed with its own diagnosis,
    refused before allocating (daemon peak RSS stays small), and a good model beside them loads."""
    staged = d.model_dir.parent / "staged.pt"
    torch.save(I.big_versioned(1, 4), staged)
    whole = staged.read_bytes()
    cases = {
        "bad/empty.pt": (b"", {"empty"}),
        "bad/random.pt": (os.urandom(1 << 16), {"not_a_checkpoint", "corrupt", "unsupported_format"}),
        "bad/cut.pt": (whole[: len(whole) // 3], {"truncated"}),
        "bad/hdr_past_eof.safetensors": (I.safetensors_bytes(
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, declared_len=1 << 20),
            {"truncated"}),
        "bad/hdr_over_cap.safetensors": (I.safetensors_bytes({}, declared_len=200 << 20), {"too_large"}),
        "bad/absurd_shape.safetensors": (I.safetensors_bytes(
            {"a": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}), {"truncated"}),
        "bad/absurd_storage.pt": (I.absurd_declared_zip(), {"corrupt"}),
        "bad/zipbomb.pt": (I.zip_bomb(128), {"corrupt"}),
    }
    base_rss = I.rss_kib(d.proc.pid)
    I.reset_peak_rss(d.proc.pid)
    for rel, (data, _codes) in cases.items():
        guard.write(d.model_dir / rel, data)
    guard.save(I.versioned(7), d.model_dir / "bad" / "good.pt")
    for rel, (_data, codes) in cases.items():
        name = rel.rsplit(".", 1)[0]
        m = failed(d, name)
        assert m["diagnosis"]["code"] in codes, (rel, m["diagnosis"])
    assert "over the limit" in d.model("bad/hdr_over_cap")["diagnosis"]["message"]
    assert "compressed" in d.model("bad/zipbomb")["diagnosis"]["message"]
    assert "4398046511104" in d.model("bad/absurd_storage")["diagnosis"]["message"]
    assert I.version_of(fetch(d, "bad/good")) == 7
    with pytest.raises(DevmapdError, match="zipbomb"):
        fetch(d, "bad/zipbomb")
    # Nothing was inflated or allocated for the claims (128 MiB bomb, 4 TiB storage, 4 TiB shape).
    peak = I.rss_kib(d.proc.pid, "VmHWM")
    assert peak - base_rss < 96 * 1024, f"daemon peak RSS grew by {(peak - base_rss) // 1024} MiB"
    alive(d)


def test_partially_written_file_is_never_loaded_half_written(d, guard: ModelDirGuard) -> None:
    """A writer that pauses longer than settle_s between chunks, file held open: nothing is
    announced until it closes; then the whole file loads, with exactly the written values."""
    staged = d.model_dir.parent / "slow.staged"
    torch.save(I.versioned(3, numel=1 << 16), staged)
    payload = staged.read_bytes()
    path = d.model_dir / "slow.pt"
    seen_states = set()
    with open(path, "wb") as fh:
        step = len(payload) // 4 + 1
        for i in range(0, len(payload), step):
            fh.write(payload[i:i + step])
            fh.flush()
            deadline = time.monotonic() + 0.5          # > settle_s (0.2 s): only the open fd holds it
            while time.monotonic() < deadline:
                m = d.model("slow")
                if m is not None:
                    seen_states.add(m["state"])
                time.sleep(0.1)
    guard.note(path)
    m = d.wait_model("slow")
    assert "failed" not in seen_states and "ready" not in seen_states, seen_states
    assert m["diagnosis"] is None
    assert I.version_of(fetch(d, "slow")) == 3


def test_malicious_pickles_run_no_code(d, guard: ModelDirGuard) -> None:
    marker = d.model_dir.parent / "PWNED"
    guard.write(d.model_dir / "evil" / "zip.pt", I.malicious_zip(marker))
    guard.write(d.model_dir / "evil" / "legacy.pt", I.malicious_legacy(marker))
    guard.write(d.model_dir / "evil" / "plain.pt", I.malicious_plain_pickle(marker))
    for name in ("evil/zip", "evil/legacy"):
        m = failed(d, name)
        assert m["diagnosis"]["code"] == "unsafe_pickle", m["diagnosis"]
        assert "posix.system" in m["diagnosis"]["message"], m["diagnosis"]   # names the global
    assert failed(d, "evil/plain")["diagnosis"]["code"] == "not_a_checkpoint"
    with pytest.raises(DevmapdError, match="posix.system"):
        fetch(d, "evil/zip")
    time.sleep(0.3)   # os.system would have run synchronously; give a stray shell time anyway
    assert not marker.exists(), "a pickle ran code inside the daemon"
    alive(d)


def test_symlink_escaping_the_model_dir_is_refused_and_reported(d, guard: ModelDirGuard) -> None:
    outside = d.model_dir.parent / "outside.pt"
    torch.save(I.versioned(9), outside)              # a perfectly good checkpoint: only its place is wrong
    guard.symlink(outside, d.model_dir / "escape.pt")
    guard.symlink("/etc/passwd", d.model_dir / "passwd.pt")
    guard.save(I.versioned(2), d.model_dir / "after_escape.pt")
    d.wait_model("after_escape")
    problems = d.wait_for(lambda st: "escape.pt" in st["daemon"]["problems"] and st["daemon"]["problems"],
                          timeout=10, what="the escaping symlink reported in status daemon.problems")
    assert "outside the model directory" in problems["escape.pt"], problems
    assert "passwd.pt" in problems
    names = {m["name"] for m in d.status()["models"]}
    assert "escape" not in names and "passwd" not in names
    with pytest.raises(DevmapdError):
        fetch(d, "escape")


@pytest.mark.parametrize("name", ["../etc/passwd", "../outside", "/etc/passwd", "a/../../outside", ".."])
def test_dotdot_in_a_requested_name_is_refused(d, name: str) -> None:
    outside = d.model_dir.parent / "outside.pt"
    if not outside.exists():
        torch.save(I.versioned(9), outside)
    with d.client() as c:
        with pytest.raises(DevmapdError) as err:
            c.fetch(name)
        assert err.value.code == "not_found", err.value
        assert repr(name) in str(err.value) or name in str(err.value), str(err.value)
        with pytest.raises(DevmapdError):
            c.model(name)
        with pytest.raises(DevmapdError):
            c.reload(name)
    assert all(not m["name"].startswith(("..", "/")) for m in d.status()["models"])


def test_fifo_and_device_file_do_not_block_the_daemon(d, guard: ModelDirGuard) -> None:
    """A FIFO named like a weight file (opening it would block forever) and /dev/zero's node
    (reading it never ends): refused and reported; models dropped afterwards still load."""
    guard.mkfifo(d.model_dir / "pipe.pt")
    has_dev = guard.mknod_char(d.model_dir / "zero.pt", 1, 5)
    guard.save(I.versioned(4), d.model_dir / "after_fifo.pt")
    d.wait_model("after_fifo")
    assert I.version_of(fetch(d, "after_fifo")) == 4
    problems = d.wait_for(lambda st: "pipe.pt" in st["daemon"]["problems"] and st["daemon"]["problems"],
                          timeout=10, what="the FIFO reported in status daemon.problems")
    assert "not a regular file" in problems["pipe.pt"], problems
    if has_dev:
        assert "zero.pt" in problems, problems
    names = {m["name"] for m in d.status()["models"]}
    assert "pipe" not in names and "zero" not in names


# ----------------------------------------------------------------------------- files changing under a load

def _start_big(d, guard: ModelDirGuard, name: str, k: int, mib: int = 96):
    staged = d.model_dir.parent / f"{name}.staged"
    torch.save(I.big_versioned(k, mib), staged)
    return staged


def test_truncated_in_place_during_a_load(d, guard: ModelDirGuard) -> None:
    """Truncating the file mid-copy: no SIGBUS (the daemon reads with pread/sendfile into its own
    sealed memfd, never from a mapping of the file); the model ends failed (truncated /
    changed_during_read) - never ready with a torn mix."""
    staged = _start_big(d, guard, "trunc", 5)
    path = d.model_dir / "trunc.pt"
    trig = I.OnLoading(d.socket, "trunc", lambda: guard.truncate(path, os.path.getsize(path) // 2))
    try:
        guard.replace(staged, path)
        assert trig.fired.wait(30), trig.error or d.log()[-3000:]
    finally:
        trig.close()

    def settled(st):
        m = I.model_of(st, "trunc")
        return m if m and m["state"] in ("failed", "ready") and m["error"] else None
    m = d.wait_for(settled, timeout=40, what="trunc to end failed (or previous version + error)")
    alive(d)
    print(f"trunc: truncated at progress {trig.progress_at_fire}; ended {m['state']} ({m['diagnosis']['code']})")
    if m["state"] == "failed":
        assert m["diagnosis"]["code"] in ("truncated", "changed_during_read"), m["diagnosis"]
    else:   # the copy beat the truncation: v5 served whole, the truncated file refused
        assert I.version_of(fetch(d, "trunc")) == 5


def test_served_copy_survives_its_file_being_truncated(d, guard: ModelDirGuard) -> None:
    """A served model is a sealed memfd, not a mapping of the file: truncate the file to 0 bytes in
    place, and a client still reads every byte of the previous version (no SIGBUS anywhere); the
    daemon keeps serving it and says why the new content was refused."""
    guard.save(I.versioned(6, numel=1 << 18), d.model_dir / "keep.pt")
    d.wait_model("keep")
    with d.client() as c:
        held = c.fetch("keep")
        guard.truncate(d.model_dir / "keep.pt", 0)
        assert I.version_of(held) == 6           # every byte touched after the truncation
        m = d.wait_for(lambda st: (m := I.model_of(st, "keep")) and m["error"] and m, timeout=20,
                       what="keep: the emptied file refused")
        assert m["state"] == "ready" and m["diagnosis"]["code"] == "empty", m
        assert I.version_of(c.fetch("keep")) == 6


def test_replaced_by_rename_during_a_load(d, guard: ModelDirGuard) -> None:
    """v1 (big) is being copied when v2 is renamed over it: every fetch meanwhile is one whole
    version, and the model ends serving v2."""
    staged = _start_big(d, guard, "swap", 1)
    v2 = d.model_dir.parent / "swap.v2"
    torch.save(I.versioned(2, numel=1 << 16), v2)
    path = d.model_dir / "swap.pt"
    trig = I.OnLoading(d.socket, "swap", lambda: guard.replace(v2, path))
    seen: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def fetcher() -> None:
        with d.client() as c:
            while not stop.is_set():
                try:
                    seen.append(I.version_of(c.fetch("swap")))
                    c.release("swap")
                except DevmapdError:
                    time.sleep(0.02)        # not registered / loading yet
                except BaseException as e:  # a torn version (AssertionError) included
                    errors.append(e)
                    return
    t = threading.Thread(target=fetcher)
    t.start()
    try:
        guard.replace(staged, path)
        assert trig.fired.wait(30), trig.error or d.log()[-3000:]
        d.wait_for(lambda st: (m := I.model_of(st, "swap")) and m["state"] == "ready" and not m["error"]
                   and I.version_of(fetch(d, "swap")) == 2, timeout=25, what="swap serving v2")
        # The read of v1 that was under way when v2 arrived must not land afterwards: v2 stays.
        time.sleep(2.0)
        m = d.model("swap")
        assert m["state"] == "ready" and not m["error"], m
        assert I.version_of(fetch(d, "swap")) == 2
    finally:
        trig.close()
        stop.set()
        t.join(10)
    assert not errors, errors
    assert set(seen) <= {1, 2}, seen
    alive(d)


def test_deleted_during_a_load(d, guard: ModelDirGuard) -> None:
    """Unlinked mid-copy: the model disappears, the half-built arena is freed (fd count back),
    and a fetch says not found."""
    before = I.fd_count(d.proc.pid)
    staged = _start_big(d, guard, "gone", 8)
    path = d.model_dir / "gone.pt"
    trig = I.OnLoading(d.socket, "gone", lambda: guard.unlink(path))
    try:
        guard.replace(staged, path)
        assert trig.fired.wait(30), trig.error or d.log()[-3000:]
    finally:
        trig.close()
    d.wait_for(lambda st: I.model_of(st, "gone") is None, timeout=30, what="gone removed from status")
    with pytest.raises(DevmapdError) as err:
        fetch(d, "gone")
    assert err.value.code == "not_found"
    assert I.wait_until(lambda: I.fd_count(d.proc.pid) <= before, 15), (I.fd_count(d.proc.pid), before)
    alive(d)


# ----------------------------------------------------------------------------- size bombs

def test_million_tensor_header_is_refused_without_materialising_it(d, guard: ModelDirGuard) -> None:
    """A valid safetensors header of 1,000,001 empty tensors (58 MB, under the 100 MiB header cap):
    refused by max_tensors (too_large, naming the count), and the daemon's peak RSS stays small -
    a refusal must not first build a million Python dicts."""
    staged = d.model_dir.parent / "million.staged"
    I.million_tensor_header(staged)
    base = I.rss_kib(d.proc.pid)
    I.reset_peak_rss(d.proc.pid)
    guard.replace(staged, d.model_dir / "million.safetensors")
    m = failed(d, "million", timeout=90)
    assert m["diagnosis"]["code"] == "too_large" and "1000001" in m["diagnosis"]["message"], m["diagnosis"]
    peak = I.rss_kib(d.proc.pid, "VmHWM")
    alive(d)
    assert peak - base < 128 * 1024, f"refusing a million-tensor header took {(peak - base) // 1024} MiB of RSS"


def test_absurd_size_on_a_sparse_file_is_refused_before_allocating(d, guard: ModelDirGuard) -> None:
    """A consistent header declaring twice the machine's RAM, backed by a sparse file: the daemon
    never tries to allocate it; a fetch gets a clear reason; RSS stays small."""
    with open("/proc/meminfo") as fh:
        total = int(next(line for line in fh if line.startswith("MemTotal:")).split()[1]) * 1024
    staged = d.model_dir.parent / "huge.staged"
    I.sparse_safetensors(staged, 2 * total)
    base = I.rss_kib(d.proc.pid)
    I.reset_peak_rss(d.proc.pid)
    guard.replace(staged, d.model_dir / "huge.safetensors")
    m = d.wait_for(lambda st: (m := I.model_of(st, "huge")) and m["state"] in ("queued", "failed")
                   and (m["reason"] or m["error"]) and m, timeout=30, what="huge refused or deferred")
    assert m["placement"] == {}
    with pytest.raises(DevmapdError) as err:
        with d.client() as c:
            c.fetch("huge")
    msg = str(err.value)
    assert "huge" in msg and ("memory" in msg or "cap" in msg), msg
    peak = I.rss_kib(d.proc.pid, "VmHWM")
    assert peak - base < 96 * 1024, f"daemon peak RSS grew by {(peak - base) // 1024} MiB"
    alive(d)


# ----------------------------------------------------------------------------- volume and lost events

def test_event_overflow_is_recovered_by_the_rescan(d, guard: ModelDirGuard) -> None:
    """Forced inotify overflow, then files whose events are lost: only the periodic rescan finds them.

    How the events are lost, honestly: the daemon is SIGSTOPped, so its inotify queue cannot drain;
    touching two hidden sub-directories alternately (IN_ATTRIB|IN_ISDIR; the kernel merges only
    identical consecutive events) queues more than fs.inotify.max_queued_events, the kernel appends
    IN_Q_OVERFLOW and drops everything after it - including the creation of the model files below.
    Directory attribute events arrive in watchdog as DirModifiedEvent, which the watcher filters
    out, so after SIGCONT no event makes it look at the directory: only its periodic full rescan
    (rescan_interval_s = 2 s here) can find the new models. They must all load, with their values.
    """
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"max_queued_events is {limit}: too many events to overflow cheaply")
    noise = [d.model_dir / ".noise-a", d.model_dir / ".noise-b"]
    for p in noise:
        p.mkdir()
        guard.note(p)
    time.sleep(0.5)                              # let those two creations be processed first
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        for i in range(limit + 2000):
            os.utime(noise[i & 1])
        for i in range(3):
            guard.save(I.versioned(20 + i), d.model_dir / "lost" / f"m{i}.pt")
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
        for p in noise:
            guard.note(p)
    for i in range(3):
        d.wait_model(f"lost/m{i}", timeout=30)
        assert I.version_of(fetch(d, f"lost/m{i}")) == 20 + i
    assert "Inotify queue overflowed" in d.log(), "the overflow did not happen: this test proved nothing"
    alive(d)


def test_burst_of_500_files_none_lost(d, guard: ModelDirGuard) -> None:
    staging = d.model_dir.parent / "burst"
    staging.mkdir()
    for i in range(500):
        torch.save({"w": torch.full((8,), float(i))}, staging / f"m{i:03d}.pt")
    (staging / "m499.pt").write_bytes(b"not a checkpoint at all")
    (d.model_dir / "burst").mkdir()
    guard.note(d.model_dir / "burst")
    for path in sorted(staging.iterdir()):
        guard.replace(path, d.model_dir / "burst" / path.name)

    def all_settled(st):
        ours = [m for m in st["models"] if m["name"].startswith("burst/")]
        return len(ours) == 500 and all(m["state"] in ("ready", "failed") for m in ours) and ours
    ours = d.wait_for(all_settled, timeout=150, what="500 burst models ready or failed")
    states = {m["name"]: m["state"] for m in ours}
    assert [n for n, s in states.items() if s == "failed"] == ["burst/m499"]
    with d.client() as c:
        for i in (0, 123, 498):
            assert torch.equal(c.fetch(f"burst/m{i:03d}")["w"].float(), torch.full((8,), float(i)))
    alive(d)
