"""The NVML inventory against torch.cuda on real hardware: same GPUs, same numbering, by UUID.

devmapd numbers GPUs ``cuda:N`` the way torch does in the daemon's process, and keys them by
UUID. NVML enumerates in PCI order and prints ``GPU-xxxxxxxx-...``; torch prints the UUID
without the prefix. These tests take torch as the oracle, in this process and in fresh
processes under several ``CUDA_VISIBLE_DEVICES`` settings (the pure ``cuda_numbering`` guess
must agree with what CUDA itself does there). Skipped without CUDA or without NVML.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.gpu.conftest import ROOT, bare_uuid, torch_uuids

# One subprocess per CUDA_VISIBLE_DEVICES setting: torch there is the oracle.
_PROBE = r"""
import json, torch
from devmapd.devices import open_backend
b = open_backend("nvml")
guess = b.snapshot()                        # NVML order + the pure CUDA_VISIBLE_DEVICES rules
uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
b.match_torch_indices(uuids)
confirmed = b.snapshot()                    # torch's numbering made authoritative
print(json.dumps({
    "torch": uuids,
    "guess": [[d.id, d.index, d.uuid] for d in guess.gpus], "guess_warning": guess.warning,
    "confirmed": [[d.id, d.index, d.uuid] for d in confirmed.gpus], "warning": confirmed.warning,
    "backend": confirmed.backend}))
b.close()
"""


def _probe(visible: str | None) -> dict:
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def backend(pynvml_mod):
    from devmapd.devices import open_backend

    b = open_backend("nvml")
    yield b
    b.close()


def test_nvml_lists_exactly_the_gpus_torch_sees(backend, pynvml_mod):
    snap = backend.snapshot()
    assert snap.backend == "nvml", snap.warning
    ours = [bare_uuid(d.uuid) for d in snap.gpus]
    theirs = [bare_uuid(u) for u in torch_uuids()]
    raw_nvml = [pynvml_mod.nvmlDeviceGetUUID(pynvml_mod.nvmlDeviceGetHandleByIndex(i))
                for i in range(pynvml_mod.nvmlDeviceGetCount())]
    print(f"\nNVML prints {raw_nvml[0]!r}; torch prints {torch_uuids()[0]!r}")
    assert sorted(ours) == sorted(theirs), (ours, theirs)
    assert all(not d.simulated and not d.lost and d.error is None for d in snap.gpus)
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        assert len(snap.gpus) == len(raw_nvml)


def test_torch_confirmed_numbering_is_torch_order(backend):
    uuids = torch_uuids()
    order = backend.match_torch_indices(uuids)
    snap = backend.snapshot()
    assert [d.id for d in snap.gpus] == [f"cuda:{i}" for i in range(len(uuids))]
    for d in snap.gpus:
        assert bare_uuid(d.uuid) == bare_uuid(uuids[d.index]), (d, uuids)
        assert order[bare_uuid(d.uuid)] == d.index


def test_memory_figures_agree_with_cuda(backend):
    snap = backend.snapshot()
    for i, uuid in enumerate(torch_uuids()):
        dev = next(d for d in snap.gpus if bare_uuid(d.uuid) == bare_uuid(uuid))
        free, total = torch.cuda.mem_get_info(i)
        print(f"\n{dev.id} {dev.name}: NVML total {dev.total >> 20} MiB free {dev.free >> 20} MiB; "
              f"cudaMemGetInfo total {total >> 20} MiB free {free >> 20} MiB")
        assert dev.total > 0 and dev.free + dev.used <= dev.total + (64 << 20)
        assert abs(dev.total - total) <= 0.03 * dev.total
        assert abs(dev.free - free) <= max(1 << 30, 0.02 * dev.total)   # sampled at different instants


def _visible_cases() -> list[str]:
    uuids = torch_uuids() if torch.cuda.is_available() else ["00000000-0000-0000-0000-000000000000"]
    n = len(uuids)
    rev = ",".join(str(i) for i in reversed(range(n)))
    return [
        rev,                                          # reversed indices (the identity on one GPU)
        "GPU-" + bare_uuid(uuids[-1]),                # by full UUID
        "GPU-" + bare_uuid(uuids[0])[:8],             # by UUID prefix, as CUDA allows
        f"0,{n}",                                     # stops at the out-of-range entry
        "0,0",                                        # a repeated entry
        "",                                           # nothing visible
    ]


@pytest.mark.parametrize("visible", _visible_cases())
def test_numbering_under_cuda_visible_devices_matches_cuda(visible, pynvml_mod):
    res = _probe(visible)
    want = [bare_uuid(u) for u in res["torch"]]
    confirmed = [bare_uuid(u) for _id, _idx, u in res["confirmed"]]
    guess = [bare_uuid(u) for _id, _idx, u in res["guess"]]
    print(f"\nCUDA_VISIBLE_DEVICES={visible!r}: torch {want}, guess {guess} ({res['guess_warning']})")
    assert confirmed == want, res
    assert [i for _id, i, _u in res["confirmed"]] == list(range(len(want)))
    # The guess made without torch must agree with CUDA, or say that it may not.
    assert guess == want or res["guess_warning"], res
    if not want:
        assert res["guess_warning"] or res["warning"], "no GPU visible and nothing says why"
