"""Each model's status record, built once per change rather than once per ``status`` call.

The registry already builds a model's status dict (``ModelRecord.to_status``) for the event it
emits on every change; :class:`StatusCache` listens and keeps the latest one per model, in name
order. ``status`` then costs a list of references, not 1,000 dicts rebuilt, and what it says is
exactly what the event stream said last (one picture for ``status`` and the dashboard).
``models_json`` also keeps each record's JSON, encoded once per change, so a reply can be
spliced from cached bytes instead of encoding every model again.

The dicts handed out are shared: callers must not change them (copy first, as model_detail
does by building its own).
"""

from __future__ import annotations

import bisect
import json
from typing import Any

from devmapd.daemon.registry import Registry

# The wire protocol's encoding (compact, UTF-8, NaN refused), so spliced bytes equal its own.
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


class StatusCache:
    """The latest status dict (and its JSON) of every registered model, in name order."""

    def __init__(self, registry: Registry) -> None:
        self._dicts: dict[str, dict[str, Any]] = {}
        self._json: dict[str, bytes] = {}
        self._names: list[str] = []
        self._counts: dict[str, int] = {}   # models per state, kept as they change
        self.builds = 0   # records (re)built: the tests count them to show status does no per-model work
        for rec in registry.records():
            self._put(rec.to_status())
        registry.listen(self._on_event)

    def _put(self, d: dict[str, Any]) -> None:
        name = d["name"]
        old = self._dicts.get(name)
        if old is None:
            bisect.insort(self._names, name)
        else:
            self._count(old.get("state"), -1)
        self._count(d.get("state"), 1)
        self._dicts[name] = d
        self._json.pop(name, None)
        self.builds += 1

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "model":
            d = event.get("model")
            if isinstance(d, dict) and isinstance(d.get("name"), str):
                self._put(d)
        elif kind == "removed":
            name = event.get("name")
            if name in self._dicts:
                self._count(self._dicts.pop(name).get("state"), -1)
                self._json.pop(name, None)
                i = bisect.bisect_left(self._names, name)
                if i < len(self._names) and self._names[i] == name:
                    del self._names[i]

    def _count(self, state: Any, n: int) -> None:
        key = str(state)
        left = self._counts.get(key, 0) + n
        if left:
            self._counts[key] = left
        else:
            self._counts.pop(key, None)

    def counts(self) -> dict[str, int]:
        """Models per state (start-up progress: how many are ready, loading, queued...)."""
        return dict(self._counts)

    def __len__(self) -> int:
        return len(self._names)

    def names(self) -> list[str]:
        return list(self._names)

    def models(self) -> list[dict[str, Any]]:
        """Every model's status dict, in name order (shared: do not modify)."""
        d = self._dicts
        return [d[n] for n in self._names]

    def models_json(self) -> bytes:
        """``json(models())`` from per-model bytes encoded once per change."""
        cache = self._json
        parts = []
        for n in self._names:
            b = cache.get(n)
            if b is None:
                b = cache[n] = _dumps(self._dicts[n]).encode("utf-8")
            parts.append(b)
        return b"[" + b",".join(parts) + b"]"

    def status_json(self, status_without_models: dict[str, Any]) -> bytes:
        """The whole status reply's JSON: ``status_without_models`` with ``"models"`` spliced in."""
        head = _dumps({k: v for k, v in status_without_models.items() if k != "models"}).encode("utf-8")
        if head == b"{}":
            return b'{"models":' + self.models_json() + b"}"
        return head[:-1] + b',"models":' + self.models_json() + b"}"
