"""A small daemon for the wire tests: the real Server over REAL sealed arenas of real checkpoints.

Run as ``python -m tests.wire.wiredaemon CONFIG.json`` (a separate process; clients connect from
other, unrelated processes). It implements protocol.DaemonAPI over arenas built from the
``*.pt`` files of ``model_dir``: with ``devmapd.engine.checkpoint.read`` when that module exists, else
directly with ``arena.ArenaBuilder`` from ``torch.load(weights_only=True)``.

Config keys: socket, model_dir, socket_mode, fetch_uids, fetch_groups, operator_uids,
operator_groups, idle_timeout_s, frame_timeout_s, event_timeout_s, max_conns_per_uid,
max_subs_per_conn, max_subs_per_uid, max_subs, slow (name -> seconds a fetch of it waits), queue_max,
refuse (name -> [code, message]: actions on it are refused), reply_extra (name -> keys merged
into its action replies, e.g. an outcome and a message).

Beyond DaemonAPI, ``status()["wire"]`` exposes what the tests check from outside: outstanding
leases, double releases, subscribers, server connections. The ``reload`` action with
``{"burst": N, "size": B}`` emits N events of ~B bytes (to drown a slow subscriber).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from devmapd.engine import arena, tree
from devmapd.wire.peercred import AccessPolicy
from devmapd.wire.protocol import ApiError, FetchGrant, Peer
from devmapd.wire.server import Server


def build_with_arena_builder(path: Path, name: str) -> tuple[arena.Manifest, list[arena.SealedSegment]]:
    """One memfd segment holding every storage of the checkpoint, laid out by arena.layout."""
    obj = torch.load(path, weights_only=True, map_location="cpu")
    storages: list[torch.UntypedStorage] = []
    storage_index: dict[tuple[int, int], int] = {}
    tensors: list[torch.Tensor] = []
    tensor_index: dict[int, int] = {}
    store_of: list[int] = []

    def index(t: torch.Tensor) -> int:
        i = tensor_index.get(id(t))
        if i is None:
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in storage_index:
                storage_index[key] = len(storages)
                storages.append(st)
            i = tensor_index[id(t)] = len(tensors)
            tensors.append(t)
            store_of.append(storage_index[key])
        return i

    encoded = tree.encode(obj, index)
    offsets, total = arena.layout([s.nbytes() for s in storages])
    builder = arena.ArenaBuilder(name, total)
    for st, off in zip(storages, offsets):
        builder.write_at(off, torch.empty(0, dtype=torch.uint8).set_(st))
    segment = builder.seal()
    entries = tuple(
        arena.TensorEntry(segment=0, offset=offsets[si], storage_nbytes=storages[si].nbytes(),
                          storage_offset=t.storage_offset(), dtype=arena.dtype_name(t.dtype),
                          shape=tuple(t.shape), stride=tuple(t.stride()), saved_location="cpu",
                          requires_grad=t.requires_grad,
                          parameter=isinstance(t, torch.nn.Parameter))
        for t, si in zip(tensors, store_of))
    manifest = arena.Manifest(tensors=entries,
                              segments=(arena.SegmentInfo("memfd", "cpu", total),), tree=encoded)
    return manifest, [segment]


def build(path: Path, name: str) -> tuple[arena.Manifest, list[arena.SealedSegment], str]:
    try:
        from devmapd.engine import checkpoint
        read = checkpoint.read
    except (ImportError, AttributeError):
        manifest, segments = build_with_arena_builder(path, name)
        return manifest, segments, "arena.ArenaBuilder"
    loaded = read(path)
    return loaded.manifest, list(loaded.segments), "checkpoint.read"


class WireDaemon:
    """protocol.DaemonAPI over real arenas; see the module docstring."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.models: dict[str, dict[str, Any]] = {}
        self.leases: dict[int, str] = {}
        self.double_releases = 0
        self.inflight = 0            # slow fetches in progress (a test kills a client mid-fetch)
        self.subscribers: list[asyncio.Queue] = []
        self.lease_ids = itertools.count(1)
        self.server: Server | None = None
        self.started_at = time.time()
        self.builder = "none"
        for path in sorted(Path(cfg["model_dir"]).glob("*.pt")):
            manifest, segments, self.builder = build(path, path.stem)
            self.models[path.stem] = {"manifest": manifest, "segments": segments, "path": str(path),
                                      "bytes": sum(s.nbytes for s in manifest.segments),
                                      "fetches": 0}
        # Hugging Face directories (a config.json beside the weights), read by the engine; their
        # JSON side files ride in the fetch reply, as the real daemon ships them, unless
        # "side_files" is false (a daemon too old to ship them).
        for d in sorted(p.parent for p in Path(cfg["model_dir"]).glob("*/config.json")):
            from devmapd.engine import checkpoint, sidefiles
            loaded = checkpoint.read(str(d))
            files = sidefiles.read_side_files(d) if cfg.get("side_files", True) else None
            self.models[d.name] = {"manifest": loaded.manifest, "segments": list(loaded.segments),
                                   "path": str(d), "fetches": 0, "side_files": files,
                                   "bytes": sum(s.nbytes for s in loaded.manifest.segments)}

    def _record(self, name: str) -> dict:
        m = self.models[name]
        return {"name": name, "path": m["path"], "state": "ready", "placement": {"cpu": m["bytes"]},
                "bytes": m["bytes"], "tensors": len(m["manifest"].tensors),
                "clients": sum(1 for n in self.leases.values() if n == name),
                "fetches": m["fetches"], "pinned": False, "pin": None, "error": None,
                "diagnosis": None}

    def status(self) -> dict:
        return {"daemon": {"version": "wire-test", "pid": os.getpid(), "backend": "none",
                           "host": "wire-test-host", "started_at": self.started_at,
                           "socket": self.cfg["socket"]},
                "devices": [], "models": [self._record(n) for n in self.models],
                "wire": {"leases": len(self.leases), "double_releases": self.double_releases,
                         "subscribers": len(self.subscribers), "builder": self.builder,
                         "inflight": self.inflight,
                         "connections": self.server.connections if self.server else 0,
                         "server_subscriptions": self.server.subscriptions if self.server else 0}}

    def model_detail(self, name: str) -> dict:
        if name not in self.models:
            raise ApiError("not_found", f"no model named {name!r}")
        return self._record(name)

    async def fetch(self, name: str, peer: Peer) -> FetchGrant:
        if name not in self.models:
            raise ApiError("not_found", f"no model named {name!r} (see `devmapd status`)")
        delay = self.cfg.get("slow", {}).get(name)
        if delay:
            self.inflight += 1
            try:
                await asyncio.sleep(delay)
            finally:
                self.inflight -= 1
        m = self.models[name]
        m["fetches"] += 1
        lease = next(self.lease_ids)
        self.leases[lease] = name
        files = m.get("side_files")
        return FetchGrant(manifest=m["manifest"], fds=[s.fd for s in m["segments"]], lease=lease,
                          model=self._record(name),
                          side_files_json=None if files is None else json.dumps(files).encode())

    def release(self, lease: Any) -> None:
        if self.leases.pop(lease, None) is None:
            self.double_releases += 1

    def subscribe(self) -> tuple[asyncio.Queue, Any]:
        q: asyncio.Queue = asyncio.Queue(maxsize=self.cfg.get("queue_max", 1000))
        self.subscribers.append(q)

        def unsubscribe() -> None:
            if q in self.subscribers:
                self.subscribers.remove(q)
        return q, unsubscribe

    def emit(self, event: dict) -> None:
        for q in list(self.subscribers):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                self.subscribers.remove(q)
                q.put_nowait_overflow = True  # type: ignore[attr-defined]

    async def action(self, op: str, args: dict, peer: Peer) -> dict:
        name = args.get("name")
        if name not in self.models:
            raise ApiError("not_found", f"no model named {name!r}")
        if name in self.cfg.get("refuse", {}):           # [code, message]: a refused action
            raise ApiError(*self.cfg["refuse"][name])
        for i in range(int(args.get("burst", 1))):
            self.emit({"type": "decision", "ts": time.time(), "name": name, "action": op,
                       "from": "cpu", "to": "cpu", "message": f"{op} {name} #{i}",
                       "pad": "x" * int(args.get("size", 0))})
            if i % 100 == 99:
                await asyncio.sleep(0)   # let the server's pumps run, as a real daemon would
        return {"name": name, "op": op, "state": "ready", "by_uid": peer.uid,
                **self.cfg.get("reply_extra", {}).get(name, {})}


async def main(cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    api = WireDaemon(cfg)
    policy = AccessPolicy(fetch_uids=tuple(cfg.get("fetch_uids", ())),
                          fetch_groups=tuple(cfg.get("fetch_groups", ())),
                          operator_uids=tuple(cfg.get("operator_uids", ())),
                          operator_groups=tuple(cfg.get("operator_groups", ())))
    server = Server(api, cfg["socket"], policy=policy, socket_mode=int(cfg.get("socket_mode", 0o660)),
                    socket_group=cfg.get("socket_group"),
                    idle_timeout_s=cfg.get("idle_timeout_s", 300.0),
                    frame_timeout_s=cfg.get("frame_timeout_s", 10.0),
                    event_timeout_s=cfg.get("event_timeout_s", 5.0),
                    max_conns_per_uid=cfg.get("max_conns_per_uid", 64),
                    **{k: cfg[k] for k in ("max_subs_per_conn", "max_subs_per_uid", "max_subs") if k in cfg})
    api.server = server
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {os.getpid()} {api.builder}", flush=True)
    await stop.wait()
    await server.close()
    for m in api.models.values():
        for s in m["segments"]:
            s.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
