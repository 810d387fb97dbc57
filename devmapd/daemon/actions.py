"""Operator actions: remap, pin, unpin, evict, reload.

A mixin of :class:`devmapd.daemon.Daemon`. The server has already checked that
the peer is an operator; this module checks the arguments, records pins and
remaps in the state file (so they survive restarts), and queues the moves.
An operator's decision always replaces a pending pressure move of the model.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from devmapd.daemon import statefile
from devmapd.wire.protocol import ApiError

log = logging.getLogger("devmapd")


class ActionsMixin:
    """DaemonAPI.action and its helpers (see the module docstring)."""

    async def action(self, op: str, args: dict[str, Any], peer: Any) -> dict[str, Any]:
        name = args.get("name")
        if not isinstance(name, str):
            raise ApiError("bad_request", f"{op} needs a model name")
        rec = self.registry.get(name)
        if rec is None:
            raise ApiError("not_found", f"no model named {name!r}")
        who = f"uid {getattr(peer, 'uid', '?')}"
        if op in ("remap", "pin"):
            device = args.get("device")
            if not isinstance(device, str) or not self._valid_target(device, allow_auto=(op == "remap")):
                known = ", ".join(["auto"] + [d["id"] for d in self._device_status()])
                raise ApiError("bad_request", f"{device!r} is not a device here (known: {known})")
            state = self.operator_state
            if op == "pin":
                rec.pin, rec.target = device, None
                state.pins[name] = device
                state.targets.pop(name, None)
            else:
                rec.target = None if device == "auto" else device
                if rec.target is None:
                    state.targets.pop(name, None)
                else:
                    state.targets[name] = device
                rec.pin = None
                state.pins.pop(name, None)
            rec.home = None
            self._forced.pop(name, None)
            await self._save_state()
            action = "pinned" if op == "pin" else "remapped"
            self.registry.decision(rec, action, f"{name}: {action} to {device} by {who}", target=device)
            self._enqueue(rec, f"{name}: moving to {device} ({op} by {who})")
            return {"name": name, "state": rec.state, "device": device}
        if op == "unpin":
            rec.pin = None
            self.operator_state.pins.pop(name, None)
            await self._save_state()
            self.registry.decision(rec, "unpinned", f"{name}: unpinned by {who}")
            self.registry.changed(rec, f"{name}: unpinned")
            return {"name": name, "state": rec.state}
        if op == "evict":
            self._drop_version(rec)
            self.registry.transition(rec, "evicted", f"{name}: evicted by {who}", progress=None,
                                     reason=f"evicted by {who}; loads again on fetch or reload")
            self.registry.decision(rec, "evicted", f"{name}: evicted by {who}")
            return {"name": name, "state": rec.state}
        if op == "reload":
            rec.fingerprint = None
            self.registry.decision(rec, "reloaded", f"{name}: reload requested by {who}")
            self._enqueue(rec, f"{name}: reloading ({who})")
            return {"name": name, "state": rec.state}
        raise ApiError("bad_request", f"unknown action {op!r}")

    def _valid_target(self, device: str, *, allow_auto: bool) -> bool:
        if device == "auto":
            return allow_auto
        return device == "cpu" or any(d.id == device for d in (self.snapshot.gpus if self.snapshot else ()))

    async def _save_state(self) -> None:
        try:  # fsync: off the event loop
            await asyncio.to_thread(statefile.save, self.cfg.state_dir, self.operator_state)
        except OSError as exc:
            log.error("cannot persist pins/remaps in %s: %s", self.cfg.state_dir, exc)
