"""Operator actions: remap, pin, unpin, evict, reload, and the state file that keeps pins and remaps.

:class:`Actions` owns the operator's decisions: the :class:`~devmapd.daemon.statefile.OperatorState`
(pins and remap targets, persisted so they survive restarts) and the checks of an action's
arguments. The server has already checked that the peer is an operator. It asks the load queue
for moves through the small :class:`LoadControl` protocol and the capacity view for the devices
that exist; it owns no load state itself. An operator's decision always replaces a pending
pressure move of the model.

Every reply says what happened: the model's ``name`` and ``state`` (and the ``device`` asked
for), ``outcome`` and ``message`` (one plain sentence):

* ``applied``: done, or a load doing it is queued;
* ``pending``: recorded, but it cannot happen now; the message says why and what it waits for;
* ``unchanged``: nothing to do (a pin or remap to where the model already sits is not reloaded).

A refused action (unknown model, a device this machine lacks) raises :class:`ApiError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from devmapd.config import Config, Rule
from devmapd.daemon import statefile
from devmapd.daemon.registry import ModelRecord, Registry
from devmapd.planner import Placement
from devmapd.textfmt import safe
from devmapd.wire.protocol import ApiError

log = logging.getLogger("devmapd")


class LoadControl(Protocol):
    """What an action asks of the load queue."""

    def enqueue(self, rec: ModelRecord, message: str) -> None: ...
    def cancel_move(self, name: str) -> None: ...
    def drop_version(self, rec: ModelRecord) -> None: ...
    def preview(self, rec: ModelRecord) -> Placement | None: ...


class Devices(Protocol):
    def gpu_ids(self) -> list[str]: ...


class Actions:
    """DaemonAPI.action and the persisted operator state (see the module docstring)."""

    def __init__(self, registry: Registry, loads: LoadControl, devices: Devices, config: Callable[[], Config], *,
                 state_dir: Path | None = None) -> None:
        self._registry = registry
        self._loads = loads
        self._devices = devices
        self._config = config  # a getter: the config changes on SIGHUP
        self._state_dir = state_dir  # resolved once at start (devmapd.daemon.statedir); None: the config's
        self._state = statefile.OperatorState()

    # ------------------------------------------------------------------ operator state
    def load_state(self) -> None:
        """Read the pins and remaps of the previous run (a corrupt file is reported and ignored)."""
        self._state = statefile.load(self._dir())

    def apply_to(self, rec: ModelRecord, rule: Rule | None) -> None:
        """Give a model just found its persisted pin/remap (a persisted pin wins over the rule's)."""
        rec.pin = self._state.pins.get(rec.name) or (rule.pin if rule and rule.pin else None)
        rec.target = self._state.targets.get(rec.name)

    def _dir(self) -> Path:
        return self._state_dir if self._state_dir is not None else Path(self._config().state_dir)

    async def _save_state(self) -> None:
        state_dir = self._dir()
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
            outcome, message, move, why = self._where_now(rec, device, action)
            if move:
                self._loads.enqueue(rec, f"{name}: moving to {device} ({op} by {who})")
            else:
                rec.reason = f"{action} to {device} by {who}; {why}"
                self._registry.changed(rec, f"{name}: {action} to {device}; not reloaded")
            return self._reply(rec, outcome, message, device=device)
        shown = safe(name)
        if op == "unpin":
            if rec.pin is None:
                return self._reply(rec, "unchanged", f"{shown} was not pinned; nothing changed.")
            rec.pin = None
            self._state.pins.pop(name, None)
            await self._save_state()
            self._registry.decision(rec, "unpinned", f"{name}: unpinned by {who}")
            self._registry.changed(rec, f"{name}: unpinned")
            return self._reply(rec, "applied", f"{shown} is unpinned; it stays {self._where(rec)} until a remap or "
                                               f"memory pressure moves it.")
        if op == "evict":
            if rec.state == "evicted":
                return self._reply(rec, "unchanged", f"{shown} is already evicted; it loads again on its next fetch "
                                                     f"or reload.")
            where = self._where(rec)
            self._loads.drop_version(rec)
            self._registry.transition(rec, "evicted", f"{name}: evicted by {who}", progress=None,
                                      reason=f"evicted by {who}; loads again on fetch or reload")
            self._registry.decision(rec, "evicted", f"{name}: evicted by {who}")
            return self._reply(rec, "applied", f"{shown} was evicted (it was {where}); it loads again on its next "
                                               f"fetch or reload.")
        if op == "reload":
            rec.fingerprint = None
            self._registry.decision(rec, "reloaded", f"{name}: reload requested by {who}")
            self._loads.enqueue(rec, f"{name}: reloading ({who})")
            return self._reply(rec, "applied", f"{shown} is reloading from disk; the current version serves until "
                                               f"the new one is ready." if rec.serving is not None else
                               f"{shown} is loading from disk.")
        raise ApiError("bad_request", f"unknown action {op!r}")

    @staticmethod
    def _reply(rec: ModelRecord, outcome: str, message: str, **extra: Any) -> dict[str, Any]:
        return {"name": rec.name, "state": rec.state, **extra, "outcome": outcome, "message": message}

    @staticmethod
    def _where(rec: ModelRecord) -> str:
        return "on " + ", ".join(sorted(rec.placement)) if rec.placement else "unloaded"

    def _where_now(self, rec: ModelRecord, device: str, action: str) -> tuple[str, str, bool, str]:
        """(outcome, message, whether to queue a load, the model's reason when none is queued) for a pin
        or remap just recorded."""
        shown, wanted = safe(rec.name), (None if device == "auto" else device)
        if rec.serving is None:
            if rec.state == "evicted" or rec.lazy:
                return ("pending", f"{shown} is {action} to {device} but not loaded ({rec.state}); it goes there on "
                                   f"its next fetch or reload.", True, "")
            return "applied", f"{shown} is {action} to {device} and loads there.", True, ""
        preview = self._loads.preview(rec)
        if preview is None:
            return "applied", f"{shown} is moving to {device}.", True, ""
        now, then = set(rec.placement), {dev for dev, _ in preview.devices}
        where = ", ".join(sorted(now)) or "nowhere"
        if preview.kind == "deferred" or then == now:
            if wanted is None:
                return ("unchanged", f"{shown} is remapped to auto and the planner keeps it on {where}; nothing was "
                                     f"reloaded.", False, f"stays on {where}")
            if now == {wanted}:
                return ("unchanged", f"{shown} is {action} to {device}, where it already is; nothing was reloaded.",
                        False, "already there")
            return ("pending", f"{shown} is {action} to {device} but stays on {where} for now: {preview.reason}; it "
                               f"moves at its next load (reload it) once {device} has room.", False,
                    f"stays on {where} until {device} has room: {preview.reason}")
        if wanted is not None and then != {wanted}:
            target = ", ".join(sorted(then))
            return ("pending", f"{shown} is {action} to {device}, which cannot take it now ({preview.reason}); it "
                               f"moves to {target} meanwhile.", True, "")
        return "applied", f"{shown} is moving from {where} to {', '.join(sorted(then))}.", True, ""

    def _valid_target(self, device: str, *, allow_auto: bool) -> bool:
        if device == "auto":
            return allow_auto
        return device == "cpu" or device in self._devices.gpu_ids()
