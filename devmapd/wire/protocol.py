"""The devmapd wire format: framing, message shapes, error codes and the server/daemon seam.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON (one object).
File descriptors ride as ``SCM_RIGHTS`` ancillary data on the frame's FIRST ``sendmsg``; a
reader therefore collects fds from every ``recvmsg`` that returns bytes of the frame (in practice
the first one) and checks ``MSG_CTRUNC``.

Messages (docs/INTERNALS.md "server.py / protocol.py / client.py")::

    request  {"v": 1, "id": n, "op": str, "args": {...}}
    reply    {"id": n, "ok": true, "result": ...}
             {"id": n, "ok": false, "error": {"code": str, "message": str}}
    event    {"id": n, "event": {...}}          (on a subscription opened by request n)

``id`` is null in an error the server sends about a frame it could not parse (then it hangs up).

Ops (args -> result; the right each needs is in FETCH_OPS / OPERATOR_OPS):

    hello     {}                 -> {version, protocol, pid, operator, uid, backend, socket, host, started_at}
    status    {}                 -> the status JSON (docs/INTERNALS.md)
    model     {name}             -> that model's status record (+ detail)
    fetch     {name}             -> {lease, model, manifest}; one fd per "memfd" segment, in order
    release   {name} | {lease}   -> {released: n}   (this connection's leases only)
    subscribe {}                 -> {subscribed: true}, then event frames with this request's id
    remap {name, device} | pin {name, device} | unpin {name} | evict {name} | reload {name}
                                 -> {name, state, ..., outcome, message}: ``outcome`` is
                                    "applied" | "pending" (kept, waits: ``message`` says for
                                    what) | "unchanged"; ``message`` one plain sentence. An
                                    action the daemon will not do is an error reply
                                    (``refused``, ``bad_request``...) whose message says why.

This module imports nothing heavy (no torch, no asyncio work): the client, the server and the CLI
all import it, and ``import devmapd`` must stay cheap.
"""
from __future__ import annotations

import array
import json
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # only for annotations: importing arena pulls in torch
    import asyncio

    from devmapd.engine.arena import Manifest

__all__ = [
    "PROTOCOL_VERSION", "HEADER", "DEFAULT_MAX_FRAME", "CLIENT_MAX_FRAME", "MAX_FDS_PER_FRAME",
    "BAD_REQUEST", "NOT_FOUND", "FORBIDDEN", "UNAVAILABLE", "BUSY", "INTERNAL", "TOO_LARGE",
    "VERSION", "REFUSED", "ERROR_CODES", "FETCH_OPS", "OPERATOR_OPS", "ACTION_OPS", "ALL_OPS",
    "ApiError", "ProtocolError", "Peer", "FetchGrant", "DaemonAPI",
    "encode_frame", "decode_body", "request", "ok_reply", "error_reply", "event_frame",
    "send_frame", "recv_frame", "close_fds", "fds_from_ancillary", "ancillary_space",
]

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")
# What the server accepts from a client: requests are tiny; a megabyte is generous.
DEFAULT_MAX_FRAME = 1 << 20
# What a client accepts from the server: a manifest of a million tensors is ~150 MB of JSON.
CLIENT_MAX_FRAME = 1 << 30
# Linux refuses more than SCM_MAX_FD (253) fds in one message.
MAX_FDS_PER_FRAME = 253

BAD_REQUEST = "bad_request"
NOT_FOUND = "not_found"
FORBIDDEN = "forbidden"
UNAVAILABLE = "unavailable"
BUSY = "busy"
INTERNAL = "internal"
TOO_LARGE = "too_large"
VERSION = "version"
REFUSED = "refused"          # an operator action understood but not done; the message says why
ERROR_CODES = frozenset({BAD_REQUEST, NOT_FOUND, FORBIDDEN, UNAVAILABLE, BUSY, INTERNAL,
                         TOO_LARGE, VERSION, REFUSED})

# Which right each op needs (peercred.AccessPolicy decides who has it). `release` only gives back
# what the same connection was granted, so it needs no right of its own.
FETCH_OPS = frozenset({"hello", "status", "model", "fetch", "subscribe"})
ACTION_OPS = ("remap", "pin", "unpin", "evict", "reload")
OPERATOR_OPS = frozenset(ACTION_OPS)
ALL_OPS = FETCH_OPS | OPERATOR_OPS | {"release"}


class ApiError(Exception):
    """A request failed; ``code`` is one of ERROR_CODES, ``message`` a plain sentence for humans."""

    def __init__(self, code: str, message: str):
        if code not in ERROR_CODES:
            code = INTERNAL
        super().__init__(message)
        self.code = code
        self.message = message

    def to_json(self) -> dict:
        return {"code": self.code, "message": self.message}


class ProtocolError(Exception):
    """The byte stream broke the framing rules (bad length, bad JSON, truncated fds...)."""

    def __init__(self, message: str, code: str = BAD_REQUEST):
        super().__init__(message)
        self.code = code
        self.message = message


class Peer:
    """Who is on the other end of a connection, from SO_PEERCRED (see peercred.identify).

    Immutable. A plain class rather than a dataclass: every client process imports this module,
    and the dataclasses machinery alone costs about a millisecond of its start-up."""

    __slots__ = ("pid", "uid", "gid", "groups", "operator")
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]
    operator: bool

    def __init__(self, pid: int, uid: int, gid: int, groups: tuple[int, ...] = (), operator: bool = False) -> None:
        for name, value in (("pid", pid), ("uid", uid), ("gid", gid), ("groups", tuple(groups)),
                            ("operator", operator)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Peer is immutable; use with_operator() (tried to set {name})")

    def _key(self) -> tuple[Any, ...]:
        return (self.pid, self.uid, self.gid, self.groups, self.operator)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Peer) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Peer(pid={self.pid}, uid={self.uid}, gid={self.gid}, groups={self.groups}, "
                f"operator={self.operator})")

    def with_operator(self, operator: bool) -> Peer:
        """The same peer with its operator right decided (the server does this at accept)."""
        return Peer(self.pid, self.uid, self.gid, self.groups, operator)


class FetchGrant:
    """What DaemonAPI.fetch hands the server for one fetch (a plain class: see Peer)."""

    __slots__ = ("manifest", "fds", "lease", "model", "manifest_json", "side_files_json")

    def __init__(self, manifest: Manifest, fds: list[int | None], lease: Any, model: dict | None = None,
                 manifest_json: bytes | None = None, side_files_json: bytes | None = None) -> None:
        self.manifest = manifest
        self.fds = fds                      # per manifest segment; the daemon keeps ownership (never closed here)
        self.lease = lease                  # given back through DaemonAPI.release on `release` or disconnect
        self.model = model if model is not None else {}   # the status record of the model served
        self.manifest_json = manifest_json  # manifest.to_json() already encoded (encode_manifest), if at hand
        self.side_files_json = side_files_json  # an HF directory's parsed side files, a JSON object, if any


class DaemonAPI(Protocol):
    """What server.py is handed; the server never imports daemon.py."""

    def status(self) -> dict: ...
    def model_detail(self, name: str) -> dict: ...
    async def fetch(self, name: str, peer: Peer) -> FetchGrant: ...
    def release(self, lease: Any) -> None: ...
    def subscribe(self) -> tuple[asyncio.Queue, Callable[[], None]]: ...
    async def action(self, op: str, args: dict, peer: Peer) -> dict: ...


# ---------------------------------------------------------------------------------------- framing

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def encode_manifest(manifest: Any) -> bytes:
    """A manifest as the bytes a fetch reply carries (the daemon encodes it once per version)."""
    return _dumps(manifest.to_json()).encode("utf-8")


def encode_frame(obj: Any) -> bytes:
    """Header + compact UTF-8 JSON. NaN/inf are refused (tree.py tags them; JSON has none)."""
    body = _dumps(obj).encode("utf-8")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes | bytearray | memoryview) -> dict:
    """Parse one frame body; anything but a JSON object is a ProtocolError."""
    try:
        obj = json.loads(bytes(body) if isinstance(body, memoryview) else body)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"frame is not valid UTF-8 JSON: {e}") from None
    if type(obj) is not dict:
        raise ProtocolError(f"frame must hold a JSON object, got {type(obj).__name__}")
    return obj


def request(rid: int, op: str, args: dict | None = None) -> dict:
    return {"v": PROTOCOL_VERSION, "id": rid, "op": op, "args": args or {}}


def ok_reply(rid: Any, result: Any) -> dict:
    return {"id": rid, "ok": True, "result": result}


def error_reply(rid: Any, code: str, message: str) -> dict:
    return {"id": rid, "ok": False, "error": {"code": code, "message": message}}


def event_frame(rid: Any, event: dict) -> dict:
    return {"id": rid, "event": event}


def ancillary_space(max_fds: int) -> int:
    return socket.CMSG_SPACE(max(1, max_fds) * array.array("i").itemsize)


def fds_from_ancillary(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """Every fd in SCM_RIGHTS messages (the caller owns and must close them)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            usable = len(data) - len(data) % a.itemsize
            a.frombytes(data[:usable])
            fds.extend(a)
    return fds


def close_fds(fds: Sequence[int | None]) -> None:
    for fd in fds:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def send_frame(sock: socket.socket, obj: Any, fds: Sequence[int] = ()) -> None:
    """Blocking send of one frame; fds (not closed here) ride on the first sendmsg."""
    data = memoryview(encode_frame(obj))
    if fds:
        if len(fds) > MAX_FDS_PER_FRAME:
            raise ProtocolError(f"cannot send {len(fds)} fds in one frame (limit {MAX_FDS_PER_FRAME})")
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc)
        data = data[sent:]
    if data:
        sock.sendall(data)


def _recv_exact_into(sock: socket.socket, buf: memoryview, fds: list[int], max_fds: int) -> None:
    """Fill ``buf`` from a blocking socket, collecting any fds that arrive on the way."""
    got = 0
    space = ancillary_space(max_fds)
    while got < len(buf):
        if fds or max_fds == 0:
            n = sock.recv_into(buf[got:])
            flags = 0
            anc: list = []
        else:
            # recvmsg_into lets the fds of the frame land while we read straight into `buf`.
            n, anc, flags, _ = sock.recvmsg_into([buf[got:]], space)
        if anc:
            fds.extend(fds_from_ancillary(anc))
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("file descriptors were truncated in transit (MSG_CTRUNC): "
                                "the sender passed more fds than expected", code=INTERNAL)
        if n == 0:
            raise ConnectionResetError("connection closed by the peer in the middle of a frame"
                                       if got or len(buf) != HEADER.size else "connection closed")
        got += n


def recv_frame(sock: socket.socket, *, max_frame: int = CLIENT_MAX_FRAME,
               max_fds: int = MAX_FDS_PER_FRAME) -> tuple[dict, list[int]]:
    """Blocking read of one frame and the fds that came with it (caller owns the fds).

    Raises ConnectionResetError on a clean EOF, ProtocolError on a framing violation; any fds
    already received are closed before an exception leaves this function.
    """
    fds: list[int] = []
    try:
        head = bytearray(HEADER.size)
        _recv_exact_into(sock, memoryview(head), fds, max_fds)
        (length,) = HEADER.unpack(head)
        if length > max_frame:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_frame}",
                                code=TOO_LARGE)
        body = bytearray(length)
        _recv_exact_into(sock, memoryview(body), fds, max_fds)
        return decode_body(body), fds
    except BaseException:
        close_fds(fds)
        raise
