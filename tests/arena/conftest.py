"""Fixtures for the arena tests: real checkpoints written by torch, packed into sealed arenas.

``pack`` plays the daemon's role by hand (checkpoint.read belongs to another module): it walks
what ``torch.load`` returned, gives each distinct storage an aligned slot, copies the storage
bytes in and seals the memfd.
"""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from devmapd.engine import arena, tree


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return (st.data_ptr(), st.nbytes())


def pack(obj: Any, name: str = "test", *, location_of=None, via_file: str | None = None,
         device: str = "cpu") -> tuple[arena.Manifest, arena.SealedSegment]:
    """Pack every tensor of ``obj`` into one sealed segment; returns (manifest, segment).

    ``location_of(tensor) -> str`` sets saved_location (default "cpu"). With ``via_file`` the
    bytes are copied with copy_from_file from a raw dump of the storages (exercises sendfile).
    """
    tensors: list[torch.Tensor] = []
    index: dict[int, int] = {}

    def ti(t: torch.Tensor) -> int:
        if id(t) not in index:
            index[id(t)] = len(tensors)
            tensors.append(t)
        return index[id(t)]

    enc = tree.encode(obj, ti)
    storages: dict[tuple[int, int], torch.UntypedStorage] = {}
    for t in tensors:
        storages.setdefault(_storage_key(t), t.untyped_storage())
    keys = list(storages)
    offsets, total = arena.layout([storages[k].nbytes() for k in keys])
    off_of = dict(zip(keys, offsets))
    b = arena.ArenaBuilder(name, total)
    try:
        if via_file:
            with open(via_file, "wb") as f:
                src_offsets = {}
                for k in keys:
                    src_offsets[k] = f.tell()
                    f.write(bytes(storages[k]))   # test-side copy only
            fd = os.open(via_file, os.O_RDONLY)
            try:
                for k in keys:
                    b.copy_from_file(off_of[k], fd, src_offsets[k], storages[k].nbytes())
            finally:
                os.close(fd)
        else:
            for k in keys:
                st = storages[k]
                b.write_at(off_of[k], torch.empty(0, dtype=torch.uint8).set_(st))
        seg = b.seal()
    except BaseException:
        b.discard()
        raise
    entries = tuple(
        arena.TensorEntry(
            segment=0, offset=off_of[_storage_key(t)], storage_nbytes=t.untyped_storage().nbytes(),
            storage_offset=t.storage_offset(), dtype=arena.dtype_name(t.dtype),
            shape=tuple(t.shape), stride=tuple(t.stride()),
            saved_location=location_of(t) if location_of else "cpu",
            requires_grad=t.requires_grad, parameter=isinstance(t, torch.nn.Parameter))
        for t in tensors)
    m = arena.Manifest(tensors=entries,
                       segments=(arena.SegmentInfo(kind="memfd", device=device, nbytes=total),),
                       tree=enc)
    return m, seg


@pytest.fixture
def packer():
    made: list[arena.SealedSegment] = []

    def _pack(obj, **kw):
        m, seg = pack(obj, **kw)
        made.append(seg)
        return m, seg

    yield _pack
    for seg in made:
        seg.close()
