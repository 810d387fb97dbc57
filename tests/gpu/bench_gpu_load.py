"""Loading a checkpoint onto the GPU: devmapd vs torch.load(map_location="cuda") vs the limit.

Issue 7's benchmark, for one real GPU (not part of the pytest run; run-on-gpu.sh runs it):

* ``pinned H2D``  - one host-to-device copy of the same number of bytes from pinned memory:
  the hardware limit any loader is measured against (pageable H2D is printed too);
* ``torch.load``  - ``torch.load(path, map_location="cuda", weights_only=True)`` + synchronize,
  with and without ``mmap=True``;
* ``devmapd``     - a real daemon (nvml backend) loading the file cold into GPU memory from a
  warm page cache: the daemon's own ``load_time_s`` (read into the sealed arena + upload), and
  the wall time from the file appearing to "ready" (adds the watcher's settle time). Then one
  fetch of the loaded model by this process (CUDA IPC), for scale.

Every figure is the best of a few runs after one warm-up of the CUDA context. Prints a table
and ratios; ``--json FILE`` also writes them. Usage: ``python tests/gpu/bench_gpu_load.py
[--gib 4] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.gpu.conftest import GIB, open_dir, start_gpu_daemon, stop_daemon, wait_placed  # noqa: E402

DEVICE = "cuda:0"       # where the daemon is expected to place the model (one GPU)


def make_checkpoint(path: Path, nbytes: int, tensors: int = 16) -> dict[str, float]:
    """float32 tensors (a checkpoint's usual dtype) of ``nbytes`` in total; returns key -> sum."""
    n = nbytes // 4 // tensors
    sd = {f"layers.{k}.weight": torch.arange(n, dtype=torch.float32).remainder_(1000.0).add_(k)
          for k in range(tensors)}
    sums = {k: v.sum(dtype=torch.float64).item() for k, v in sd.items()}
    torch.save(sd, path)
    return sums


def warm_page_cache(path: Path) -> float:
    """Read the whole file once (seconds), so every loader starts from a warm page cache."""
    buf = bytearray(64 << 20)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        torch.cuda.empty_cache()
        times.append(fn())
    return min(times)


def time_h2d(nbytes: int, pinned: bool) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()

    def once() -> float:
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=pinned)  # noqa: F821  (closure; `del` in the finally below)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    try:
        return best(once, 3)
    finally:
        del host, dev


def time_torch_load(path: Path, mmap: bool) -> float:
    def once() -> float:
        t0 = time.perf_counter()
        sd = torch.load(path, map_location="cuda", weights_only=True, mmap=mmap)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        del sd
        return dt

    return best(once, 2)


def time_devmapd(src: Path, base: Path, sums: dict[str, float], reloads: int = 2) -> dict[str, float]:
    mdir = base / "models"
    mdir.mkdir()
    torch.save({"w": torch.zeros(1 << 20)}, mdir / "warmup.pt")   # the daemon's CUDA context, first
    d = start_gpu_daemon(base / "d", model_dir=mdir, low_mib=256, high_mib=512)
    try:
        wait_placed(d, "warmup", DEVICE, timeout=120)
        t0 = time.perf_counter()
        os.link(src, mdir / "big.pt")      # appears at once, fully written, same page cache
        m = wait_placed(d, "big", DEVICE, timeout=600)
        wall = time.perf_counter() - t0
        loads = [float(m["load_time_s"])]
        for _ in range(reloads):
            gen = m["generation"]
            with d.client() as c:
                c.reload("big")
            m = d.wait_for(lambda st: next((x for x in st["models"] if x["name"] == "big" and x["generation"] != gen
                                            and x["state"] == "ready" and set(x["placement"]) == {DEVICE}), None),
                           timeout=600, what=f"big reloaded onto {DEVICE}")
            loads.append(float(m["load_time_s"]))
        with d.client() as c:
            t1 = time.perf_counter()
            sd = c.fetch("big")
            torch.cuda.synchronize()
            fetch_ms = (time.perf_counter() - t1) * 1000
            key = next(iter(sums))
            ok = abs(sd[key].sum(dtype=torch.float64).item() - sums[key]) < 1e-6 * abs(sums[key]) + 1
            del sd
            gc.collect()
            torch.cuda.synchronize()
            c.release("big")
        return {"load_s": min(loads), "first_load_s": loads[0], "wall_to_ready_s": wall,
                "fetch_ms": fetch_ms, "fetch_correct": ok}
    finally:
        stop_daemon(d, "bench")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4.0, help="checkpoint size in GiB (default 4)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu_load: no CUDA device here; nothing to measure", file=sys.stderr)
        return 2
    nbytes = int(args.gib * GIB)
    base = open_dir("devmapd-bench-")
    res: dict[str, object] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                              "bytes": nbytes}
    try:
        torch.ones(1, device="cuda")                  # CUDA context outside every timing
        src_dir = base / "src"
        src_dir.mkdir()
        src = src_dir / "big.pt"
        t0 = time.perf_counter()
        sums = make_checkpoint(src, nbytes)
        nbytes = src.stat().st_size
        res["file_bytes"] = nbytes
        res["write_s"] = time.perf_counter() - t0
        res["warm_read_s"] = warm_page_cache(src)
        res["pinned_h2d_s"] = time_h2d(nbytes, pinned=True)
        res["pageable_h2d_s"] = time_h2d(nbytes, pinned=False)
        res["torch_load_s"] = time_torch_load(src, mmap=False)
        res["torch_load_mmap_s"] = time_torch_load(src, mmap=True)
        gc.collect()
        torch.cuda.empty_cache()
        res["devmapd"] = time_devmapd(src, base, sums)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    dm = res["devmapd"]
    gbs = lambda s: nbytes / s / 1e9  # noqa: E731
    rows = [("pinned H2D copy (limit)", res["pinned_h2d_s"]), ("pageable H2D copy", res["pageable_h2d_s"]),
            ('torch.load(map_location="cuda")', res["torch_load_s"]),
            ('torch.load(..., mmap=True)', res["torch_load_mmap_s"]),
            ("devmapd cold load to ready (daemon load_time_s)", dm["load_s"]),
            ("devmapd file-appears-to-ready wall", dm["wall_to_ready_s"])]
    print(f"\n{res['gpu']}, torch {res['torch']}, {nbytes / GIB:.2f} GiB checkpoint, warm page cache "
          f"(warm read {gbs(res['warm_read_s']):.1f} GB/s)")
    for label, s in rows:
        print(f"  {label:<50} {s:8.3f} s  {gbs(s):6.1f} GB/s")
    res["ratios"] = {
        "devmapd_vs_torch_load": dm["load_s"] / res["torch_load_s"],
        "devmapd_vs_pinned_h2d": dm["load_s"] / res["pinned_h2d_s"],
        "torch_load_vs_pinned_h2d": res["torch_load_s"] / res["pinned_h2d_s"],
    }
    r = res["ratios"]
    print(f"  devmapd / torch.load = {r['devmapd_vs_torch_load']:.2f}x time;  devmapd / pinned limit = "
          f"{r['devmapd_vs_pinned_h2d']:.2f}x;  torch.load / pinned limit = {r['torch_load_vs_pinned_h2d']:.2f}x")
    print(f"  then one fetch of it by this benchmark process (CUDA IPC from the daemon): {dm['fetch_ms']:.2f} ms "
          f"(correct: {dm['fetch_correct']})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if dm["fetch_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
