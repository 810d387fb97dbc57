"""Client programs for the wire tests, each run as its own process:
``python -m tests.wire.clients COMMAND ARGS...``. Results go to stdout as one JSON line;
long-lived ones print progress lines and wait for a line on stdin between phases.
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
from typing import Any


def say(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def same(a: Any, b: Any, path: str = "") -> None:
    """Assert ``a`` (fetched) equals ``b`` (torch.load): types, structure, dtypes, shapes, values."""
    import torch
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        assert a.stride() == b.stride() and a.storage_offset() == b.storage_offset(), path
        assert a.device == b.device, path
        assert torch.equal(a, b), f"{path}: values differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)[:5]} != {list(b)[:5]}"
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}.{i}")
    elif isinstance(a, float) and math.isnan(b):
        assert math.isnan(a), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def pss_kb(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError("no Pss line")


def cmd_equal(sock: str, *pairs: str) -> None:
    """For each NAME PATH: fetched object == torch.load(file); tied weights stay tied; views
    stay views; a map_location naming the device the tensors are on moves nothing."""
    import torch

    import devmapd
    counts = {}
    for name, path in zip(pairs[::2], pairs[1::2]):
        got = devmapd.load(name, socket=sock)
        ref = torch.load(path, weights_only=True)
        same(got, ref)
        if "tied_a" in ref:
            assert got["tied_a"].untyped_storage().data_ptr() == got["tied_b"].untyped_storage().data_ptr()
            assert got["view"].untyped_storage().data_ptr() == got["base"].untyped_storage().data_ptr()
        again = devmapd.load(name, "cpu", socket=sock)
        same(again, ref)
        first = next(iter(ref))
        assert again[first].data_ptr() != ref[first].data_ptr()
        counts[name] = sum(isinstance(v, torch.Tensor) for v in got.values())
    say({"ok": True, "tensors": counts})


def cmd_write(sock: str, name: str, path: str) -> None:
    """Writing into fetched tensors changes only this process's copy."""
    import torch

    import devmapd
    got = devmapd.load(name, socket=sock)
    ref = torch.load(path, weights_only=True)
    first = next(iter(got))
    got[first].add_(1000.0)
    got[first].view(-1)[0] = 12345.0
    assert got[first].view(-1)[0].item() == 12345.0
    assert not torch.equal(got[first], ref[first])
    # A second fetch (new connection, same process) maps the memfd again: untouched.
    with devmapd.Client(sock) as c:
        fresh = c.fetch(name)
    same(fresh, ref)
    say({"ok": True, "key": first})


def cmd_hold(sock: str, name: str, path: str) -> None:
    """Load, print LOADED, wait for a line, then check our copy still equals the file."""
    import torch

    import devmapd
    got = devmapd.load(name, socket=sock)
    print("LOADED", flush=True)
    sys.stdin.readline()
    same(got, torch.load(path, weights_only=True))
    say({"ok": True})


def cmd_memfd(sock: str, name: str) -> None:
    """The received memfd refuses writes, writable shared maps and resizing (EPERM)."""
    import errno
    import mmap

    from devmapd.client import Client
    from devmapd.wire.protocol import MAX_FDS_PER_FRAME, close_fds
    out: dict[str, Any] = {}
    with Client(sock) as c:
        result, fds = c._call("fetch", {"name": name}, max_fds=MAX_FDS_PER_FRAME)
        try:
            fd = fds[0]
            out["nfds"] = len(fds)
            for what, fn in (("write", lambda: os.write(fd, b"x")),
                             ("pwrite", lambda: os.pwrite(fd, b"x", 0)),
                             ("ftruncate", lambda: os.ftruncate(fd, 0)),
                             ("mmap_shared_write", lambda: mmap.mmap(fd, 4096, mmap.MAP_SHARED,
                                                                    mmap.PROT_READ | mmap.PROT_WRITE))):
                try:
                    fn()
                    out[what] = "allowed"
                except OSError as e:
                    out[what] = errno.errorcode.get(e.errno, str(e.errno))
            # Reopening through /proc for writing must not get around the seals either.
            try:
                w = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
                try:
                    os.write(w, b"x")
                    out["reopen_write"] = "allowed"
                except OSError as e:
                    out["reopen_write"] = errno.errorcode.get(e.errno, str(e.errno))
                finally:
                    os.close(w)
            except OSError as e:
                out["reopen_write"] = errno.errorcode.get(e.errno, str(e.errno))
        finally:
            close_fds(fds)
    say(out)


def cmd_pss(sock: str, name: str) -> None:
    """Phase 1: print READY; phase 2 (stdin line): load + read every byte, print LOADED."""
    import torch  # noqa: F401  (imported before the baseline so it is not counted as the model)

    import devmapd
    import devmapd.engine.arena  # noqa: F401
    say({"phase": "ready", "pss_kb": pss_kb()})
    sys.stdin.readline()
    got = devmapd.load(name, socket=sock)
    total = 0.0
    for t in got.values():
        total += float(t.sum())   # reads every byte of the mapping, allocates nothing big
    say({"phase": "loaded", "pss_kb": pss_kb(), "checksum": total})
    sys.stdin.readline()


def cmd_many(sock: str, name: str, path: str, nthreads: str) -> None:
    """N threads, each with its own connection, fetch at once and verify; hold until stdin."""
    import torch

    from devmapd.client import Client
    ref = torch.load(path, weights_only=True)
    n = int(nthreads)
    barrier = threading.Barrier(n)
    clients = [Client(sock) for _ in range(n)]
    errors: list[str] = []

    def work(c: Client) -> None:
        try:
            c.hello()              # connect first, so all n connections exist together
            barrier.wait(30)
            same(c.fetch(name), ref)
        except Exception as e:     # reported, not swallowed
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    say({"ok": not errors, "errors": errors[:3], "n": n})
    sys.stdin.readline()
    for c in clients:
        c.close()


def cmd_access(sock: str) -> None:
    """What this uid may do: each op's outcome (ok or the error code and message)."""
    import devmapd
    from devmapd.client import Client, DevmapdError
    out: dict[str, Any] = {"uid": os.getuid(), "groups": os.getgroups()}
    with Client(sock) as c:
        for op, call in (("hello", lambda: c.hello()), ("status", lambda: c.status()),
                         ("fetch", lambda: c.fetch("small")),
                         ("remap", lambda: c.remap("small", "cpu")),
                         ("evict", lambda: c.evict("small"))):
            try:
                r = call()
                out[op] = {"ok": True, "n": len(r) if hasattr(r, "__len__") else None}
            except DevmapdError as e:
                out[op] = {"ok": False, "code": e.code, "class": type(e).__name__, "message": str(e)}
    try:
        devmapd.load("small", socket=sock)
        out["load"] = {"ok": True}
    except DevmapdError as e:
        out["load"] = {"ok": False, "class": type(e).__name__, "message": str(e)}
    say(out)


def cmd_rawfetch(sock: str, name: str) -> None:
    """Send a fetch, never read the reply, announce it and wait to be killed."""
    import socket
    import time

    from devmapd.wire import protocol as P
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    P.send_frame(s, P.request(1, "fetch", {"name": name}))
    print("SENT", flush=True)
    time.sleep(600)


def cmd_loadslow(sock: str, name: str) -> None:
    """devmapd.load a model whose fetch is slow; the test kills us while it is in flight."""
    import devmapd
    print("FETCHING", flush=True)
    devmapd.load(name, socket=sock)
    print("DONE", flush=True)


def cmd_fallback(path: str, *cases: str) -> None:
    """For each SOCKET NAME: devmapd.load fails plainly; with fallback it warns, loads locally."""
    import warnings

    import torch

    import devmapd
    results = []
    for sock, name in zip(cases[::2], cases[1::2]):
        out: dict[str, Any] = {}
        try:
            devmapd.load(name, socket=sock)
            out["plain"] = "ok"
        except devmapd.DevmapdError as e:
            out["plain"] = type(e).__name__
            out["plain_message"] = str(e)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got = devmapd.load(name, socket=sock, fallback=True, path=path)
        same(got, torch.load(path, weights_only=True))
        out["warnings"] = [str(x.message) for x in w]
        results.append(out)
    print(json.dumps(results), flush=True)


def cmd_persist(sock: str, name: str) -> None:
    """devmapd.load keeps one connection per socket; release gives the model back; a forked
    child gets its own connection instead of sharing the parent's stream."""
    import devmapd
    from devmapd.client import Client

    def wire() -> dict:
        with Client(sock) as c:
            return c.status()["wire"]

    def clients_of() -> int:
        with Client(sock) as c:
            return next(m["clients"] for m in c.status()["models"] if m["name"] == name)

    out: dict[str, Any] = {}
    base = wire()["connections"]          # includes the status connection itself
    a = devmapd.load(name, socket=sock)
    b = devmapd.load(name, socket=sock)
    out["connections_added"] = wire()["connections"] - base
    out["clients_after_two_loads"] = clients_of()
    pid = os.fork()
    if pid == 0:                          # child: must not write into the parent's stream
        try:
            c = devmapd.load(name, socket=sock)
            os._exit(0 if float(c["w"].sum()) == float(a["w"].sum()) else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    out["child_rc"] = os.waitstatus_to_exitcode(status)
    again = devmapd.load(name, socket=sock)      # the parent's connection still works
    out["clients_after_fork"] = clients_of()
    devmapd.release(name, socket=sock)
    out["clients_after_release"] = clients_of()
    out["tensors_alive"] = bool(float(a["w"].sum()) == float(b["w"].sum()) == float(again["w"].sum()))
    say(out)


def cmd_subscribe(sock: str, count: str) -> None:
    """Send COUNT subscribe requests on one raw connection; report each reply (ok, or the error
    code and message), then wait for a line on stdin before closing (the subscriptions held)."""
    import socket

    from devmapd.wire import protocol as P
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(sock)
    replies = []
    for rid in range(1, int(count) + 1):
        P.send_frame(s, P.request(rid, "subscribe"))
        while True:   # events of earlier subscriptions may come first
            msg, fds = P.recv_frame(s, max_fds=0)
            if msg.get("id") == rid and "event" not in msg:
                break
        replies.append({"ok": True} if msg["ok"] else {"ok": False, **msg["error"]})
    say({"uid": os.getuid(), "replies": replies})
    sys.stdin.readline()
    s.close()


if __name__ == "__main__":
    globals()[f"cmd_{sys.argv[1]}"](*sys.argv[2:])
