"""The ``nvml`` inventory backend: real NVIDIA GPUs through pynvml (nvidia-ml-py).

This is the ONLY module of devmapd that imports pynvml. It reports, per GPU visible to CUDA:
UUID, name, total/free/used memory, utilisation and the processes using it.

Numbering. Devices are keyed by UUID; the id ``cuda:N`` is the index torch will use in this
process. NVML enumerates in PCI bus order; CUDA numbers the devices named by
``CUDA_VISIBLE_DEVICES`` (indices, or ``GPU-``/``MIG-`` UUID prefixes, parsed by the same rules
torch uses) in the order listed, and all devices otherwise. Without torch we assume CUDA's order
is PCI bus order, which holds when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or all GPUs are the same
model; otherwise the snapshot warns, and the daemon can confirm the numbering with torch once
CUDA is initialised by calling :meth:`NvmlBackend.match_torch_indices`.

Degrade, never crash:

* pynvml missing, ``libnvidia-ml.so.1`` missing, driver not loaded, library/driver version
  mismatch, or init that hangs -> a CPU-only snapshot whose warning says why; init is retried
  every ``retry_every`` snapshots. Such a snapshot says ``backend="none"``: it is what serves
  then (status reports the backend that actually serves, the warning says why and that NVML is
  being retried); it says ``"nvml"`` again from the first snapshot NVML answers.
* one GPU lost (GPU_IS_LOST, RESET_REQUIRED, ...) -> that device ``lost=True`` with ``error``;
  the others are reported normally.
* a call that hangs -> every NVML call runs in a worker thread with ``call_timeout_s``; after a
  timeout the backend is degraded (devices show their last known numbers with ``error`` set) and
  the hung call is not waited on again: later snapshots return at once until it comes back.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
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

log = logging.getLogger("devmapd.devices")

# The backend a snapshot names when NVML cannot be used and only the host memory is reported.
CPU_ONLY_BACKEND = "none"

# NVML return codes (nvml.h); read from the module when it has them, these are the fallbacks.
_CODES = {
    "UNINITIALIZED": 1,
    "NOT_SUPPORTED": 3,
    "NO_PERMISSION": 4,
    "DRIVER_NOT_LOADED": 9,
    "TIMEOUT": 10,
    "LIBRARY_NOT_FOUND": 12,
    "FUNCTION_NOT_FOUND": 13,
    "GPU_IS_LOST": 15,
    "RESET_REQUIRED": 16,
    "LIB_RM_VERSION_MISMATCH": 18,
    "GPU_NOT_FOUND": 28,
}
# 2**64 - 1: NVML_VALUE_NOT_AVAILABLE for unsigned long long (per-process memory under WDDM/MIG).
_NOT_AVAILABLE_ULL = (1 << 64) - 1


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def normalize_uuid(uuid: str) -> str:
    """Compare UUIDs the way torch and NVML can both be matched: no ``GPU-`` prefix, lower case.

    NVML says ``GPU-8f6c...``; ``torch.cuda.get_device_properties(i).uuid`` prints ``8f6c...``.
    """
    u = uuid.strip().lower()
    return u[4:] if u.startswith("gpu-") else u


# --------------------------------------------------------------------------------------------
# CUDA_VISIBLE_DEVICES -> cuda:N numbering (pure; mirrors torch.cuda._parse_visible_devices)
# --------------------------------------------------------------------------------------------


def _strtoul(s: str) -> int:
    """The leading integer of ``s`` like C strtoul as CUDA uses it ("1gpu" -> 1), else -1."""
    digits = ""
    for i, c in enumerate(s):
        if c.isdigit() or (i == 0 and c in "+-"):
            digits += c
        else:
            break
    try:
        return int(digits)
    except ValueError:
        return -1


def cuda_numbering(
    uuids: Sequence[str], visible: str | None
) -> tuple[list[str], str | None]:
    """The UUIDs CUDA will number 0, 1, ... given NVML's ``uuids`` (PCI bus order) and
    ``CUDA_VISIBLE_DEVICES`` (``visible``, None when unset). Returns (uuids in cuda order, warning).

    Rules (CUDA's, as torch implements them): integer entries index the device list; parsing
    stops at the first invalid or out-of-range entry; a repeated entry makes the list empty;
    ``GPU-`` entries are UUID prefixes that must match exactly one device; ``MIG-`` instances
    are not enumerated by devmapd.
    """
    if visible is None:
        return list(uuids), None
    var = visible.strip()
    if var == "":
        return [], "CUDA_VISIBLE_DEVICES is empty: no GPU is visible to devmapd"
    entries = [e.strip() for e in var.split(",")]
    if var.startswith("MIG-"):
        return [], ("CUDA_VISIBLE_DEVICES names MIG instances; devmapd does not enumerate MIG devices, "
                    "so it places nothing on them: name whole GPUs (GPU-... or indices) instead")
    out: list[str] = []
    if var.startswith("GPU-"):
        for e in entries:
            if not e.startswith("GPU-"):
                break
            matches = [u for u in uuids if u.lower().startswith(e.lower())]
            if len(matches) != 1:
                return out, _truncated(visible, e, "matches no GPU" if not matches else "matches several GPUs")
            if matches[0] in out:
                return [], f"CUDA_VISIBLE_DEVICES={visible!r} repeats {e}: CUDA then sees no GPU at all"
            out.append(matches[0])
        return out, None
    for e in entries:
        n = _strtoul(e)
        if n < 0:
            return out, (None if e == "" else _truncated(visible, e, "is not a device index"))
        if n >= len(uuids):
            return out, _truncated(visible, e, f"is out of range ({len(uuids)} GPUs)")
        if uuids[n] in out:
            return [], f"CUDA_VISIBLE_DEVICES={visible!r} repeats {e}: CUDA then sees no GPU at all"
        out.append(uuids[n])
    return out, None


def _truncated(visible: str, entry: str, why: str) -> str:
    return f"CUDA_VISIBLE_DEVICES={visible!r}: entry {entry!r} {why}; CUDA ignores it and every entry after it"


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Raw:
    """What one worker-thread query learned about one NVML device."""

    nvml_index: int
    uuid: str | None
    name: str = ""
    total: int = 0
    free: int = 0
    used: int = 0
    utilization: float | None = None
    processes: tuple[tuple[int, int], ...] = ()  # (pid, bytes)
    pci_bus_id: str | None = None
    lost: bool = False
    error: str | None = None


class _BackendDown(Exception):
    """NVML as a whole stopped working (driver unloaded, version mismatch): go CPU-only."""


class NvmlBackend:
    """Inventory through NVML. See the module docstring for numbering and degradation."""

    name = "nvml"

    def __init__(
        self,
        *,
        nvml_module: Any = None,
        call_timeout_s: float = 2.0,
        retry_every: int = 10,
        environ: Mapping[str, str] | None = None,
        meminfo_path: str = MEMINFO_PATH,
        clock: Callable[[], float] = time.time,
        process_names: bool = True,
    ) -> None:
        """``nvml_module``: a pynvml-like module (tests inject one); default: import pynvml.
        ``retry_every``: while NVML is unusable, retry init every this many snapshots.
        ``environ``: where CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER are read (default os.environ).
        """
        self._nvml = nvml_module
        self.call_timeout_s = call_timeout_s
        self.retry_every = max(1, int(retry_every))
        self._environ = environ if environ is not None else os.environ
        self._meminfo_path = meminfo_path
        self._clock = clock
        self._process_names = process_names
        self._caller = TimedCaller("devmapd-nvml")
        self._initialised = False
        self._reason: str | None = None  # why we are CPU-only, while we are
        self._polls_until_retry = 0  # 0: try init at the next snapshot
        self._last: dict[str, Device] = {}  # uuid -> last good Device
        self._last_uuid_at: dict[int, str] = {}  # nvml index -> uuid, to name a device lost early
        self._torch_order: dict[str, int] | None = None  # normalized uuid -> torch index, once confirmed
        self.init_attempts = 0

    # ---- init / degrade ---------------------------------------------------------------------

    def _code(self, name: str) -> int:
        return int(getattr(self._nvml, f"NVML_ERROR_{name}", _CODES[name]))

    def _is_nvml_error(self, exc: BaseException) -> bool:
        cls = getattr(self._nvml, "NVMLError", None)
        return isinstance(cls, type) and isinstance(exc, cls)

    def _backend_reason(self, exc: BaseException) -> str | None:
        """A plain sentence when ``exc`` means NVML as a whole is unusable, else None."""
        if not self._is_nvml_error(exc):
            return None
        code = getattr(exc, "value", None)
        if code == self._code("LIBRARY_NOT_FOUND"):
            return "NVML library libnvidia-ml.so.1 not found (no NVIDIA driver installed?)"
        if code == self._code("DRIVER_NOT_LOADED"):
            return "NVIDIA driver is not loaded (check `nvidia-smi` and that the nvidia kernel module is loaded)"
        if code == self._code("LIB_RM_VERSION_MISMATCH"):
            return ("NVML library and kernel driver versions differ (driver updated without a reboot?): "
                    "reboot or reload the nvidia kernel module")
        if code == self._code("UNINITIALIZED"):
            return "NVML is not initialised (the driver was reset?)"
        if code == self._code("NO_PERMISSION"):
            return "no permission to use NVML (check access to /dev/nvidia*)"
        if code == self._code("FUNCTION_NOT_FOUND"):
            return "the NVIDIA driver is too old for this NVML call: update the driver"
        return None

    def _degrade(self, reason: str) -> None:
        if self._reason != reason:
            log.warning("GPU inventory unavailable: %s; running CPU-only, retrying every %d polls",
                        reason, self.retry_every)
        self._reason = reason
        if self._initialised:
            self._initialised = False
            try:  # best effort; a driver that is gone may refuse
                self._caller.call(self._nvml.nvmlShutdown, timeout=self.call_timeout_s, what="nvmlShutdown")
            except Exception:  # noqa: BLE001 - already degrading, nothing more to say
                pass
        self._polls_until_retry = self.retry_every - 1  # this poll counts as the first of N

    def _try_init(self) -> None:
        self.init_attempts += 1
        if self._nvml is None:
            try:
                import pynvml  # the one place in devmapd that imports it
            except ImportError as exc:
                self._degrade(f"pynvml is not installed ({exc}); install nvidia-ml-py")
                return
            self._nvml = pynvml
        try:
            self._caller.call(self._nvml.nvmlInit, timeout=self.call_timeout_s, what="nvmlInit")
        except CallTimeout:
            self._degrade(f"nvmlInit did not return within {self.call_timeout_s:g}s (driver hung?)")
            return
        except CallerBusy as exc:
            self._degrade(f"an earlier NVML call is still hung ({exc})")
            return
        except Exception as exc:  # noqa: BLE001 - any failure of init means CPU-only, never a crash
            self._degrade(self._backend_reason(exc) or f"nvmlInit failed: {exc} ({type(exc).__name__})")
            return
        if self._reason is not None:
            log.warning("GPU inventory available again through NVML (was: %s)", self._reason)
        self._initialised = True
        self._reason = None

    # ---- the worker-thread query -------------------------------------------------------------

    def _query(self, index: int) -> _Raw:
        """Runs in the worker thread: everything NVML says about device ``index``."""
        nv = self._nvml
        lost_codes = {self._code("GPU_IS_LOST"), self._code("RESET_REQUIRED"), self._code("GPU_NOT_FOUND")}

        def essential_failure(what: str, exc: BaseException, uuid: str | None) -> _Raw:
            if self._backend_reason(exc) is not None:
                raise _BackendDown(self._backend_reason(exc)) from exc
            code = getattr(exc, "value", None)
            if code in lost_codes:
                return _Raw(index, uuid, lost=True, error=f"GPU is lost ({exc}): it gets no placements until it is back")
            return _Raw(index, uuid, lost=True, error=f"unusable: {what} failed ({exc}); it gets no placements")

        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # noqa: BLE001
            return essential_failure("nvmlDeviceGetHandleByIndex", exc, None)
        try:
            uuid = _s(nv.nvmlDeviceGetUUID(handle))
        except Exception as exc:  # noqa: BLE001
            return essential_failure("nvmlDeviceGetUUID", exc, None)
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            total, free, used = int(mem.total), int(mem.free), int(mem.used)
        except Exception as exc:  # noqa: BLE001
            return essential_failure("nvmlDeviceGetMemoryInfo", exc, uuid)
        name = uuid
        try:
            name = _s(nv.nvmlDeviceGetName(handle))
        except Exception:  # noqa: BLE001 - cosmetic; keep the UUID as name
            pass
        util: float | None = None
        try:
            util = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001 - NOT_SUPPORTED on some boards/vGPU; unknown is fine
            pass
        pci: str | None = None
        try:
            pci = _s(nv.nvmlDeviceGetPciInfo(handle).busId).lower()
        except Exception:  # noqa: BLE001 - ordering falls back to NVML's, which is PCI order anyway
            pass
        procs: dict[int, int] = {}
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            fn = getattr(nv, getter, None)
            if fn is None:
                continue
            try:
                for p in fn(handle):
                    mem_used = getattr(p, "usedGpuMemory", None)
                    if mem_used is None or int(mem_used) >= _NOT_AVAILABLE_ULL:
                        mem_used = 0  # NVML_VALUE_NOT_AVAILABLE (WDDM, MIG, containers)
                    pid = int(p.pid)
                    # A process in both lists is one process: keep the larger figure, not the sum.
                    procs[pid] = max(procs.get(pid, 0), int(mem_used))
            except Exception:  # noqa: BLE001 - NOT_SUPPORTED / NO_PERMISSION: list stays partial
                pass
        return _Raw(index, uuid, name, total, free, used, util, tuple(sorted(procs.items())), pci)

    # ---- snapshot ----------------------------------------------------------------------------

    def _cpu_only(self, host: Device, host_warning: str | None, now: float) -> Snapshot:
        reason = f"{self._reason}; running CPU-only, retrying NVML every {self.retry_every} polls"
        # "none", not our name: no NVML serves this snapshot (README: backend is what serves).
        return Snapshot(CPU_ONLY_BACKEND, (), host, join_warnings(reason, host_warning), now)

    def _stale(self, error: str) -> list[_Raw]:
        """Last known devices, marked with ``error`` (used when NVML does not answer)."""
        out = []
        for idx, uuid in sorted(self._last_uuid_at.items()):
            d = self._last.get(uuid)
            if d is None:
                out.append(_Raw(idx, uuid, lost=True, error=error))
            else:
                out.append(_Raw(idx, uuid, d.name, d.total, d.free, d.used, d.utilization,
                                tuple((p.pid, p.used) for p in d.processes), None, False, error))
        return out

    def snapshot(self) -> Snapshot:
        host, host_warning = read_host_memory(self._meminfo_path)
        now = self._clock()
        if not self._initialised:
            if self._polls_until_retry <= 0:
                self._try_init()
            else:
                self._polls_until_retry -= 1
            if not self._initialised:
                return self._cpu_only(host, host_warning, now)

        degraded: str | None = None
        try:
            raws = self._collect()
        except _BackendDown as exc:
            self._degrade(str(exc))
            return self._cpu_only(host, host_warning, now)
        except (CallTimeout, CallerBusy) as exc:
            degraded = f"inventory degraded: NVML is not answering ({exc}); not waiting on it again until it returns"
            raws = self._stale("NVML not answering; showing last known numbers")
        except Exception as exc:  # noqa: BLE001 - e.g. nvmlDeviceGetCount failing: never crash the poll
            self._degrade(self._backend_reason(exc) or f"listing GPUs failed: {exc} ({type(exc).__name__})")
            return self._cpu_only(host, host_warning, now)
        else:
            hung = [r for r in raws if r.error and "not answering" in r.error]
            if hung:
                degraded = ("inventory degraded: an NVML call timed out; devices not queried show "
                            "their last known numbers; not waiting on it again until it returns")

        devices, numbering_warning = self._number(raws)
        return Snapshot(self.name, tuple(devices), host, join_warnings(degraded, numbering_warning, host_warning), now)

    def _collect(self) -> list[_Raw]:
        count = int(self._caller.call(self._nvml.nvmlDeviceGetCount, timeout=self.call_timeout_s, what="nvmlDeviceGetCount"))
        raws: list[_Raw] = []
        for index in range(count):
            try:
                raw = self._caller.call(lambda i=index: self._query(i), timeout=self.call_timeout_s,
                                        what=f"NVML query of device {index}")
            except (CallTimeout, CallerBusy) as exc:
                uuid = self._last_uuid_at.get(index)
                last = self._last.get(uuid) if uuid else None
                err = f"NVML not answering ({exc}); showing last known numbers"
                if last is None:
                    raw = _Raw(index, uuid, lost=True, error=err)
                else:
                    raw = _Raw(index, uuid, last.name, last.total, last.free, last.used, last.utilization,
                               tuple((p.pid, p.used) for p in last.processes), None, False, err)
            if raw.uuid is None:
                # Lost before it told us its UUID: use what it was last time, else a placeholder.
                raw = replace(raw, uuid=self._last_uuid_at.get(index, f"nvml-index-{index}"))
            raws.append(raw)
        return raws

    def _number(self, raws: list[_Raw]) -> tuple[list[Device], str | None]:
        """Turn NVML-ordered records into ``cuda:N`` Devices (see module docstring)."""
        # PCI bus order is CUDA's order under CUDA_DEVICE_ORDER=PCI_BUS_ID; NVML already uses it,
        # but sort explicitly so a driver that does not cannot shuffle our numbering.
        ordered = sorted(raws, key=lambda r: (r.pci_bus_id is None, r.pci_bus_id or "", r.nvml_index))
        by_uuid = {r.uuid: r for r in ordered if r.uuid}
        warning: str | None = None
        if self._torch_order is not None:
            cuda_uuids = [u for u, _ in sorted(((u, self._torch_order[normalize_uuid(u)]) for u in by_uuid
                                                if normalize_uuid(u) in self._torch_order), key=lambda t: t[1])]
            index_of = {u: self._torch_order[normalize_uuid(u)] for u in cuda_uuids}
        else:
            cuda_uuids, warning = cuda_numbering([r.uuid for r in ordered if r.uuid],
                                                 self._environ.get("CUDA_VISIBLE_DEVICES"))
            index_of = {u: i for i, u in enumerate(cuda_uuids)}
            names = {by_uuid[u].name for u in cuda_uuids if not by_uuid[u].lost}
            if len(names) > 1 and self._environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST") != "PCI_BUS_ID":
                warning = join_warnings(warning, (
                    "GPUs of different models and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA may number them "
                    "fastest-first, so cuda:N here is a guess until confirmed with torch; set "
                    "CUDA_DEVICE_ORDER=PCI_BUS_ID to make it certain"))
        devices: list[Device] = []
        for u in cuda_uuids:
            r = by_uuid[u]
            idx = index_of[u]
            self._last_uuid_at[r.nvml_index] = u
            procs = tuple(GpuProcess(pid, used, self._proc_name(pid)) for pid, used in r.processes)
            dev = Device(id=f"cuda:{idx}", index=idx, uuid=u, name=r.name or u, total=r.total,
                         free=max(0, r.free), used=r.used, utilization=r.utilization, processes=procs,
                         simulated=False, lost=r.lost, error=r.error)
            if not r.lost and r.error is None:
                self._last[u] = dev
            devices.append(dev)
        # Remember index -> uuid also for GPUs not visible to CUDA, so a lost one keeps its name.
        for r in ordered:
            if r.uuid and not r.uuid.startswith("nvml-index-"):
                self._last_uuid_at[r.nvml_index] = r.uuid
        devices.sort(key=lambda d: d.index if d.index is not None else -1)
        return devices, warning

    def _proc_name(self, pid: int) -> str | None:
        if not self._process_names:
            return None
        try:  # best effort: another pid namespace or a process that just exited has no name here
            with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                return f.read().strip() or None
        except OSError:
            return None

    # ---- torch confirmation / close ----------------------------------------------------------

    def match_torch_indices(self, uuids_by_torch_index: Sequence[str] | Mapping[int, str]) -> dict[str, int]:
        """Make torch's numbering authoritative: ``uuids_by_torch_index[i]`` is the UUID of
        ``cuda:i`` in this process (``str(torch.cuda.get_device_properties(i).uuid)``; with or
        without the ``GPU-`` prefix). Later snapshots number devices by it; GPUs torch does not
        list are left out. Returns normalized uuid -> index as now used.
        """
        items = uuids_by_torch_index.items() if isinstance(uuids_by_torch_index, Mapping) else enumerate(uuids_by_torch_index)
        order: dict[str, int] = {}
        for idx, uuid in items:
            key = normalize_uuid(str(uuid))
            if key in order:
                raise ValueError(f"uuid {uuid} is listed for two torch indices")
            order[key] = int(idx)
        self._torch_order = order
        return dict(order)

    @property
    def degraded_reason(self) -> str | None:
        """Why the backend is CPU-only now (None when NVML works)."""
        return self._reason

    def close(self) -> None:
        """Shut NVML down (without waiting on a hung call) and stop the worker."""
        if self._initialised and not self._caller.busy:
            try:
                self._caller.call(self._nvml.nvmlShutdown, timeout=self.call_timeout_s, what="nvmlShutdown")
            except Exception:  # noqa: BLE001 - closing; nothing useful to do with it
                pass
        self._initialised = False
        self._caller.close()
