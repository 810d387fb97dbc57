"""Content-addressed storages: checkpoints that hold the same bytes share one copy per device.

A lab's model directory is full of near-duplicates (fine-tunes of one base, every epoch of a
run, the same weights re-saved in another format). ``StorageStore`` keeps, per device, every
storage a served model uses exactly once, keyed by its bytes, and hands each model a manifest
whose entries point into the store's sealed segments.

Unit of sharing: the STORAGE, never the tensor. A manifest storage is the distinct
``(segment, offset, storage_nbytes)`` triple of its entries: tied weights and views point at one
storage, and keep doing so after the redirect; dtype, shape, stride and storage offset stay in
each manifest entry. The bytes compared are the SERVED bytes (after prefix stripping and dtype
casts), because the store reads them from the model's own sealed segments after the read.

Identity of bytes: each storage is hashed with xxh3-128 (measured on a 2-core host: 30 GB/s
against 6.8 GB/s for blake3 on one thread, 13.5 GB/s on all threads, and about 5 GB/s for
the read itself, so blake3 would cost 25-60 % of the load rate and xxh3 about 15 %). xxh3 is not
cryptographic, so a hash match is only a candidate: the bytes are compared with ``memcmp``
before anything is shared (17 GB/s, and only for the bytes that then need no memory). A crafted
collision therefore costs one comparison and shares nothing. Within ONE model two equal storages
stay separate (torch.load gives them separate storages, and a client's copy-on-write write
into one must not show in the other).

Segments: a sealed memfd cannot be hole-punched (F_SEAL_WRITE forbids fallocate), so a storage
cannot be freed alone out of the segment it was read into. Two ways out were weighed:

* one segment per unit of sharing: the set of models sharing a storage changes whenever a model
  comes or goes, so storages would have to move between segments on every operation anyway, and
  a segment per storage costs an fd per storage (a lab's ~1,000 models hold ~10^5 storages;
  SCM_RIGHTS carries at most 253 fds in one message);
* compaction (chosen): a model's read lands in its own segment as today; the storages it shares
  point into the segments that already hold them, and the storages nobody uses any more are
  ``dead`` bytes of their segment. When a segment's dead bytes pass ``compact_dead_fraction`` of
  it, its live storages are copied (in the kernel, sendfile) into a new sealed segment, every
  holder's manifest is rebuilt to point there (``Holding.layout`` counts the rebuilds), and the
  old segment is retired. Clients that mapped the old one keep their mapping (a mapping of a
  memfd outlives every fd of it), new fetches use the new one. A segment whose storages are all
  dead is retired without a copy. A new model whose storages were mostly found is compacted
  the same way at once, so only its new storages stay resident.

  Compacting eagerly (fraction 0) keeps memory exact but copies the shared part of a segment
  every time one of its models leaves; the default (0.25) copies at most a third of what it
  frees and holds at most a quarter of a segment dead, which ``usage()`` reports as
  ``reclaimable``.

Bounded fds: every segment counts against a live ``origin`` owner (first the model whose read
made it). When the origin leaves and the segment still holds storages others use, the holder
of most of its bytes inherits it; an heir already at ``segments_per_owner`` (default 2) segments
on that device gets it merged with its smallest one (one copy of both). So the store holds at
most segments_per_owner x live models x devices segments, however long the chain of versions
that left storages behind (epoch after epoch replacing the last). A manifest refers to at most
``max_segments`` segments per device: when a model's storages are found in more, the matches
in the segments that would contribute least are kept as the model's own copies instead.

Retired segments are not closed at once: a fetch may be between reading a holding's fds and
sending them. The caller closes them with ``reap()`` when no fetch is in flight (the daemon's
event loop, after it has picked up every rebuilt manifest). Every method is thread-safe.

Planning: ``cost_of(device, keys)`` says how many bytes a model whose storage keys are known
(from an earlier read: ``keys_of(owner)``) would add on a device, and ``exclusive_bytes(owner)``
how many releasing it would free: what the planner charges and what the pressure loop gains
by demoting a model whose storages are shared.
"""
from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from devmapd.engine.arena import (
    ArenaBuilder,
    ArenaError,
    Manifest,
    SealedSegment,
    SegmentInfo,
    TensorEntry,
    layout,
)

__all__ = ["StorageKey", "Holding", "OwnerUsage", "DeviceUsage", "StorageStore", "DedupError",
           "hash_name", "digest_of"]

StorageKey = tuple[int, bytes]   # (nbytes, xxh3-128 digest of the bytes)

_HASH_STEP = 64 << 20   # hash in bounded steps so one call never holds a huge buffer export


class DedupError(Exception):
    """A manifest or segment the store cannot take; the message says what is wrong."""


def _hasher() -> tuple[Any, str]:
    """xxh3-128 when xxhash is installed; else stdlib blake2b-128 (cryptographic, ~6x slower)."""
    try:
        import xxhash
    except ImportError:
        import hashlib
        return (lambda: hashlib.blake2b(digest_size=16)), "blake2b-128 (hashlib; install xxhash for speed)"
    return xxhash.xxh3_128, f"xxh3_128 (xxhash {xxhash.VERSION})"


def hash_name() -> str:
    """The content hash in use, with its library version (for status and reports)."""
    return _hasher()[1]


def digest_of(buf: memoryview) -> bytes:
    """The 128-bit content hash of ``buf`` (a byte view), fed in bounded steps."""
    h = _hasher()[0]()
    n = buf.nbytes
    for pos in range(0, n, _HASH_STEP):
        h.update(buf[pos:pos + _HASH_STEP])
    digest: bytes = h.digest()
    return digest


_libc: Any = None


def _memcmp() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None)
        lib.memcmp.restype = ctypes.c_int
        lib.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        _libc = lib
    return _libc.memcmp


class _Mapped:
    """A private read mapping of a sealed segment, for hashing and comparing its bytes.

    MAP_PRIVATE with write permission (never used) so ctypes can take its address; a private
    mapping of a sealed memfd is allowed and sees the memfd's pages without copying them.
    """

    def __init__(self, seg: SealedSegment):
        self.nbytes = seg.nbytes
        self.mm: mmap.mmap | None = None
        self._anchor: Any = None
        self.addr = 0
        if seg.nbytes:
            self.mm = mmap.mmap(seg.fd, seg.nbytes, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self._anchor = ctypes.c_char.from_buffer(self.mm)
            self.addr = ctypes.addressof(self._anchor)

    def view(self, offset: int, nbytes: int) -> memoryview:
        if self.mm is None:
            return memoryview(b"")
        return memoryview(self.mm)[offset:offset + nbytes]

    def close(self) -> None:
        self._anchor = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass   # a view still exists (an exception's traceback holds one): unmapped with it
            self.mm = None


class _Segment:
    __slots__ = ("id", "device", "sealed", "_mapped", "payload", "live", "retired", "origin")

    def __init__(self, sid: int, device: str, sealed: SealedSegment, origin: Hashable):
        self.id = sid
        self.device = device
        self.origin = origin                 # the live owner this segment counts against
        self.sealed = sealed
        self._mapped: _Mapped | None = None
        self.payload = 0                     # bytes of every storage placed in it, dead or alive
        self.live: dict[int, _Entry] = {}    # entry id -> entry still held by someone
        self.retired = False

    @property
    def mapped(self) -> _Mapped:
        """A read mapping, made on first use and dropped by ``unmap`` at the end of each store
        operation: holding every segment mapped would cost the daemon page tables for every
        byte it serves (~0.2 % of it) and fault time it rarely needs again."""
        if self._mapped is None:
            self._mapped = _Mapped(self.sealed)
        return self._mapped

    def unmap(self) -> None:
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None

    @property
    def live_bytes(self) -> int:
        return sum(e.nbytes for e in self.live.values())

    @property
    def dead_bytes(self) -> int:
        return self.payload - self.live_bytes


class _Entry:
    __slots__ = ("id", "device", "nbytes", "digest", "segment", "offset", "holders")

    def __init__(self, eid: int, device: str, nbytes: int, digest: bytes | None, segment: _Segment,
                 offset: int):
        self.id = eid
        self.device = device
        self.nbytes = nbytes
        self.digest = digest          # None until a storage of the same size needs comparing
        self.segment = segment
        self.offset = offset
        self.holders: set[Hashable] = set()

    def get_digest(self) -> bytes:
        if self.digest is None:
            self.digest = digest_of(self.segment.mapped.view(self.offset, self.nbytes))
        return self.digest


@dataclass
class Holding:
    """One owner's claim on the store: the manifest to serve and the segments its fds come from.

    ``manifest`` and ``segments`` change when compaction moves storages (``layout`` counts the
    changes); read them together under ``StorageStore.lock`` or compare ``layout`` before and
    after. The segments belong to the store: never close them, release the owner instead.
    """

    owner: Hashable
    manifest: Manifest
    segments: tuple[SealedSegment, ...]
    devices: tuple[str, ...]                 # device of each distinct storage of the model
    layout: int = 0
    # internals: the template entries, and per entry the index of its storage in _refs
    _template: tuple[TensorEntry, ...] = field(default=(), repr=False)
    _storage_of: tuple[int, ...] = field(default=(), repr=False)
    _refs: list[_Entry | None] = field(default_factory=list, repr=False)   # None: an empty storage
    _anchor: dict[str, SealedSegment] = field(default_factory=dict, repr=False)  # device -> empty segment

    @property
    def fds(self) -> list[int | None]:
        return [s.fd for s in self.segments]

    @property
    def nbytes(self) -> int:
        """Bytes of the model's distinct storages (what it would hold alone)."""
        return sum(r.nbytes for r in self._refs if r is not None)

    def placement(self) -> dict[str, int]:
        """Bytes of the model's storages per device, as if it held them alone (what it serves)."""
        out: dict[str, int] = {}
        for r in self._refs:
            if r is not None:
                out[r.device] = out.get(r.device, 0) + r.nbytes
        return out


@dataclass(frozen=True)
class OwnerUsage:
    """One owner's bytes: ``own`` held by it alone, ``shared`` also held by others, per other owner."""

    bytes: int
    own: int
    shared: int
    shared_with: dict[Hashable, int]


@dataclass(frozen=True)
class DeviceUsage:
    """``unique``: bytes of distinct live storages; ``resident``: bytes the segments still hold
    (unique + ``reclaimable`` dead bytes awaiting compaction); ``segments``/``storages`` counts."""

    unique: int
    resident: int
    reclaimable: int
    segments: int
    storages: int


class StorageStore:
    """Content-addressed storages of every device, with per-owner reference counts."""

    def __init__(self, *, compact_dead_fraction: float = 0.25, max_segments: int = 32,
                 segments_per_owner: int = 2, label: str = "shared") -> None:
        if not 0.0 <= compact_dead_fraction < 1.0:
            raise ValueError(f"compact_dead_fraction must be in [0, 1), not {compact_dead_fraction!r}")
        if max_segments < 1:
            raise ValueError(f"max_segments must be >= 1, not {max_segments!r}")
        self.compact_dead_fraction = compact_dead_fraction
        self.max_segments = max_segments
        if segments_per_owner < 1:
            raise ValueError(f"segments_per_owner must be >= 1, not {segments_per_owner!r}")
        self.segments_per_owner = segments_per_owner
        self.label = label
        self.lock = threading.RLock()
        self._index: dict[tuple[str, int], list[_Entry]] = {}   # (device, nbytes) -> entries
        self._segments: dict[int, _Segment] = {}
        self._holdings: dict[Hashable, Holding] = {}
        self._retired: list[_Segment] = []
        self._retired_anchors: list[SealedSegment] = []
        self._next_id = 0
        self.compactions = 0
        self.compacted_bytes = 0
        self.changes = 0          # bumped by every adopt and release (report's cache key)
        self.compaction_failures = 0
        self.last_compaction_error = ""
        self._pending: set[int] = set()   # segments whose compaction failed, retried at each release
        self._report: tuple[Any, dict[str, Any]] | None = None

    # ------------------------------------------------------------------------- adding

    def adopt(self, owner: Hashable, manifest: Manifest, segments: Sequence[SealedSegment]) -> Holding:
        """Take a freshly read model: share what the store already holds, keep the rest.

        ``manifest`` and ``segments`` are a read's (LoadedModel): memfd segments only (a real
        GPU's buffers are not shared here). The store takes ownership of ``segments`` (it
        closes or keeps them; the caller must not use them afterwards) and returns the owner's
        Holding. If it raises (DedupError: ``owner`` is already held, or the manifest does not
        match the segments; OSError: no memory to map or hash them), nothing was taken and the
        segments are still the caller's to close.
        """
        if len(segments) != len(manifest.segments):
            raise DedupError(f"{len(segments)} segments for a manifest naming {len(manifest.segments)}")
        for i, info in enumerate(manifest.segments):
            if info.kind != "memfd":
                raise DedupError(f"segment {i} ({info.device}) is a {info.kind!r} segment; only "
                                 "memfd segments are shared")
            if segments[i].nbytes < info.nbytes:
                raise DedupError(f"segment {i} holds {segments[i].nbytes} bytes, the manifest says {info.nbytes}")
        template = tuple(manifest.tensors)
        with self.lock:
            if owner in self._holdings:
                raise DedupError(f"{owner!r} already holds storages; release it first")
        # The model's storages: distinct (segment, offset, nbytes) triples in first-use order.
        storage_index: dict[tuple[int, int, int], int] = {}
        storage_of: list[int] = []
        triples: list[tuple[int, int, int]] = []
        for e in template:
            t = (e.segment, e.offset, e.storage_nbytes)
            si = storage_index.get(t)
            if si is None:
                si = storage_index[t] = len(triples)
                triples.append(t)
            storage_of.append(si)
        new_segs = [_Segment(-1, info.device, seg, owner) for info, seg in zip(manifest.segments, segments)]
        with self.lock:
            if owner in self._holdings:
                raise DedupError(f"{owner!r} already holds storages; release it first")
            try:
                return self._adopt_locked(owner, manifest, template, tuple(storage_of), triples, new_segs)
            except BaseException:
                for seg in new_segs:   # nothing was registered (see _adopt_locked): drop our mappings
                    seg.unmap()
                raise
            finally:
                self.changes += 1
                self._unmap_all()

    def _unmap_all(self) -> None:
        for seg in self._segments.values():
            seg.unmap()

    def _adopt_locked(self, owner: Hashable, manifest: Manifest, template: tuple[TensorEntry, ...],
                      storage_of: tuple[int, ...], triples: list[tuple[int, int, int]],
                      new_segs: list[_Segment]) -> Holding:
        for s in new_segs:
            s.id = self._next_id
            self._next_id += 1
        # 1. candidates: for each storage, an existing entry with equal bytes not used by this
        # owner. Only storages of a size the device already holds are hashed (equal bytes have
        # equal sizes), so a model unlike anything held loads without hashing anything; the
        # entries it leaves are hashed when a storage of their size first needs comparing.
        found: list[_Entry | None] = []
        digests: list[bytes | None] = []
        taken: set[int] = set()
        for seg_i, off, nb in triples:
            digests.append(None)
            if nb == 0:
                found.append(None)
                continue
            dev = new_segs[seg_i].device
            match = None
            for cand in self._index.get((dev, nb), ()):
                if cand.id in taken:
                    continue
                if digests[-1] is None:
                    digests[-1] = digest_of(new_segs[seg_i].mapped.view(off, nb))
                if cand.get_digest() == digests[-1] and self._same_bytes(new_segs[seg_i], off, cand, nb):
                    match = cand
                    break
            if match is not None:
                taken.add(match.id)
            found.append(match)
        # 2. bound the segments one manifest names per device: keep the matches in the segments
        # that contribute most; the others' storages stay as the model's own copies (which
        # takes the slot of the model's own segment, if it had none yet).
        per_dev: dict[str, dict[int, int]] = {}
        has_own: set[str] = set()
        for i, m in enumerate(found):
            if m is not None:
                per_dev.setdefault(m.device, {})
                per_dev[m.device][m.segment.id] = per_dev[m.device].get(m.segment.id, 0) + m.nbytes
            elif triples[i][2]:
                has_own.add(new_segs[triples[i][0]].device)
        keep_segments: set[int] = set()
        for dev, by_seg in per_dev.items():
            ranked = sorted(by_seg.items(), key=lambda kv: (-kv[1], kv[0]))
            room = self.max_segments - (1 if dev in has_own else 0)
            if len(ranked) > room:
                room = self.max_segments - 1
            keep_segments.update(sid for sid, _ in ranked[:room])
        found = [m if m is None or m.segment.id in keep_segments else None for m in found]
        # 3. a device whose storages are all empty still needs a segment to point them at (made
        # before anything is registered: from here on nothing raises, so a failed adopt takes
        # nothing and the caller keeps its segments)
        anchors: dict[str, SealedSegment] = {}
        try:
            for dev in {new_segs[t[0]].device for t in triples if t[2] == 0}:
                if not any(t[2] and new_segs[t[0]].device == dev for t in triples):
                    anchors[dev] = ArenaBuilder(f"{self.label}@{dev}", 0).seal()
        except BaseException:
            for a in anchors.values():
                a.close()
            raise
        # 4. register: matched storages take a reference; new ones become entries of new_segs
        refs: list[_Entry | None] = []
        for i, (seg_i, off, nb) in enumerate(triples):
            if nb == 0:
                refs.append(None)
                continue
            m = found[i]
            if m is None:
                seg = new_segs[seg_i]
                m = _Entry(self._next_id, seg.device, nb, digests[i], seg, off)
                self._next_id += 1
                self._index.setdefault((seg.device, nb), []).append(m)
                seg.live[m.id] = m
            m.holders.add(owner)
            refs.append(m)
        for s in new_segs:
            s.payload = sum(nb for seg_i, _off, nb in set(triples) if new_segs[seg_i] is s)
            self._segments[s.id] = s
        holding = Holding(owner=owner, manifest=manifest, segments=(),
                          devices=tuple(new_segs[t[0]].device for t in triples),
                          _template=template, _storage_of=storage_of, _refs=refs)
        self._holdings[owner] = holding
        holding._anchor.update(anchors)
        # 5. the new segments hold dead bytes where storages were found: compact them (or retire
        # them when nothing of theirs is kept).
        for s in new_segs:
            self._settle(s)
        self._rebuild(holding)
        return holding

    def _same_bytes(self, new: _Segment, off: int, cand: _Entry, nbytes: int) -> bool:
        """Byte-for-byte equality: a hash match alone is never trusted."""
        a = new.mapped.addr + off
        b = cand.segment.mapped.addr + cand.offset
        return bool(_memcmp()(a, b, nbytes) == 0)

    # ------------------------------------------------------------------------- releasing

    def release(self, owner: Hashable) -> int:
        """Drop ``owner``'s references; returns the bytes of storages nobody holds any more.

        Segments left mostly dead are compacted (the other holders' manifests are rebuilt);
        retired segments wait for ``reap()``. Releasing an owner not held returns 0.
        """
        with self.lock:
            holding = self._holdings.pop(owner, None)
            if holding is None:
                return 0
            self.changes += 1
            freed = 0
            touched: dict[int, _Segment] = {}
            for ref in {id(r): r for r in holding._refs if r is not None}.values():
                ref.holders.discard(owner)
                if not ref.holders:
                    freed += ref.nbytes
                    del ref.segment.live[ref.id]
                    bucket = self._index[(ref.device, ref.nbytes)]
                    bucket.remove(ref)
                    if not bucket:
                        del self._index[(ref.device, ref.nbytes)]
                    touched[ref.segment.id] = ref.segment
            for sid in self._pending:   # compactions that failed before: try again
                if sid in self._segments:
                    touched[sid] = self._segments[sid]
            self._pending = set()
            for seg in touched.values():
                self._settle(seg)
            self._inherit(owner)
            self._retired_anchors.extend(holding._anchor.values())
            holding._anchor.clear()
            return freed

    def _settle(self, seg: _Segment) -> None:
        """Retire ``seg`` when nothing lives in it, compact it when too much of it is dead."""
        if seg.retired:
            return
        if not seg.live:
            self._retire(seg)
            return
        dead = seg.dead_bytes
        if dead and dead > self.compact_dead_fraction * seg.payload:
            try:
                self._compact(seg)
            except (ArenaError, OSError) as e:
                # No memory or fds for the copy now: the segment stays valid with its dead bytes
                # (reported as reclaimable) and is tried again at the next release.
                self.compaction_failures += 1
                self.last_compaction_error = str(e)
                self._pending.add(seg.id)

    def _retire(self, seg: _Segment) -> None:
        seg.retired = True
        seg.unmap()
        del self._segments[seg.id]
        self._retired.append(seg)

    def _compact(self, seg: _Segment) -> None:
        """Copy ``seg``'s live storages into a new sealed segment; its holders' manifests follow."""
        self._rewrite([seg], seg.origin)

    def _rewrite(self, old: list[_Segment], origin: Hashable) -> None:
        """Copy the live storages of ``old`` (one device) into one new sealed segment of ``origin``,
        retire ``old`` and rebuild the manifest of every holder of a moved storage."""
        live = sorted((e for seg in old for e in seg.live.values()), key=lambda e: (e.segment.id, e.offset))
        device = old[0].device
        offsets, total = layout([e.nbytes for e in live])
        builder = ArenaBuilder(f"{self.label}@{device}", total)
        try:
            for e, off in zip(live, offsets):
                builder.copy_from_file(off, e.segment.sealed.fd, e.offset, e.nbytes)   # kernel copy
            new_sealed = builder.seal()
        except BaseException:
            builder.discard()
            raise
        new = _Segment(self._next_id, device, new_sealed, origin)
        self._next_id += 1
        for e, off in zip(live, offsets):
            e.segment = new
            e.offset = off
            new.live[e.id] = e
        new.payload = sum(e.nbytes for e in live)
        self._segments[new.id] = new
        self.compactions += 1
        self.compacted_bytes += new.payload
        affected = {o: self._holdings[o] for e in live for o in e.holders if o in self._holdings}
        for seg in old:
            self._retire(seg)
        for h in affected.values():
            self._rebuild(h)

    def _inherit(self, owner: Hashable) -> None:
        """Give the segments ``owner`` read (and others still use) to a live heir.

        Every live segment has a live origin and no owner is the origin of more than
        ``segments_per_owner`` segments per device, so the store never holds more segments
        than that many per live model and device, however long the chain of versions that
        left their storages behind. The heir is the holder of most of the segment's bytes;
        an heir that would exceed the bound gets the segment merged with its smallest one.
        """
        for seg in [s for s in self._segments.values() if s.origin == owner]:
            if seg.retired:
                continue
            weight: dict[Hashable, int] = {}
            for e in seg.live.values():
                for o in e.holders:
                    weight[o] = weight.get(o, 0) + e.nbytes
            heir = max(self._holdings, key=lambda o: weight.get(o, 0))
            mine = [s for s in self._segments.values() if s.origin == heir and s.device == seg.device]
            seg.origin = heir
            if len(mine) >= self.segments_per_owner:
                try:
                    self._rewrite([seg, min(mine, key=lambda s: (s.payload, s.id))], heir)
                except (ArenaError, OSError) as e:   # over the bound until the next release
                    self.compaction_failures += 1
                    self.last_compaction_error = str(e)

    # ------------------------------------------------------------------------- manifests

    def _rebuild(self, h: Holding) -> None:
        """Point the holding's manifest at where its storages live now."""
        order: dict[int, int] = {}
        segs: list[_Segment] = []

        def index_of(s: _Segment) -> int:
            i = order.get(s.id)
            if i is None:
                i = order[s.id] = len(segs)
                segs.append(s)
            return i

        first_on: dict[str, int] = {}
        anchors: list[SealedSegment] = []
        anchor_devs: list[str] = []
        for r in h._refs:
            if r is not None:
                first_on.setdefault(r.device, index_of(r.segment))
        entries = []
        for e, si in zip(h._template, h._storage_of):
            ref = h._refs[si]
            if ref is None:   # an empty storage: offset 0 of some segment on its device
                dev = h.devices[si]
                if dev not in first_on:
                    first_on[dev] = len(segs) + len(anchors)
                    anchors.append(h._anchor[dev])
                    anchor_devs.append(dev)
                entries.append(e.replace(segment=first_on[dev], offset=0))
            else:
                entries.append(e.replace(segment=index_of(ref.segment), offset=ref.offset))
        sealed = [s.sealed for s in segs] + anchors
        devs = [s.device for s in segs] + anchor_devs
        infos = tuple(SegmentInfo(kind="memfd", device=d, nbytes=x.nbytes) for d, x in zip(devs, sealed))
        if h.segments:
            h.layout += 1
        h.manifest = Manifest(tensors=tuple(entries), segments=infos, tree=h.manifest.tree,
                              version=h.manifest.version)
        h.segments = tuple(sealed)

    # ------------------------------------------------------------------------- queries

    def holding(self, owner: Hashable) -> Holding | None:
        with self.lock:
            return self._holdings.get(owner)

    def owners(self) -> list[Hashable]:
        with self.lock:
            return list(self._holdings)

    def owner_usage(self, owner: Hashable) -> OwnerUsage:
        """Its own bytes (nobody else holds them) and shared bytes, with whom."""
        with self.lock:
            h = self._holdings.get(owner)
            if h is None:
                return OwnerUsage(0, 0, 0, {})
            own = shared = 0
            with_: dict[Hashable, int] = {}
            for r in {id(r): r for r in h._refs if r is not None}.values():
                others = r.holders - {owner}
                if others:
                    shared += r.nbytes
                    for o in others:
                        with_[o] = with_.get(o, 0) + r.nbytes
                else:
                    own += r.nbytes
            return OwnerUsage(own + shared, own, shared, with_)

    def exclusive_bytes(self, owner: Hashable, device: str | None = None) -> int:
        """Bytes that releasing ``owner`` would free (on ``device``, or everywhere)."""
        with self.lock:
            h = self._holdings.get(owner)
            if h is None:
                return 0
            return sum(r.nbytes for r in {id(r): r for r in h._refs if r is not None}.values()
                       if r.holders == {owner} and (device is None or r.device == device))

    def cost_of(self, device: str, keys: Iterable[StorageKey]) -> int:
        """Bytes a model with these storage keys would add on ``device`` (keys seen before count 0).

        Each key counts against at most one existing copy, like ``adopt`` (a model's two equal
        storages are two copies)."""
        with self.lock:
            seen: dict[StorageKey, int] = {}
            cost = 0
            for k in keys:
                n = seen.get(k, 0)
                if not k[0]:
                    continue
                have = sum(1 for e in self._index.get((device, k[0]), ()) if e.get_digest() == k[1])
                if n < have:
                    seen[k] = n + 1
                else:
                    cost += k[0]
            self._unmap_all()
            return cost

    def keys_of(self, owner: Hashable) -> tuple[StorageKey, ...]:
        """The storage keys of a held model (hashing what was not hashed yet), to keep for
        ``cost_of`` after the model is released: its placement cost on another device later."""
        with self.lock:
            h = self._holdings.get(owner)
            if h is None:
                raise KeyError(owner)
            try:
                return tuple((0, b"") if r is None else (r.nbytes, r.get_digest()) for r in h._refs)
            finally:
                self._unmap_all()

    def usage(self) -> dict[str, DeviceUsage]:
        """Per device: unique live bytes, resident bytes, reclaimable (dead) bytes, counts."""
        with self.lock:
            out: dict[str, list[int]] = {}
            for s in self._segments.values():
                u = out.setdefault(s.device, [0, 0, 0, 0, 0])
                live = s.live_bytes
                u[0] += live
                u[1] += s.payload
                u[2] += s.payload - live
                u[3] += 1
                u[4] += len(s.live)
            return {d: DeviceUsage(*v) for d, v in out.items()}

    def report(self, name_of: Callable[[Hashable], str | None] = str) -> dict[str, Any]:
        """Sharing as plain JSON for status and metrics (cached until the next adopt or release).

        ``{"hash": ..., "devices": {id: {"unique", "resident", "reclaimable", "segments",
        "storages"}}, "models": {name: {"bytes", "own", "shared", "shared_with": {name: bytes}}}}``;
        ``name_of(owner)`` names an owner (None leaves it out, e.g. a version being replaced).
        """
        with self.lock:
            names = {o: name_of(o) for o in self._holdings}
            key = (self.changes, tuple(names.values()))
            if self._report is not None and self._report[0] == key:
                return self._report[1]
            devices = {d: {"unique": u.unique, "resident": u.resident, "reclaimable": u.reclaimable,
                           "segments": u.segments, "storages": u.storages} for d, u in self.usage().items()}
            models: dict[str, Any] = {}
            for owner, name in names.items():
                if name is None:
                    continue
                u = self.owner_usage(owner)
                with_: dict[str, int] = {}
                for other, n in u.shared_with.items():
                    other_name = names.get(other)
                    if other_name is not None:
                        with_[other_name] = with_.get(other_name, 0) + n
                models[name] = {"bytes": u.bytes, "own": u.own, "shared": u.shared,
                                "shared_with": dict(sorted(with_.items()))}
            out = {"hash": hash_name(), "devices": devices, "models": models,
                   "compactions": self.compactions, "compacted_bytes": self.compacted_bytes}
            self._report = (key, out)
            return out

    def savings(self, owners: Iterable[Hashable] | None = None) -> dict[str, int]:
        """Per device, the bytes the holders' placements count more than once: the sum of every
        holder's ``placement()`` minus the bytes of the distinct storages they hold. Subtract it
        from the summed placements of the same owners (default all) to get what the device
        really holds for them; a version still loading or being replaced is left out by naming
        only the owners whose placements are summed."""
        with self.lock:
            chosen = self._holdings if owners is None else {
                o: self._holdings[o] for o in owners if o in self._holdings}
            logical: dict[str, int] = {}
            distinct: dict[int, _Entry] = {}
            for h in chosen.values():
                for r in h._refs:
                    if r is not None:
                        logical[r.device] = logical.get(r.device, 0) + r.nbytes
                        distinct[r.id] = r
            unique: dict[str, int] = {}
            for r in distinct.values():
                unique[r.device] = unique.get(r.device, 0) + r.nbytes
            return {d: n - unique.get(d, 0) for d, n in logical.items() if n - unique.get(d, 0)}

    def fd_count(self) -> int:
        """Open segment fds the store holds (live and awaiting reap)."""
        with self.lock:
            anchors = sum(len(h._anchor) for h in self._holdings.values())
            return len(self._segments) + len(self._retired) + len(self._retired_anchors) + anchors

    # ------------------------------------------------------------------------- closing

    def reap(self) -> int:
        """Close retired segments (call when no fetch is between reading fds and sending them)."""
        with self.lock:
            retired, self._retired = self._retired, []
            anchors, self._retired_anchors = self._retired_anchors, []
        for s in retired:
            s.unmap()
            s.sealed.close()
        for a in anchors:
            a.close()
        return len(retired) + len(anchors)

    def close(self) -> None:
        """Release everything (daemon shutdown)."""
        with self.lock:
            for owner in list(self._holdings):
                self.release(owner)
            for s in list(self._segments.values()):
                self._retire(s)
        self.reap()
