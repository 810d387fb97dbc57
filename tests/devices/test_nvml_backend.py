"""The nvml backend against an injected pynvml-like module (this box has no NVIDIA driver),
plus the real import path, which must degrade to CPU-only here."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
import threading
import time
from pathlib import Path

import pynvml
import pytest

from devmapd.devices import Snapshot, open_backend
from devmapd.devices.nvml import NvmlBackend, cuda_numbering, normalize_uuid

from .fake_nvml import MIB, FakeGpu, FakeNvml

A = "GPU-aaaaaaaa-1111-2222-3333-444444444444"
B = "GPU-bbbbbbbb-1111-2222-3333-444444444444"


def two_gpus() -> list[FakeGpu]:
    # NVML index 0 sits on the higher PCI bus: CUDA (PCI order) calls it cuda:1.
    return [
        FakeGpu(A, name="NVIDIA A100", total=40960 * MIB, used=2048 * MIB, util=55, pci="00000000:81:00.0",
                compute=[(1234, 1024 * MIB), (999999, None)], graphics=[(1234, 1024 * MIB), (4321, 512 * MIB)]),
        FakeGpu(B, name="NVIDIA A100", total=81920 * MIB, used=0, util=0, pci="00000000:01:00.0"),
    ]


def backend(fake: FakeNvml, **kw) -> NvmlBackend:
    kw.setdefault("environ", {})
    kw.setdefault("call_timeout_s", 0.3)
    kw.setdefault("process_names", False)
    return NvmlBackend(nvml_module=fake, **kw)


def test_reports_memory_utilisation_processes_numbered_by_pci_order() -> None:
    b = backend(FakeNvml(two_gpus()))
    snap = b.snapshot()
    assert snap.backend == "nvml" and snap.warning is None
    assert [(d.id, d.index, d.uuid) for d in snap.gpus] == [("cuda:0", 0, B), ("cuda:1", 1, A)]
    a = snap.gpus[1]
    assert (a.total, a.used, a.free) == (40960 * MIB, 2048 * MIB, 38912 * MIB)
    assert a.name == "NVIDIA A100" and a.utilization == 55.0 and not a.simulated and not a.lost
    # compute + graphics merged per pid (not summed); NVML_VALUE_NOT_AVAILABLE (None) -> 0 bytes
    assert {(p.pid, p.used) for p in a.processes} == {(1234, 1024 * MIB), (4321, 512 * MIB), (999999, 0)}
    assert snap.host.id == "cpu" and snap.host.total > 0
    b.close()


def test_value_not_available_as_raw_ull_is_tolerated() -> None:
    gpus = two_gpus()
    gpus[0].compute = [(77, (1 << 64) - 1)]
    snap = backend(FakeNvml(gpus)).snapshot()
    assert [(p.pid, p.used) for p in snap.gpus[1].processes if p.pid == 77] == [(77, 0)]


def test_optional_calls_not_supported_leave_fields_empty() -> None:
    gpus = two_gpus()
    gpus[0].fail = {"util": pynvml.NVML_ERROR_NOT_SUPPORTED, "compute": pynvml.NVML_ERROR_NO_PERMISSION,
                    "graphics": pynvml.NVML_ERROR_NOT_SUPPORTED, "pci": pynvml.NVML_ERROR_NOT_SUPPORTED}
    snap = backend(FakeNvml(gpus)).snapshot()
    a = next(d for d in snap.gpus if d.uuid == A)
    assert a.utilization is None and a.processes == () and not a.lost and a.error is None


@pytest.mark.parametrize(
    "visible, expected, warns",
    [
        (None, [B, A], False),
        ("1", [A], False),
        ("1,0", [A, B], False),
        ("GPU-aaaa", [A], False),
        ("GPU-aaaa,GPU-bbbb", [A, B], False),
        ("", [], True),
        ("0,0", [], True),  # a repeated entry: CUDA sees nothing
        ("0,7,1", [B], True),  # out of range: the rest is ignored
        ("0,-1,1", [B], True),  # invalid: the rest is ignored
        ("GPU-", [], True),  # ambiguous prefix
        ("MIG-1234", [], True),
    ],
)
def test_cuda_visible_devices_numbering(visible, expected, warns) -> None:
    order, warning = cuda_numbering([B, A], visible)
    assert order == expected
    assert (warning is not None) == warns


def test_cuda_visible_devices_applied_to_snapshot() -> None:
    snap = backend(FakeNvml(two_gpus()), environ={"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}).snapshot()
    assert [(d.id, d.uuid) for d in snap.gpus] == [("cuda:0", A)]
    snap = backend(FakeNvml(two_gpus()), environ={"CUDA_VISIBLE_DEVICES": ""}).snapshot()
    assert snap.gpus == () and "CUDA_VISIBLE_DEVICES is empty" in (snap.warning or "")


def test_mixed_models_warn_that_numbering_is_a_guess_unless_pci_order() -> None:
    gpus = two_gpus()
    gpus[1].name = "NVIDIA RTX 4090"
    warn = backend(FakeNvml(gpus)).snapshot().warning
    assert warn and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in warn
    assert backend(FakeNvml(gpus), environ={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}).snapshot().warning is None


def test_match_torch_indices_overrides_the_guess() -> None:
    b = backend(FakeNvml(two_gpus()))
    assert [d.uuid for d in b.snapshot().gpus] == [B, A]
    # torch (after CUDA init) says cuda:0 is A; torch prints uuids without the GPU- prefix
    mapping = b.match_torch_indices([A[4:].upper(), B[4:]])
    assert mapping == {normalize_uuid(A): 0, normalize_uuid(B): 1}
    assert [(d.id, d.uuid) for d in b.snapshot().gpus] == [("cuda:0", A), ("cuda:1", B)]
    b.match_torch_indices({0: B})  # torch sees only one GPU
    assert [(d.id, d.uuid) for d in b.snapshot().gpus] == [("cuda:0", B)]
    with pytest.raises(ValueError):
        b.match_torch_indices([A, A])


@pytest.mark.parametrize(
    "code, words",
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "libnvidia-ml.so.1 not found"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "driver is not loaded"),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "versions differ"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no permission"),
        (pynvml.NVML_ERROR_UNKNOWN, "nvmlInit failed"),
    ],
)
def test_init_failure_is_cpu_only_with_the_reason(code, words) -> None:
    fake = FakeNvml(two_gpus(), init_error=code)
    snap = backend(fake).snapshot()
    # What serves is the CPU-only inventory: the backend says so (README: `none`), the warning why.
    assert snap.gpus == () and snap.backend == "none"
    assert words in snap.warning and "CPU-only" in snap.warning
    assert snap.host.total > 0


def test_init_is_retried_every_n_polls_and_recovers() -> None:
    fake = FakeNvml(two_gpus(), init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    b = backend(fake, retry_every=3)
    snaps = [b.snapshot() for _ in range(3)]  # polls 1-3: one attempt
    assert fake.init_calls == 1 and all(s.gpus == () for s in snaps)
    assert "retrying NVML every 3 polls" in snaps[-1].warning
    assert all(s.backend == "none" for s in snaps)
    fake.init_error = None  # the driver was loaded
    later = b.snapshot()  # poll 4: the retry
    assert fake.init_calls == 2
    assert later.gpus and later.warning is None and later.backend == "nvml"


def test_driver_unloaded_mid_run_degrades_then_recovers() -> None:
    fake = FakeNvml(two_gpus())
    b = backend(fake, retry_every=1)
    assert len(b.snapshot().gpus) == 2
    fake.count_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    snap = b.snapshot()
    assert snap.gpus == () and "driver is not loaded" in snap.warning and snap.backend == "none"
    fake.count_error = None
    assert len(b.snapshot().gpus) == 2  # retry_every=1: the very next poll retries


def test_one_lost_gpu_is_marked_lost_and_others_are_fine() -> None:
    gpus = two_gpus()
    fake = FakeNvml(gpus)
    b = backend(fake)
    b.snapshot()
    gpus[0].fail = {"handle": pynvml.NVML_ERROR_GPU_IS_LOST}  # it no longer even gives a handle
    snap = b.snapshot()
    lost = next(d for d in snap.gpus if d.uuid == A)  # the uuid is remembered from before
    assert lost.lost and "lost" in lost.error and lost.id == "cuda:1"
    ok = next(d for d in snap.gpus if d.uuid == B)
    assert not ok.lost and ok.error is None and ok.free == 81920 * MIB


def test_other_essential_failure_marks_device_unusable() -> None:
    gpus = two_gpus()
    gpus[1].fail = {"memory": pynvml.NVML_ERROR_UNKNOWN}
    snap = backend(FakeNvml(gpus)).snapshot()
    bad = next(d for d in snap.gpus if d.uuid == B)
    assert bad.lost and "unusable" in bad.error


def test_hung_call_times_out_degrades_and_is_not_waited_on_again() -> None:
    gpus = two_gpus()
    fake = FakeNvml(gpus)
    b = backend(fake, call_timeout_s=1.0)
    good = b.snapshot()
    hang = threading.Event()
    gpus[1].fail = {"memory": hang}  # B (cuda:0) hangs in nvmlDeviceGetMemoryInfo
    try:
        t0 = time.monotonic()
        snap = b.snapshot()
        first = time.monotonic() - t0
        assert 0.9 <= first < 5.0
        assert "degraded" in snap.warning
        stale = next(d for d in snap.gpus if d.uuid == B)
        assert stale.error and "not answering" in stale.error and stale.free == good.gpus[0].free
        t0 = time.monotonic()
        again = b.snapshot()
        assert time.monotonic() - t0 < 0.5  # the hung call is not waited on again (>= 1.0 if it were)
        assert "degraded" in again.warning and all(d.error for d in again.gpus)
    finally:
        hang.set()
    gpus[1].fail = {}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        snap = b.snapshot()
        if snap.warning is None:
            break
        time.sleep(0.02)
    assert snap.warning is None and all(d.error is None for d in snap.gpus)
    b.close()


def test_hung_device_count_shows_last_known_devices() -> None:
    fake = FakeNvml(two_gpus())
    b = backend(fake, call_timeout_s=0.2)
    b.snapshot()
    fake.count_hang = threading.Event()
    try:
        snap = b.snapshot()
        assert "not answering" in snap.warning
        assert sorted(d.uuid for d in snap.gpus) == sorted([A, B]) and all(d.error for d in snap.gpus)
    finally:
        fake.count_hang.set()
        fake.count_hang = None
    b.close()


def test_close_shuts_nvml_down() -> None:
    fake = FakeNvml(two_gpus())
    b = backend(fake)
    b.snapshot()
    b.close()
    assert fake.shutdown_calls == 1


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has an NVIDIA driver")
def test_real_pynvml_degrades_to_cpu_only_here() -> None:
    b = open_backend("auto")
    try:
        snap = b.snapshot()
        assert isinstance(snap, Snapshot) and snap.backend == "none"
        assert snap.gpus == ()
        assert "libnvidia-ml.so.1 not found" in snap.warning and "retrying" in snap.warning
        assert snap.host.total > 0 and 0 < snap.host.free <= snap.host.total
    finally:
        b.close()


def test_only_the_nvml_module_imports_pynvml() -> None:
    root = Path(__file__).resolve().parents[2] / "devmapd"
    importers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                       if "import pynvml" in p.read_text(encoding="utf-8", errors="replace"))
    assert importers == ["devices/nvml.py"]
    code = ("import sys, devmapd.devices, devmapd.planner, devmapd.pressure;"
            "from devmapd.devices import open_backend; open_backend('none').snapshot();"
            "assert 'pynvml' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root.parent)


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has an NVIDIA driver")
def test_real_daemon_without_libnvidia_ml_reports_backend_none_with_the_reason(tmp_path) -> None:
    """`devmapd serve` with devices.backend = "nvml" on a machine without the NVIDIA library:
    status names the backend that serves (`none`, as the README says) and the warning says why."""
    import json
    import os

    from tests.harness import DaemonHandle, devmapd_cmd

    cfg = tmp_path / "devmapd.toml"
    cfg.write_text('[devices]\nbackend = "nvml"\npoll_interval_s = 0.2\n')
    (tmp_path / "models").mkdir()
    sock = str(tmp_path / "run" / "devmapd.sock")
    log = tmp_path / "daemon.log"
    argv = devmapd_cmd("serve", "--config", str(cfg), "--model-dir", str(tmp_path / "models"),
                       "--socket", sock, "--state-dir", str(tmp_path / "state"))
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "DEVMAPD_SOCKET")}
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=str(Path(__file__).resolve().parents[2]))
    d = DaemonHandle(proc=proc, socket=sock, model_dir=tmp_path / "models", state_dir=tmp_path / "state",
                     sim_file=tmp_path / "none.json", config_file=cfg, log_file=log, argv=argv)
    try:
        d.wait_for(lambda st: True, timeout=30, what="the daemon to answer")
        cli_env = {**env, "DEVMAPD_SOCKET": sock}
        st = json.loads(subprocess.run(devmapd_cmd("status", "--json"), capture_output=True, text=True,
                                       env=cli_env, timeout=60, check=True).stdout)
        assert st["daemon"]["backend"] == "none", st["daemon"]
        warning = st["daemon"]["warning"]
        assert "libnvidia-ml.so.1 not found" in warning and "retrying NVML" in warning, warning
        assert [dev["id"] for dev in st["devices"]] == ["cpu"]
        text = subprocess.run(devmapd_cmd("status"), capture_output=True, text=True, env=cli_env,
                              timeout=60, check=True).stdout
        assert "backend none" in text and "warning: " in text and "libnvidia-ml.so.1 not found" in text, text
    finally:
        d.stop()
