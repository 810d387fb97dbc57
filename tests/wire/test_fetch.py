"""Zero-copy fetch through a real server process, by clients in other processes."""
from __future__ import annotations

import os
import signal

from tests.wire.conftest import (
    BIG_MB,
    FETCH_GROUP,
    WireDaemon,
    fd_count,
    last_json,
    nobody_prefix,
    read_line,
    run_client,
    spawn_client,
    wait_for,
)


def test_fetched_tensors_equal_torch_load(wired: WireDaemon) -> None:
    r = run_client("equal", wired.socket, "small", str(wired.ckpts["small"]),
                   "many", str(wired.ckpts["many"]))
    assert r.returncode == 0, r.stderr
    assert last_json(r.stdout) == {"ok": True, "tensors": {"small": 10, "many": 4000}}
    # The client process is gone: its persistent connection and leases went with it.
    w = wired.settle()
    assert w["leases"] == 0 and w["double_releases"] == 0


def test_load_keeps_one_connection_per_process(wired: WireDaemon) -> None:
    wired.settle()
    r = run_client("persist", wired.socket, "small")
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    assert out == {"connections_added": 1, "clients_after_two_loads": 2, "child_rc": 0,
                   "clients_after_fork": 3, "clients_after_release": 0, "tensors_alive": True}, out
    assert wired.settle()["leases"] == 0


def test_client_write_reaches_no_one_else(wired: WireDaemon) -> None:
    path = str(wired.ckpts["small"])
    holder = spawn_client("hold", wired.socket, "small", path)
    try:
        assert read_line(holder) == "LOADED"
        r = run_client("write", wired.socket, "small", path)
        assert r.returncode == 0, r.stderr
        assert last_json(r.stdout)["ok"] is True
        # The holder, mapped before the write, still sees the file's values...
        out, err = holder.communicate("go\n", timeout=60)
        assert holder.returncode == 0, err
        assert last_json(out)["ok"] is True
    finally:
        if holder.poll() is None:
            holder.kill()


def test_received_memfd_refuses_writes(wired: WireDaemon) -> None:
    r = run_client("memfd", wired.socket, "small")
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    assert out["nfds"] == 1
    for what in ("write", "pwrite", "ftruncate", "mmap_shared_write", "reopen_write"):
        assert out[what] in ("EPERM", "EACCES"), (what, out)
    assert out["write"] == "EPERM" and out["mmap_shared_write"] == "EPERM"


def test_four_clients_share_one_copy(wired: WireDaemon) -> None:
    """Sum of PSS growth over 4 holders ~ one model size (torch.load would be 4x)."""
    size_kb = BIG_MB * 1024
    procs = [spawn_client("pss", wired.socket, "big") for _ in range(4)]
    try:
        for p in procs:
            assert '"ready"' in read_line(p, 90)
        before = {p.pid: _pss(p.pid) for p in procs}
        for p in procs:
            p.stdin.write("load\n")
            p.stdin.flush()
        sums = set()
        for p in procs:
            line = read_line(p, 90)
            assert '"loaded"' in line, line
            sums.add(line.split('"checksum": ')[1].rstrip("}"))
        assert len(sums) == 1            # all four read the same bytes
        after = {p.pid: _pss(p.pid) for p in procs}
        grown = sum(after[pid] - before[pid] for pid in before)
        # Each holder read all 64 MiB, yet together they account for about one copy.
        assert grown < 1.3 * size_kb, (grown, size_kb)
        assert grown > 0.7 * size_kb, (grown, size_kb)
        assert all(after[pid] - before[pid] < 0.6 * size_kb for pid in before), (before, after)
        # The memfd mappings themselves: each holder has all of it resident, a quarter charged.
        maps = {p.pid: _memfd_mapping_kb(p.pid) for p in procs}
        for rss, pss in maps.values():
            assert rss >= 0.95 * size_kb and pss < 0.3 * size_kb, maps
        assert abs(sum(pss for _, pss in maps.values()) - size_kb) < 0.05 * size_kb, maps
    finally:
        for p in procs:
            if p.poll() is None:
                p.stdin.write("exit\n")
                p.stdin.flush()
        for p in procs:
            try:
                p.wait(30)
            except Exception:
                p.kill()


def _pss(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise AssertionError("no Pss")


def _memfd_mapping_kb(pid: int) -> tuple[int, int]:
    """(Rss, Pss) summed over this process's mappings of devmapd memfds."""
    rss = pss = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                inside = "memfd:devmapd" in line
            elif inside and first == "Rss:":
                rss += int(line.split()[1])
            elif inside and first == "Pss:":
                pss += int(line.split()[1])
    return rss, pss


def test_fifty_concurrent_clients(wired: WireDaemon) -> None:
    path = str(wired.ckpts["small"])
    procs = [spawn_client("many", wired.socket, "small", path, "25") for _ in range(2)]
    try:
        for p in procs:
            out = read_line(p, 90)
            assert '"ok": true' in out, out
        w = wired.wire()
        assert w["connections"] >= 51, w      # 50 clients + our status connection, all at once
        assert w["leases"] >= 50, w
        for p in procs:
            p.communicate("done\n", timeout=30)
            assert p.returncode == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    w = wired.settle()
    assert w["leases"] == 0 and w["connections"] <= 1, w


def test_sigkilled_client_mid_fetch(wired: WireDaemon) -> None:
    """A client killed while its fetch is in flight: lease released, no fd leaked, others served."""
    wired.settle()
    baseline = fd_count(wired.pid)
    p = spawn_client("loadslow", wired.socket, "slow")      # the daemon takes 1.5 s for "slow"
    try:
        assert read_line(p) == "FETCHING"
        assert wait_for(lambda: wired.wire()["inflight"] >= 1, 20)   # its fetch is under way
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    # Another client is served while (and after) the dead one's fetch completes.
    from devmapd.client import Client
    with Client(wired.socket) as c:
        assert c.fetch("small")["w"].shape == (64, 32)
    w = wired.settle()
    assert w["leases"] == 0 and w["double_releases"] == 0, w
    assert wait_for(lambda: fd_count(wired.pid) <= baseline, 10), (fd_count(wired.pid), baseline)
    # Same with a raw client that sends fetch and never reads a byte of the reply.
    p = spawn_client("rawfetch", wired.socket, "small")
    try:
        assert read_line(p) == "SENT"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    w = wired.settle()
    assert w["leases"] == 0 and w["double_releases"] == 0, w
    assert wait_for(lambda: fd_count(wired.pid) <= baseline, 10), (fd_count(wired.pid), baseline)


def test_unprivileged_uid_is_refused_with_a_reason(wired: WireDaemon) -> None:
    r = run_client("access", wired.socket, prefix=nobody_prefix())
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    assert out["uid"] == 65534
    for op in ("hello", "status", "fetch", "remap"):
        assert out[op]["ok"] is False and out[op]["class"] == "PermissionDenied", (op, out[op])
    assert "uid 65534" in out["fetch"]["message"]
    assert "fetch list" in out["fetch"]["message"] and "server.fetch_uids" in out["fetch"]["message"]
    assert "operators list" in out["remap"]["message"]
    assert out["load"]["class"] == "PermissionDenied"


def test_group_member_fetches_but_cannot_operate(wired: WireDaemon) -> None:
    r = run_client("access", wired.socket, prefix=nobody_prefix((FETCH_GROUP,)))
    assert r.returncode == 0, r.stderr
    out = last_json(r.stdout)
    assert out["groups"] == [FETCH_GROUP]
    assert out["hello"]["ok"] and out["status"]["ok"] and out["fetch"]["ok"], out
    assert out["load"]["ok"], out
    for op in ("remap", "evict"):
        assert out[op]["ok"] is False and out[op]["code"] == "forbidden"
        assert "uid 65534" in out[op]["message"] and "operators list" in out[op]["message"]
        assert "server.operator_uids/operator_groups" in out[op]["message"]


def test_socket_mode_is_the_first_gate(wired: WireDaemon) -> None:
    mode = os.stat(wired.socket).st_mode & 0o777
    os.chmod(wired.socket, 0o660)
    try:
        r = run_client("access", wired.socket, prefix=nobody_prefix((FETCH_GROUP,)))
    finally:
        os.chmod(wired.socket, mode)
    out = last_json(r.stdout)
    assert out["hello"]["class"] == "PermissionDenied"
    assert "socket's group" in out["hello"]["message"]


def test_unreachable_and_unknown_fall_back_with_a_warning(wired: WireDaemon, tmp_path) -> None:
    path = str(wired.ckpts["small"])
    r = run_client("fallback", path, str(tmp_path / "nobody-here.sock"), "small",
                   wired.socket, "no-such-model")
    assert r.returncode == 0, r.stderr
    down, unknown = last_json(r.stdout)
    assert down["plain"] == "DaemonUnavailable" and "no socket at" in down["plain_message"]
    assert len(down["warnings"]) == 1 and "locally with torch.load" in down["warnings"][0]
    assert unknown["plain"] == "ModelNotFound" and "no-such-model" in unknown["plain_message"]
    assert len(unknown["warnings"]) == 1
