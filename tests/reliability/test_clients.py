"""Clients: hostile, broken and very many clients against a REAL daemon process.

tests/wire/ covers these defences against the server module with a stand-in API; here the same
attacks go to ``devmapd serve`` itself (real registry, real memfds, real leases), and each test
asserts what the daemon must do: refuse with a reason, cut the offender off, give everything back
(leases, fds), and keep serving everyone else the whole, right version.
"""
from __future__ import annotations

import array
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from devmapd.client import Client, DevmapdError
from devmapd.wire import protocol as P
from tests.harness import ROOT, sim_gpu
from tests.reliability import inputs as I
from tests.reliability.conftest import ModelDirGuard, module_daemon

CAP = 8
IDLE_S = 1.5


# ----------------------------------------------------------------------------- daemon with tight limits

@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    # socket_group nogroup: uid nobody (gid 65534) can open the socket, so what refuses it below is
    # the daemon's own fetch_uids policy, not the socket file's mode.
    extra = (f'[server]\nfetch_uids = [0]\nsocket_group = "nogroup"\nmax_connections_per_uid = {CAP}\n'
             f"idle_timeout_s = {IDLE_S}\nmax_frame_bytes = 65536\n")
    yield from module_daemon(tmp_path_factory, "tight", extra_config=extra)


@pytest.fixture(scope="module")
def tight_model(tight):
    from tests.reliability.conftest import _GUARD

    _GUARD.save(I.versioned(1), tight.model_dir / "m.pt")
    tight.wait_model("m")
    return "m"


def fetch_version(handle, name: str) -> int:
    """Fetch on a connection of its own, check it is one whole version, release it."""
    with handle.client() as c:
        return I.version_of(c.fetch(name))


def hello_ok(handle) -> None:
    with handle.client() as c:
        assert c.hello()["pid"] == handle.proc.pid




def test_unauthorized_uid_is_refused_with_a_clear_reason(tight, tight_model) -> None:
    out = I.as_nobody(tight.socket)
    for op in ("hello", "status", "fetch", "load"):
        assert out[op]["ok"] is False and out[op]["class"] == "PermissionDenied", (op, out[op])
    msg = out["fetch"]["message"]
    assert "uid 65534" in msg and "server.fetch_uids" in msg, msg
    assert fetch_version(tight, "m") == 1   # root, on the list, is served meanwhile
    assert tight.model("m")["fetches"] >= 1


def test_connection_flood_from_one_uid_is_capped_per_uid(tight, tight_model) -> None:
    """uid 0 opens CAP connections and more: the extra ones are refused (busy, naming the limit and
    the config key), another uid is not starved by it, and closing them frees the slots."""
    socks: list[socket.socket] = []
    refusals = []
    try:
        for i in range(CAP + 4):
            s = I.raw_connect(tight.socket)
            socks.append(s)
            try:
                P.send_frame(s, P.request(i, "hello"))
            except (BrokenPipeError, ConnectionResetError):
                pass   # refused at accept: the "busy" reply is already waiting in our buffer
            reply, _ = P.recv_frame(s, max_fds=0)
            if not reply["ok"]:
                refusals.append(reply["error"])
        assert len(refusals) == 4, refusals
        for err in refusals:
            assert err["code"] == "busy" and f"limit {CAP}" in err["message"], err
            assert "uid 0" in err["message"] and "max_connections_per_uid" in err["message"], err
        # Another uid still gets through to the policy (forbidden: not on fetch_uids), NOT "busy".
        out = I.as_nobody(tight.socket)
        assert out["hello"]["code"] == "forbidden", out["hello"]
    finally:
        for s in socks:
            s.close()
    assert I.wait_until(lambda: _try_hello(tight), 10), "slots were not given back after the flood"


def _try_hello(handle) -> bool:
    try:
        hello_ok(handle)
        return True
    except DevmapdError:
        return False


def test_idle_and_trickling_clients_are_cut_off_but_holders_stay(tight, tight_model) -> None:
    """Idle: closed after idle_timeout_s (1.5 s here). Trickling: a frame sent a byte at a time is
    cut off by the frame deadline however slowly the bytes come. A client holding a lease is a
    live user: never cut off for being quiet. Everyone else is served throughout."""
    idle = I.raw_connect(tight.socket, timeout=30)
    idle_since = time.monotonic()
    trickle = I.raw_connect(tight.socket, timeout=30)
    holder = Client(tight.socket)
    try:
        held = holder.fetch("m")
        t0 = time.monotonic()
        results: dict[str, object] = {}

        def wait_eof(name: str, s: socket.socket) -> None:
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except OSError as e:
                data += repr(e).encode()
            results[name] = (time.monotonic() - (idle_since if name == "idle" else t0), data)

        def trickler() -> None:
            frame = P.encode_frame(P.request(1, "hello"))
            try:
                trickle.sendall(frame[:5])
                for b in frame[5:]:
                    time.sleep(0.4)          # well under idle_timeout_s: the frame deadline must act
                    trickle.sendall(bytes([b]))
            except OSError:
                pass

        threads = [threading.Thread(target=wait_eof, args=("idle", idle)),
                   threading.Thread(target=wait_eof, args=("trickle", trickle)),
                   threading.Thread(target=trickler, daemon=True)]
        for t in threads:
            t.start()
        while threads[0].is_alive() or threads[1].is_alive():
            hello_ok(tight)                  # others are served while the two are dealt with
            time.sleep(0.3)
            assert time.monotonic() - t0 < 40, results
        idle_after, idle_data = results["idle"]
        assert idle_after >= IDLE_S * 0.8 and idle_data == b"", results["idle"]
        trickle_after, trickle_data = results["trickle"]
        assert b"incomplete frame" in trickle_data, trickle_data
        # The holder was quiet far longer than idle_timeout_s and keeps its connection and lease.
        assert holder.hello()["pid"] == tight.proc.pid
        assert I.version_of(held) == 1 and tight.model("m")["clients"] >= 1
    finally:
        idle.close()
        trickle.close()
        holder.close()


@pytest.mark.parametrize("payload, code", [
    (struct.pack(">I", 0xFFFFFFF0), "too_large"),                       # 4 GiB announced
    (struct.pack(">I", 65537) + b"{" * 100, "too_large"),                # just over max_frame_bytes
    (struct.pack(">I", 9) + b"{not json", "bad_request"),
    (struct.pack(">I", 3) + b"\xff\xfe\x00", "bad_request"),
    (struct.pack(">I", 7) + b"[1,2,3]", "bad_request"),
    (struct.pack(">I", 0), "bad_request"),
])
def test_oversized_and_malformed_frames_get_an_error_and_a_hangup(tight, tight_model, payload, code) -> None:
    base = I.rss_kib(tight.proc.pid)
    with I.raw_connect(tight.socket) as s:
        s.sendall(payload)
        reply, _ = P.recv_frame(s, max_fds=0)
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
        assert reply["error"]["message"]
        s.settimeout(10)
        assert s.recv(1) == b"", "the daemon must hang up on a broken stream"
    assert I.rss_kib(tight.proc.pid) - base < 32 * 1024   # nothing buffered for the announced size
    assert fetch_version(tight, "m") == 1


def test_wrongly_typed_requests_are_refused_and_the_connection_kept(tight, tight_model) -> None:
    with I.raw_connect(tight.socket) as s:
        cases = [({"v": 1, "id": 1, "op": 5}, "bad_request"),
                 ({"v": 1, "id": 2, "op": "fetch", "args": {"name": ["m"]}}, "bad_request"),
                 ({"v": 1, "id": 3, "op": "fetch", "args": {"name": "m" * 5000}}, "not_found"),
                 ({"v": 2, "id": 4, "op": "hello"}, "version")]
        for req, code in cases:
            P.send_frame(s, req)
            reply, fds = P.recv_frame(s, max_fds=0)
            assert reply["ok"] is False and reply["error"]["code"] == code, (req, reply)
        P.send_frame(s, P.request(9, "hello"))
        assert P.recv_frame(s, max_fds=0)[0]["ok"]


def test_unexpected_fds_from_a_client_are_closed(tight, tight_model) -> None:
    """A client passing fds (a pipe's write end, a memfd): the daemon closes them (the pipe reads
    EOF), answers with an error, hangs up, and its own fd count returns to where it was."""
    hello_ok(tight)
    baseline = I.fd_count(tight.proc.pid)
    r_end, w_end = os.pipe()
    mfd = os.memfd_create("client-junk")
    try:
        with I.raw_connect(tight.socket) as s:
            s.sendmsg([P.encode_frame(P.request(1, "fetch", {"name": "m"}))],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w_end, mfd]).tobytes())])
            os.close(w_end)
            w_end = -1
            reply, fds = P.recv_frame(s, max_fds=4)
            assert not fds and reply["ok"] is False and "file descriptor" in reply["error"]["message"], reply
            s.settimeout(10)
            assert s.recv(1) == b""
        os.set_blocking(r_end, False)

        def pipe_eof() -> bool:
            try:
                return os.read(r_end, 1) == b""
            except BlockingIOError:
                return False
        assert I.wait_until(pipe_eof, 10), "the daemon kept the client's pipe open"
    finally:
        os.close(r_end)
        os.close(mfd)
        if w_end >= 0:
            os.close(w_end)
    assert I.wait_until(lambda: I.fd_count(tight.proc.pid) <= baseline, 10), (I.fd_count(tight.proc.pid), baseline)
    assert tight.model("m")["clients"] == 0


# ----------------------------------------------------------------------------- daemon for crowds

@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    yield from module_daemon(tmp_path_factory, "crowd", gpus=[sim_gpu(0, 1024), sim_gpu(1, 1024)],
                                extra_config="[server]\nmax_connections_per_uid = 1024\n")


_KILLED_CLIENT = r"""
import sys
from devmapd.client import Client
c = Client(sys.argv[1])
c.fetch(sys.argv[2])                             # torch imported, first lease taken
print("READY", flush=True)
while True:
    sd = c.fetch(sys.argv[2])
    sum(float(t.sum()) for t in sd.values())     # touch the pages
    c.release(sys.argv[2])
"""

_RAW_FETCH_NO_READ = r"""
import os, socket, struct, sys, json
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
body = json.dumps({"v": 1, "id": 1, "op": "fetch", "args": {"name": sys.argv[2]}}).encode()
s.sendall(struct.pack(">I", len(body)) + body)
print("SENT", flush=True)
import time; time.sleep(60)
"""


def test_sigkill_mid_fetch_gives_everything_back(crowd, guard: ModelDirGuard) -> None:
    guard.save(I.big_versioned(3, 16), crowd.model_dir / "k.pt")
    crowd.wait_model("k")
    hello_ok(crowd)
    baseline = I.fd_count(crowd.proc.pid)
    procs = [subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, crowd.socket, "k"], cwd=ROOT, env=I.client_env(),
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    procs += [subprocess.Popen([sys.executable, "-c", _RAW_FETCH_NO_READ, crowd.socket, "k"], cwd=ROOT,
                               env=I.client_env(), stdout=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() in ("READY", "SENT")
        time.sleep(0.5)                                   # the looping ones are mid-fetch by now
        assert crowd.model("k")["fetches"] >= 6
        rng = random.Random(6)
        for p in procs:
            time.sleep(rng.uniform(0, 0.2))
            os.kill(p.pid, signal.SIGKILL)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    assert I.wait_until(lambda: crowd.model("k")["clients"] == 0, 15), crowd.model("k")
    assert I.wait_until(lambda: I.fd_count(crowd.proc.pid) <= baseline, 15), (I.fd_count(crowd.proc.pid), baseline)
    assert fetch_version(crowd, "k") == 3


def test_200_clients_fetching_while_models_are_replaced_never_see_a_torn_model(crowd, guard) -> None:
    """200 clients (threads, one connection each) fetch two models in a loop while both files are
    replaced again and again by version k (every element of every tensor = k). Every fetch must be
    ONE whole version, and a client never sees a model go back to an older version."""
    names = ("v/a", "v/b")
    staging = crowd.model_dir.parent / "vstage"
    staging.mkdir(exist_ok=True)
    for n in names:
        guard.save(I.versioned(1, tensors=6, numel=1 << 14), crowd.model_dir / f"{n}.pt")
    for n in names:
        crowd.wait_model(n)
    stop = threading.Event()
    errors: list[str] = []
    fetched = [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        last = {n: 0 for n in names}
        try:
            with Client(crowd.socket, timeout=60) as c:
                while not stop.is_set():
                    for n in names:
                        k = I.version_of(c.fetch(n))
                        if k < last[n]:
                            errors.append(f"client {i}: {n} went back from v{last[n]} to v{k}")
                        last[n] = k
                        c.release(n)
                        with lock:
                            fetched[0] += 1
        except BaseException as e:      # a torn model raises AssertionError in version_of
            errors.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(200)]
    for t in threads:
        t.start()
    versions = 1
    try:
        for k in range(2, 9):
            for n in names:
                tmp = staging / f"{n.replace('/', '_')}.{k}"
                torch_save(I.versioned(k, tensors=6, numel=1 << 14), tmp)
                guard.replace(tmp, crowd.model_dir / f"{n}.pt")
            versions = k
            time.sleep(0.4)
            assert not errors, errors[:5]
        crowd.wait_for(lambda st: all(I.model_of(st, n)["generation"] and I.model_of(st, n)["state"] == "ready"
                                      and not I.model_of(st, n)["error"] for n in names), timeout=30)
        for n in names:
            assert I.wait_until(lambda n=n: fetch_version(crowd, n) == versions, 30), n
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:5]
    assert fetched[0] >= 400, fetched[0]
    print(f"200 clients: {fetched[0]} fetches, 0 torn, versions 1..{versions}")
    assert I.wait_until(lambda: all(crowd.model(n)["clients"] == 0 for n in names), 15)


def torch_save(obj, path: Path) -> None:
    import torch

    torch.save(obj, path)


def test_fd_count_flat_after_1000_client_crashes(crowd, guard: ModelDirGuard) -> None:
    """1,000 clients that die abruptly (RST via SO_LINGER 0): a third after half a frame, a third
    right after asking for a fetch (the memfd reply goes into a dead socket), a third after
    connecting. The daemon's fd count and leases come back to exactly where they were."""
    if crowd.model("k") is None:
        guard.save(I.big_versioned(3, 16), crowd.model_dir / "k.pt")
    crowd.wait_model("k")
    hello_ok(crowd)
    time.sleep(0.3)
    baseline = I.fd_count(crowd.proc.pid)
    linger = struct.pack("ii", 1, 0)
    fetch_frame = P.encode_frame(P.request(1, "fetch", {"name": "k"}))
    for i in range(1000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.connect(crowd.socket)
        if i % 3 == 0:
            s.send(fetch_frame[: len(fetch_frame) // 2])
        elif i % 3 == 1:
            s.send(fetch_frame)
        s.close()
    assert crowd.proc.poll() is None
    assert I.wait_until(lambda: I.fd_count(crowd.proc.pid) <= baseline, 30), (I.fd_count(crowd.proc.pid), baseline)
    assert I.wait_until(lambda: crowd.model("k")["clients"] == 0, 15), crowd.model("k")
    assert fetch_version(crowd, "k") == 3
