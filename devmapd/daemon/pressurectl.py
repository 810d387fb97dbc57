"""The pressure controller: carries out what the pure rules in :mod:`devmapd.pressure` decide.

:class:`PressureController` owns the pressure state carried between polls (each model's last
move, since when its home GPU has had room) and decides, once per poll, which models leave a
crowded or lost GPU and which go back home: it builds the holdings from the registry, asks
:func:`devmapd.pressure.evaluate`, records each model's ``home`` and hands every move to the
load queue through the small :class:`Mover` protocol (the queue re-reads the model onto the
target; the current version keeps serving meanwhile). It never loads anything itself, so it can
be driven in a test with a stand-in mover and capacity view and a clock of the test's choosing.
"""

from __future__ import annotations

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

    def watermarks(self) -> pressure.Watermarks:
        p = self._config().pressure
        return pressure.Watermarks(low=p.low_watermark_mib * MIB, high=p.high_watermark_mib * MIB,
                                   cooldown_s=p.cooldown_s)

    def poll(self) -> None:
        """One pressure pass: evacuate lost GPUs, then demote and promote as the rules say."""
        self._evacuate_lost()
        gpus, _host = self._capacity.capacities()
        if not gpus:
            return
        holdings = []
        for rec in self._registry.records():
            if rec.state != "ready" or rec.serving is None:
                continue
            for device, nbytes in rec.placement.items():
                holdings.append(pressure.Holding(name=rec.name, device=device, bytes=nbytes,
                                                 # never fetched = least recently fetched (ties go biggest-first)
                                                 last_fetch=rec.last_fetch or 0.0,
                                                 pinned=rec.pin is not None, home=rec.home))
        moves, self._state = pressure.evaluate(gpus, holdings, self._state, self._clock(), self.watermarks(),
                                               self._capacity.policy())
        for move in moves:
            rec = self._registry.get(move.name)
            if rec is None or self._mover.busy(rec.name) or rec.state == "loading":
                continue
            promoting = rec.home is not None and move.target == rec.home
            rec.home = None if promoting else (rec.home or move.source)
            self._move(rec, "promoted" if promoting else "demoted", move.source, move.target, move.reason)

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
