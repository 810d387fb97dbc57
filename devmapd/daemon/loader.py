"""Turn a placement decision into a served version of a model.

One call does the whole pipeline for one model version, off the event loop:
read the checkpoint ONCE into sealed memfd segments (one per device id the
placement names), then, for segments placed on a real CUDA device, upload
them into one GPU buffer each and export a CUDA IPC handle. The result is a
:class:`ServedVersion`: the manifest clients receive, the fds that travel
with it, and the bytes it occupies per device.

Simulated GPUs (DESIGN.md) keep their "GPU" segments as memfds in host memory:
the placement label says ``cuda:N`` and status marks the device simulated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devmapd.engine import checkpoint, sidefiles
from devmapd.engine.arena import Manifest, SealedSegment
from devmapd.engine.learned import read_learned
from devmapd.wire.protocol import encode_manifest

log = logging.getLogger("devmapd.daemon.loader")


class UploadError(RuntimeError):
    """The checkpoint read fine but copying it to a real GPU failed (no usable CUDA in the
    daemon, or out of GPU memory because another process took it since the snapshot). The load
    queue then serves the model from the CPU instead of failing it."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"cannot upload to {device}: {reason}")
        self.device = device
        self.reason = reason


@dataclass
class ServedVersion:
    """One immutable version of a model, as clients receive it."""

    generation: int
    manifest: Manifest
    segments: list[SealedSegment | None]  # memfd per segment; None once moved to a real GPU
    gpu_segments: dict[int, Any] = field(default_factory=dict)  # segment index -> cuda_share.GpuSegment
    placement: dict[str, int] = field(default_factory=dict)
    fingerprint: tuple | None = None
    load_time_s: float = 0.0
    inspection: Any = None
    manifest_json: bytes | None = None  # encoded once, off the event loop (CPU/simulated versions)
    # A Hugging Face directory's config.json / generation_config.json, parsed and encoded once:
    # shipped with every fetch so a client builds the model without reading the model dir.
    side_files_json: bytes | None = None
    shared: Any = None  # the engine.dedup.StorageStore that owns the segments (owner: generation), or None
    layout: int = 0  # the store's layout of those storages that manifest and segments reflect

    @property
    def fds(self) -> list[int | None]:
        return [seg.fd if seg is not None else None for seg in self.segments]

    def refresh(self) -> bool:
        """Take the manifest and segments the store rebuilt when compaction moved storages that
        this version shares; True if they changed. Call on the event loop before the store reaps."""
        store = self.shared
        if store is None:
            return False
        with store.lock:
            holding = store.holding(self.generation)
            if holding is None or holding.layout == self.layout:
                return False
            self.manifest, self.segments, self.layout = holding.manifest, list(holding.segments), holding.layout
        self.manifest_json = encode_manifest(self.manifest)
        return True

    def manifest_for_client(self) -> Manifest:
        """The manifest one fetch sends: GPU segments get a fresh CUDA IPC export each.

        torch's producer-side ref counting keeps an exported block alive until its
        importer releases it, even after we drop the buffer (eviction, demotion).
        """
        if not self.gpu_segments:
            return self.manifest
        from devmapd.gpu import cuda_share

        manifest, _payloads = cuda_share.manifest_for_client(self.manifest, self.gpu_segments)
        segments = list(manifest.segments)
        for i, seg in enumerate(segments):
            if seg.kind == "cuda-ipc" and self.segments[i] is not None:
                # The host copy travels too (fds), so a client whose CUDA import fails falls back to it.
                segments[i] = dataclasses.replace(seg, ipc={**(seg.ipc or {}), "host_copy": True})
        return dataclasses.replace(manifest, segments=tuple(segments))

    @property
    def nbytes(self) -> int:
        return sum(self.placement.values())

    def close(self) -> None:
        """Drop the daemon's references.

        Safe while clients still use the version: a client holds its own dup of
        each memfd (SCM_RIGHTS) and its own mapping, so the kernel frees the pages
        only when the last one lets go; a CUDA block exported over IPC stays alive
        in torch's IPC limbo until every importer has released it.
        """
        if self.shared is not None:
            # The store owns the segments: release this version's storages; those another
            # version shares stay, the rest go (their segments close at the store's reap).
            store, self.shared = self.shared, None
            store.release(self.generation)
            self.segments = [None] * len(self.segments)
            return
        for seg in self.segments:
            if seg is not None:
                seg.close()
        self.segments = [None] * len(self.segments)
        for gpu in self.gpu_segments.values():
            gpu.release()
        self.gpu_segments.clear()


def _shared_version(store: Any, loaded: Any, generation: int, started: float,
                    side_files_json: bytes | None) -> ServedVersion | None:
    """A version whose storages live in ``store`` (engine.dedup): those other versions already
    hold on the same device are shared, the rest kept. Placement is what the model serves per
    device; what the device really holds is the store's to say (Inventory.held subtracts it).
    None when the store cannot take it now (no memory to map it): it is then served unshared."""
    from devmapd.engine.dedup import DedupError

    try:
        holding = store.adopt(generation, loaded.manifest, loaded.segments)
    except (DedupError, OSError) as exc:  # adopt took nothing: the read is still ours to serve
        log.warning("generation %d served without sharing its storages: %s", generation, exc)
        return None
    with store.lock:
        manifest, segments, layout = holding.manifest, list(holding.segments), holding.layout
        placement = holding.placement()
    return ServedVersion(generation=generation, manifest=manifest, segments=segments, placement=placement,
                         fingerprint=loaded.fingerprint, load_time_s=time.perf_counter() - started,
                         inspection=loaded.inspection, manifest_json=encode_manifest(manifest),
                         side_files_json=side_files_json, shared=store, layout=layout)


def placement_of(manifest: Manifest) -> dict[str, int]:
    """Bytes served per device id: each storage once, as served (after a dtype cast).

    Not the segments' sizes: those pad every storage to the arena's alignment, so a 16 B model
    would read as 64 B in status while ``bytes`` (from the file) says 16 B.
    """
    out: dict[str, int] = {}
    seen: set[tuple[int, int]] = set()
    for t in manifest.tensors:
        key = (t.segment, t.offset)
        if key in seen:
            continue
        seen.add(key)
        dev = manifest.segments[t.segment].device
        out[dev] = out.get(dev, 0) + t.storage_nbytes
    return out


def read_side_files_json(source: Any, options: checkpoint.ReadOptions) -> bytes | None:
    """The side files of an HF directory as the JSON object a fetch reply carries; None for a
    single-file model. A side file that exists but is unusable fails the load (its diagnosis)."""
    if getattr(source, "kind", None) != "hf-dir":
        return None
    files = sidefiles.read_side_files(source.path, root=options.root,
                                      max_bytes=min(options.max_side_file_bytes, sidefiles.MAX_SIDE_FILE_BYTES))
    return json.dumps(files, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def load_version(
    source: Any,
    generation: int,
    options: checkpoint.ReadOptions,
    *,
    device_of: Callable[[str], str] | None,
    cuda_index_of: Callable[[str], int | None],
    keep_host_copy: bool = False,
    progress: Callable[[int, int], None] | None = None,
    learned: Any = None,
    store: Any = None,
) -> ServedVersion:
    """Read ``source`` into a new :class:`ServedVersion` (blocking; run in a worker thread).

    ``cuda_index_of(device_id)`` returns the local torch CUDA index of a REAL GPU
    device id, or None for cpu and simulated devices (which stay memfds).
    Raises :class:`checkpoint.CheckpointError` with a diagnosis when the file cannot be read,
    :class:`UploadError` when a GPU upload fails (everything read is released first).
    """
    started = time.perf_counter()
    side_files_json = read_side_files_json(source, options)   # before any segment exists to release
    if learned is not None:   # what the inspection parsed: no second unpickle, memfds filled in parallel
        loaded = read_learned(learned, options, device_of=device_of, progress=progress, source=source)
    else:
        loaded = checkpoint.read(source, options, device_of=device_of, progress=progress)
    if store is not None and all(cuda_index_of(info.device) is None for info in loaded.manifest.segments):
        shared = _shared_version(store, loaded, generation, started, side_files_json)
        if shared is not None:
            return shared
    segments: list[SealedSegment | None] = list(loaded.segments)
    infos = list(loaded.manifest.segments)
    gpu_segments: dict[int, Any] = {}
    try:
        for i, info in enumerate(infos):
            index = cuda_index_of(info.device)
            if index is None:
                continue
            from devmapd.gpu import cuda_share  # imported only when a real GPU is in play

            sealed = segments[i]
            assert sealed is not None
            try:
                gpu = cuda_share.GpuSegment.upload(sealed, index)
            except cuda_share.CudaShareError as exc:
                raise UploadError(info.device, str(exc)) from exc
            except RuntimeError as exc:  # torch.OutOfMemoryError is one; other CUDA errors too
                raise UploadError(info.device, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
            gpu_segments[i] = gpu
            # No IPC export here: each export takes one torch ref-counter slot that exactly one
            # consumer gives back, so the daemon exports once per fetch (manifest_for_client).
            infos[i] = dataclasses.replace(info, kind="cuda-ipc", ipc=None, device_uuid=gpu.device_uuid)
            if not keep_host_copy:
                sealed.close()
                segments[i] = None
    except BaseException:
        for gpu in gpu_segments.values():
            gpu.release()
        for seg in segments:
            if seg is not None:
                seg.close()
        raise
    manifest = dataclasses.replace(loaded.manifest, segments=tuple(infos))
    # Encoding a 4,000-tensor manifest takes tens of ms: do it here, in the load thread, rather
    # than on the daemon's event loop at the first fetch. GPU manifests differ per fetch (IPC).
    manifest_json = None if gpu_segments else encode_manifest(manifest)
    return ServedVersion(
        manifest_json=manifest_json,
        side_files_json=side_files_json,
        generation=generation,
        manifest=manifest,
        segments=segments,
        gpu_segments=gpu_segments,
        placement=placement_of(manifest),
        fingerprint=loaded.fingerprint,
        load_time_s=time.perf_counter() - started,
        inspection=loaded.inspection,
    )
