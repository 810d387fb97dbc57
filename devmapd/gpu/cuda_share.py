"""GPU residency and CUDA IPC: one CUDA buffer per (model, device), shared with torch's reductions.

Daemon: ``GpuSegment.upload`` copies a sealed arena segment into one uint8 CUDA buffer (the
manifest's byte offsets stay valid inside it); ``export`` produces a JSON-able IPC payload per
client fetch. Client: ``import_segment`` maps the buffer into its own CUDA context (device found
by UUID, never by index) and ``tensors_from_segment`` builds the tensors as views of it.

Lifetime (torch's CUDA IPC reference counting; torch/csrc/StorageSharing.cpp, CudaIPCTypes.cpp):

* every ``export`` (``storage._share_cuda_()``) wraps the producer's block in a NEW ref-counter
  slot set to 1, in a shared-memory counter file owned by the producer (the daemon);
* the consumer's imported storage decrements *its* slot when the storage is freed (all tensors
  and slices on it gone); importing the same handle twice in one process is deduplicated by
  torch, which decrements the extra slot at once;
* when the daemon drops its buffer (``release``), a block whose slots are not all zero waits in
  torch's "limbo" and is freed only by a later ``torch.cuda.ipc_collect()`` (``collect``; the
  caching allocator also runs it when it runs out of memory).

Consequences the daemon must honour: export ONCE PER CLIENT FETCH, never share one payload
between clients (each consumer decrements once: a shared payload goes negative and the block
can be freed under live clients; an unused payload keeps its slot at 1 and leaks the block).
A payload whose client died, or never imported it, must be returned with ``release_payload``
(the dead process's deleter never ran); a live client's own storage deleter does it otherwise.
GPU memory shared this way is NOT copy-on-write: a client writing into its CUDA tensors writes
into the daemon's copy, which every other client sees (CUDA IPC has no private mappings).
"""
from __future__ import annotations

import base64
import warnings
from collections.abc import Sequence

import torch

from devmapd.engine import arena

__all__ = ["CudaShareError", "GpuSegment", "import_segment", "local_index_for_uuid",
           "normalize_uuid", "tensors_from_segment", "collect", "payload_to_json",
           "payload_from_json", "release_payload", "manifest_for_client"]

PAYLOAD_VERSION = 1
# Staging chunk for host->device copies through pinned memory: big enough to reach full PCIe
# bandwidth, small enough that pinning it is cheap (pinning a whole model would cost more than
# the copy it speeds up).
_STAGE = 64 << 20


class CudaShareError(arena.SegmentImportError, RuntimeError):
    """CUDA sharing is not possible here; callers fall back to the CPU copy with a warning."""


# ----------------------------------------------------------------------------- device identity

def normalize_uuid(uuid: str) -> str:
    """Compare UUIDs the same way whatever printed them: NVML says "GPU-xxxx", torch "xxxx"."""
    u = str(uuid).strip().lower()
    return u[4:] if u.startswith("gpu-") else u


def _local_uuids() -> list[str]:
    # torch enumerates only the devices CUDA_VISIBLE_DEVICES leaves visible, in *its* order;
    # index i here is the local index this process must use, whatever the daemon calls it.
    if not torch.cuda.is_available():
        return []
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def local_index_for_uuid(uuid: str, devices: Sequence[str] | None = None) -> int | None:
    """This process's CUDA index of the GPU with ``uuid``, or None if it cannot see it.

    ``devices`` (UUIDs in local index order) replaces detection, for tests and callers that
    already enumerated.
    """
    want = normalize_uuid(uuid)
    for i, u in enumerate(_local_uuids() if devices is None else devices):
        if normalize_uuid(u) == want:
            return i
    return None


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


# ----------------------------------------------------------------------------- payload codec

def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode("ascii")


def _unb64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s, validate=True)


def payload_to_json(args: tuple, device_uuid_: str, nbytes: int) -> dict:
    """reduce_tensor's rebuild_cuda_tensor args for a uint8 buffer -> a JSON-able dict."""
    (tensor_cls, size, stride, tensor_offset, storage_cls, dtype, storage_device, handle,
     storage_size_bytes, storage_offset_bytes, requires_grad, ref_counter_handle,
     ref_counter_offset, event_handle, event_sync_required) = args
    if dtype != torch.uint8 or tensor_cls is not torch.Tensor:
        raise CudaShareError("only plain uint8 segment buffers are exported")
    return {
        "v": PAYLOAD_VERSION,
        "device_uuid": device_uuid_,
        "nbytes": int(nbytes),
        "size": [int(x) for x in size],
        "stride": [int(x) for x in stride],
        "tensor_offset": int(tensor_offset),
        "producer_device": int(storage_device),   # informational: the daemon's index
        "handle": _b64(handle),
        "storage_size_bytes": int(storage_size_bytes),
        "storage_offset_bytes": int(storage_offset_bytes),
        "ref_counter_handle": _b64(ref_counter_handle),
        "ref_counter_offset": int(ref_counter_offset),
        "event_handle": _b64(event_handle),
        "event_sync_required": bool(event_sync_required),
    }


def payload_from_json(payload: dict, local_index: int) -> tuple:
    """The inverse: rebuild_cuda_tensor's args, with the storage device set to OUR index."""
    try:
        if payload.get("v") != PAYLOAD_VERSION:
            raise CudaShareError(f"CUDA IPC payload version {payload.get('v')!r} is not "
                                 f"{PAYLOAD_VERSION}; upgrade devmapd on the older side")
        return (
            torch.Tensor, torch.Size(payload["size"]), tuple(payload["stride"]),
            int(payload["tensor_offset"]), torch.storage.TypedStorage, torch.uint8,
            int(local_index), _unb64(payload["handle"]), int(payload["storage_size_bytes"]),
            int(payload["storage_offset_bytes"]), False, _unb64(payload["ref_counter_handle"]),
            int(payload["ref_counter_offset"]), _unb64(payload["event_handle"]),
            bool(payload["event_sync_required"]),
        )
    except CudaShareError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise CudaShareError(f"malformed CUDA IPC payload ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- daemon side

class GpuSegment:
    """One uint8 CUDA buffer holding a whole arena segment at the manifest's offsets."""

    def __init__(self, buf: torch.Tensor, device_index: int, name: str = ""):
        self.buf: torch.Tensor | None = buf
        self.device_index = device_index
        self.device_uuid = device_uuid(device_index)
        self.nbytes = buf.numel()
        self.name = name

    @classmethod
    def upload(cls, sealed: arena.SealedSegment, device_index: int) -> GpuSegment:
        if not torch.cuda.is_available():
            raise CudaShareError("CUDA is not available in the daemon; the model stays on CPU")
        arena.verify_sealed(sealed.fd)
        dev = torch.device("cuda", device_index)
        n = sealed.nbytes
        buf = torch.empty(n, dtype=torch.uint8, device=dev)
        if n:
            # Read the memfd through a private read-only-in-practice mapping owned by a torch
            # storage (same mechanism as the client's attach), so no Python copy is made.
            src_st = torch.UntypedStorage.from_file(f"/proc/self/fd/{sealed.fd}", shared=False,
                                                    nbytes=n)
            src = torch.empty(0, dtype=torch.uint8).set_(src_st)
            with torch.cuda.device(dev):   # streams and events below belong to this GPU
                _copy_to_device(buf, src)
            del src, src_st
        return cls(buf, device_index, sealed.name)

    def view(self) -> torch.Tensor:
        if self.buf is None:
            raise CudaShareError(f"GPU segment {self.name} was released")
        return self.buf

    def export(self) -> dict:
        """A JSON-able handle for ONE client (each call takes a torch IPC ref-counter slot)."""
        from torch.multiprocessing.reductions import reduce_tensor
        buf = self.view()
        _fn, args = reduce_tensor(buf)
        return payload_to_json(args, self.device_uuid, self.nbytes)

    def release(self) -> None:
        """Drop our reference; torch frees the block once every importer has released it."""
        self.buf = None
        collect()


def release_payload(payload: dict) -> None:
    """Give back the ref-counter slot of a payload that will never be (or no longer is) used.

    For the daemon: a client that died (imported or not), or a payload never sent. Calling it
    for a live client that still holds the import would let the block be freed under it.
    """
    handle = _unb64(payload.get("ref_counter_handle"))
    if handle is None or not torch.cuda.is_available():
        return
    torch.UntypedStorage._release_ipc_counter_cuda(handle, int(payload["ref_counter_offset"]))


def manifest_for_client(manifest: arena.Manifest, gpu_segments: dict[int, GpuSegment]
                        ) -> tuple[arena.Manifest, list[dict]]:
    """The manifest to send ONE client: a fresh export for each cuda-ipc segment.

    Returns it with the payloads issued (keep them with the client's lease, for
    ``release_payload`` should the client die).
    """
    import dataclasses
    segs = list(manifest.segments)
    issued: list[dict] = []
    for i, gpu in gpu_segments.items():
        payload = gpu.export()
        issued.append(payload)
        segs[i] = dataclasses.replace(segs[i], kind="cuda-ipc", ipc=payload,
                                      device_uuid=gpu.device_uuid)
    return dataclasses.replace(manifest, segments=tuple(segs)), issued


def collect() -> None:
    """Free GPU blocks whose IPC consumers have all let go, back to the DRIVER.

    ipc_collect() returns such blocks to torch's caching allocator, where NVML still counts
    them as ours; empty_cache() hands the now-unused cached blocks back to the driver, so
    other users (and the pressure loop) see the memory come back.
    """
    if torch.cuda.is_available():
        torch.cuda.ipc_collect()
        torch.cuda.empty_cache()


def _copy_to_device(dst: torch.Tensor, src: torch.Tensor) -> None:
    n = src.numel()
    stages: list[torch.Tensor] = []
    if n > _STAGE:
        try:
            stages = [torch.empty(_STAGE, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        except RuntimeError:
            stages = []
    if not stages:
        dst.copy_(src)          # small, or no pinned memory: the driver stages for us
        torch.cuda.synchronize(dst.device)
        return
    stream = torch.cuda.current_stream(dst.device)
    done = [None, None]
    # Double buffering: fill one pinned chunk on the CPU while the other is copied to the GPU.
    for k, start in enumerate(range(0, n, _STAGE)):
        j = k % 2
        m = min(_STAGE, n - start)
        if done[j] is not None:
            done[j].synchronize()          # the GPU has finished reading this pinned buffer
        stages[j][:m].copy_(src[start:start + m])
        dst[start:start + m].copy_(stages[j][:m], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(stream)
        done[j] = ev
    torch.cuda.synchronize(dst.device)


# ----------------------------------------------------------------------------- client side

def import_segment(payload: dict, device_uuid_: str) -> torch.Tensor:
    """Map a daemon's GPU segment into this process: a uint8 CUDA tensor of the whole segment."""
    if not torch.cuda.is_available():
        raise CudaShareError("this process has no CUDA (or CUDA_VISIBLE_DEVICES hides every "
                             "GPU); use the CPU copy or map_location='cpu'")
    idx = local_index_for_uuid(device_uuid_)
    if idx is None:
        raise CudaShareError(f"GPU {device_uuid_} is not visible to this process (check "
                             "CUDA_VISIBLE_DEVICES / the container's GPUs); using the CPU copy")
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    args = payload_from_json(payload, idx)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # TypedStorage deprecation chatter
            buf = rebuild_cuda_tensor(*args)
    except RuntimeError as e:
        # e.g. "cudaErrorMapBufferObjectFailed"/"invalid device context": another container,
        # a driver that refuses IPC, or the daemon already freed the block.
        raise CudaShareError(f"the CUDA driver refused to map the daemon's GPU memory ({e}); "
                             "using the CPU copy") from None
    if buf.numel() != int(payload["nbytes"]):
        raise CudaShareError(f"imported GPU buffer holds {buf.numel()} bytes, expected "
                             f"{payload['nbytes']}")
    return buf


def tensors_from_segment(buf: torch.Tensor, manifest: arena.Manifest, segment_index: int,
                         out: list | None = None) -> list:
    """Build the tensors of ``segment_index`` as views of ``buf`` (uint8, the whole segment).

    Fills and returns ``out`` (a list as long as manifest.tensors; a new one if None); slots of
    other segments are left untouched (None in a new list).
    """
    if out is None:
        out = [None] * len(manifest.tensors)
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise CudaShareError("a segment buffer must be a 1-D uint8 tensor")
    base = buf.untyped_storage()
    off = buf.storage_offset()
    if off or base.nbytes() != buf.numel():
        base = base[off:off + buf.numel()]
    arena.tensors_on_storage(base, manifest, segment_index, out)
    return out



def _import_into(manifest: arena.Manifest, segment_index: int, out: list) -> None:
    """arena.attach's importer for "cuda-ipc" segments."""
    seg = manifest.segments[segment_index]
    if seg.ipc is None or seg.device_uuid is None:
        raise arena.ArenaError(f"cuda-ipc segment {segment_index} lacks its handle or device UUID")
    # Looked up through the module so that a test can stand in for the CUDA import.
    tensors_from_segment(import_segment(seg.ipc, seg.device_uuid), manifest, segment_index, out)


arena.register_importer("cuda-ipc", _import_into)
