"""Host memory, the none backend and the timed worker every hardware call goes through."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from devmapd.devices import CallerBusy, CallTimeout, InventoryBackend, TimedCaller, read_host_memory
from devmapd.devices.none import NoneBackend


def test_host_memory_from_proc_meminfo() -> None:
    host, warning = read_host_memory()
    assert warning is None
    assert host.id == "cpu" and host.kind == "cpu" and host.index is None
    assert host.total > 0 and 0 < host.free <= host.total and host.used == host.total - host.free


def test_host_memory_parses_kb_and_uses_memavailable(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    600 kB\n")
    host, warning = read_host_memory(str(f))
    assert warning is None and (host.total, host.free, host.used) == (1024000, 614400, 409600)
    f.write_text("MemTotal:       1000 kB\nMemFree:         100 kB\n")  # pre-3.14 kernels
    assert read_host_memory(str(f))[0].free == 102400


def test_host_memory_unreadable_is_a_warning(tmp_path: Path) -> None:
    host, warning = read_host_memory(str(tmp_path / "missing"))
    assert host.total == 0 and "cannot read host memory" in warning


def test_none_backend_is_cpu_only() -> None:
    b = NoneBackend()
    assert isinstance(b, InventoryBackend)
    snap = b.snapshot()
    assert snap.backend == "none" and snap.gpus == () and snap.warning is None and snap.host.total > 0
    b.close()


def test_timed_caller_result_exception_timeout_busy_recover() -> None:
    c = TimedCaller("test")
    assert c.call(lambda: 42, timeout=1) == 42
    with pytest.raises(ZeroDivisionError):
        c.call(lambda: 1 / 0, timeout=1)
    gate = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(CallTimeout):
        c.call(gate.wait, timeout=0.1, what="stuck call")
    assert time.monotonic() - t0 < 1
    assert c.busy and "stuck call" in c.hung_description()
    t0 = time.monotonic()
    with pytest.raises(CallerBusy):
        c.call(lambda: 1, timeout=5)
    assert time.monotonic() - t0 < 1.0  # no second wait behind the hung call (5 s if it queued)
    gate.set()
    deadline = time.monotonic() + 5
    while c.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert c.call(lambda: "back", timeout=1) == "back"
    c.close()
