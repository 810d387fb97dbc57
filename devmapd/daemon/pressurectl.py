"""The pressure controller: carries out what the pure rules in :mod:`devmapd.pressure` decide.

:class:`PressureController` owns the pressure state carried between polls (each model's last
move, since when its home GPU has had room) and decides, once per poll, which models leave a
crowded or lost GPU and which go back to a GPU: it builds the holdings from the registry,
counts the moves still in flight as made (so one squeeze is not answered again at every poll
until the first moves land), asks :func:`devmapd.pressure.evaluate`, keeps each model's
``home`` until a promotion has actually landed on a GPU (a promotion the planner had to defer is
tried again after the cooldown) and hands every move to the load queue through the small
:class:`Mover` protocol (the queue re-reads the model onto the target; the current version
keeps serving meanwhile). It never loads anything itself, so it can
be driven in a test with a stand-in mover and capacity view and a clock of the test's choosing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Protocol

from devmapd import planner, pressure
from devmapd.config import Config
from devmapd.daemon.registry import ModelRecord, Registry

log = logging.getLogger("devmapd")

MIB = 1 << 20


class Mover(Protocol):
    """What a move needs from the load queue."""

    def busy(self, name: str) -> bool: ...
    def moves_in_flight(self) -> dict[str, str]: ...  # name -> target ("" = anywhere)
    def request_move(self, rec: ModelRecord, target: str, why: str, message: str) -> None: ...


class PressureCapacity(Protocol):
    def capacities(self) -> tuple[list[planner.DeviceCapacity], planner.DeviceCapacity]: ...
    def policy(self) -> planner.Policy: ...
    def lost_gpus(self) -> dict[str, str]: ...


class PressureController:
    """Demotions off crowded GPUs, promotions back home, evacuation of lost GPUs (see the module docstring)."""

    def __init__(self, registry: Registry, capacity: PressureCapacity, mover: Mover, config: Callable[[], Config], *,
                 on_demote: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time) -> None:
        self._registry = registry
        self._capacity = capacity
        self._mover = mover
        self._config = config  # a getter: the watermarks change on SIGHUP
        self._on_demote = on_demote  # metrics: demotions per model
        self._clock = clock
        self._state = pressure.PressureState()
        self._promoting: dict[str, str] = {}  # name -> GPU a promotion of it was sent to (home kept till it lands)

    def watermarks(self) -> pressure.Watermarks:
        p = self._config().pressure
        return pressure.Watermarks(low=p.low_watermark_mib * MIB, high=p.high_watermark_mib * MIB,
                                   cooldown_s=p.cooldown_s)

    def poll(self) -> None:
        """One pressure pass: evacuate lost GPUs, then demote and promote as the rules say."""
        self._evacuate_lost()
        self._settle_promotions()
        gpus, _host = self._capacity.capacities()
        if not gpus:
            return
        gpus = self._with_moves_in_flight(gpus)
        holdings = []
        for rec in self._registry.records():
            if rec.state != "ready" or rec.serving is None:
                continue
            store = getattr(rec.serving, "shared", None)
            for device, nbytes in rec.placement.items():
                if store is not None:  # demoting a model frees only the storages nobody else uses
                    nbytes = store.exclusive_bytes(rec.serving.generation, device)
                holdings.append(pressure.Holding(name=rec.name, device=device, bytes=nbytes,
                                                 # never fetched = least recently fetched (ties go biggest-first)
                                                 last_fetch=rec.last_fetch or 0.0,
                                                 pinned=rec.pin is not None, home=rec.home,
                                                 clients=rec.clients))
        moves, self._state = pressure.evaluate(gpus, holdings, self._state, self._clock(), self.watermarks(),
                                               self._capacity.policy())
        self._say_what_demoted_models_wait_for()
        for move in moves:
            rec = self._registry.get(move.name)
            if rec is None or self._mover.busy(rec.name) or rec.state == "loading":
                continue
            promoting = move.direction == pressure.PROMOTE
            if promoting:
                self._promoting[rec.name] = move.target  # home is cleared once it has landed there
            else:
                rec.home = rec.home or move.source
            self._move(rec, "promoted" if promoting else "demoted", move.source, move.target, move.reason)

    def _say_what_demoted_models_wait_for(self) -> None:
        """A demoted model's reason says what it waits for, not only how it got there: "demoted
        from cuda:1" alone, long after the pressure ended, reads as if nothing would bring it back."""
        for name, wait in self._state.waits:
            rec = self._registry.get(name)
            if rec is None or rec.home is None or rec.state != "ready":
                continue
            why = rec.reason or ""
            base = why.split("; now ", 1)[0]
            text = f"{base}; now {wait}"
            if why != text:
                rec.reason = text
                self._registry.changed(rec, f"{name}: {wait}")

    def _settle_promotions(self) -> None:
        """A promotion that landed ends the model's exile; one that did not is tried again later."""
        for name, target in list(self._promoting.items()):
            rec = self._registry.get(name)
            if rec is None:
                del self._promoting[name]
            elif not self._mover.busy(name) and rec.state != "loading":
                del self._promoting[name]
                if target in rec.placement:
                    rec.home = None

    def _with_moves_in_flight(self, gpus: list[planner.DeviceCapacity]) -> list[planner.DeviceCapacity]:
        """The GPUs as they will be once the moves under way land: off their source, onto their target."""
        released: dict[str, int] = {}
        incoming: dict[str, int] = {}
        policy = self._capacity.policy()
        for name, target in self._mover.moves_in_flight().items():
            rec = self._registry.get(name)
            if rec is None:
                continue
            for device, nbytes in rec.placement.items():
                if device != target:
                    released[device] = released.get(device, 0) + nbytes
            if target and target != "cpu" and target not in rec.placement:
                nbytes = sum(rec.placement.values()) or sum(rec.planned.values())
                incoming[target] = incoming.get(target, 0) + planner.charge(nbytes, policy.overhead)
        if not released and not incoming:
            return gpus
        return [dataclasses.replace(g, free=g.free + released.get(g.id, 0) - incoming.get(g.id, 0),
                                    held=max(0, g.held - released.get(g.id, 0) + incoming.get(g.id, 0)))
                for g in gpus]

    def _evacuate_lost(self) -> None:
        """Models on a GPU that fell off the bus are read again onto a device that is there."""
        lost = self._capacity.lost_gpus()
        if not lost:
            return
        for rec in self._registry.records():
            gone = [dev for dev in rec.placement if dev in lost]
            if not gone or rec.state != "ready" or self._mover.busy(rec.name):
                continue
            where = ", ".join(gone)
            # "" = no target: the planner picks a device that is there.
            self._move(rec, "demoted", where, "", f"{where} was lost ({lost[gone[0]]})")

    def _move(self, rec: ModelRecord, action: str, source: str, target: str, why: str) -> None:
        """Hand one move to the load queue; ``why`` becomes the model's reason once it lands."""
        if self._on_demote is not None and action == "demoted":
            self._on_demote(rec.name)
        arrow = f"{source} -> {target}" if target else f"off {source}"
        self._registry.decision(rec, action, f"{rec.name}: {action} {arrow}: {why}", source=source,
                                target=target or None)
        self._mover.request_move(rec, target, f"{action} from {source}: {why}", f"{rec.name}: moving {arrow}")
