"""The asyncio Unix-socket server: frames in, DaemonAPI calls, frames (and memfds) out.

The server is handed a ``DaemonAPI`` object (protocol.py) and never imports daemon.py. Each
connection is one task that reads frames with ``recvmsg`` on a non-blocking socket (asyncio
streams cannot carry fds) and answers its requests in order; a subscription adds a second task
that streams events. Everything a connection acquired (leases, subscriptions, tasks, its socket)
is given back in one ``finally`` when it ends, however it ends.

Defences, so that one client never affects another:
- a frame's length is checked against ``max_frame`` before any body byte is buffered;
- a frame that has started must complete within ``frame_timeout_s`` (trickling clients);
- a connection that holds nothing (no lease, no subscription) and sends nothing for
  ``idle_timeout_s`` is closed. A connection holding a lease is a process using a model: it
  stays open as long as the peer lives, because closing it would release the model under it;
- every write has a deadline (``write_timeout_s``; ``event_timeout_s`` for events), and a
  subscriber whose queue fills up is dropped rather than buffered without bound;
- fds sent by a client are closed at once and the client is disconnected (clients never send
  fds); MSG_CTRUNC is treated the same way;
- connections are capped per uid and in total; so are subscriptions (per connection, per uid,
  in total), because the daemon copies every event into every subscriber's queue: 20,000
  subscriptions on one connection kept it at 78% CPU. An extra ``subscribe`` is refused with
  ``busy`` and a message naming the limit; the connection and its other subscriptions go on.
"""
from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
import time
import weakref
from typing import Any

from devmapd.wire import protocol as P
from devmapd.wire.peercred import AccessPolicy, gid_of, identify
from devmapd.wire.protocol import ApiError, DaemonAPI, FetchGrant, Peer, ProtocolError

# ApiError/FetchGrant/Peer are re-exported: the daemon imports them from here.
__all__ = ["Server", "ServerError", "ApiError", "FetchGrant", "Peer", "AccessPolicy"]

log = logging.getLogger("devmapd.wire.server")

_RECV_CHUNK = 64 << 10
_MAX_LEASES_PER_CONN = 4096
# Subscription caps (defaults; Server(...) and set_limits take others). A dashboard or an
# events() iterator holds one subscription on a connection of its own, so these leave ample
# room for real use while bounding the per-event fan-out work of the daemon.
MAX_SUBSCRIPTIONS_PER_CONN = 8
MAX_SUBSCRIPTIONS_PER_UID = 64
MAX_SUBSCRIPTIONS = 1024
# Room for a few fds, so that a client sending some gets them delivered (and closed by us)
# rather than silently dropped; more than this arrives as MSG_CTRUNC, which is also an error.
_ANC_SPACE = P.ancillary_space(16)


class ServerError(Exception):
    """The server cannot start (socket path in use, bad directory, unknown group...)."""


class _SendTimeout(ConnectionError):
    """A write missed its deadline; the connection is unusable (a partial frame may be out)."""


class _Hangup(Exception):
    """End this connection (after an optional last error frame was sent)."""


def _group_id(group: str | int | None) -> int | None:
    if group is None or group == "":
        return None
    try:
        return gid_of(group)
    except ValueError:
        raise ServerError(f"socket group {group!r} does not exist (config server.socket_group); "
                          "create it or leave the setting empty") from None


class _ManifestCache:
    """Encoded manifest JSON per Manifest object: a model's manifest never changes once built,
    and re-encoding a 4,000-tensor manifest on every fetch would cost milliseconds each time."""

    def __init__(self, limit: int = 256):
        self._d: dict[int, tuple[weakref.ref, bytes]] = {}
        self._limit = limit

    def get(self, manifest: Any) -> bytes:
        key = id(manifest)
        hit = self._d.get(key)
        if hit is not None and hit[0]() is manifest:
            return hit[1]
        data = P._dumps(manifest.to_json()).encode("utf-8")
        try:
            ref = weakref.ref(manifest, lambda _r, k=key: self._d.pop(k, None))
        except TypeError:        # not weak-referenceable: do not cache
            return data
        if len(self._d) >= self._limit:
            self._d.clear()
        self._d[key] = (ref, data)
        return data


class Server:
    """Serve ``api`` on the Unix socket ``path`` (see the module docstring)."""

    def __init__(self, api: DaemonAPI, path: str, *, policy: AccessPolicy | None = None,
                 socket_mode: int = 0o660, socket_group: str | int | None = None,
                 max_frame: int = P.DEFAULT_MAX_FRAME, idle_timeout_s: float = 300.0,
                 request_timeout_s: float = 120.0, frame_timeout_s: float = 10.0,
                 write_timeout_s: float = 30.0, event_timeout_s: float = 5.0,
                 max_conns_per_uid: int = 64, max_conns: int = 1024,
                 max_subs_per_conn: int = MAX_SUBSCRIPTIONS_PER_CONN,
                 max_subs_per_uid: int = MAX_SUBSCRIPTIONS_PER_UID,
                 max_subs: int = MAX_SUBSCRIPTIONS):
        self.api = api
        # An abstract socket name (leading NUL, possible with socket activation) is not a path.
        self.path = os.path.abspath(path) if path and not path.startswith("\0") else (path or "")
        self.policy = policy or AccessPolicy()
        self.socket_mode = socket_mode
        self.socket_gid = _group_id(socket_group)
        self.set_limits(max_frame=max_frame, idle_timeout_s=idle_timeout_s, max_conns_per_uid=max_conns_per_uid,
                        request_timeout_s=request_timeout_s, max_subs_per_conn=max_subs_per_conn,
                        max_subs_per_uid=max_subs_per_uid, max_subs=max_subs)
        self.frame_timeout_s = frame_timeout_s
        self.write_timeout_s = write_timeout_s
        self.event_timeout_s = event_timeout_s
        self.max_conns = max_conns
        self._listener: socket.socket | None = None
        self._owns_path = False          # we bound the file, so we unlink it on close
        self._path_ino: int | None = None
        self._accept_task: asyncio.Task | None = None
        self._conns: set[_Conn] = set()
        self._per_uid: dict[int, int] = {}
        self._subs_per_uid: dict[int, int] = {}
        self._subs_total = 0
        self._manifests = _ManifestCache()
        self._started_at = time.time()
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def from_socket(cls, api: DaemonAPI, sock: socket.socket, **kwargs: Any) -> Server:
        """Serve on an already bound, listening socket (systemd socket activation).

        The socket file then belongs to whoever created it (systemd): it is neither chmod-ed
        nor unlinked here.
        """
        try:
            path = sock.getsockname()
        except OSError:
            path = ""
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        srv = cls(api, path or "", **kwargs)
        srv._listener = sock
        return srv

    @property
    def connections(self) -> int:
        return len(self._conns)

    def set_policy(self, policy: AccessPolicy) -> None:
        """Apply a new access policy (config reload) to new requests on every connection."""
        self.policy = policy
        for conn in self._conns:
            p = conn.peer
            conn.peer = p.with_operator(policy.is_operator(p.uid, p.gid, p.groups))

    def set_limits(self, *, max_frame: int, idle_timeout_s: float, max_conns_per_uid: int,
                   request_timeout_s: float, max_subs_per_conn: int | None = None,
                   max_subs_per_uid: int | None = None, max_subs: int | None = None) -> None:
        """Apply new limits (config reload); they hold for every request from now on.

        The subscription caps are optional: None keeps the current value (the module defaults
        at first). Lowering one never cuts existing subscriptions; it refuses new ones.
        """
        self.max_frame = max_frame
        self.idle_timeout_s = idle_timeout_s
        self.max_conns_per_uid = max_conns_per_uid
        self.request_timeout_s = request_timeout_s
        for attr, value in (("max_subs_per_conn", max_subs_per_conn), ("max_subs_per_uid", max_subs_per_uid),
                            ("max_subs", max_subs)):
            if value is not None:
                if type(value) is not int or value < 1:
                    raise ValueError(f"{attr} must be a positive integer, got {value!r}")
                setattr(self, attr, value)

    @property
    def subscriptions(self) -> int:
        """Subscriptions held now, over every connection."""
        return self._subs_total

    def _subscription_refusal(self, conn: _Conn) -> str | None:
        """Why ``conn`` may not take one more subscription, or None."""
        uid = conn.peer.uid
        if len(conn.subs) >= self.max_subs_per_conn:
            return (f"this connection already holds {len(conn.subs)} subscriptions (limit "
                    f"{self.max_subs_per_conn} per connection); one subscription carries every event, "
                    "so reuse it")
        if self._subs_per_uid.get(uid, 0) >= self.max_subs_per_uid:
            return (f"uid {uid} already holds {self._subs_per_uid[uid]} subscriptions (limit "
                    f"{self.max_subs_per_uid} per uid); close some dashboards or event streams")
        if self._subs_total >= self.max_subs:
            return (f"the daemon already serves {self._subs_total} subscriptions (limit "
                    f"{self.max_subs} in total); try again later")
        return None

    def _count_subscription(self, uid: int, delta: int) -> None:
        self._subs_total += delta
        n = self._subs_per_uid.get(uid, 0) + delta
        if n > 0:
            self._subs_per_uid[uid] = n
        else:
            self._subs_per_uid.pop(uid, None)

    async def start(self) -> None:
        if self._listener is None:
            self._listener = self._bind()
        self._listener.setblocking(False)
        self._accept_task = asyncio.get_running_loop().create_task(
            self._accept_loop(), name="devmapd-accept")
        log.info("serving on %s", self.path)

    def _bind(self) -> socket.socket:
        if not self.path:
            raise ServerError("no socket path given (config server.socket)")
        self._prepare_dir(os.path.dirname(self.path))
        self._clear_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # bind() creates the file with 0777 & ~umask: with 0177 it is born 0600, so it is never
        # briefly reachable by others before the chmod below. umask is process-wide; the window
        # is one syscall and only ever makes files stricter.
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError as e:
            sock.close()
            raise ServerError(f"cannot bind {self.path}: {e.strerror or e} "
                              "(Unix socket paths must be under 108 bytes; check config server.socket)") from None
        finally:
            os.umask(old)
        try:
            if self.socket_gid is not None:
                os.chown(self.path, -1, self.socket_gid)
            os.chmod(self.path, self.socket_mode)
            sock.listen(min(self.max_conns, socket.SOMAXCONN))
        except OSError as e:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise ServerError(f"cannot set up {self.path}: {e.strerror or e}") from None
        self._owns_path = True
        self._path_ino = os.stat(self.path).st_ino
        return sock

    def _prepare_dir(self, d: str) -> None:
        if not os.path.isdir(d):
            parent = os.path.dirname(d)
            if parent and not os.path.isdir(parent):
                os.makedirs(parent, mode=0o755, exist_ok=True)
            mode = 0o750 if self.socket_gid is not None else 0o755
            try:
                os.mkdir(d, mode)
            except FileExistsError:
                pass
            except OSError as e:
                raise ServerError(f"cannot create the socket directory {d}: {e.strerror}") from None
            else:
                os.chmod(d, mode)          # mkdir's mode is filtered by the umask
                if self.socket_gid is not None:
                    os.chown(d, -1, self.socket_gid)
        st = os.stat(d)
        if st.st_uid not in (0, os.geteuid()):
            raise ServerError(f"socket directory {d} belongs to uid {st.st_uid}, not to this daemon "
                              f"(uid {os.geteuid()}); another user could replace the socket. "
                              "Use a directory you own (config server.socket)")

    @staticmethod
    def _clear_stale(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ServerError(f"{path} exists and is not a socket; refusing to replace it. "
                              "Remove it or choose another path (config server.socket)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)       # a dead daemon's leftover: nobody is listening
            log.info("removed stale socket %s", path)
            return
        except OSError as e:          # timeout (backlog full) or EACCES: someone is there
            raise ServerError(f"a daemon seems to be listening on {path} ({e}); stop it first "
                              "or choose another path (config server.socket)") from None
        finally:
            probe.close()
        raise ServerError(f"another devmapd is already serving on {path}; stop it first "
                          "(devmapd status shows it) or choose another path (config server.socket)")

    async def close(self) -> None:
        """Stop accepting, end every connection (releasing its leases), remove our socket file."""
        self._closing = True
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._owns_path:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._path_ino:   # still ours, not a successor's
                    os.unlink(self.path)
            self._owns_path = False
        tasks = [c.task for c in list(self._conns) if c.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------------ accepting

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                # EMFILE/ENFILE/ENOBUFS: back off instead of spinning; the backlog waits for us.
                log.warning("accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            try:
                self._admit(sock)
            except Exception:   # never let one connection's setup kill the accept loop
                log.exception("could not set up a connection")
                sock.close()

    def _admit(self, sock: socket.socket) -> None:
        if self._closing:
            sock.close()
            return
        sock.setblocking(False)
        try:
            peer = identify(sock, self.policy)
        except OSError as e:
            log.info("dropping a connection whose credentials cannot be read: %s", e)
            sock.close()
            return
        refusal = None
        if len(self._conns) >= self.max_conns:
            refusal = (f"the daemon already serves {len(self._conns)} connections "
                       f"(limit {self.max_conns}); try again later")
        elif self._per_uid.get(peer.uid, 0) >= self.max_conns_per_uid:
            refusal = (f"uid {peer.uid} already holds {self._per_uid[peer.uid]} connections "
                       f"(limit {self.max_conns_per_uid}, config server.max_connections_per_uid); "
                       "close some clients")
        if refusal is not None:
            log.warning("refusing pid %d uid %d: %s", peer.pid, peer.uid, refusal)
            with contextlib.suppress(OSError):   # best effort; never wait for a client here
                sock.send(P.encode_frame(P.error_reply(None, P.BUSY, refusal)))
            sock.close()
            return
        conn = _Conn(self, sock, peer)
        self._conns.add(conn)
        self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
        conn.task = asyncio.get_running_loop().create_task(
            conn.run(), name=f"devmapd-conn-{peer.pid}")

    def _forget(self, conn: _Conn) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            n = self._per_uid.get(conn.peer.uid, 1) - 1
            if n > 0:
                self._per_uid[conn.peer.uid] = n
            else:
                self._per_uid.pop(conn.peer.uid, None)

    # ------------------------------------------------------------------ helpers for _Conn

    def hello(self, peer: Peer) -> dict:
        from devmapd._version import __version__
        try:
            d = self.api.status().get("daemon", {}) or {}
        except Exception:   # hello must answer even when status is broken
            log.exception("status() failed during hello")
            d = {}
        return {"version": __version__, "protocol": P.PROTOCOL_VERSION, "pid": os.getpid(),
                "operator": peer.operator, "uid": peer.uid, "backend": d.get("backend"),
                "socket": self.path, "host": d.get("host") or socket.gethostname(),
                "started_at": d.get("started_at", self._started_at)}


class _Conn:
    """One client connection. ``run`` is its task; ``_cleanup`` gives everything back."""

    _lease_ids = itertools.count(1)

    def __init__(self, server: Server, sock: socket.socket, peer: Peer):
        self.srv = server
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.task: asyncio.Task | None = None
        self.buf = bytearray()
        self.leases: dict[int, tuple[str, Any]] = {}
        self.subs: dict[Any, tuple[asyncio.Task | None, Any]] = {}
        self.send_lock = asyncio.Lock()
        self.loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ I/O primitives

    async def _wait(self, add: Any, remove: Any, timeout: float | None) -> None:
        fut = self.loop.create_future()
        add(self.fd, lambda: fut.done() or fut.set_result(None))
        try:
            async with asyncio.timeout(timeout):
                await fut
        finally:
            remove(self.fd)

    def _recv_some(self) -> bool:
        """One non-blocking recvmsg into the buffer; False on EOF. Raises BlockingIOError."""
        data, anc, flags, _ = self.sock.recvmsg(_RECV_CHUNK, _ANC_SPACE)
        fds = P.fds_from_ancillary(anc)
        if fds or flags & socket.MSG_CTRUNC:
            P.close_fds(fds)
            log.warning("pid %d uid %d sent %d file descriptor(s)%s; closed them and hung up",
                        self.peer.pid, self.peer.uid, len(fds),
                        " (truncated: MSG_CTRUNC)" if flags & socket.MSG_CTRUNC else "")
            raise ProtocolError("clients must not send file descriptors; "
                                f"{len(fds)} received were closed")
        if not data:
            return False
        self.buf += data
        return True

    def _parse(self) -> dict | None:
        """A complete frame from the buffer, or None. The length is checked before the body is
        waited for, so an oversized prefix never makes us buffer (or allocate) that much."""
        if len(self.buf) < P.HEADER.size:
            return None
        (length,) = P.HEADER.unpack_from(self.buf)
        if length > self.srv.max_frame:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of "
                                f"{self.srv.max_frame} (config server.max_frame_bytes)",
                                code=P.TOO_LARGE)
        end = P.HEADER.size + length
        if len(self.buf) < end:
            return None
        body = bytes(self.buf[P.HEADER.size:end])
        del self.buf[:end]
        return P.decode_body(body)

    def _holds_something(self) -> bool:
        return bool(self.leases or self.subs)

    async def _read_frame(self) -> dict | None:
        """The next request, or None on a clean EOF between frames."""
        started: float | None = None
        while True:
            msg = self._parse()
            if msg is not None:
                return msg
            now = time.monotonic()
            if self.buf:
                started = started if started is not None else now
                timeout: float | None = started + self.srv.frame_timeout_s - now
                if timeout <= 0:
                    raise ProtocolError(f"incomplete frame: {len(self.buf)} bytes in "
                                        f"{self.srv.frame_timeout_s:g}s; hanging up")
            elif self._holds_something():
                timeout = None
            else:
                timeout = self.srv.idle_timeout_s
            try:
                if not self._recv_some():
                    if self.buf:
                        log.info("pid %d hung up in the middle of a frame", self.peer.pid)
                    return None
                continue
            except BlockingIOError:
                pass
            try:
                await self._wait(self.loop.add_reader, self.loop.remove_reader, timeout)
            except TimeoutError:
                if self.buf:
                    continue   # the frame deadline check above raises the ProtocolError
                log.info("closing idle connection of pid %d uid %d", self.peer.pid, self.peer.uid)
                raise _Hangup() from None

    async def _send_bytes(self, data: bytes, fds: list[int], timeout: float) -> None:
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else None
        async with self.send_lock:
            try:
                async with asyncio.timeout(timeout):
                    while view:
                        try:
                            if anc is not None:
                                n = self.sock.sendmsg([view], anc)
                                anc = None   # the fds went with these bytes
                            else:
                                n = self.sock.send(view)
                            view = view[n:]
                        except BlockingIOError:
                            await self._wait(self.loop.add_writer, self.loop.remove_writer, None)
            except TimeoutError:
                # A peer that does not read its replies loses the connection (never retried:
                # half a frame is on the wire).
                raise _SendTimeout(f"peer did not read for {timeout:g}s") from None

    async def send(self, obj: Any, fds: list[int] | None = None, *, timeout: float | None = None) -> None:
        await self._send_bytes(P.encode_frame(obj), fds or [],
                               self.srv.write_timeout_s if timeout is None else timeout)

    # ------------------------------------------------------------------ the connection task

    async def run(self) -> None:
        try:
            while True:
                try:
                    msg = await self._read_frame()
                except ProtocolError as e:
                    log.info("hanging up on pid %d uid %d: %s", self.peer.pid, self.peer.uid, e.message)
                    await self._last_word(P.error_reply(None, e.code, e.message))
                    return
                if msg is None:
                    return
                await self._dispatch(msg)
                # A client that pipelines requests and reads replies as fast as they come could
                # otherwise keep this loop from ever yielding: let other connections run.
                await asyncio.sleep(0)
        except _Hangup:
            pass
        except (ConnectionError, BrokenPipeError, TimeoutError) as e:
            log.info("connection of pid %d ended: %s", self.peer.pid, e.__class__.__name__)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("connection of pid %d uid %d failed", self.peer.pid, self.peer.uid)
        finally:
            self._cleanup()

    async def _last_word(self, obj: dict) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            await self.send(obj, timeout=1.0)

    def _cleanup(self) -> None:
        for task, unsubscribe in self.subs.values():
            if task is not None:
                task.cancel()
            try:
                unsubscribe()
            except Exception:
                log.exception("unsubscribe failed")
        if self.subs:
            self.srv._count_subscription(self.peer.uid, -len(self.subs))
        self.subs.clear()
        leases, self.leases = self.leases, {}
        for name, lease in leases.values():
            try:
                self.srv.api.release(lease)
            except Exception:
                log.exception("releasing a lease on %s failed", name)
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
        self.sock.close()
        self.srv._forget(self)

    # ------------------------------------------------------------------ requests

    async def _dispatch(self, msg: dict) -> None:
        rid = msg.get("id")
        if rid is not None and type(rid) not in (int, str):
            await self.send(P.error_reply(None, P.BAD_REQUEST, "request id must be an integer or a string"))
            return
        try:
            if msg.get("v") != P.PROTOCOL_VERSION:
                raise ApiError(P.VERSION, f"this daemon speaks protocol {P.PROTOCOL_VERSION}, the request "
                                          f"says {msg.get('v')!r}; upgrade the older side")
            op = msg.get("op")
            args = msg.get("args", {})
            if type(op) is not str or op not in P.ALL_OPS:
                raise ApiError(P.BAD_REQUEST, f"unknown op {op!r}; known: {', '.join(sorted(P.ALL_OPS))}")
            if args is None:
                args = {}
            if type(args) is not dict:
                raise ApiError(P.BAD_REQUEST, "args must be a JSON object")
            if op != "release":
                why = self.srv.policy.refusal(self.peer, op, operator_op=op in P.OPERATOR_OPS)
                if why is not None:
                    log.info("refused %s from pid %d: %s", op, self.peer.pid, why)
                    raise ApiError(P.FORBIDDEN, why)
            if op == "fetch":
                await self._fetch(rid, args)
                return
            if op == "subscribe":
                await self._subscribe(rid)
                return
            status_json = getattr(self.srv.api, "status_json", None) if op == "status" else None
            if status_json is not None:
                # The daemon keeps each model's JSON encoded until it changes: splice it in
                # rather than re-encode every model on every status call.
                body = b"".join((b'{"id":', P._dumps(rid).encode(), b',"ok":true,"result":', status_json(), b"}"))
                await self._send_bytes(P.HEADER.pack(len(body)) + body, [], self.srv.write_timeout_s)
                return
            result = await self._simple(op, args)
        except ApiError as e:
            await self.send(P.error_reply(rid, e.code, e.message))
            return
        except TimeoutError:
            await self.send(P.error_reply(rid, P.UNAVAILABLE, f"{msg.get('op')} did not finish within "
                                          f"{self.srv.request_timeout_s:g}s; try again later"))
            return
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:
            log.exception("%s from pid %d failed", msg.get("op"), self.peer.pid)
            await self.send(P.error_reply(rid, P.INTERNAL, f"internal error while handling "
                                          f"{msg.get('op')}: {type(e).__name__}: {e} (see the daemon log)"))
            return
        await self.send(P.ok_reply(rid, result))

    @staticmethod
    def _name(args: dict) -> str:
        name = args.get("name")
        if type(name) is not str or not name:
            raise ApiError(P.BAD_REQUEST, "args.name must be a non-empty string (the model name)")
        return name

    async def _simple(self, op: str, args: dict) -> Any:
        api = self.srv.api
        if op == "hello":
            return self.srv.hello(self.peer)
        if op == "status":
            return api.status()
        if op == "model":
            name = self._name(args)
            try:
                return api.model_detail(name)
            except KeyError:
                raise ApiError(P.NOT_FOUND, f"no model named {name!r}") from None
        if op == "release":
            return {"released": self._release(args)}
        # operator actions
        async with asyncio.timeout(self.srv.request_timeout_s):
            return await api.action(op, args, self.peer)

    def _release(self, args: dict) -> int:
        lease_id, name = args.get("lease"), args.get("name")
        if lease_id is None and name is None:
            raise ApiError(P.BAD_REQUEST, "release needs args.name (every lease on that model) "
                                          "or args.lease (one lease id from a fetch reply)")
        picked = [k for k, (n, _) in self.leases.items()
                  if (lease_id is None or k == lease_id) and (name is None or n == name)]
        for k in picked:
            n, lease = self.leases.pop(k)
            try:
                self.srv.api.release(lease)
            except Exception:
                log.exception("releasing a lease on %s failed", n)
        return len(picked)

    async def _fetch(self, rid: Any, args: dict) -> None:
        name = self._name(args)
        if len(self.leases) >= _MAX_LEASES_PER_CONN:
            raise ApiError(P.BUSY, f"this connection already holds {len(self.leases)} leases; "
                                   "release models you no longer use")
        async with asyncio.timeout(self.srv.request_timeout_s):
            grant: FetchGrant = await self.srv.api.fetch(name, self.peer)
        # From here the lease is ours to give back: record it before anything else can fail,
        # so that _cleanup releases it whatever happens next (bad grant, client gone...).
        lease_id = next(self._lease_ids)
        self.leases[lease_id] = (name, grant.lease)
        try:
            segments = grant.manifest.segments
            if len(grant.fds) != len(segments):
                raise ApiError(P.INTERNAL, f"the daemon granted {len(grant.fds)} fds for "
                                           f"{len(segments)} segments of {name}")
            fds: list[int] = []
            for i, (seg, fd) in enumerate(zip(segments, grant.fds)):
                if seg.kind == "memfd" or (seg.ipc or {}).get("host_copy"):
                    # memfd segments, and the sealed host copy of a GPU segment that has one
                    # (a client whose CUDA import fails falls back to it).
                    if fd is None or fd < 0:
                        raise ApiError(P.INTERNAL, f"segment {i} of {name} is a memfd without an fd")
                    fds.append(fd)
            if len(fds) > P.MAX_FDS_PER_FRAME:
                raise ApiError(P.TOO_LARGE, f"{name} has {len(fds)} memfd segments; at most "
                                            f"{P.MAX_FDS_PER_FRAME} fit in one reply")
            manifest_json = grant.manifest_json or self.srv._manifests.get(grant.manifest)
            # Our own duplicates, taken before the next await: the daemon may close its fds
            # (model replaced) while this reply waits for the send lock, and a closed fd number
            # can be reused by anything in the meantime.
            own: list[int] = []
            try:
                for fd in fds:
                    own.append(os.dup(fd))
            except OSError as e:
                P.close_fds(own)
                raise ApiError(P.INTERNAL, f"cannot pass the memory of {name}: {e.strerror}") from None
        except ApiError:
            self._release({"lease": lease_id})
            raise
        try:
            # Splice the cached manifest JSON into the reply instead of re-encoding it.
            body = b"".join((b'{"id":', P._dumps(rid).encode(), b',"ok":true,"result":{"lease":',
                             str(lease_id).encode(), b',"model":',
                             P._dumps(grant.model or {}).encode("utf-8"),
                             b',"side_files":' + grant.side_files_json if grant.side_files_json else b"",
                             # the manifest stays last: a client reuses its parse of an unchanged tail
                             b',"manifest":', manifest_json, b"}}"))
            await self._send_bytes(P.HEADER.pack(len(body)) + body, own, self.srv.write_timeout_s)
        finally:
            P.close_fds(own)

    async def _subscribe(self, rid: Any) -> None:
        if rid in self.subs:
            raise ApiError(P.BAD_REQUEST, f"request id {rid!r} already has a subscription")
        refusal = self.srv._subscription_refusal(self)
        if refusal is not None:
            log.warning("refusing a subscription from pid %d uid %d: %s", self.peer.pid, self.peer.uid, refusal)
            raise ApiError(P.BUSY, refusal)
        queue, unsubscribe = self.srv.api.subscribe()
        # Registered (and counted) before the reply goes out, so cleanup unsubscribes and
        # uncounts it even if that send fails; the pump starts after it, so the ok reply always
        # precedes the first event (events arriving meanwhile wait in the queue).
        self.subs[rid] = (None, unsubscribe)
        self.srv._count_subscription(self.peer.uid, +1)
        await self.send(P.ok_reply(rid, {"subscribed": True}))
        task = self.loop.create_task(self._pump(rid, queue), name=f"devmapd-events-{self.peer.pid}")
        self.subs[rid] = (task, unsubscribe)

    async def _pump(self, rid: Any, queue: asyncio.Queue) -> None:
        try:
            while True:
                event = await queue.get()
                # The daemon's queue is bounded; a full one means we fell behind (and the daemon
                # stopped feeding it): drop the subscriber rather than serve a gappy stream.
                if queue.maxsize and queue.qsize() >= queue.maxsize - 1:
                    log.warning("dropping subscriber pid %d: %d events behind", self.peer.pid,
                                queue.qsize())
                    break
                await self.send(P.event_frame(rid, event), timeout=self.srv.event_timeout_s)
        except OSError as e:     # _SendTimeout included
            log.warning("dropping slow subscriber pid %d uid %d (%s)", self.peer.pid,
                        self.peer.uid, type(e).__name__)
        except asyncio.CancelledError:
            return
        # A subscriber that cannot keep up loses its connection, not our memory.
        if self.task is not None:
            self.task.cancel()
