"""Builders for hostile inputs and helpers to observe the daemon, for the reliability suite.

Every hostile file is made the way an attacker or an accident would make it: real torch.save
archives that are then damaged or rewritten, hand-built safetensors headers, pickles whose
globals would run code. Nothing here talks to the daemon except through its socket and /proc.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import socket
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

MIB = 1 << 20


# ----------------------------------------------------------------------------- versioned models

def versioned(k: int, *, tensors: int = 4, numel: int = 1024, dtype: torch.dtype = torch.float32) -> dict:
    """A state dict whose every element of every tensor is ``k``: any mix of versions shows."""
    return {f"layers.{i}.weight": torch.full((numel,), float(k), dtype=dtype) for i in range(tensors)}


def big_versioned(k: int, mib: int, *, tensors: int = 16) -> dict:
    """``mib`` MiB of float32 filled with ``k``, in ``tensors`` tensors (loads long enough to race)."""
    return versioned(k, tensors=tensors, numel=mib * MIB // 4 // tensors)


def version_of(fetched: Any) -> int:
    """The single version ``k`` a fetched state dict carries; AssertionError if it is torn."""
    assert isinstance(fetched, dict) and fetched, f"not a state dict: {type(fetched)}"
    seen = set()
    for key, t in fetched.items():
        lo, hi = float(t.min()), float(t.max())   # touches every byte of the mapping
        seen.add(lo)
        seen.add(hi)
    assert len(seen) == 1, f"torn model: tensors carry versions {sorted(seen)}"
    return int(seen.pop())


# ----------------------------------------------------------------------------- hostile files

class Evil:
    """Unpickling this runs ``touch MARKER`` - unless the unpickler refuses the global."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def malicious_zip(marker: Path) -> bytes:
    """A real torch.save archive (zip) with a weight AND an object whose unpickling runs a command."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4), "payload": Evil(marker)}, buf)
    return buf.getvalue()


def malicious_legacy(marker: Path) -> bytes:
    """The same in torch's legacy (pre-1.6, non-zip) format."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4), "payload": Evil(marker)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def malicious_plain_pickle(marker: Path) -> bytes:
    """A bare pickle named .pt, as `pickle.dump(model, f)` would leave it."""
    return pickle.dumps(Evil(marker), protocol=2)


def zip_bomb(inflated_mib: int = 128) -> bytes:
    """A torch archive whose data.pkl is DEFLATEd and a member that inflates to ``inflated_mib`` MiB.

    The archive is ~1/1000 of what it claims; a reader that inflates first and checks later
    allocates the whole bomb.
    """
    good = io.BytesIO()
    torch.save({"w": torch.ones(4)}, good)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good.getvalue())) as src, \
            zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        prefix = src.namelist()[0].split("/")[0]
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        zero = bytes(MIB)
        with dst.open(f"{prefix}/data/bomb", "w", force_zip64=True) as fh:
            for _ in range(inflated_mib):
                fh.write(zero)
    return out.getvalue()


def absurd_declared_zip() -> bytes:
    """A torch archive whose pickle declares a storage of 2**40 float32 elements (4 TiB)."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    data = buf.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename.endswith("/data.pkl"):
                # The storage's element count is pickled as BININT1 3 ('K\x03'); make it a BINUNICODE-free
                # LONG1 of 2**40, the rest of the pickle unchanged.
                assert body.count(b"K\x03") >= 1, body
                body = body.replace(b"K\x03", b"\x8a\x06" + (1 << 40).to_bytes(6, "little"), 1)
            dst.writestr(info, body)
    return out.getvalue()


def safetensors_bytes(header: dict, data: bytes = b"", *, declared_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    n = len(raw) if declared_len is None else declared_len
    return struct.pack("<Q", n) + raw + data


def million_tensor_header(path: Path, count: int = 1_000_001) -> None:
    """A VALID safetensors file of ``count`` empty tensors (~58 MB of header, under the 100 MiB cap)."""
    parts = ",".join('"t%d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}' % i for i in range(count))
    raw = ("{" + parts + "}").encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)


# ----------------------------------------------------------------------------- observing the daemon

def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM (Linux >= 4.0: writing 5 to clear_refs), so a later peak is this test's own."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def wait_until(pred, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def raw_connect(path: str, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def model_of(status: dict, name: str) -> dict | None:
    return next((m for m in status["models"] if m["name"] == name), None)


def sparse_safetensors(path: Path, nbytes: int) -> None:
    """A consistent safetensors file declaring one ``nbytes`` tensor; the data is a hole (sparse)."""
    raw = json.dumps({"huge": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + nbytes)


class OnLoading:
    """Run ``action`` the moment the daemon reports ``name`` loading with bytes copied (progress > 0).

    Subscribes on a raw socket of its own BEFORE the file is dropped, so the action lands in the
    middle of the copy (the daemon reports progress every ~10% of the bytes), not after it.
    """

    def __init__(self, socket_path: str, name: str, action) -> None:
        import threading

        from devmapd.wire import protocol as P

        self._P = P
        self.name, self.action = name, action
        self.fired = threading.Event()
        self.progress_at_fire: float | None = None
        self.error: BaseException | None = None
        self.sock = raw_connect(socket_path)
        P.send_frame(self.sock, P.request(1, "subscribe"))
        reply, _ = P.recv_frame(self.sock, max_fds=0)
        assert reply.get("ok"), reply
        self.sock.settimeout(None)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                msg, _ = self._P.recv_frame(self.sock, max_fds=0)
                ev = msg.get("event") or {}
                m = ev.get("model") if ev.get("type") == "model" else None
                if m and m["name"] == self.name and m["state"] == "loading" and (m.get("progress") or 0) > 0:
                    self.progress_at_fire = m["progress"]
                    self.action()
                    self.fired.set()
                    return
        except BaseException as e:  # socket closed by close(), or the action failed: report it
            self.error = e

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


# ----------------------------------------------------------------------------- another uid

NOBODY = 65534
# From docs/INTERNALS.md: uid/gid nobody; DAC_READ_SEARCH only to reach the root-owned venv.
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
ROOT = Path(__file__).resolve().parents[2]

_NOBODY_SCRIPT = r"""
import json, sys
from devmapd.client import Client, load
out = {}
for op in ("hello", "status", "fetch", "load"):
    try:
        if op == "load":
            load("m", socket=sys.argv[1])
        else:
            with Client(sys.argv[1]) as c:
                getattr(c, op)(*(("m",) if op == "fetch" else ()))
        out[op] = {"ok": True}
    except Exception as e:
        out[op] = {"ok": False, "class": type(e).__name__, "code": getattr(e, "code", None), "message": str(e)}
print(json.dumps(out))
"""


def client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DEVMAPD_SOCKET"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def as_nobody(socket_path: str) -> dict:
    """hello/status/fetch("m")/load("m") from a process running as uid nobody: op -> outcome."""
    import subprocess
    import sys

    r = subprocess.run([*AS_NOBODY, sys.executable, "-c", _NOBODY_SCRIPT, socket_path], cwd=ROOT,
                       env=client_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])
