"""Who is connecting (SO_PEERCRED + supplementary groups) and what they may do (AccessPolicy).

The socket file's mode and group are the first gate (whoever cannot open the socket never gets
here); this policy is the second, per operation:

- fetch rights (hello, status, model, fetch, subscribe): anyone who can reach the socket when
  both ``fetch_uids`` and ``fetch_groups`` are empty; otherwise a uid in ``fetch_uids`` or a
  primary/supplementary group in ``fetch_groups``. Operators always have fetch rights.
- operator rights (remap, pin, unpin, evict, reload): root, the daemon's own uid, a uid in
  ``operator_uids`` or a group in ``operator_groups``. Empty operator lists mean root (and the
  daemon's own user) only.

Users and groups may be given as numbers or names; names are resolved once, at construction.

Supplementary groups come from SO_PEERGROUPS (Linux >= 4.13: the kernel's copy taken at
connect(), so no pid-reuse race), else from the "Groups:" line of /proc/<pid>/status.
"""
from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from devmapd.wire.protocol import Peer

__all__ = ["AccessPolicy", "peer_credentials", "peer_groups", "identify"]

_UCRED = struct.Struct("3i")          # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)   # not exported by Python 3.11


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected ``sock``, as the kernel recorded them."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _groups_from_proc(pid: int) -> tuple[int, ...]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


def peer_groups(sock: socket.socket, pid: int) -> tuple[int, ...]:
    """The peer's supplementary group ids (possibly empty)."""
    size = 4 * 64
    for _ in range(4):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == 34 and size < 4 * 65536:   # ERANGE: buffer too small, grow it
                size *= 8
                continue
            break
        n = len(raw) // 4
        return tuple(struct.unpack(f"{n}I", raw[: 4 * n]))
    return _groups_from_proc(pid)


def _uid_of(u: int | str) -> int:
    if isinstance(u, int):
        return u
    if str(u).isdigit():
        return int(u)
    try:
        return pwd.getpwnam(str(u)).pw_uid
    except KeyError:
        raise ValueError(f"unknown user {u!r} in the access policy (config server.*_uids); "
                         "use a uid number or an existing user name") from None


def gid_of(g: int | str) -> int:
    if isinstance(g, int):
        return g
    if str(g).isdigit():
        return int(g)
    try:
        return grp.getgrnam(str(g)).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {g!r} in the access policy (config server.*_groups); "
                         "use a gid number or an existing group name") from None


@dataclass(frozen=True)
class AccessPolicy:
    """Who may fetch and who may operate; see the module docstring for the rules."""
    fetch_uids: tuple[int | str, ...] = ()
    fetch_groups: tuple[int | str, ...] = ()
    operator_uids: tuple[int | str, ...] = ()
    operator_groups: tuple[int | str, ...] = ()

    def __post_init__(self) -> None:
        # Resolve names to numbers once, so a typo fails at start-up rather than on a request.
        object.__setattr__(self, "fetch_uids", tuple(_uid_of(u) for u in self.fetch_uids))
        object.__setattr__(self, "fetch_groups", tuple(gid_of(g) for g in self.fetch_groups))
        object.__setattr__(self, "operator_uids", tuple(_uid_of(u) for u in self.operator_uids))
        object.__setattr__(self, "operator_groups", tuple(gid_of(g) for g in self.operator_groups))

    @staticmethod
    def _in(uid: int, gid: int, groups: Iterable[int], uids: tuple, gids: tuple) -> bool:
        return uid in uids or gid in gids or any(g in gids for g in groups)

    def is_operator(self, uid: int, gid: int, groups: Iterable[int] = ()) -> bool:
        return (uid == 0 or uid == os.geteuid()
                or self._in(uid, gid, groups, self.operator_uids, self.operator_groups))

    def can_fetch(self, uid: int, gid: int, groups: Iterable[int] = ()) -> bool:
        if not self.fetch_uids and not self.fetch_groups:
            return True
        groups = tuple(groups)
        return (self._in(uid, gid, groups, self.fetch_uids, self.fetch_groups)
                or self.is_operator(uid, gid, groups))

    def refusal(self, peer: Peer, op: str, *, operator_op: bool) -> str | None:
        """None when ``peer`` may run ``op``; otherwise a sentence saying why not and what to change."""
        if operator_op:
            if peer.operator:
                return None
            return (f"{op} refused: uid {peer.uid} is not in the operators list "
                    "(config server.operator_uids/operator_groups; root is always an operator)")
        if peer.operator or self.can_fetch(peer.uid, peer.gid, peer.groups):
            return None
        return (f"{op} refused: uid {peer.uid} is not in the fetch list "
                "(config server.fetch_uids/fetch_groups; operators may always fetch)")


def identify(sock: socket.socket, policy: AccessPolicy) -> Peer:
    """The Peer on ``sock`` with its operator flag decided by ``policy``."""
    pid, uid, gid = peer_credentials(sock)
    groups = peer_groups(sock, pid)
    return Peer(pid=pid, uid=uid, gid=gid, groups=groups,
                operator=policy.is_operator(uid, gid, groups))
