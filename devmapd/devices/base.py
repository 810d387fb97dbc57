"""Device inventory data types and helpers shared by every backend.

The snapshot a backend returns (:class:`Snapshot` of :class:`Device`), the backend protocol,
host memory from ``/proc/meminfo`` and :class:`TimedCaller`, which keeps a hung hardware call
from blocking a poll. Backends import this module; nothing here imports a backend.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = [
    "GpuProcess",
    "Device",
    "Snapshot",
    "InventoryBackend",
    "read_host_memory",
    "TimedCaller",
    "CallTimeout",
    "CallerBusy",
    "MEMINFO_PATH",
]

MEMINFO_PATH = "/proc/meminfo"


@dataclass(frozen=True)
class GpuProcess:
    """A process using a GPU, as the driver reports it."""

    pid: int
    used: int  # bytes; 0 when the driver does not say (NVML_VALUE_NOT_AVAILABLE)
    name: str | None = None


@dataclass(frozen=True)
class Device:
    """One device in a snapshot: a GPU (``cuda:N``) or the host (``cpu``).

    ``utilization`` is the GPU busy percentage (0-100) over the driver's last sample
    period, or None when unknown. ``lost`` means the GPU fell off the bus / needs a reset:
    it must get no placements. ``error`` says what went wrong for this device (lost, or a
    call that timed out, in which case the memory numbers are the last known ones).
    """

    id: str
    index: int | None
    uuid: str
    name: str
    total: int
    free: int
    used: int
    utilization: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    simulated: bool = False
    lost: bool = False
    error: str | None = None
    kind: str = "gpu"  # "gpu" | "cpu"


@dataclass(frozen=True)
class Snapshot:
    """The inventory at one instant."""

    backend: str  # "nvml" | "simulated" | "none"
    gpus: tuple[Device, ...]
    host: Device  # id "cpu": total = MemTotal, free = MemAvailable
    warning: str | None  # why we degraded, if we did
    taken_at: float


@runtime_checkable
class InventoryBackend(Protocol):
    name: str

    def snapshot(self) -> Snapshot:  # never raises, never hangs (timeouts inside)
        ...

    def close(self) -> None: ...


def read_host_memory(path: str = MEMINFO_PATH) -> tuple[Device, str | None]:
    """The host as a ``cpu`` Device, plus a warning when /proc/meminfo could not be read.

    MemAvailable (not MemFree) is the "free" figure: it counts reclaimable page cache,
    which is what a new allocation can actually get.
    """
    fields: dict[str, int] = {}
    warning: str | None = None
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
                    fields[key.strip()] = int(parts[0]) * scale
    except OSError as exc:
        warning = f"cannot read host memory from {path}: {exc.strerror or exc}"
    total = fields.get("MemTotal", 0)
    # Kernels before 3.14 lack MemAvailable; MemFree is the closest (pessimistic) figure.
    free = fields.get("MemAvailable", fields.get("MemFree", 0))
    if warning is None and total == 0:
        warning = f"{path} has no MemTotal line; host memory shown as 0"
    free = max(0, min(free, total))
    host = Device(
        id="cpu",
        index=None,
        uuid="host",
        name="host memory",
        total=total,
        free=free,
        used=total - free,
        kind="cpu",
    )
    return host, warning


def join_warnings(*parts: str | None) -> str | None:
    """Join the non-empty warnings with '; ' (None when there are none)."""
    kept = [p for p in parts if p]
    return "; ".join(kept) if kept else None


class CallTimeout(Exception):
    """A hardware call took longer than its timeout; it is still running in the worker."""


class CallerBusy(Exception):
    """An earlier call timed out and has not returned yet; we refuse to queue behind it."""


T = TypeVar("T")


class TimedCaller:
    """Runs calls in one daemon worker thread, waiting at most ``timeout`` for each.

    Why one thread and not one per call: a driver call that hangs usually holds a driver
    lock, so further calls would pile up behind it. After a timeout the caller is *busy*
    until the hung call returns on its own; every call made meanwhile fails at once with
    :class:`CallerBusy` instead of waiting again. The thread is a daemon thread so a call
    that never returns cannot keep the process from exiting.
    """

    def __init__(self, name: str = "devmapd-inventory") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._hung: Future[Any] | None = None
        self._hung_what = ""
        self._hung_since = 0.0
        self._closed = False

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                fut.set_exception(exc)

    @property
    def busy(self) -> bool:
        """True while a call that timed out has still not returned."""
        with self._lock:
            if self._hung is not None and self._hung.done():
                self._hung = None
            return self._hung is not None

    def hung_description(self) -> str:
        """What is hung and for how long (empty when nothing is)."""
        if not self.busy:
            return ""
        return f"{self._hung_what} has not returned for {time.monotonic() - self._hung_since:.0f}s"

    def call(self, fn: Callable[[], T], *, timeout: float, what: str = "call") -> T:
        """Run ``fn()`` in the worker; return its result or re-raise its exception.

        Raises :class:`CallTimeout` when it takes longer than ``timeout`` (it keeps running;
        the caller is busy until it returns) and :class:`CallerBusy` when an earlier call is
        still hung.
        """
        if self.busy:
            raise CallerBusy(self.hung_description())
        with self._lock:
            if self._closed:
                raise CallerBusy("the inventory backend is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name=self._name, daemon=True)
                self._thread.start()
        fut: Future[T] = Future()
        self._jobs.put((fn, fut))
        try:
            return fut.result(timeout=timeout)
        except TimeoutError:
            with self._lock:
                self._hung = fut
                self._hung_what = what
                self._hung_since = time.monotonic()
            raise CallTimeout(f"{what} did not return within {timeout:g}s") from None

    def close(self) -> None:
        """Stop the worker after its current call (a hung call is abandoned, not joined)."""
        with self._lock:
            self._closed = True
            if self._thread is not None:
                self._jobs.put(None)
