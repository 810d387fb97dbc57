"""File descriptors: the daemon's limit, how many it holds open, and the reserve it keeps.

Every served model holds at least one sealed memfd (plus one per extra device segment and a
host copy), so the number of models devmapd can serve is bounded by ``RLIMIT_NOFILE``. Its soft
limit is 1024 by default, under systemd too; :func:`raise_soft_limit` lifts it to the hard limit
at start (the unit also sets ``LimitNOFILE=``, since its system-call filter refuses
``setrlimit``). :class:`FdBudget` counts the open fds against the current soft limit and refuses
a new load, with a diagnosis naming the limit and the fix, while fewer than a reserve remain:
the reserve is what connections, fetches and the next poll need, so the models already ready
keep serving instead of every fetch failing with ``Too many open files``.

Owns nothing but that arithmetic; the load queue asks :meth:`FdBudget.refusal` before each load
and the status view shows :meth:`FdBudget.status`.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable

from devmapd.engine.diagnose import Diagnosis
from devmapd.textfmt import safe

log = logging.getLogger("devmapd")

RESERVE_MIN = 64  # fds always kept for connections, fetches and polling
RESERVE_FRACTION = 0.05  # ...or this share of the limit, whichever is larger
RECOUNT_S = 1.0  # a count of open fds is reused this long while far from the limit
_FD_DIR = "/proc/self/fd"


def _nr_open() -> int:
    """The kernel's ceiling for RLIMIT_NOFILE (an "unlimited" hard limit means this)."""
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return 1 << 20


def current_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _nr_open() if soft == resource.RLIM_INFINITY else int(soft)


def raise_soft_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard limit; returns (before, after) and logs what it did.

    A refusal (a seccomp filter, a container) is logged and the daemon goes on with the limit it
    has: the budget below then keeps it from running out.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _nr_open() if hard == resource.RLIM_INFINITY else int(hard)
    before = _nr_open() if soft == resource.RLIM_INFINITY else int(soft)
    if before >= target:
        log.info("file descriptor limit: %d (soft = hard)", before)
        return before, before
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the file descriptor limit from %d to its hard limit %d (%s); set "
                    "LimitNOFILE= in the unit (or `ulimit -n` before `devmapd serve`) to serve more models",
                    before, target, exc)
        return before, before
    log.info("file descriptor limit raised from %d to %d (the hard limit)", before, target)
    return before, target


class FdBudget:
    """Open fds against the limit, and whether a new load may still take some (see the module docstring)."""

    def __init__(self, *, reserve_min: int = RESERVE_MIN, reserve_fraction: float = RESERVE_FRACTION,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._reserve_min = reserve_min
        self._reserve_fraction = reserve_fraction
        self._clock = clock
        self._counted: tuple[float, int] | None = None   # (when, how many) of the last listing

    def _open_now(self, limit: int, *, headroom: int = 0) -> int:
        """Open fds, listed again only when the last count is over a second old or ``headroom``
        (fds left) was within the margin: listing /proc/self/fd costs ~0.7 ms at 1,000 fds, and
        a start-up over a whole directory asks once per load."""
        now = self._clock()
        last = self._counted
        if last is not None and now - last[0] < RECOUNT_S and limit - last[1] > headroom:
            return last[1]
        opened = self.open_fds(limit)
        self._counted = (now, opened)
        return opened

    def reserve(self, limit: int) -> int:
        return max(self._reserve_min, int(limit * self._reserve_fraction))

    @staticmethod
    def open_fds(limit: int) -> int:
        """How many fds this process has open now (the listing's own fd not counted)."""
        try:
            return max(0, len(os.listdir(_FD_DIR)) - 1)
        except OSError:  # EMFILE: not even one more fd to list them with
            return limit

    def status(self) -> dict[str, int]:
        limit = current_limit()
        return {"open": self._open_now(limit), "limit": limit, "reserve": self.reserve(limit)}

    def refusal(self, name: str) -> Diagnosis | None:
        """Why a load of ``name`` must not start now, or None when fds are left for it."""
        limit = current_limit()
        reserve = self.reserve(limit)
        # A fresh count is taken whenever fewer than four reserves were left at the last one, so
        # a burst of loads within the second cannot slip past the reserve unseen.
        opened = self._open_now(limit, headroom=4 * reserve)
        if limit - opened >= reserve:
            return None
        return Diagnosis(
            "io_error",
            f"{safe(name)} was not loaded: devmapd has {opened} of its {limit} file descriptors open (each served "
            f"model holds at least one) and keeps the last {reserve} for the models already serving; raise "
            f"LimitNOFILE= in devmapd.service (or `ulimit -n` before `devmapd serve`), restart, and reload it",
            detail=f"RLIMIT_NOFILE soft limit {limit}, {opened} open, reserve {reserve}")
