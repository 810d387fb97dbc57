"""The ``none`` inventory backend: no GPUs, host memory only.

Used with ``devices.backend = "none"`` (or on machines where the operator wants devmapd to
never touch a GPU). The host memory is read from /proc/meminfo at every snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from devmapd.devices.base import MEMINFO_PATH, Snapshot, read_host_memory


class NoneBackend:
    """CPU-only inventory."""

    name = "none"

    def __init__(self, *, meminfo_path: str = MEMINFO_PATH, clock: Callable[[], float] = time.time) -> None:
        self._meminfo_path = meminfo_path
        self._clock = clock

    def snapshot(self) -> Snapshot:
        host, warning = read_host_memory(self._meminfo_path)
        return Snapshot(backend=self.name, gpus=(), host=host, warning=warning, taken_at=self._clock())

    def close(self) -> None:
        """Nothing to release."""
