"""cuda_share.py parts that need no GPU: the payload codec, UUID matching, the view builder.

The real CUDA path (upload, export, import in another process) is tests/gpu/test_cuda_share.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from devmapd.engine import arena
from devmapd.gpu import cuda_share

HAS_CUDA = torch.cuda.is_available()


def _fake_reduce_args(device_index=2):
    """The exact tuple shape torch's reduce_tensor gives for a CUDA uint8 tensor."""
    return (torch.Tensor, torch.Size([4096]), (1,), 0, torch.storage.TypedStorage, torch.uint8,
            device_index, b"\x00\x01IPC-HANDLE\xff" * 4, 4096, 512, False, b"/torch_123_456_0", 7,
            b"\x00" * 64, True)


def test_payload_is_json_and_rebuilds_the_same_args_on_our_index():
    args = _fake_reduce_args(device_index=2)
    payload = cuda_share.payload_to_json(args, "GPU-abc", 4096)
    wire = json.loads(json.dumps(payload))              # it must survive the socket as JSON
    back = cuda_share.payload_from_json(wire, local_index=0)
    assert len(back) == len(args) == 15
    # everything identical except the device: the consumer's own index for that UUID
    assert back[6] == 0 and wire["producer_device"] == 2
    assert back[:6] == args[:6] and back[7:] == (args[7], 4096, 512, False, args[11], 7,
                                                  args[13], True)
    assert wire["device_uuid"] == "GPU-abc" and wire["nbytes"] == 4096


def test_payload_codec_refuses_bad_input():
    with pytest.raises(cuda_share.CudaShareError, match="uint8"):
        cuda_share.payload_to_json((torch.Tensor, torch.Size([1]), (1,), 0,
                                    torch.storage.TypedStorage, torch.float32, 0, b"h", 4, 0,
                                    False, b"r", 0, b"e", False), "u", 4)
    good = cuda_share.payload_to_json(_fake_reduce_args(), "u", 4096)
    with pytest.raises(cuda_share.CudaShareError, match="version"):
        cuda_share.payload_from_json({**good, "v": 9}, 0)
    with pytest.raises(cuda_share.CudaShareError, match="malformed"):
        cuda_share.payload_from_json({k: v for k, v in good.items() if k != "handle"}, 0)
    with pytest.raises(cuda_share.CudaShareError, match="malformed"):
        cuda_share.payload_from_json({**good, "handle": "not base64!"}, 0)


def test_uuid_matching_never_assumes_index_order():
    # what torch prints (no prefix) vs what NVML/the daemon says ("GPU-" prefix), any case
    local = ["11111111-aaaa-bbbb-cccc-000000000000", "22222222-aaaa-bbbb-cccc-000000000000"]
    assert cuda_share.local_index_for_uuid("GPU-22222222-AAAA-bbbb-cccc-000000000000", local) == 1
    assert cuda_share.local_index_for_uuid("11111111-aaaa-bbbb-cccc-000000000000", local) == 0
    # the daemon's cuda:0 hidden by CUDA_VISIBLE_DEVICES: not visible -> None, never index 0
    assert cuda_share.local_index_for_uuid("GPU-33333333-aaaa-bbbb-cccc-000000000000", local) is None
    assert cuda_share.local_index_for_uuid("GPU-x", []) is None


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA refusal")
def test_without_cuda_import_and_upload_refuse_clearly():
    payload = cuda_share.payload_to_json(_fake_reduce_args(), "GPU-abc", 4096)
    with pytest.raises(cuda_share.CudaShareError, match="no CUDA"):
        cuda_share.import_segment(payload, "GPU-abc")
    b = arena.ArenaBuilder("g", 64)
    seg = b.seal()
    try:
        with pytest.raises(cuda_share.CudaShareError, match="not available"):
            cuda_share.GpuSegment.upload(seg, 0)
    finally:
        seg.close()
    cuda_share.release_payload(payload)      # a no-op without CUDA, never an exception
    cuda_share.collect()


def test_tensors_from_segment_builds_views_of_a_flat_buffer(packer):
    # The builder is device-agnostic: on a CPU uint8 buffer holding a segment's bytes (as the
    # imported CUDA buffer does) it yields exactly what attach yields from the memfd.
    w = torch.randn(5, 3)
    obj = {"w": w, "wt": w.t(), "b": torch.arange(7, dtype=torch.int16), "h": torch.randn(3).half()}
    m, seg = packer(obj)
    raw = torch.frombuffer(bytearray(b"\xee" * 128 + os_pread(seg.fd, seg.nbytes)),
                           dtype=torch.uint8)
    buf = raw[128:]                                  # a view with a storage offset, like IPC's
    out = cuda_share.tensors_from_segment(buf, m, 0)
    ref = arena.attach(m, [seg.fd])
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)
    assert out[0].untyped_storage().data_ptr() >= buf.data_ptr()
    # views share the buffer's memory: writing the buffer shows through the tensors
    buf.zero_()
    assert all(not t.any() for t in out)
    with pytest.raises(cuda_share.CudaShareError, match="1-D uint8"):
        cuda_share.tensors_from_segment(buf.view(torch.int16), m, 0)


def os_pread(fd: int, n: int) -> bytes:
    import os
    return os.pread(fd, n, 0)


def test_attach_dispatches_cuda_ipc_segments_to_cuda_share(packer, monkeypatch):
    # arena.attach must hand a cuda-ipc segment to import_segment with its UUID and build the
    # tensors with tensors_from_segment; here import_segment returns a CPU buffer of the bytes.
    from dataclasses import replace
    obj = {"a": torch.randn(4), "b": torch.arange(3)}
    m, seg = packer(obj)
    data = os_pread(seg.fd, seg.nbytes)
    calls = []

    def fake_import(payload, uuid):
        calls.append((payload, uuid))
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    monkeypatch.setattr(cuda_share, "import_segment", fake_import)
    ipc_seg = replace(m.segments[0], kind="cuda-ipc", device="cuda:1", device_uuid="GPU-u",
                      ipc={"v": 1})
    m2 = replace(m, segments=(ipc_seg,))
    got = arena.build(m2, [None])
    assert calls == [({"v": 1}, "GPU-u")]
    assert torch.equal(got["a"], obj["a"]) and torch.equal(got["b"], obj["b"])
    with pytest.raises(arena.ArenaError, match="lacks its handle"):
        arena.attach(replace(m, segments=(replace(ipc_seg, ipc=None),)), [None])


@pytest.mark.skipif(HAS_CUDA, reason="needs the import to fail")
def test_cuda_ipc_segment_falls_back_to_its_host_copy_with_a_warning(packer):
    from dataclasses import replace
    obj = {"a": torch.randn(4), "b": torch.arange(3)}
    m, seg = packer(obj)
    payload = cuda_share.payload_to_json(_fake_reduce_args(), "GPU-abc", seg.nbytes)
    m2 = replace(m, segments=(replace(m.segments[0], kind="cuda-ipc", device="cuda:0",
                                      device_uuid="GPU-abc", ipc=payload),))
    with pytest.warns(RuntimeWarning, match="served from the CPU copy"):
        got = arena.build(m2, [seg.fd], map_location={"cuda:0": "cpu"})
    assert got["a"].device.type == "cpu" and torch.equal(got["a"], obj["a"])
    with pytest.raises(cuda_share.CudaShareError):        # no host copy: the error stands
        arena.build(m2, [None])
