"""Memory-pressure decisions: which models to demote off a crowded GPU, and when to promote
them back. PURE: plain data in, a list of moves and the next state out; no I/O, no clock.

Called once per poll with the live GPU capacities (``free`` as NVML reports it, ``held`` =
devmapd's own bytes there) and devmapd's holdings (one per model and device; a split model has
several). The rules:

* Demote. On a GPU whose ``free < low`` where devmapd holds unpinned models, move the least
  recently fetched first until the projected free (``free`` + bytes moved off) is ``>= high``.
  Models no client holds go before held ones: a held model's GPU block stays until its clients
  let go, so demoting it frees nothing now. (Its bytes still count as moved off, or every held
  model on the GPU would be demoted in one poll.) The caller counts moves still in flight as
  already made (their bytes off the source, onto the target) before it calls, so one squeeze
  is answered once, not again at every poll until the first moves land.
  Target: another GPU that stays at or above ``high`` after taking it and has room under the
  planner's capacity rules (policy picks which: best-fit or spread); else ``"cpu"``. A part of
  a split model always goes to ``"cpu"`` (the daemon re-places the whole model).
* Promote. A demoted model (``home`` set and not where it sits) goes back home when the home
  GPU has had ``free >= high + charge(model)`` continuously for ``cooldown_s`` and devmapd still
  has room there. A model demoted to the CPU whose home has no such room goes to another GPU
  that has (policy picks which), so every demoted model gets back onto a GPU that fits. The
  most recently fetched go first.
* Hysteresis. Demotion starts below ``low`` and promotion needs ``high`` plus the model, so a
  promotion never by itself pushes a GPU back under ``low``.
* No flapping. A model moved in the last ``cooldown_s`` is never moved in the opposite
  direction (a promoted model is not demoted, a demoted one not promoted) within that time.
* Pinned models are never moved.

The state carried between polls (:class:`PressureState`) holds each model's last move and
since when its home has had room; it is immutable and pruned of models no longer held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from devmapd.planner import DeviceCapacity, Policy, capacity, charge, fmt_bytes

__all__ = ["Holding", "Watermarks", "Move", "PressureState", "evaluate"]

DEMOTE = "demote"
PROMOTE = "promote"


@dataclass(frozen=True)
class Holding:
    name: str
    device: str  # where these bytes sit now: "cuda:N" or "cpu"
    bytes: int
    last_fetch: float  # unix seconds; 0 when never fetched
    pinned: bool
    home: str | None  # where the model belongs when it was demoted; None when it is at home
    clients: int = 0  # leases live clients hold on it (their imports pin its GPU block)


@dataclass(frozen=True)
class Watermarks:
    low: int  # bytes: demote when a GPU's free drops below this
    high: int  # bytes: ...until it is back at or above this
    cooldown_s: float


@dataclass(frozen=True)
class Move:
    name: str
    source: str
    target: str
    reason: str
    direction: str = "demote"  # "demote" | "promote"


@dataclass(frozen=True)
class LastMove:
    source: str
    target: str
    at: float
    direction: str  # "demote" | "promote"


@dataclass(frozen=True)
class PressureState:
    """Opaque to callers: start with ``PressureState()`` and pass back what evaluate returns."""

    last_moves: tuple[tuple[str, LastMove], ...] = ()  # name -> its last move (sorted by name)
    room_since: tuple[tuple[str, float], ...] = ()  # name -> since when its home has had room
    # name -> why a demoted model is not back home yet (what it waits for), for its reason
    waits: tuple[tuple[str, str], ...] = ()

    def last_move(self, name: str) -> LastMove | None:
        return dict(self.last_moves).get(name)

    def waiting_for(self, name: str) -> str | None:
        """Why the demoted model ``name`` has not been promoted yet, or None."""
        return dict(self.waits).get(name)


@dataclass
class _Model:
    name: str
    pinned: bool
    home: str | None
    last_fetch: float
    parts: dict[str, int]  # device -> bytes
    clients: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _models(holdings: Sequence[Holding]) -> dict[str, _Model]:
    out: dict[str, _Model] = {}
    for h in holdings:
        m = out.get(h.name)
        if m is None:
            m = out[h.name] = _Model(h.name, h.pinned, h.home, h.last_fetch, {})
        m.pinned = m.pinned or h.pinned
        m.home = m.home or h.home
        m.last_fetch = max(m.last_fetch, h.last_fetch)
        m.clients = max(m.clients, h.clients)
        m.parts[h.device] = m.parts.get(h.device, 0) + max(0, h.bytes)
    return out


def _blocked(state: dict[str, LastMove], name: str, direction: str, now: float, cooldown_s: float) -> bool:
    """True when ``name`` moved the other way less than ``cooldown_s`` ago (no flapping)."""
    last = state.get(name)
    return last is not None and last.direction != direction and now - last.at < cooldown_s


def evaluate(gpus: Sequence[DeviceCapacity], holdings: Sequence[Holding], state: PressureState,
             now: float, marks: Watermarks, policy: Policy) -> tuple[list[Move], PressureState]:
    """This poll's moves (demotions first, in GPU order; then promotions) and the next state."""
    by_id = {g.id: g for g in gpus}
    order = [g.id for g in gpus]
    models = _models(holdings)
    last = dict(state.last_moves)
    room_since = dict(state.room_since)
    moves: list[Move] = []
    moved: set[str] = set()
    incoming: dict[str, int] = {}  # GPU -> charged bytes moving onto it this poll
    released: dict[str, int] = {}  # GPU -> bytes moving off it this poll

    def room_for_devmapd(dev: str) -> int:
        g = by_id[dev]
        return capacity(g, policy) - g.held - incoming.get(dev, 0) + released.get(dev, 0)

    def projected_free(dev: str) -> int:
        return by_id[dev].free - incoming.get(dev, 0) + released.get(dev, 0)

    pressured = [d for d in order if not by_id[d].lost and by_id[d].free < marks.low]

    # ---- demotions --------------------------------------------------------------------------
    for dev in pressured:
        candidates = sorted(
            (m for m in models.values()
             if dev in m.parts and not m.pinned and m.name not in moved
             and not _blocked(last, m.name, DEMOTE, now, marks.cooldown_s)),
            # Unheld before held (demoting a held model frees nothing until its clients let go);
            # then least recently fetched; among equals the biggest, which frees the most with the
            # fewest moves (demoting a few KiB first only to move the big model anyway is churn).
            key=lambda m: (m.clients > 0, m.last_fetch, -m.parts[dev], m.name),
        )
        observed = projected_free(dev)  # what triggered the demotions, before any of them
        for m in candidates:
            if projected_free(dev) >= marks.high:
                break
            nbytes = m.parts[dev]
            cost = charge(nbytes, policy.overhead)
            target = "cpu"
            if len(m.parts) == 1:
                recent = last.get(m.name)
                fitting = [
                    t for t in order
                    if t != dev and t not in pressured and not by_id[t].lost and t != m.home
                    and not (recent is not None and recent.source == t and now - recent.at < marks.cooldown_s)
                    and projected_free(t) - cost >= marks.high and room_for_devmapd(t) >= cost
                ]
                if fitting:
                    if policy.mode == "spread":
                        target = max(fitting, key=lambda t: (projected_free(t), -order.index(t)))
                    else:
                        target = min(fitting, key=lambda t: (projected_free(t), order.index(t)))
            before = projected_free(dev)
            released[dev] = released.get(dev, 0) + nbytes
            if target != "cpu":
                incoming[target] = incoming.get(target, 0) + cost
            moved.add(m.name)
            last[m.name] = LastMove(dev, target, now, DEMOTE)
            room_since.pop(m.name, None)
            # Say how far short the earlier demotions left it: rounded sizes alone can read as
            # "128.0 MiB after earlier demotions, until free >= 128.0 MiB" for a few KiB short.
            progress = "" if before == observed else \
                f"; still {fmt_bytes(marks.high - before)} short after earlier demotions"
            moves.append(Move(m.name, dev, target, (
                f"{dev} free {fmt_bytes(observed)} < low watermark {fmt_bytes(marks.low)}: "
                f"least recently fetched unpinned model goes to {target} until free >= {fmt_bytes(marks.high)}"
                f"{progress}")))

    # ---- promotions -------------------------------------------------------------------------
    waiting = sorted(
        (m for m in models.values()
         if m.home is not None and m.home in by_id and m.home not in m.parts and not m.pinned
         and m.name not in moved),
        key=lambda m: (-m.last_fetch, m.name),
    )
    waits: dict[str, str] = {}

    def fits(dev: str, cost: int) -> bool:
        g = by_id[dev]
        return (not g.lost and dev not in pressured and projected_free(dev) >= marks.high + cost
                and room_for_devmapd(dev) >= cost)

    for m in waiting:
        home = by_id[m.home]  # type: ignore[index]
        cost = charge(m.total, policy.overhead)
        home_has_room = not home.lost and home.free >= marks.high + cost
        # Only a model on the CPU alone looks elsewhere: one on another GPU is on a GPU already.
        elsewhere = [] if home_has_room or set(m.parts) != {"cpu"} else [
            t for t in order if t != home.id and not by_id[t].lost and by_id[t].free >= marks.high + cost]
        if not home_has_room and not elsewhere:
            room_since.pop(m.name, None)
            on = "stays on " + "+".join(sorted(m.parts))
            waits[m.name] = (f"{on}: waits for {home.id} to have free >= high watermark + model "
                             f"({fmt_bytes(marks.high + cost)}; it has {fmt_bytes(max(0, home.free))})")
            continue
        since = room_since.setdefault(m.name, now)
        if now - since < marks.cooldown_s or _blocked(last, m.name, PROMOTE, now, marks.cooldown_s):
            where = home.id if home_has_room else "a GPU"
            waits[m.name] = f"goes back to {where} once the room has lasted the {marks.cooldown_s:g}s cooldown"
            continue
        if home_has_room:
            if not fits(home.id, cost):
                continue  # earlier moves this poll took the room
            target = home.id
            why = "back home"
        else:
            fitting = [t for t in elsewhere if fits(t, cost)]
            if not fitting:
                continue
            if policy.mode == "spread":
                target = max(fitting, key=lambda t: (projected_free(t), -order.index(t)))
            else:
                target = min(fitting, key=lambda t: (projected_free(t), order.index(t)))
            why = f"back on a GPU ({home.id}, where it was demoted from, has no room for it)"
        source = max(m.parts, key=lambda d: (m.parts[d], d))
        incoming[target] = incoming.get(target, 0) + cost
        moved.add(m.name)
        last[m.name] = LastMove(source, target, now, PROMOTE)
        room_since.pop(m.name, None)
        moves.append(Move(m.name, source, target, (
            f"{target} has had free >= high watermark + model ({fmt_bytes(marks.high + cost)}) "
            f"for {now - since:.0f}s: {why}"), PROMOTE))

    waiting_names = {m.name for m in waiting}
    room_since = {n: t for n, t in room_since.items() if n in waiting_names}

    # ---- next state: only models still held; moves only while they can still block ----------
    held_names = set(models)
    next_state = PressureState(
        last_moves=tuple(sorted((n, lm) for n, lm in last.items()
                                if n in held_names and now - lm.at < marks.cooldown_s)),
        room_since=tuple(sorted((n, t) for n, t in room_since.items() if n in held_names)),
        waits=tuple(sorted((n, w) for n, w in waits.items() if n in held_names and n not in moved)),
    )
    return moves, next_state
