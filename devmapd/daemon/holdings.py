"""Per-device totals of what the daemon's models hold, kept as they change (never re-summed).

Placing one model needs what every OTHER model occupies per device (its serving placement
plus where an in-flight load of it is going). Summing that over the registry on every load
makes a start-up of N models cost O(N^2); at 1,000 models it was most of the start-up.
:class:`Holdings` keeps the sums and, per model, the last placement and planned bytes it
counted, so a change costs O(devices of that model):

* it listens to the registry: every event about a model (a transition, a change, a removal)
  re-reads that one record's ``placement`` and ``planned`` and applies the difference;
* code that sets ``planned`` without an event (a load about to start) calls ``update(rec)``.

``verify(records)`` recomputes from scratch: the tests use it to prove the incremental sums
never drift.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from devmapd.daemon.registry import ModelRecord, Registry


def _add(totals: dict[str, int], part: dict[str, int], sign: int) -> None:
    for device, nbytes in part.items():
        n = totals.get(device, 0) + sign * nbytes
        if n:
            totals[device] = n
        else:
            totals.pop(device, None)


class Holdings:
    """Bytes held (serving placements) and planned (in-flight loads) per device."""

    def __init__(self, registry: Registry | None = None) -> None:
        self._held: dict[str, int] = {}
        self._planned: dict[str, int] = {}
        self._seen: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
        self._registry = registry
        if registry is not None:
            registry.listen(self._on_event)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "model":
            name = (event.get("model") or {}).get("name")
            rec = self._registry.get(name) if self._registry is not None and name is not None else None
            if rec is not None:
                self.update(rec)
        elif kind == "removed":
            self.forget(str(event.get("name")))

    def update(self, rec: ModelRecord) -> None:
        """Count ``rec`` as it is now (idempotent; O(devices))."""
        placement, planned = rec.placement, rec.planned
        old = self._seen.get(rec.name)
        if old is not None and old[0] == placement and old[1] == planned:
            return
        if old is not None:
            _add(self._held, old[0], -1)
            _add(self._planned, old[1], -1)
        snap = (dict(placement), dict(planned))
        _add(self._held, snap[0], 1)
        _add(self._planned, snap[1], 1)
        self._seen[rec.name] = snap

    def forget(self, name: str) -> None:
        old = self._seen.pop(name, None)
        if old is not None:
            _add(self._held, old[0], -1)
            _add(self._planned, old[1], -1)

    def held(self) -> dict[str, int]:
        """Bytes the serving versions occupy per device (what the hardware sees)."""
        return dict(self._held)

    def occupied_by_others(self, rec: ModelRecord) -> dict[str, int]:
        """What every model but ``rec`` holds or is loading onto, per device."""
        self.update(rec)
        out = dict(self._held)
        _add(out, self._planned, 1)
        own = self._seen.get(rec.name)
        if own is not None:
            _add(out, own[0], -1)
            _add(out, own[1], -1)
        return out

    @staticmethod
    def verify(records: Iterable[ModelRecord]) -> tuple[dict[str, int], dict[str, int]]:
        """(held, planned) summed from scratch over ``records``."""
        held: dict[str, int] = {}
        planned: dict[str, int] = {}
        for rec in records:
            _add(held, rec.placement, 1)
            _add(planned, rec.planned, 1)
        return held, planned

    def totals(self) -> tuple[dict[str, int], dict[str, int]]:
        return dict(self._held), dict(self._planned)
