"""The code that runs inside fresh measured processes (forked from the forkserver).

Module-level functions only (they are pickled by name). The forkserver has imported torch,
numpy and safetensors.torch, what a user's script has done before its first load; it has NOT
imported ``devmapd``: a devmapd measurement starts its clock before ``import devmapd``, so the
client's import is paid inside the timed region, as a user pays it. This module therefore
imports devmapd only inside the functions that use it.
"""
from __future__ import annotations

import mmap
import os
import resource
import sys
import time
from typing import Any

import numpy as np
import safetensors.torch
import torch

try:
    from numpy._core.multiarray import _set_madvise_hugepage
except ImportError:   # numpy < 2
    from numpy.core.multiarray import _set_madvise_hugepage

METHODS = ("devmapd", "torch.load", "torch.load(mmap)", "safetensors")


def _load(method: str, path: str, name: str, socket: str) -> Any:
    if method == "devmapd":
        import devmapd
        return devmapd.load(name, socket=socket)
    if method == "torch.load":
        return torch.load(path, weights_only=True)
    if method == "torch.load(mmap)":
        return torch.load(path, mmap=True, weights_only=True)
    if method == "safetensors":
        return safetensors.torch.load_file(path)
    raise ValueError(method)


def _touch(sd: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Read every byte: a sum over each tensor. Returns (checksum, bytes read)."""
    total, nbytes = 0.0, 0
    for t in sd.values():
        total += float(t.sum())
        nbytes += t.numel() * t.element_size()
    return total, nbytes


def _import_client() -> None:
    """Import what a devmapd fetch needs (``holders`` count it as code, not model)."""
    import devmapd.client  # noqa: F401
    import devmapd.engine.arena  # noqa: F401


def fetch_once(method: str, path: str, name: str, socket: str, touch: bool = True) -> dict[str, Any]:
    """One user process: load once, then read every byte. Times from the call, not from exec.

    For devmapd the clock starts before ``import devmapd`` (asserted: the forkserver must not
    have imported it); ``import_s`` is the part of it the import took. Also counts the minor
    page faults taken while reading (how many times the kernel had to map pages of the model
    into this process)."""
    if method == "devmapd" and any(m == "devmapd" or m.startswith("devmapd.") for m in sys.modules):
        raise RuntimeError("devmapd was imported before the clock started; the forkserver must not preload it")
    t0 = time.perf_counter()
    import_s = 0.0
    if method == "devmapd":
        import devmapd
        import devmapd.client  # noqa: F401  (what devmapd.load imports on first use)
        import_s = time.perf_counter() - t0
    sd = _load(method, path, name, socket)
    t1 = time.perf_counter()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    checksum, nbytes = _touch(sd) if touch else (0.0, 0)
    t2 = time.perf_counter()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    out = {"method": method, "tensors_s": t1 - t0, "touch_s": t2 - t0, "n": len(sd), "bytes": nbytes,
           "checksum": checksum, "import_s": import_s, "touch_faults": faults}
    if method == "devmapd":
        # A repeat fetch of the unchanged model in the same process (the first one still held).
        t3 = time.perf_counter()
        again = devmapd.load(name, socket=socket)
        out["second_call_s"] = time.perf_counter() - t3
        del again
    return out


def hold(method: str, path: str, name: str, socket: str, conn: Any) -> None:
    """A process that holds a model (every byte read) until told to exit; PSS is read meanwhile."""
    if method == "devmapd":
        _import_client()    # code, not model: part of the "before" baseline
    conn.send(("started", os.getpid()))
    assert conn.recv() == "go"
    sd = _load(method, path, name, socket)
    checksum, nbytes = _touch(sd)
    conn.send(("holding", {"checksum": checksum, "bytes": nbytes}))
    conn.recv()        # "exit"; sd stays alive until here
    del sd


def cold_once(method: str, path: str) -> dict[str, Any]:
    """Read one checkpoint from a warm page cache into fresh memory, one way."""
    if method == "devmapd":
        from devmapd.engine import checkpoint  # the daemon has it imported before any load
        t0 = time.perf_counter()
        lm = checkpoint.read(path)
        dt = time.perf_counter() - t0
        nbytes = sum(s.nbytes for s in lm.segments)
        for s in lm.segments:
            s.close()
        return {"s": dt, "bytes": nbytes, "tensors": lm.inspection.tensors, "payload": lm.inspection.bytes}
    if method == "memcpy":
        # The physical limit: one memcpy from the page cache (a read-only mapping of the file)
        # into a freshly allocated buffer, page faults of the fresh memory included.
        # The source mapping is populated before the clock starts (its page-table faults are an
        # artefact of mapping the file here, not part of copying bytes).
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        src = np.frombuffer(mm, dtype=np.uint8)
        # numpy madvises big buffers MADV_HUGEPAGE; a plain malloc+memcpy (and the memfd arena)
        # gets 4 KiB pages. Huge-page faults here stall on compaction at random (0.4..3.5 GiB/s
        # run to run on this VM), so the peer is the plain one.
        _set_madvise_hugepage(False)
        t0 = time.perf_counter()
        dst = np.empty(size, dtype=np.uint8)
        np.copyto(dst, src)
        dt = time.perf_counter() - t0
        del src, dst
        mm.close()
        return {"s": dt, "bytes": size}
    if method == "sendfile":
        # The kernel-side limit for an arena: the whole file sent into a fresh memfd in one
        # sendfile loop (shmem pages allocated on the way), no parsing, no layout, no seals.
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            t0 = time.perf_counter()
            mfd = os.memfd_create("bench-sendfile", os.MFD_CLOEXEC)
            pos = 0
            while pos < size:
                pos += os.sendfile(mfd, fd, pos, min(size - pos, 1 << 30))
            dt = time.perf_counter() - t0
            os.close(mfd)
        finally:
            os.close(fd)
        return {"s": dt, "bytes": size}
    if method == "torch.load":
        t0 = time.perf_counter()
        sd = torch.load(path, weights_only=True)
        dt = time.perf_counter() - t0
        return {"s": dt, "bytes": sum(t.numel() * t.element_size() for t in sd.values())}
    raise ValueError(method)


def idle_python_rss() -> dict[str, int]:
    """RSS of a bare interpreter that has imported torch (the floor any torch daemon pays)."""
    from benchmarks.common import status_fields
    return status_fields(os.getpid())
