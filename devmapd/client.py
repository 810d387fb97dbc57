"""The devmapd client library: ``devmapd.load`` and ``devmapd.Client``.

Blocking sockets only (no asyncio in user processes). A fetch reply carries the model's manifest
and its sealed memfds (SCM_RIGHTS); ``arena.build`` maps them copy-on-write and rebuilds the
checkpoint object in place, applying ``map_location`` only where it asks for another device.

``devmapd.load`` keeps ONE persistent connection per socket path for the whole process
(opened lazily, shared by threads, re-opened after a fork or a daemon restart): the daemon counts
that connection as a client holding each model it fetched until the process exits or calls
``release``. torch is imported only when tensors are built.
"""
from __future__ import annotations

import itertools
import os
import socket as _socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from devmapd.engine.gcpause import gc_paused
from devmapd.wire import protocol as P

__all__ = ["DevmapdError", "DaemonUnavailable", "ModelNotFound", "PermissionDenied",
           "ModelUnavailable", "Client", "load", "load_into", "meta_init", "release", "default_socket"]

SYSTEM_SOCKET = "/run/devmapd/devmapd.sock"
# A fetch may wait for a model that is still loading; the daemon gives up after its own
# request timeout (120 s by default), so wait a little longer than that before calling it dead.
LOAD_TIMEOUT_S = 630.0   # a fetch may wait for a load: the daemon gives up first (server.fetch_timeout_s, 600 s)


class DevmapdError(Exception):
    """Any failure talking to devmapd. ``code`` is the daemon's error code (or a client-side one)."""

    code = "error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class DaemonUnavailable(DevmapdError):
    """No daemon answers on the socket (not running, restarting, wrong path, or it hung)."""
    code = "unreachable"


class ModelNotFound(DevmapdError):
    """The daemon does not know that model name."""
    code = P.NOT_FOUND


class PermissionDenied(DevmapdError):
    """The socket file or the daemon's access policy refuses this user."""
    code = P.FORBIDDEN


class ModelUnavailable(DevmapdError):
    """The daemon knows the model but cannot serve it now (failed to load, timed out...)."""
    code = P.UNAVAILABLE


_BY_CODE: dict[str, type[DevmapdError]] = {
    P.NOT_FOUND: ModelNotFound, P.FORBIDDEN: PermissionDenied, P.UNAVAILABLE: ModelUnavailable,
}


def _error(err: Any) -> DevmapdError:
    if not isinstance(err, dict):
        return DevmapdError(f"the daemon sent a malformed error: {err!r}", "bad_reply")
    code = str(err.get("code", "internal"))
    return _BY_CODE.get(code, DevmapdError)(str(err.get("message", code)), code)


def default_socket(explicit: str | None = None) -> str:
    """The socket path a client uses, first match wins:

    1. ``explicit`` (a ``socket=`` argument or ``--socket``);
    2. ``$DEVMAPD_SOCKET``;
    3. for root: ``/run/devmapd/devmapd.sock`` (the system service);
    4. otherwise ``$XDG_RUNTIME_DIR/devmapd.sock`` when ``$XDG_RUNTIME_DIR`` is set, else
       ``/tmp/devmapd-<uid>/devmapd.sock`` (a per-user daemon). A non-root user of the system
       service sets ``DEVMAPD_SOCKET=/run/devmapd/devmapd.sock`` (or the config's
       ``server.socket``).
    """
    if explicit:
        return os.fspath(explicit)
    env = os.environ.get("DEVMAPD_SOCKET")
    if env:
        return env
    configured = _configured_socket()
    if configured:
        return configured
    uid = os.geteuid()
    if uid == 0 or os.path.exists(SYSTEM_SOCKET):  # the system service serves every user of the group
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "devmapd.sock")
    return f"/tmp/devmapd-{uid}/devmapd.sock"


def _configured_socket() -> str | None:
    """``server.socket`` of the system config, when one exists and is readable."""
    from devmapd.config import DEFAULT_CONFIG_PATH, ConfigError, load

    if not os.path.exists(DEFAULT_CONFIG_PATH):
        return None
    try:
        cfg = load(DEFAULT_CONFIG_PATH)
    except ConfigError:
        return None  # the daemon reports a broken config; a client just uses the defaults
    return cfg.server.socket


def _connect(path: str, timeout: float) -> _socket.socket:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        return sock
    except BaseException as e:
        sock.close()
        if isinstance(e, FileNotFoundError):
            raise DaemonUnavailable(f"devmapd is not running: no socket at {path} (start it with "
                                    "`devmapd serve`, or point --socket / $DEVMAPD_SOCKET at the "
                                    "right path)") from None
        if isinstance(e, ConnectionRefusedError):
            raise DaemonUnavailable(f"nothing is listening on {path}: the daemon is down or "
                                    "restarting (start it with `devmapd serve`)") from None
        if isinstance(e, PermissionError):
            raise PermissionDenied(f"no permission to connect to {path} as uid {os.geteuid()}: "
                                   "ask an admin to add you to the socket's group "
                                   "(config server.socket_group)") from None
        if isinstance(e, TimeoutError):
            raise DaemonUnavailable(f"devmapd at {path} did not accept a connection within "
                                    f"{timeout:g}s; it may be overloaded or hung") from None
        if isinstance(e, OSError):
            raise DaemonUnavailable(f"cannot connect to devmapd at {path}: "
                                    f"{e.strerror or e}") from None
        raise


class Client:
    """A connection to devmapd (opened lazily; thread-safe: one request at a time).

    Closing the client (or its process exiting) releases every model it fetched.
    """

    def __init__(self, socket: str | None = None, *, timeout: float = 30.0):
        self.socket_path = default_socket(socket)
        self.timeout = timeout
        self._sock: _socket.socket | None = None
        self._pid = 0
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._event_socks: set[_socket.socket] = set()
        self._closed = False
        # name -> (the reply's closing bytes b'"manifest":<json>}}', the Manifest built from
        # them): a repeat fetch of an unchanged model compares bytes instead of parsing JSON
        # and reuses the manifest's checked build plan (see _recv_fetch).
        self._manifests: dict[str, tuple[bytes, Any]] = {}

    # ------------------------------------------------------------------ plumbing

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.socket_path!r}, connected={self._sock is not None})"

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _after_fork(self) -> None:
        # The child inherited the parent's connection: two processes on one stream would
        # interleave frames. Closing the child's copy leaves the parent's connection intact.
        self._lock = threading.RLock()
        self._drop()
        for s in list(self._event_socks):
            s.close()
        self._event_socks.clear()

    def _call(self, op: str, args: dict | None = None, *, max_fds: int = 0,
              timeout: float | None = None,
              recv: Callable[[_socket.socket, int], tuple[dict, list[int]]] | None = None,
              ) -> tuple[Any, list[int]]:
        """Send one request and return (result, fds). Retries once on a fresh connection when
        a reused one turns out to be dead (daemon restarted, idle connection closed).
        ``recv(sock, max_fds)`` reads a reply frame (default: protocol.recv_frame)."""
        with self._lock:
            if self._closed:
                raise DevmapdError("this Client is closed", "closed")
            if self._sock is not None and self._pid != os.getpid():
                self._after_fork()
            for attempt in (0, 1):
                reused = self._sock is not None
                if self._sock is None:
                    self._sock = _connect(self.socket_path, self.timeout)
                    self._pid = os.getpid()
                sock = self._sock
                sock.settimeout(timeout or self.timeout)
                rid = next(self._ids)
                try:
                    P.send_frame(sock, P.request(rid, op, args))
                    while True:
                        if recv is None:
                            msg, fds = P.recv_frame(sock, max_fds=max_fds)
                        else:
                            msg, fds = recv(sock, max_fds)
                        if msg.get("id") == rid and "event" not in msg:
                            break
                        P.close_fds(fds)
                        if msg.get("id") is None and msg.get("ok") is False:
                            # The daemon is hanging up on us and says why.
                            self._drop()
                            raise _error(msg.get("error"))
                except (ConnectionResetError, BrokenPipeError) as e:
                    # The daemon may have said why it hung up (busy, bad frame) before closing.
                    why = _parting_error(sock)
                    self._drop()
                    if why is not None:
                        raise why from None
                    if reused and attempt == 0:
                        continue
                    raise DaemonUnavailable(f"devmapd at {self.socket_path} closed the connection "
                                            f"during {op} ({e}); is it restarting?") from None
                except TimeoutError:
                    self._drop()
                    raise DaemonUnavailable(f"devmapd at {self.socket_path} did not answer {op} "
                                            f"within {timeout or self.timeout:g}s") from None
                except P.ProtocolError as e:
                    self._drop()
                    raise DevmapdError(f"bad reply from devmapd to {op}: {e}", "bad_reply") from None
                except OSError as e:
                    self._drop()
                    raise DaemonUnavailable(f"lost devmapd at {self.socket_path} during {op}: "
                                            f"{e.strerror or e}") from None
                if msg.get("ok") is True:
                    return msg.get("result"), fds
                P.close_fds(fds)
                raise _error(msg.get("error"))
            raise AssertionError("unreachable")

    def _request(self, op: str, args: dict | None = None) -> Any:
        return self._call(op, args)[0]

    # ------------------------------------------------------------------ public API

    def hello(self) -> dict:
        return self._request("hello", {"protocol": P.PROTOCOL_VERSION})

    def status(self) -> dict:
        return self._request("status")

    def model(self, name: str) -> dict:
        return self._request("model", {"name": name})

    def fetch(self, name: str, map_location: Any = None) -> Any:
        """What ``torch.load`` would return for model ``name``, its tensors mapped zero-copy."""
        # Parsing the manifest and building thousands of tensors allocates many small objects
        # and no cycles; a full collection triggered midway cost ~100 ms for 4,000 tensors.
        with gc_paused():
            return self._fetch(name, map_location)

    def fetch_with_reply(self, name: str, map_location: Any = None) -> tuple[Any, dict]:
        """``(fetch(name, map_location), the reply's other fields)``: ``model`` (its status
        record) and, from a daemon that ships them, ``side_files`` (devmapd.hf reads them)."""
        with gc_paused():
            obj, result = self._fetch_reply(name, map_location)
        return obj, {k: v for k, v in result.items() if k != "manifest"}

    def _fetch(self, name: str, map_location: Any) -> Any:
        return self._fetch_reply(name, map_location)[0]

    def _fetch_reply(self, name: str, map_location: Any) -> tuple[Any, dict]:
        """(what torch.load would return, the fetch reply's other fields)."""
        tail: list[bytes] = []
        result, fds = self._call("fetch", {"name": name}, max_fds=P.MAX_FDS_PER_FRAME,
                                 timeout=max(self.timeout, LOAD_TIMEOUT_S),
                                 recv=lambda sock, n: _recv_fetch(sock, n, self._manifests.get(name), tail))
        try:
            obj, manifest = self._build(name, result, fds, map_location)
            if tail:
                if len(self._manifests) >= _MANIFEST_CACHE and name not in self._manifests:
                    self._manifests.pop(next(iter(self._manifests)))
                self._manifests[name] = (tail[0], manifest)
            return obj, result
        except BaseException:
            # Nothing of it is in use: give the lease back now rather than at disconnect.
            if isinstance(result, dict) and "lease" in result:
                try:
                    self._call("release", {"lease": result["lease"]})
                except DevmapdError:
                    pass
            raise
        finally:
            P.close_fds(fds)   # the mappings made by arena.build stay valid without the fds

    @staticmethod
    def _build(name: str, result: Any, fds: list[int], map_location: Any) -> tuple[Any, Any]:
        from devmapd.engine import arena  # torch: only now
        try:
            manifest = result["manifest"]
            if not isinstance(manifest, arena.Manifest):   # else: the cached one, bytes equal
                manifest = arena.Manifest.from_json(manifest)
        except (TypeError, KeyError) as e:
            raise DevmapdError(f"the fetch reply for {name} has no manifest ({e})", "bad_reply") from None
        except arena.ArenaError as e:
            raise DevmapdError(f"cannot read the manifest of {name}: {e}", "bad_reply") from None
        # A memfd segment always travels as an fd; a GPU (cuda-ipc) segment also brings its sealed
        # host copy when the daemon keeps one, for clients that cannot import CUDA IPC handles.
        carries_fd = [s.kind == "memfd" or bool((s.ipc or {}).get("host_copy")) for s in manifest.segments]
        expected = sum(carries_fd)
        if len(fds) != expected:
            raise DevmapdError(f"the daemon sent {len(fds)} file descriptors for {name}, whose "
                               f"manifest has {expected} memfd segments; refusing the reply",
                               "bad_reply")
        it = iter(fds)
        per_segment = [next(it) if carried else None for carried in carries_fd]
        if any(s.kind == "cuda-ipc" for s in manifest.segments):
            from devmapd.gpu import cuda_share  # noqa: F401  (registers the cuda-ipc importer)
        try:
            return arena.build(manifest, per_segment, map_location), manifest
        except arena.ArenaError as e:
            raise DevmapdError(f"cannot map {name}: {e}", "bad_reply") from None

    def release(self, name: str) -> None:
        """Tell the daemon this process no longer holds ``name`` (every fetch of it)."""
        with self._lock:
            if self._sock is None or self._pid != os.getpid():
                return   # no connection: nothing is held through it
            self._call("release", {"name": name})

    def remap(self, name: str, device: str) -> dict:
        return self._request("remap", {"name": name, "device": device})

    def pin(self, name: str, device: str) -> dict:
        return self._request("pin", {"name": name, "device": device})

    def unpin(self, name: str) -> dict:
        return self._request("unpin", {"name": name})

    def evict(self, name: str) -> dict:
        return self._request("evict", {"name": name})

    def reload(self, name: str) -> dict:
        return self._request("reload", {"name": name})

    def events(self, *, reconnect: bool = True) -> Iterator[dict]:
        """Iterate over the daemon's events (on a connection of their own).

        When the connection drops, yields ``{"type": "connection", "state": "lost", ...}``, then
        (with ``reconnect``) retries with exponential backoff (0.1 s .. 2 s) and yields
        ``{"type": "connection", "state": "restored", ...}`` once subscribed again. Without
        ``reconnect`` the iterator ends after the "lost" marker. A refusal (permission denied)
        is raised, not retried. ``close()`` from another thread ends the iteration.
        """
        backoff = 0.1
        lost = False
        first = True
        while not self._closed:
            sock: _socket.socket | None = None
            try:
                sock = _connect(self.socket_path, self.timeout)
                self._event_socks.add(sock)
                P.send_frame(sock, P.request(1, "subscribe"))
                reply, fds = P.recv_frame(sock, max_fds=0)
                if reply.get("ok") is not True:
                    raise _error(reply.get("error"))
                sock.settimeout(None)   # events may be hours apart; EOF tells us the daemon went
                if lost:
                    lost = False
                    yield _conn_event("restored", f"reconnected to devmapd at {self.socket_path}")
                backoff = 0.1
                first = False
                while True:
                    msg, fds = P.recv_frame(sock, max_fds=0)
                    if "event" in msg:
                        yield msg["event"]
                    elif msg.get("ok") is False:
                        raise ConnectionResetError(_error(msg.get("error")).args[0])
            except (PermissionDenied, ModelNotFound):
                raise
            except (DaemonUnavailable, OSError, P.ProtocolError, DevmapdError) as e:
                if self._closed:
                    return
                if first and not reconnect:
                    raise e if isinstance(e, DevmapdError) else DaemonUnavailable(str(e)) from None
                first = False
                if not lost:
                    lost = True
                    yield _conn_event("lost", f"lost the connection to devmapd at "
                                              f"{self.socket_path}: {e}"
                                      + ("; reconnecting" if reconnect else ""))
                if not reconnect:
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if sock is not None:
                    self._event_socks.discard(sock)
                    sock.close()

    def close(self) -> None:
        """Close the connection (the daemon releases everything fetched through it)."""
        self._closed = True
        for s in list(self._event_socks):
            try:
                s.shutdown(_socket.SHUT_RDWR)   # wakes a thread blocked in events()
            except OSError:
                pass
        with self._lock:
            self._drop()


def _parting_error(sock: _socket.socket) -> DevmapdError | None:
    """The error frame a server sent just before hanging up, if one is waiting to be read."""
    try:
        sock.settimeout(0.2)
        msg, fds = P.recv_frame(sock, max_fds=0)
    except (OSError, P.ProtocolError):
        return None
    P.close_fds(fds)
    if msg.get("id") is None and msg.get("ok") is False:
        return _error(msg.get("error"))
    return None


_MANIFEST_CACHE = 32          # models whose last manifest a Client keeps (bytes + plan)
_MANIFEST_KEY = b',"manifest":'


def _recv_fetch(sock: _socket.socket, max_fds: int, cached: tuple[bytes, Any] | None,
                tail_out: list[bytes]) -> tuple[dict, list[int]]:
    """Read a fetch reply frame, parsing as little of it as possible.

    The server splices the manifest JSON in last: ``{..."result":{..., "manifest":M}}``. When
    the frame ends with the bytes ``"manifest":M}}`` of the previous fetch of this model, M is
    not parsed again: ``result["manifest"]`` is the Manifest built then (same bytes, same
    manifest). Otherwise the head and M are parsed separately (together, the same work as one
    parse) and M's closing bytes are put in ``tail_out`` for the cache. Anything unusual falls
    back to parsing the whole frame, so a different server layout costs speed, never
    correctness.
    """
    fds: list[int] = []
    try:
        head = bytearray(P.HEADER.size)
        P._recv_exact_into(sock, memoryview(head), fds, max_fds)
        (length,) = P.HEADER.unpack(head)
        if length > P.CLIENT_MAX_FRAME:
            raise P.ProtocolError(f"frame of {length} bytes exceeds the limit of "
                                  f"{P.CLIENT_MAX_FRAME}", code=P.TOO_LARGE)
        body = bytearray(length)
        P._recv_exact_into(sock, memoryview(body), fds, max_fds)
        return _split_fetch(bytes(body), cached, tail_out), fds
    except BaseException:
        P.close_fds(fds)
        raise


def _split_fetch(body: bytes, cached: tuple[bytes, Any] | None, tail_out: list[bytes]) -> dict:
    import json
    if cached is not None and body.endswith(cached[0]):
        msg = _head_of(body[:len(body) - len(cached[0]) + len(_MANIFEST_KEY)])
        if msg is not None:
            msg["result"]["manifest"] = cached[1]
            return msg
    at = body.rfind(_MANIFEST_KEY)
    if at > 0 and body.endswith(b"}}"):
        cut = at + len(_MANIFEST_KEY)
        msg = _head_of(body[:cut])
        if msg is not None:
            try:
                manifest = json.loads(body[cut:-2])
            except ValueError:
                pass
            else:
                msg["result"]["manifest"] = manifest
                tail_out.append(body[at:])
                return msg
    return P.decode_body(body)


def _head_of(head: bytes) -> dict | None:
    """``head`` (a reply up to and including ``,"manifest":``) completed with null, parsed;
    None unless it is an ok reply whose result's last field is that manifest."""
    import json
    try:
        msg = json.loads(head + b"null}}")
    except ValueError:
        return None
    if type(msg) is not dict or msg.get("ok") is not True:
        return None
    result = msg.get("result")
    if type(result) is not dict or "manifest" not in result or result["manifest"] is not None:
        return None
    return msg


def _conn_event(state: str, message: str) -> dict:
    return {"type": "connection", "state": state, "ts": time.time(), "message": message}


# ---------------------------------------------------------------------------- devmapd.load

_shared: dict[str, Client] = {}
_shared_lock = threading.Lock()


def _shared_client(socket: str | None) -> Client:
    path = default_socket(socket)
    with _shared_lock:
        c = _shared.get(path)
        if c is None:
            c = _shared[path] = Client(path, timeout=LOAD_TIMEOUT_S)
        return c


def _reset_after_fork() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()
    for c in _shared.values():
        c._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


def load(name: str, map_location: Any = None, *, socket: str | None = None,
         fallback: bool = False, path: str | os.PathLike | None = None) -> Any:
    """What ``torch.load(<the file of name>, map_location=..., weights_only=True)`` returns,
    served zero-copy by the devmapd daemon (after its normalisation, e.g. ``module.`` stripped).

    ``map_location`` takes torch's four forms; tensors move only when it names a device other
    than the one they sit on. Raises DaemonUnavailable / ModelNotFound / PermissionDenied /
    ModelUnavailable (all DevmapdError). With ``fallback=True`` and ``path``, any of those makes
    it warn and load ``path`` locally with ``torch.load(weights_only=True)`` instead.
    """
    if fallback and path is None:
        raise ValueError("devmapd.load(fallback=True) needs path=<the checkpoint file> to fall back to")
    try:
        return _shared_client(socket).fetch(name, map_location)
    except DevmapdError as e:
        if not fallback:
            raise
        warnings.warn(f"devmapd.load({name!r}): {e}; loading {os.fspath(path)} locally with "
                      "torch.load instead (no sharing, no normalisation)", RuntimeWarning,
                      stacklevel=2)
    import torch
    return torch.load(path, map_location=map_location, weights_only=True)


def load_into(module: Any, name: str, *, strict: bool = True, map_location: Any = None,
              socket: str | None = None) -> Any:
    """Make ``module``'s parameters and buffers BE model ``name``'s served tensors; returns it.

    Like ``module.load_state_dict(devmapd.load(name), strict=strict, assign=True)``: no copy,
    so the weights stay shared with the daemon and every other process (copy-on-write), and a
    module built on the meta device (``with devmapd.meta_init(): model = Net()``, or
    ``with torch.device("meta")``) never initialises weights it would throw away. ``load_state_dict`` without ``assign=True`` copies
    every weight into the module's own memory instead. Parameters stay Parameters (with the
    module's requires_grad) and take the served dtype and device, as with assign=True;
    ``map_location`` moves them first. Also: DDP / DataParallel / torch.compile wrappers are
    unwrapped (the daemon serves keys without their ``module.`` / ``_orig_mod.`` prefixes),
    tied weights stay tied, a checkpoint holding the state dict under ``state_dict`` or
    ``model`` is accepted, and anything left on the meta device is an error that names it.
    Raises devmapd.engine.assign.AssignError (a RuntimeError) with torch's missing/unexpected
    key and size-mismatch messages, and the DevmapdError family as ``load`` does.
    """
    from devmapd.engine import assign
    obj = load(name, map_location, socket=socket)
    what = f"devmapd model {_printable(name)}"
    return assign.assign_state_dict(module, assign.state_dict_of(obj, what), strict=strict, what=what)


def meta_init() -> Any:
    """``with devmapd.meta_init(): model = Net()``: build ``model`` on the meta device with its
    weight initialisers skipped (nothing allocated, nothing initialised), for ``load_into``.
    See devmapd.engine.assign.meta_init."""
    from devmapd.engine import assign
    return assign.meta_init()


def _printable(name: str) -> str:
    """``name`` quoted with control characters escaped (names come from files and clients)."""
    return repr(str(name))


def release(name: str, *, socket: str | None = None) -> None:
    """Tell the daemon this process no longer uses ``name`` (fetched with ``devmapd.load``)."""
    path = default_socket(socket)
    with _shared_lock:
        c = _shared.get(path)
    if c is not None:
        c.release(name)
