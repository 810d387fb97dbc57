"""Operator actions: remap, pin, unpin, evict, reload, and the state file that keeps pins and remaps.

:class:`Actions` owns the operator's decisions: the :class:`~devmapd.daemon.statefile.OperatorState`
(pins and remap targets, persisted so they survive restarts) and the checks of an action's
arguments. The server has already checked that the peer is an operator. It asks the load queue
for moves through the small :class:`LoadControl` protocol and the capacity view for the devices
that exist; it owns no load state itself. An operator's decision always replaces a pending
pressure move of the model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from devmapd.config import Config, Rule
from devmapd.daemon import statefile
from devmapd.daemon.registry import ModelRecord, Registry
from devmapd.wire.protocol import ApiError

log = logging.getLogger("devmapd")


class LoadControl(Protocol):
    """What an action asks of the load queue."""

    def enqueue(self, rec: ModelRecord, message: str) -> None: ...
    def cancel_move(self, name: str) -> None: ...
    def drop_version(self, rec: ModelRecord) -> None: ...


class Devices(Protocol):
    def gpu_ids(self) -> list[str]: ...


class Actions:
    """DaemonAPI.action and the persisted operator state (see the module docstring)."""

    def __init__(self, registry: Registry, loads: LoadControl, devices: Devices, config: Callable[[], Config]) -> None:
        self._registry = registry
        self._loads = loads
        self._devices = devices
        self._config = config  # a getter: the config changes on SIGHUP
        self._state = statefile.OperatorState()

    # ------------------------------------------------------------------ operator state
    def load_state(self) -> None:
        """Read the pins and remaps of the previous run (a corrupt file is reported and ignored)."""
        self._state = statefile.load(self._config().state_dir)

    def apply_to(self, rec: ModelRecord, rule: Rule | None) -> None:
        """Give a model just found its persisted pin/remap (a persisted pin wins over the rule's)."""
        rec.pin = self._state.pins.get(rec.name) or (rule.pin if rule and rule.pin else None)
        rec.target = self._state.targets.get(rec.name)

    async def _save_state(self) -> None:
        state_dir = self._config().state_dir
        try:  # fsync: off the event loop
            await asyncio.to_thread(statefile.save, state_dir, self._state)
        except OSError as exc:
            log.error("cannot persist pins/remaps in %s: %s", state_dir, exc)

    # ------------------------------------------------------------------ DaemonAPI.action
    async def action(self, op: str, args: dict[str, Any], peer: Any) -> dict[str, Any]:
        name = args.get("name")
        if not isinstance(name, str):
            raise ApiError("bad_request", f"{op} needs a model name")
        rec = self._registry.get(name)
        if rec is None:
            raise ApiError("not_found", f"no model named {name!r}")
        who = f"uid {getattr(peer, 'uid', '?')}"
        if op in ("remap", "pin"):
            device = args.get("device")
            if not isinstance(device, str) or not self._valid_target(device, allow_auto=(op == "remap")):
                known = ", ".join(["auto", *self._devices.gpu_ids(), "cpu"])
                raise ApiError("bad_request", f"{device!r} is not a device here (known: {known})")
            state = self._state
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
            self._loads.cancel_move(name)
            await self._save_state()
            action = "pinned" if op == "pin" else "remapped"
            self._registry.decision(rec, action, f"{name}: {action} to {device} by {who}", target=device)
            self._loads.enqueue(rec, f"{name}: moving to {device} ({op} by {who})")
            return {"name": name, "state": rec.state, "device": device}
        if op == "unpin":
            rec.pin = None
            self._state.pins.pop(name, None)
            await self._save_state()
            self._registry.decision(rec, "unpinned", f"{name}: unpinned by {who}")
            self._registry.changed(rec, f"{name}: unpinned")
            return {"name": name, "state": rec.state}
        if op == "evict":
            self._loads.drop_version(rec)
            self._registry.transition(rec, "evicted", f"{name}: evicted by {who}", progress=None,
                                      reason=f"evicted by {who}; loads again on fetch or reload")
            self._registry.decision(rec, "evicted", f"{name}: evicted by {who}")
            return {"name": name, "state": rec.state}
        if op == "reload":
            rec.fingerprint = None
            self._registry.decision(rec, "reloaded", f"{name}: reload requested by {who}")
            self._loads.enqueue(rec, f"{name}: reloading ({who})")
            return {"name": name, "state": rec.state}
        raise ApiError("bad_request", f"unknown action {op!r}")

    def _valid_target(self, device: str, *, allow_auto: bool) -> bool:
        if device == "auto":
            return allow_auto
        return device == "cpu" or device in self._devices.gpu_ids()
