"""systemd integration without libsystemd: sd_notify, socket activation, journald logging.

The service manager talks to us through environment variables and one datagram socket:

* ``NOTIFY_SOCKET``: where ``READY=1``, ``STATUS=``, ``WATCHDOG=1``, ``STOPPING=1``,
  ``RELOADING=1`` and the file descriptor store messages (``FDSTORE=1`` with the fds as
  SCM_RIGHTS) go. A path, or ``@name`` for the abstract namespace.
* ``WATCHDOG_USEC`` / ``WATCHDOG_PID``: the watchdog timeout and which process it applies to.
* ``LISTEN_PID`` / ``LISTEN_FDS`` / ``LISTEN_FDNAMES``: fds passed to us from fd 3 on (the
  socket unit's listening socket and whatever we put in the fd store before a restart).
* ``INVOCATION_ID`` / ``JOURNAL_STREAM``: whether we run under systemd and whether stderr is
  connected to the journal.

Everything here is a no-op when those variables are absent, so ``devmapd serve`` behaves
the same in a terminal as under systemd apart from the messages it sends.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from devmapd.textfmt import safe, safe_text

__all__ = [
    "LISTEN_FDNAME",
    "EscapingFormatter",
    "Notifier",
    "configure_logging",
    "journal_stream_matches",
    "listen_fds",
    "listen_socket",
    "running_under_systemd",
    "watchdog_interval",
    "watchdog_timeout",
]

log = logging.getLogger(__name__)

# The FileDescriptorName= of systemd/devmapd.socket: how the daemon finds its listening socket
# among the fds it is handed (the rest come from the fd store, see fdstore.py).
LISTEN_FDNAME = "devmapd-listen"
SEND_TIMEOUT_S = 0.5

# The first fd systemd passes (SD_LISTEN_FDS_START).
_LISTEN_FDS_START = 3
# The kernel refuses more than SCM_MAX_FD (253) fds in one message.
_SCM_MAX_FD = 253
# systemd's FDNAME_MAX.
_FDNAME_MAX = 255


def _address(value: str) -> bytes:
    """NOTIFY_SOCKET value -> sockaddr_un path bytes ('@' means the abstract namespace)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value.encode()
    raise ValueError(
        f"NOTIFY_SOCKET={value!r} is neither an absolute path nor an '@' abstract address; "
        "devmapd only speaks AF_UNIX to the service manager (vsock is not supported)"
    )


def _fdname_ok(name: str) -> bool:
    # systemd's fdname_is_valid(): printable ASCII, no ':', at most 255 characters.
    return 0 < len(name) <= _FDNAME_MAX and all(32 <= ord(c) < 127 and c != ":" for c in name)


class Notifier:
    """sd_notify client. Every method is a no-op (returning False) without ``NOTIFY_SOCKET``.

    Send failures are logged once and reported by returning False: losing a STATUS update
    must never take the daemon down. The watchdog is the exception that proves the rule:
    if WATCHDOG=1 stops arriving, systemd restarts us, which is what we want.
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address = _address(address) if address else None
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, unset: bool = False) -> Notifier:
        """Read NOTIFY_SOCKET and WATCHDOG_USEC/WATCHDOG_PID.

        ``unset=True`` removes them from ``os.environ`` so child processes (the daemon spawns
        none today) cannot speak for us; NotifyAccess=main enforces the same on systemd's side.
        """
        env = os.environ if env is None else env
        notifier = cls(env.get("NOTIFY_SOCKET") or None, watchdog_usec=_watchdog_usec(env))
        if unset and env is os.environ:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._address is not None

    # -- the messages -------------------------------------------------------------------
    def ready(self, status: str | None = None) -> bool:
        """READY=1 (optionally with STATUS=): send only once the socket accepts connections."""
        lines = ["READY=1"]
        if status is not None:
            lines.append(_status_line(status))
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        """STATUS=<one line>, shown by `systemctl status devmapd`."""
        return self.notify(_status_line(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: send from the main loop, and only while it is healthy."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(_status_line(status))
        return self.notify(*lines)

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC, as systemd >= 253 requires for
        Type=notify-reload; older systemd ignores the extra field). Follow with ready()."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = ["RELOADING=1", f"MONOTONIC_USEC={usec}"]
        if status is not None:
            lines.append(_status_line(status))
        return self.notify(*lines)

    def fdstore(self, fds: Sequence[int], name: str, *, poll: bool = False) -> bool:
        """Hand ``fds`` to systemd's fd store under FDNAME=``name`` (needs FileDescriptorStoreMax=).

        systemd keeps duplicates; the caller still owns (and may close) its own fds.
        ``poll=False`` sends FDPOLL=0: memfds never signal POLLHUP, and we do not want systemd
        to drop an entry on its own.
        """
        if not _fdname_ok(name):
            raise ValueError(
                f"invalid fd store name {name!r}: use 1-255 printable ASCII characters without ':'"
            )
        if not fds:
            return True
        ok = True
        for start in range(0, len(fds), _SCM_MAX_FD):
            chunk = list(fds[start : start + _SCM_MAX_FD])
            lines = ["FDSTORE=1", f"FDNAME={name}"]
            if not poll:
                lines.append("FDPOLL=0")
            ok = self.notify(*lines, fds=chunk) and ok
        return ok

    def fdstore_remove(self, name: str) -> bool:
        """FDSTOREREMOVE=1: systemd closes every stored fd called ``name``."""
        if not _fdname_ok(name):
            raise ValueError(f"invalid fd store name {name!r}")
        return self.notify("FDSTOREREMOVE=1", f"FDNAME={name}")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the configured WatchdogSec=), or None."""
        if not self._watchdog_usec:
            return None
        return self._watchdog_usec / 2e6

    # -- transport ----------------------------------------------------------------------
    def notify(self, *lines: str, fds: Sequence[int] = ()) -> bool:
        """Send one datagram of newline-separated ``KEY=value`` lines (+ fds). True if sent."""
        if self._address is None:
            return False
        payload = "\n".join(lines).encode()
        ancillary = []
        if fds:
            ancillary.append(
                (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [int(fd) for fd in fds]).tobytes())
            )
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # The daemon notifies from its event loop: a service manager that stops reading
                    # (a full datagram queue) may cost us a bounded wait, never a hang.
                    self._sock.settimeout(SEND_TIMEOUT_S)
                sent = self._sock.sendmsg([payload], ancillary, 0, self._address)
            except OSError as exc:
                if not self._warned:
                    log.warning("could not notify the service manager at %s: %s", self.address, exc)
                    self._warned = True
                return False
        return sent == len(payload)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __repr__(self) -> str:
        return f"Notifier({self.address!r})"


def _status_line(text: str) -> str:
    # STATUS is one line: a newline would start a new (bogus) assignment.
    return "STATUS=" + " ".join(str(text).split())


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # the watchdog is meant for another process (e.g. our parent)
        except ValueError:
            return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
        return None
    return usec if usec > 0 else None


def watchdog_timeout(env: Mapping[str, str] | None = None) -> float | None:
    """The WatchdogSec= timeout in seconds for this process, or None when not enabled."""
    usec = _watchdog_usec(os.environ if env is None else env)
    return usec / 1e6 if usec else None


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """How often to send WATCHDOG=1: half the timeout, as sd_watchdog_enabled(3) advises."""
    timeout = watchdog_timeout(env)
    return timeout / 2 if timeout else None


def listen_fds(unset: bool = True) -> dict[str, list[int]]:
    """Fds passed by systemd (socket activation + fd store), grouped by name, in fd order.

    Returns {} unless LISTEN_PID is our pid. Every fd gets FD_CLOEXEC, and with ``unset`` the
    three variables are removed so no child mistakes them for its own. Unnamed fds are called
    "unknown", as sd_listen_fds_with_names(3) does.
    """
    env = os.environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        pid, count = -1, 0
    names_raw = env.get("LISTEN_FDNAMES")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return {}
    names = names_raw.split(":") if names_raw is not None else []
    if len(names) != count:
        if names_raw is not None:
            log.warning("LISTEN_FDNAMES has %d names for %d fds; calling them 'unknown'", len(names), count)
        names = ["unknown"] * count
    result: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        fd = _LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:  # systemd promised it; say so rather than crash on a bad handoff
            log.warning("LISTEN_FDS fd %d (%s) is not open: %s", fd, name, exc)
            continue
        result.setdefault(name or "unknown", []).append(fd)
    return result


def listen_socket(fds: Mapping[str, list[int]], name: str = LISTEN_FDNAME) -> socket.socket | None:
    """The listening AF_UNIX stream socket named ``name`` among ``listen_fds()``, or None.

    The socket is non-blocking (asyncio wants that) and ready for ``asyncio.start_unix_server(
    sock=...)``. The daemon must not unlink its path on exit: the socket unit owns it.
    """
    for fd in fds.get(name, []):
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            log.warning("fd %d named %s is not a socket; ignoring it", fd, name)
            continue
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            log.warning("fd %d named %s is %s/%s, not a Unix stream socket", fd, name, sock.family, sock.type)
            sock.detach()
            continue
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            log.warning("fd %d named %s is not listening", fd, name)
            sock.detach()
            continue
        sock.setblocking(False)
        return sock
    return None


def journal_stream_matches(fd: int = 2, env: Mapping[str, str] | None = None) -> bool:
    """True when ``fd`` is the journal stream systemd set up (JOURNAL_STREAM=<dev>:<ino>)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def running_under_systemd(env: Mapping[str, str] | None = None) -> bool:
    """True when started by systemd as a service (INVOCATION_ID) or logging to the journal."""
    env = os.environ if env is None else env
    return bool(env.get("INVOCATION_ID")) or journal_stream_matches(2, env)


# Python level -> syslog priority (sd-daemon(3) SD_* prefixes).
_SYSLOG_PRIORITY = (
    (logging.CRITICAL, 2),  # SD_CRIT
    (logging.ERROR, 3),  # SD_ERR
    (logging.WARNING, 4),  # SD_WARNING
    (logging.INFO, 6),  # SD_INFO
)


def syslog_priority(levelno: int) -> int:
    for threshold, priority in _SYSLOG_PRIORITY:
        if levelno >= threshold:
            return priority
    return 7  # SD_DEBUG


# Every line of a record after its first starts with this, so no continuation line (a
# traceback, an exception message holding a newline) can look like a record of its own.
CONTINUATION = "  | "


class EscapingFormatter(logging.Formatter):
    """A Formatter after which no log line can be forged, whatever the call site logs.

    Model names come from files and clients: a name holding a newline could otherwise write a
    whole fake record ('... CRITICAL devmapd: FAKE'), and ESC/BEL would reach the terminal of
    whoever tails the log. So the message (arguments merged) and the logger name are made one
    line by :func:`devmapd.textfmt.safe` (``\\n``, ``\\x1b``, ...); the traceback and stack text
    keep their lines, each escaped, and every line after the record's first starts with
    :data:`CONTINUATION`. The record itself is left untouched for other handlers.
    """

    def format(self, record: logging.LogRecord) -> str:
        clean = logging.makeLogRecord(record.__dict__)
        clean.name = safe(record.name)
        clean.msg, clean.args = safe(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            clean.exc_text = self.formatException(record.exc_info)
        clean.exc_info = None
        if clean.exc_text:
            clean.exc_text = safe_text(clean.exc_text)
        if clean.stack_info:
            clean.stack_info = safe_text(clean.stack_info)
        text = super().format(clean)
        first, sep, rest = text.partition("\n")
        if not sep:
            return first
        return first + "\n" + "\n".join(CONTINUATION + line for line in rest.split("\n"))


class JournalFormatter(EscapingFormatter):
    """'<N>logger: message' with the <N> prefix on EVERY line, so a traceback's lines keep
    the record's priority in the journal instead of falling back to the unit's default."""

    def __init__(self, prefix: bool) -> None:
        super().__init__("%(name)s: %(message)s")
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.prefix:
            return text
        tag = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(tag + line for line in text.split("\n"))


_HANDLER_MARK = "_devmapd_handler"


def configure_logging(level: int | str = logging.INFO, under_systemd: bool | None = None) -> logging.Handler:
    """Set up the root logger on stderr; idempotent (replaces the handler it added before).

    Under systemd: no timestamps of our own (the journal stamps every line) and, when stderr
    is the journal stream, <N> syslog prefixes so `journalctl -p warning -u devmapd` works.
    Elsewhere: '2026-01-01 12:00:00,000 WARNING devmapd.daemon: ...'. Either way through an
    :class:`EscapingFormatter`: one line per record plus marked continuation lines, control
    characters escaped, so a model name cannot forge a log line.
    """
    if under_systemd is None:
        under_systemd = running_under_systemd()
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ValueError(f"unknown log level {level!r}: use debug, info, warning, error or critical")
        level = resolved
    handler = logging.StreamHandler(sys.stderr)
    if under_systemd:
        handler.setFormatter(JournalFormatter(prefix=journal_stream_matches(2)))
    else:
        handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
