"""Model records, their state machine, and the event stream built from them.

A record is the daemon's whole knowledge of one model: where its file is, what
inspection found, which version is serving, where that version sits, who holds
it. Every change goes through :class:`Registry`, which checks the transition
and tells subscribers, so the TUI, ``devmapd status`` and the logs can never
disagree about a model.

States::

    queued -> loading -> ready | failed
    ready  -> loading          (reload or move: the old version keeps serving)
    ready | failed -> evicted  (dropped from memory, still registered)
    any    -> queued           (file changed, operator reload)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STATES = ("queued", "loading", "ready", "failed", "evicted")

_ALLOWED: dict[str, frozenset[str]] = {
    "queued": frozenset({"loading", "queued", "evicted", "failed"}),
    "loading": frozenset({"ready", "failed", "queued", "evicted"}),
    "ready": frozenset({"loading", "queued", "evicted", "ready"}),
    "failed": frozenset({"queued", "loading", "evicted", "failed"}),
    "evicted": frozenset({"queued", "loading", "evicted"}),
}


class TransitionError(RuntimeError):
    """A state change the state machine does not allow (a daemon bug, never user input)."""


@dataclass
class ModelRecord:
    """Everything the daemon knows about one model."""

    name: str
    path: str
    state: str = "queued"
    source: Any = None  # names.ModelSource
    fingerprint: tuple | None = None
    inspection: Any = None  # checkpoint.Inspection
    serving: Any = None  # the version clients get: daemon.ServedVersion
    generation: int = 0
    placement: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    diagnosis: Any = None  # checkpoint.Diagnosis
    reason: str = ""
    load_time_s: float | None = None
    loaded_at: float | None = None
    last_fetch: float | None = None
    fetches: int = 0
    leases: dict[int, int] = field(default_factory=dict)  # lease id -> generation held
    pin: str | None = None
    target: str | None = None  # operator remap ("cuda:1", "cpu"); None = auto
    progress: float | None = None
    lazy: bool = False
    home: str | None = None  # where pressure demoted it from
    stored: list[str] = field(default_factory=list)  # FDNAMEs of the serving version in systemd's fd store
    attempt: int = 0  # bumped by each load attempt and by evict/delete: a stale attempt drops its result
    planned: dict[str, int] = field(default_factory=dict)  # device -> bytes an in-flight load will occupy
    # The format a failed inspection still recognised ("torch-zip" for a truncated zip): status
    # names it as `devmapd inspect` does, while `inspection` stays the last good one (or None).
    format_hint: str | None = None

    @property
    def clients(self) -> int:
        return len(self.leases)

    def to_status(self) -> dict[str, Any]:
        """The model's entry in ``devmapd status --json`` (DESIGN.md contract plus extras)."""
        insp = self.inspection
        diag = self.diagnosis
        return {
            "name": self.name,
            "path": self.path,
            "format": getattr(insp, "format", None) or self.format_hint,
            "state": self.state,
            "serving": self.serving is not None,
            "placement": dict(self.placement),
            "bytes": getattr(insp, "bytes", 0) if insp is not None else 0,
            "dtypes": dict(getattr(insp, "dtypes", {}) or {}),
            "tensors": getattr(insp, "tensors", 0) if insp is not None else 0,
            "locations": dict(getattr(insp, "locations", {}) or {}),
            "prefixes": list(getattr(insp, "prefixes", ()) or ()),
            "clients": self.clients,
            "pinned": self.pin is not None,
            "pin": self.pin,
            "target": self.target,
            "error": self.error,
            "diagnosis": None if diag is None else {"code": diag.code, "message": diag.message},
            "load_time_s": self.load_time_s,
            "loaded_at": self.loaded_at,
            "last_fetch": self.last_fetch,
            "fetches": self.fetches,
            "progress": self.progress,
            "reason": self.reason,
            "generation": self.generation,
            "lazy": self.lazy,
        }


Listener = Callable[[dict[str, Any]], None]


class Registry:
    """The set of model records; every mutation emits an event to listeners."""

    def __init__(self) -> None:
        self._records: dict[str, ModelRecord] = {}
        self._sorted: list[ModelRecord] | None = None  # records() in name order, rebuilt after add/remove
        self._listeners: list[Listener] = []

    # -- reading -----------------------------------------------------------
    def get(self, name: str) -> ModelRecord | None:
        return self._records.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[ModelRecord]:
        """Every record in name order (a copy: callers may change the registry while iterating).

        The order is kept between calls and rebuilt only after a model comes or goes, so the
        many callers per load and per poll do not sort 1,000 names each time."""
        if self._sorted is None:
            self._sorted = [self._records[name] for name in sorted(self._records)]
        return list(self._sorted)

    def counts(self) -> dict[str, int]:
        out = {state: 0 for state in STATES}
        for rec in self._records.values():
            out[rec.state] += 1
        return out

    # -- events ------------------------------------------------------------
    def listen(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)

        def unlisten() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unlisten

    def emit(self, event: dict[str, Any]) -> None:
        event.setdefault("ts", time.time())
        for listener in list(self._listeners):
            listener(event)

    def changed(self, rec: ModelRecord, message: str) -> None:
        """Tell listeners a record changed (after fields were set directly)."""
        self.emit({"type": "model", "model": rec.to_status(), "message": message})

    def decision(self, rec: ModelRecord, action: str, message: str, *, source: str | None = None,
                 target: str | None = None) -> None:
        self.emit({"type": "decision", "name": rec.name, "action": action, "from": source, "to": target,
                   "message": message})

    # -- writing -----------------------------------------------------------
    def add(self, rec: ModelRecord) -> ModelRecord:
        self._records[rec.name] = rec
        self._sorted = None
        self.changed(rec, f"{rec.name}: registered ({rec.path})")
        return rec

    def remove(self, name: str, message: str) -> ModelRecord | None:
        rec = self._records.pop(name, None)
        if rec is not None:
            self._sorted = None
            self.emit({"type": "removed", "name": name, "message": message})
        return rec

    def transition(self, rec: ModelRecord, state: str, message: str, **fields: Any) -> None:
        """Move ``rec`` to ``state`` (checked), set ``fields``, and emit one event."""
        if state not in STATES:
            raise TransitionError(f"unknown state {state!r}")
        if state not in _ALLOWED[rec.state]:
            raise TransitionError(f"{rec.name}: {rec.state} -> {state} is not allowed")
        rec.state = state
        for key, value in fields.items():
            if not hasattr(rec, key):
                raise AttributeError(key)
            setattr(rec, key, value)
        self.changed(rec, message)
