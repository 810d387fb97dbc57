"""The ``simulated`` inventory backend: GPUs described by a JSON file (``--simulate FILE``).

Format (DESIGN.md "Simulated devices")::

    {"gpus": [{"name": "Sim A100", "uuid": "GPU-sim-0", "total_mib": 40960,
               "used_by_others_mib": 1024,
               "utilization": 12.5,                                # optional, percent
               "processes": [{"pid": 4242, "used_mib": 1024, "name": "train.py"}],  # optional
               "error": "lost"},                                   # optional, see below
              ...]}

Ids are ``cuda:0``, ``cuda:1``, ... in file order. The file is re-read at EVERY snapshot so a
test creates or removes pressure by writing a new file and renaming it into place. A missing
or bad file keeps the last good device list and sets a warning saying what is wrong.

``free = total - used_by_others - held``: "GPU" tensors of a simulated device live in host
memory, so the daemon tells this backend what it holds per device (:meth:`set_held`) and the
backend adds it, as NVML would show devmapd's own allocations. devmapd's own usage also shows
up as a process (this pid) in the device's process list, as it would under NVML.

``"error"`` simulates NVML failures:

* ``"lost"``: the GPU is lost (like NVML_ERROR_GPU_IS_LOST): ``lost=True``, free 0.
* ``"hang"``: the query for that GPU blocks in the inventory worker thread until the field is
  removed from the file (or the backend closes). The snapshot waits ``call_timeout_s`` once,
  then marks the backend degraded and shows the device's last known numbers with ``error``
  set; later snapshots do not wait on it again. Other GPUs are unaffected.
* ``"driver_mismatch"`` / ``"no_driver"``: the whole backend degrades to CPU-only with the
  reason NVML would give, as long as the field is in the file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from devmapd.devices.base import (
    MEMINFO_PATH,
    CallerBusy,
    CallTimeout,
    Device,
    GpuProcess,
    Snapshot,
    TimedCaller,
    join_warnings,
    read_host_memory,
)

MIB = 1 << 20
SIMULATED_ERRORS = ("lost", "hang", "driver_mismatch", "no_driver")

# Same wording as the real NVML degradations in nvml.py, so operators see one vocabulary.
_BACKEND_ERRORS = {
    "driver_mismatch": "NVML library and kernel driver versions differ (simulated): running CPU-only",
    "no_driver": "NVIDIA driver is not loaded (simulated): running CPU-only",
}


@dataclass(frozen=True)
class SimGpu:
    """One GPU as the simulate file describes it (bytes, not MiB)."""

    name: str
    uuid: str
    total: int
    used_by_others: int
    error: str | None = None
    utilization: float | None = None
    processes: tuple[GpuProcess, ...] = ()


def _mib(value: Any, where: str, *, minimum: float = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < minimum:
        raise ValueError(f"{where} must be a number >= {minimum:g}, got {value!r}")
    return int(round(value * MIB))


def parse_simulate(data: Any) -> tuple[SimGpu, ...]:
    """Validate the decoded JSON of a simulate file; raise ValueError saying what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("gpus"), list):
        raise ValueError('the top level must be an object with a "gpus" list, e.g. {"gpus": []}')
    gpus: list[SimGpu] = []
    seen: set[str] = set()
    for i, g in enumerate(data["gpus"]):
        where = f"gpus[{i}]"
        if not isinstance(g, dict):
            raise ValueError(f"{where} must be an object")
        name, uuid = g.get("name"), g.get("uuid")
        if not isinstance(name, str) or not name:
            raise ValueError(f'{where} needs a "name" string')
        if not isinstance(uuid, str) or not uuid:
            raise ValueError(f'{where} needs a "uuid" string')
        if uuid in seen:
            raise ValueError(f"{where} repeats uuid {uuid!r}; every GPU needs its own")
        seen.add(uuid)
        if "total_mib" not in g:
            raise ValueError(f'{where} needs "total_mib"')
        total = _mib(g["total_mib"], f"{where}.total_mib", minimum=1)
        others = _mib(g.get("used_by_others_mib", 0), f"{where}.used_by_others_mib")
        error = g.get("error")
        if error is not None and error not in SIMULATED_ERRORS:
            raise ValueError(f"{where}.error must be one of {', '.join(SIMULATED_ERRORS)}, got {error!r}")
        util = g.get("utilization")
        if util is not None:
            if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 <= util <= 100:
                raise ValueError(f"{where}.utilization must be a percentage 0-100, got {util!r}")
            util = float(util)
        procs: list[GpuProcess] = []
        raw_procs = g.get("processes", [])
        if not isinstance(raw_procs, list):
            raise ValueError(f"{where}.processes must be a list")
        for j, p in enumerate(raw_procs):
            pw = f"{where}.processes[{j}]"
            if not isinstance(p, dict) or isinstance(p.get("pid"), bool) or not isinstance(p.get("pid"), int):
                raise ValueError(f'{pw} must be an object with an integer "pid"')
            pname = p.get("name")
            if pname is not None and not isinstance(pname, str):
                raise ValueError(f"{pw}.name must be a string")
            procs.append(GpuProcess(pid=p["pid"], used=_mib(p.get("used_mib", 0), f"{pw}.used_mib"), name=pname))
        gpus.append(SimGpu(name, uuid, total, others, error, util, tuple(procs)))
    return tuple(gpus)


class SimulatedBackend:
    """Inventory read from a JSON file at every snapshot."""

    name = "simulated"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        call_timeout_s: float = 1.0,
        meminfo_path: str = MEMINFO_PATH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.fspath(path)
        self.call_timeout_s = call_timeout_s
        self._meminfo_path = meminfo_path
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._last_good: tuple[SimGpu, ...] | None = None
        self._last_devices: dict[str, Device] = {}  # uuid -> last good Device, for hangs
        self._hangs: dict[str, threading.Event] = {}  # uuid -> released when the hang ends
        self._caller = TimedCaller("devmapd-simulated-inventory")

    def set_held(self, held: Mapping[str, int]) -> None:
        """What devmapd holds now per device id (``cuda:N`` -> bytes); replaces the old map."""
        clean = {str(k): max(0, int(v)) for k, v in held.items()}
        with self._lock:
            self._held = clean

    def _read(self) -> tuple[tuple[SimGpu, ...], str | None]:
        problem: str | None = None
        try:
            with open(self.path, encoding="utf-8") as f:
                gpus = parse_simulate(json.load(f))
        except FileNotFoundError:
            problem = f"simulate file {self.path} does not exist"
        except OSError as exc:
            problem = f"cannot read simulate file {self.path}: {exc.strerror or exc}"
        except json.JSONDecodeError as exc:
            problem = f"simulate file {self.path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        except UnicodeDecodeError:
            problem = f"simulate file {self.path} is not UTF-8 text"
        except ValueError as exc:
            problem = f"simulate file {self.path}: {exc}"
        else:
            self._last_good = gpus
            return gpus, None
        if self._last_good is None:
            return (), f"{problem}; no simulated GPUs until it is fixed"
        return self._last_good, f"{problem}; keeping the last good device list"

    def _release_hangs(self, still_hanging: set[str]) -> None:
        for uuid in list(self._hangs):
            if uuid not in still_hanging:
                self._hangs.pop(uuid).set()

    def _query_hung(self, device_id: str, gpu: SimGpu) -> str:
        """Run the blocking "NVML call" for a GPU marked hang; return the error to show."""
        if gpu.uuid not in self._hangs:
            event = threading.Event()
            try:
                self._caller.call(event.wait, timeout=self.call_timeout_s, what=f"simulated NVML query of {device_id}")
            except CallTimeout as exc:
                self._hangs[gpu.uuid] = event
                return f"NVML call timed out ({exc}); showing last known numbers"
            except CallerBusy as exc:
                event.set()
                return f"not queried: an earlier NVML call is still hung ({exc}); showing last known numbers"
        return f"NVML call for this GPU is hung ({self._caller.hung_description() or 'still pending'}); showing last known numbers"

    def snapshot(self) -> Snapshot:
        host, host_warning = read_host_memory(self._meminfo_path)
        gpus, file_warning = self._read()
        with self._lock:
            held = dict(self._held)
        now = self._clock()
        self._release_hangs({g.uuid for g in gpus if g.error == "hang"})

        backend_error = next((_BACKEND_ERRORS[g.error] for g in gpus if g.error in _BACKEND_ERRORS), None)
        if backend_error is not None:
            return Snapshot(self.name, (), host, join_warnings(backend_error, file_warning, host_warning), now)

        devices: list[Device] = []
        hung: list[str] = []
        for index, g in enumerate(gpus):
            device_id = f"cuda:{index}"
            if g.error == "lost":
                devices.append(
                    Device(device_id, index, g.uuid, g.name, g.total, 0, g.total, None, (), True, True,
                           "GPU is lost (simulated NVML_ERROR_GPU_IS_LOST): it gets no placements")
                )
                continue
            if g.error == "hang":
                error = self._query_hung(device_id, g)
                hung.append(device_id)
                last = self._last_devices.get(g.uuid)
                if last is not None and last.total == g.total:
                    devices.append(Device(device_id, index, g.uuid, g.name, last.total, last.free, last.used,
                                          last.utilization, last.processes, True, False, error))
                else:
                    devices.append(Device(device_id, index, g.uuid, g.name, g.total, 0, g.total, None, (), True, False, error))
                continue
            mine = held.get(device_id, 0)
            free = max(0, g.total - g.used_by_others - mine)
            procs = g.processes
            if mine:
                procs = procs + (GpuProcess(pid=os.getpid(), used=mine, name="devmapd (simulated GPU memory)"),)
            dev = Device(device_id, index, g.uuid, g.name, g.total, free, g.total - free, g.utilization, procs, True)
            self._last_devices[g.uuid] = dev
            devices.append(dev)

        hang_warning = None
        if hung:
            hang_warning = (f"inventory degraded: NVML calls for {', '.join(hung)} time out "
                            f"(simulated hang after {self.call_timeout_s:g}s); not waiting on them again until they return")
        return Snapshot(self.name, tuple(devices), host, join_warnings(hang_warning, file_warning, host_warning), now)

    def close(self) -> None:
        """Release any simulated hang so the worker thread ends, then stop it."""
        self._release_hangs(set())
        self._caller.close()
