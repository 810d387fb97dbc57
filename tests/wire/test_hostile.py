"""Misbehaving clients against the real server process: each is cut off, nobody else notices."""
from __future__ import annotations

import array
import os
import socket
import struct
import threading
import time

import pytest

from devmapd.wire import protocol as P
from tests.wire.conftest import WireDaemon, fd_count, wait_for


def frame(obj: object) -> bytes:
    return P.encode_frame(obj)


def read_reply(s: socket.socket) -> dict:
    msg, fds = P.recv_frame(s, max_fds=P.MAX_FDS_PER_FRAME)
    P.close_fds(fds)
    return msg


def assert_eof(s: socket.socket, within: float) -> float:
    """Drain until the server hangs up; returns how long that took."""
    start = time.monotonic()
    s.settimeout(within)
    while True:
        if not s.recv(65536):
            return time.monotonic() - start


def still_serves(wired: WireDaemon) -> None:
    with wired.raw() as s:
        s.sendall(frame(P.request(7, "hello")))
        r = read_reply(s)
        assert r["id"] == 7 and r["ok"] is True and r["result"]["protocol"] == 1


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe\x00", b"[1, 2, 3]", b'"just a string"'])
def test_malformed_frame_gets_an_error_and_a_hangup(wired: WireDaemon, body: bytes) -> None:
    with wired.raw() as s:
        s.sendall(struct.pack(">I", len(body)) + body)
        r = read_reply(s)
        assert r["id"] is None and r["ok"] is False and r["error"]["code"] == "bad_request"
        assert_eof(s, 5)
    still_serves(wired)


def test_oversized_length_prefix_is_refused_before_the_body(wired: WireDaemon) -> None:
    with wired.raw() as s:
        start = time.monotonic()
        s.sendall(struct.pack(">I", 0xFFFFFFF0))     # 4 GiB announced, nothing follows
        r = read_reply(s)
        assert r["error"]["code"] == "too_large" and "exceeds the limit" in r["error"]["message"]
        assert time.monotonic() - start < 3          # it did not wait for (or allocate) a body
        assert_eof(s, 5)
    still_serves(wired)


def test_trickling_partial_frame_is_cut_off(wired: WireDaemon) -> None:
    """A frame must complete within frame_timeout_s (1 s here) however slowly bytes arrive."""
    data = frame(P.request(1, "hello"))
    with wired.raw() as s:
        start = time.monotonic()
        s.sendall(data[:3])
        hung_up = False
        for b in data[3:]:
            time.sleep(0.25)
            try:
                s.sendall(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                hung_up = True
                break
            # A reply would mean the frame completed: it must not.
        took = time.monotonic() - start
        if not hung_up:
            s.settimeout(5)
            r = read_reply(s)
            assert r["id"] is None and "incomplete frame" in r["error"]["message"], r
        assert took < 5, took
    still_serves(wired)


def test_fds_sent_by_a_client_are_closed(wired: WireDaemon) -> None:
    wired.settle()
    baseline = fd_count(wired.pid)
    r_end, w_end = os.pipe()
    try:
        with wired.raw() as s:
            s.sendmsg([frame(P.request(1, "hello"))],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w_end, w_end]).tobytes())])
            os.close(w_end)
            w_end = -1
            r = read_reply(s)
            assert r["ok"] is False and "must not send file descriptors" in r["error"]["message"]
            assert_eof(s, 5)
        # The pipe reads EOF only once every copy of its write end is closed: the server's too.
        os.set_blocking(r_end, False)
        assert wait_for(lambda: _pipe_eof(r_end), 5)
    finally:
        os.close(r_end)
        if w_end >= 0:
            os.close(w_end)
    wired.settle()
    assert wait_for(lambda: fd_count(wired.pid) <= baseline, 5)
    still_serves(wired)


def _pipe_eof(fd: int) -> bool:
    try:
        return os.read(fd, 1) == b""
    except BlockingIOError:
        return False


def test_too_many_fds_truncated_is_an_error(wired: WireDaemon) -> None:
    """More fds than the server's ancillary buffer (MSG_CTRUNC): error, hang-up, nothing leaks."""
    wired.settle()
    baseline = fd_count(wired.pid)
    r_end, w_end = os.pipe()
    try:
        with wired.raw() as s:
            s.sendmsg([frame(P.request(1, "hello"))],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w_end] * 200).tobytes())])
            os.close(w_end)
            w_end = -1
            r = read_reply(s)
            assert r["ok"] is False and r["id"] is None
            assert_eof(s, 5)
        os.set_blocking(r_end, False)
        assert wait_for(lambda: _pipe_eof(r_end), 5)
    finally:
        os.close(r_end)
        if w_end >= 0:
            os.close(w_end)
    assert wait_for(lambda: fd_count(wired.pid) <= baseline, 5)


def test_bad_requests_get_codes_and_keep_the_connection(wired: WireDaemon) -> None:
    with wired.raw() as s:
        cases = [
            ({"v": 1, "id": 1, "op": "frobnicate"}, "bad_request"),
            ({"v": 99, "id": 2, "op": "hello"}, "version"),
            ({"v": 1, "id": 3, "op": "fetch", "args": []}, "bad_request"),
            ({"v": 1, "id": 4, "op": "fetch", "args": {}}, "bad_request"),
            ({"v": 1, "id": 5, "op": "fetch", "args": {"name": "nope"}}, "not_found"),
            ({"v": 1, "id": 6, "op": "model", "args": {"name": "nope"}}, "not_found"),
            ({"v": 1, "id": 7, "op": "release", "args": {}}, "bad_request"),
        ]
        # Pipelined: all requests in one write, replies come back in order.
        s.sendall(b"".join(frame(req) for req, _ in cases))
        for req, code in cases:
            r = read_reply(s)
            assert r["id"] == req["id"] and r["ok"] is False and r["error"]["code"] == code, (req, r)
            assert r["error"]["message"]
        s.sendall(frame(P.request(8, "model", {"name": "small"})))
        r = read_reply(s)
        assert r["ok"] and r["result"]["name"] == "small"


def test_release_gives_the_lease_back_on_a_live_connection(wired: WireDaemon) -> None:
    wired.settle()
    with wired.raw() as s:
        s.sendall(frame(P.request(1, "fetch", {"name": "small"})) + frame(P.request(2, "fetch", {"name": "small"})))
        a, b = read_reply(s), read_reply(s)
        assert a["ok"] and b["ok"] and a["result"]["lease"] != b["result"]["lease"]
        assert wired.wire()["leases"] == 2
        s.sendall(frame(P.request(3, "release", {"lease": a["result"]["lease"]})))
        assert read_reply(s)["result"] == {"released": 1}
        assert wired.wire()["leases"] == 1
        s.sendall(frame(P.request(4, "release", {"name": "small"})))
        assert read_reply(s)["result"] == {"released": 1}
        assert wired.wire()["leases"] == 0
    assert wired.settle()["double_releases"] == 0


def test_idle_connection_is_closed_but_a_holder_is_not(wired: WireDaemon) -> None:
    """idle_timeout_s is 2.5 s here; a connection holding a lease is a live user: kept."""
    idle = wired.raw()
    opened = time.monotonic()
    holder = wired.raw()
    try:
        holder.sendall(frame(P.request(1, "fetch", {"name": "small"})))
        assert read_reply(holder)["ok"]
        assert_eof(idle, 15)
        took = time.monotonic() - opened
        assert 2.0 < took < 10, took
        time.sleep(0.5)
        holder.sendall(frame(P.request(2, "hello")))
        assert read_reply(holder)["ok"]
    finally:
        idle.close()
        holder.close()
    assert wired.settle()["leases"] == 0


def test_per_uid_connection_cap(wired: WireDaemon) -> None:
    cap = wired.cfg["max_conns_per_uid"]
    wired.settle()
    socks = []
    try:
        refused = None
        for _ in range(cap + 2):
            s = wired.raw()
            socks.append(s)
            s.sendall(frame(P.request(1, "hello")))
            r = read_reply(s)
            if not r["ok"]:
                refused = r
                break
        assert refused is not None and refused["error"]["code"] == "busy", refused
        assert f"limit {cap}" in refused["error"]["message"] and "uid 0" in refused["error"]["message"]
        assert len(socks) == cap + 1
        # The client library reports the same refusal, reason included.
        from devmapd.client import Client, DevmapdError
        with pytest.raises(DevmapdError) as e:
            Client(wired.socket).hello()
        assert e.value.code == "busy" and f"limit {cap}" in str(e.value)
    finally:
        for s in socks:
            s.close()
    wired.settle()
    still_serves(wired)


def test_slow_subscriber_is_dropped(wired: WireDaemon) -> None:
    """A subscriber that never reads is disconnected; memory and other clients are unaffected."""
    slow = wired.raw()
    fast = wired.raw()
    try:
        for s in (slow, fast):
            s.sendall(frame(P.request(1, "subscribe")))
            assert read_reply(s)["result"] == {"subscribed": True}
        assert wired.wire()["subscribers"] == 2
        with wired.raw() as op:
            # ~1,500 events of 4 KiB: far beyond the socket buffer and the 500-event queue.
            op.sendall(frame(P.request(1, "reload", {"name": "small", "burst": 1500, "size": 4096})))
            assert read_reply(op)["ok"]
        # The fast one, reading, gets events in order (it may be dropped too once it lags).
        ev = read_reply(fast)
        assert ev["id"] == 1 and ev["event"]["type"] == "decision" and ev["event"]["message"] == "reload small #0"
        assert wait_for(lambda: wired.wire()["subscribers"] <= 1, 10), wired.wire()
        total = 0
        slow.settimeout(5)
        while True:
            chunk = slow.recv(1 << 16)
            if not chunk:
                break
            total += len(chunk)
        assert total < 1500 * 4096      # it never got the whole burst: it was cut off
    finally:
        slow.close()
        fast.close()
    assert wired.settle()["subscribers"] == 0
    still_serves(wired)


def test_events_stream_to_a_subscriber(wired: WireDaemon) -> None:
    from devmapd.client import Client
    got: list[dict] = []
    wired.settle()
    with Client(wired.socket) as c:
        it = c.events()
        t = threading.Thread(target=lambda: got.extend([next(it), next(it)]))
        t.start()
        assert wait_for(lambda: wired.wire()["subscribers"] >= 1, 10)
        with wired.raw() as op:
            op.sendall(frame(P.request(1, "pin", {"name": "small", "device": "cpu"})))
            assert read_reply(op)["result"]["by_uid"] == 0
            op.sendall(frame(P.request(2, "unpin", {"name": "small"})))
            assert read_reply(op)["ok"]
        t.join(10)
        assert [(e["type"], e["action"], e["name"]) for e in got] == [
            ("decision", "pin", "small"), ("decision", "unpin", "small")]
    it.close()
    assert wired.settle()["subscribers"] == 0
