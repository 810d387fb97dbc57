"""A pynvml-like module object for tests on a machine without an NVIDIA driver.

The real pynvml cannot run here (no libnvidia-ml.so.1), so the nvml backend is exercised
against this stand-in, injected through ``NvmlBackend(nvml_module=...)``. It raises the REAL
pynvml exception classes and uses the real constants, so the backend's error handling is tested
against what pynvml actually raises.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

MIB = 1 << 20


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA Fake 24GB"
    total: int = 24576 * MIB
    used: int = 1024 * MIB
    util: int = 7
    pci: str = "00000000:01:00.0"
    compute: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, bytes or None)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)
    # method name -> an NVML error code to raise, or a threading.Event to block on (a hang)
    fail: dict[str, Any] = field(default_factory=dict)


class FakeNvml:
    """Module-like: attribute access mirrors pynvml's API surface used by the backend."""

    NVMLError = pynvml.NVMLError

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.count_error: int | None = None
        self.count_hang: threading.Event | None = None
        self.init_calls = 0
        self.shutdown_calls = 0
        self.initialised = False
        for name in dir(pynvml):
            if name.startswith("NVML_ERROR_") or name.startswith("NVMLError_"):
                setattr(self, name, getattr(pynvml, name))

    # -- library --
    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self.initialised = False

    def _check(self) -> None:
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        if self.count_hang is not None:
            self.count_hang.wait()
        if self.count_error is not None:
            raise pynvml.NVMLError(self.count_error)
        return len(self.gpus)

    # -- per device --
    def _gpu(self, handle: int, method: str) -> FakeGpu:
        self._check()
        gpu = self.gpus[handle]
        how = gpu.fail.get(method)
        if isinstance(how, threading.Event):
            how.wait()
        elif how is not None:
            raise pynvml.NVMLError(how)
        return gpu

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._gpu(index, "handle")
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self._gpu(handle, "uuid").uuid

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self._gpu(handle, "name").name.encode()  # older pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        g = self._gpu(handle, "memory")
        return SimpleNamespace(total=g.total, used=g.used, free=g.total - g.used)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=self._gpu(handle, "util").util, memory=0)

    def nvmlDeviceGetPciInfo(self, handle: int) -> Any:
        return SimpleNamespace(busId=self._gpu(handle, "pci").pci)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        g = self._gpu(handle, "compute")
        return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in g.compute]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[Any]:
        g = self._gpu(handle, "graphics")
        return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in g.graphics]
