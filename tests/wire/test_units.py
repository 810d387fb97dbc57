"""Framing, access policy, socket discovery and server lifecycle, on real sockets."""
from __future__ import annotations

import array
import asyncio
import os
import socket
import stat
import struct
import subprocess
import sys

import pytest

from devmapd.client import Client, DaemonUnavailable, default_socket
from devmapd.wire import protocol as P
from devmapd.wire.peercred import AccessPolicy, identify, peer_groups
from devmapd.wire.server import Server, ServerError
from tests.wire.conftest import REPO

# ------------------------------------------------------------------------------ framing


def test_frame_round_trip_with_fds() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        big = {"x": "é" * 300_000, "n": [1, 2.5, None, True]}    # larger than a socket buffer
        import threading
        t = threading.Thread(target=P.send_frame, args=(a, big, [r, w]))
        t.start()
        msg, fds = P.recv_frame(b)
        t.join()
        assert msg == big and len(fds) == 2
        os.write(fds[1], b"ok")              # the received fds are live duplicates
        assert os.read(r, 2) == b"ok"
        P.close_fds(fds)
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)


def test_frame_is_compact_and_refuses_nan() -> None:
    assert P.encode_frame({"a": [1, 2]}) == struct.pack(">I", 11) + b'{"a":[1,2]}'
    with pytest.raises(ValueError):
        P.encode_frame({"x": float("nan")})


def test_recv_frame_limits_and_truncation() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        a.sendall(struct.pack(">I", 1 << 20))
        with pytest.raises(P.ProtocolError) as e:
            P.recv_frame(b, max_frame=1000)
        assert e.value.code == "too_large"
        # More fds than the reader has room for: MSG_CTRUNC is an error, and nothing leaks.
        r, w = os.pipe()
        a.sendmsg([P.encode_frame({"k": 1})],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w] * 8).tobytes())])
        os.close(w)
        with pytest.raises(P.ProtocolError) as e:
            P.recv_frame(b, max_fds=2)
        assert "MSG_CTRUNC" in str(e.value)
        os.set_blocking(r, False)
        assert os.read(r, 1) == b""           # every copy of the write end is closed
        os.close(r)
    finally:
        a.close()
        b.close()
    # (After a protocol error the stream is out of step: callers drop the connection.)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.sendall(b"\x00\x00")
    a.close()
    with pytest.raises(ConnectionResetError, match="middle of a frame"):
        P.recv_frame(b)
    b.close()


def test_decode_rejects_non_objects() -> None:
    for body in (b"[]", b"1", b"\xff", b"{"):
        with pytest.raises(P.ProtocolError):
            P.decode_body(body)


# ------------------------------------------------------------------------------ policy


def test_policy_rules() -> None:
    me = os.geteuid()
    open_ = AccessPolicy()
    assert open_.can_fetch(1234, 1234) and not open_.is_operator(1234, 1234)
    assert open_.is_operator(0, 0) and open_.is_operator(me, me)
    p = AccessPolicy(fetch_uids=(1001,), fetch_groups=("2000",), operator_uids=(1002,),
                     operator_groups=(3000,))
    assert p.can_fetch(1001, 5) and p.can_fetch(7, 7, (2000,)) and p.can_fetch(1002, 5)
    assert not p.can_fetch(7, 7, (9,))
    assert p.is_operator(7, 3000) and p.is_operator(7, 7, (1, 3000)) and not p.is_operator(1001, 5)
    peer = P.Peer(pid=1, uid=1001, gid=1001, groups=(), operator=False)
    why = p.refusal(peer, "remap", operator_op=True)
    assert why and "uid 1001" in why and "operators list" in why
    assert "server.operator_uids/operator_groups" in why
    assert p.refusal(peer, "fetch", operator_op=False) is None
    assert AccessPolicy(fetch_groups=("root",)).fetch_groups == (0,)
    with pytest.raises(ValueError, match="unknown group"):
        AccessPolicy(fetch_groups=("no-such-group-xyz",))


def test_identify_reads_kernel_credentials() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        peer = identify(a, AccessPolicy())
        assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
        assert set(peer_groups(a, os.getpid())) == set(os.getgroups())
        assert peer.operator is True
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------------------ discovery


def test_default_socket_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVMAPD_SOCKET", "/env/s.sock")
    assert default_socket("/explicit.sock") == "/explicit.sock"
    assert default_socket() == "/env/s.sock"
    monkeypatch.delenv("DEVMAPD_SOCKET")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_socket() == "/run/devmapd/devmapd.sock"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_socket() == "/run/user/1000/devmapd.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket() == "/tmp/devmapd-1000/devmapd.sock"


def test_import_devmapd_does_not_import_torch() -> None:
    code = ("import sys, devmapd; devmapd.Client; devmapd.DevmapdError; import devmapd.wire.server; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# ------------------------------------------------------------------------------ lifecycle


class TinyAPI:
    """Just enough DaemonAPI for lifecycle tests (no models)."""

    def status(self) -> dict:
        return {"daemon": {"backend": "none"}, "devices": [], "models": []}

    def model_detail(self, name: str) -> dict:
        raise KeyError(name)

    async def fetch(self, name: str, peer: P.Peer) -> P.FetchGrant:
        raise P.ApiError("not_found", f"no model named {name!r}")

    def release(self, lease: object) -> None:
        pass

    def subscribe(self):
        return asyncio.Queue(10), lambda: None

    async def action(self, op: str, args: dict, peer: P.Peer) -> dict:
        raise P.ApiError("unavailable", f"{op} is not available yet")


async def _hello(path: str) -> dict:
    return await asyncio.to_thread(lambda: Client(path, timeout=5).hello())


async def test_server_creates_dir_and_socket_with_modes(tmp_path) -> None:
    gid = os.getgroups()[0] if os.getgroups() else os.getgid()
    path = tmp_path / "run" / "sub" / "d.sock"
    async with Server(TinyAPI(), str(path), policy=AccessPolicy(), socket_group=gid):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
        dst = os.stat(path.parent)
        assert stat.S_IMODE(dst.st_mode) == 0o750 and dst.st_uid == os.geteuid() and dst.st_gid == gid
        h = await _hello(str(path))
        assert h["protocol"] == 1 and h["socket"] == str(path) and h["backend"] == "none"
    assert not path.exists()              # close() removed our socket file


async def test_server_refuses_a_live_daemon_and_clears_a_stale_socket(tmp_path) -> None:
    path = str(tmp_path / "d.sock")
    async with Server(TinyAPI(), path, policy=AccessPolicy()):
        with pytest.raises(ServerError, match="already serving"):
            await Server(TinyAPI(), path, policy=AccessPolicy()).start()
        assert (await _hello(path))["protocol"] == 1       # the first one is untouched
    # A socket file nobody listens on (a crashed daemon's) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    async with Server(TinyAPI(), path, policy=AccessPolicy(), socket_mode=0o600):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert (await _hello(path))["protocol"] == 1
    # A regular file at the path is never deleted.
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(ServerError, match="not a socket"):
        await Server(TinyAPI(), path, policy=AccessPolicy()).start()
    assert open(path).read() == "precious"


async def test_server_from_an_inherited_socket(tmp_path) -> None:
    path = str(tmp_path / "activated.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen()
    srv = Server.from_socket(TinyAPI(), lsock, policy=AccessPolicy())
    await srv.start()
    try:
        h = await _hello(path)
        assert h["socket"] == path
        with pytest.raises(Exception) as e:
            await asyncio.to_thread(lambda: Client(path, timeout=5).fetch("nope"))
        assert "no model named" in str(e.value)
        with pytest.raises(Exception, match="not available yet"):
            await asyncio.to_thread(lambda: Client(path, timeout=5).remap("m", "cpu"))
    finally:
        await srv.close()
    assert os.path.exists(path)           # systemd's socket file is left alone
    with pytest.raises(DaemonUnavailable):
        await asyncio.to_thread(lambda: Client(path, timeout=5).hello())
