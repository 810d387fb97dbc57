"""Placement planner: (device capacities, model demands, policy) -> one Placement per model.

PURE: no I/O, no torch, nothing of devmapd imported; the same input always gives the same output.

Capacity. For each GPU devmapd may use::

    others    = max(0, total - free - held)          # what other processes use now
    available = min(total - others, total * max_fraction) - reserve

and every model placed on it in this plan is charged ``bytes * (1 + overhead)`` (allocator
margin) against ``available``. ``held`` is devmapd's own current usage; it is NOT subtracted
because the plan re-charges every model it keeps. Lost GPUs get nothing. The host ("cpu") is
limited only by ``policy.host_cap`` (None: no cap) and is charged the plain bytes (memfds have
no allocator slack). Beyond the cap a model is ``deferred``: registered, loaded on first fetch.

Order. Models are handled by priority (higher first), then size (bigger first), then name, in
three passes: (1) pins, (2) models whose ``current`` placement is still valid keep it (no
reshuffle on every replan), (3) everything else. So a pin outranks stability, and stability
outranks a new model.

One model, in pass 3:

* ``lazy`` and not placed yet -> ``deferred`` ("lazy: loads on first fetch").
* ``device_map`` rules (fnmatch globs over module group names, first match wins; device
  ``"auto"`` = no rule) put the matching groups on their device when it has room; a rule that
  cannot be honoured now is said in ``reason`` and its groups are placed like the rest. The
  unmatched groups are placed as below.
* ``preferred`` devices are tried first, in order, for the whole model.
* Otherwise by policy among the GPUs with room for the whole model: ``best-fit`` (default: the
  tightest GPU that fits) or ``spread`` (the GPU with the most room).
* No single GPU has room -> with ``allow_split`` and at least two groups, a split like
  accelerate's device maps: groups in file order fill the GPUs (most room first) contiguously,
  a group never split, the rest on the CPU; used only when some group lands on a GPU.
* Else the CPU, else (host cap) ``deferred`` with the reason.

Pins: a pin that fits is always honoured. A pin that does NOT fit now is not forced (that
would over-commit a device someone else is using); the model is placed where it fits and the
reason says ``pin to X cannot be honoured now`` so the daemon can report it. The next replan
tries the pin again.

Group bytes: when ``groups`` add up to less than ``bytes`` (tensors outside any group), the
difference travels with the first group so a split still accounts for every byte.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

__all__ = ["DeviceCapacity", "ModelDemand", "Policy", "Placement", "plan", "capacity", "charge", "fmt_bytes"]


@dataclass(frozen=True)
class DeviceCapacity:
    id: str
    total: int
    free: int  # as the inventory reports it
    held: int  # bytes devmapd has placed there now
    lost: bool = False


@dataclass(frozen=True)
class ModelDemand:
    name: str
    bytes: int
    groups: tuple[tuple[str, int], ...] = ()  # module groups in file order -> bytes
    current: tuple[tuple[str, int], ...] = ()  # where it sits now (device -> bytes), for stability
    pin: str | None = None
    preferred: tuple[str, ...] = ()
    device_map: tuple[tuple[str, str], ...] = ()  # (glob over groups, device)
    lazy: bool = False
    priority: int = 0  # higher is placed first


@dataclass(frozen=True)
class Policy:
    mode: str = "best-fit"  # "best-fit" | "spread"
    reserve: int = 0  # bytes kept free on every GPU
    max_fraction: float = 0.9  # devmapd's share of a GPU's total at most
    overhead: float = 0.02  # allocator margin charged on GPU placements
    host_cap: int | None = None  # host bytes devmapd may fill; beyond it models are deferred
    allow_split: bool = True


@dataclass(frozen=True)
class Placement:
    name: str
    kind: str  # "gpu" | "split" | "cpu" | "deferred"
    devices: tuple[tuple[str, int], ...]  # device -> bytes (empty when deferred)
    group_devices: tuple[tuple[str, str], ...] = ()  # split: group -> device, file order
    reason: str = ""


MODES = ("best-fit", "spread")


def fmt_bytes(n: int | float) -> str:
    """Human size for reasons and logs: '512 MiB', '3.2 GiB'."""
    n = float(n)
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def charge(nbytes: int, overhead: float) -> int:
    """Bytes charged on a GPU for ``nbytes`` of tensors (allocator margin included)."""
    return nbytes + math.ceil(nbytes * max(0.0, overhead))


def capacity(gpu: DeviceCapacity, policy: Policy) -> int:
    """Bytes devmapd may place on ``gpu`` in total (see module docstring); 0 when lost."""
    if gpu.lost:
        return 0
    others = max(0, gpu.total - gpu.free - gpu.held)
    return max(0, min(gpu.total - others, math.floor(gpu.total * policy.max_fraction)) - policy.reserve)


class _Ledger:
    """Room left per device while a plan is being made (copyable for tentative placements)."""

    def __init__(self, gpus: Sequence[DeviceCapacity], host: DeviceCapacity, policy: Policy) -> None:
        self.policy = policy
        self.host_id = host.id
        self.order = [g.id for g in gpus if not g.lost]  # input order: the tie-breaker
        self.lost = {g.id for g in gpus if g.lost}
        self.room: dict[str, int] = {g.id: capacity(g, policy) for g in gpus if not g.lost}
        self.host_room: int | None = policy.host_cap

    def copy(self) -> _Ledger:
        new = object.__new__(_Ledger)
        new.policy, new.host_id, new.order, new.lost = self.policy, self.host_id, self.order, self.lost
        new.room, new.host_room = dict(self.room), self.host_room
        return new

    def known(self, dev: str) -> bool:
        return dev == self.host_id or dev in self.room

    def cost(self, dev: str, nbytes: int) -> int:
        return nbytes if dev == self.host_id else charge(nbytes, self.policy.overhead)

    def left(self, dev: str) -> float:
        if dev == self.host_id:
            return math.inf if self.host_room is None else self.host_room
        return self.room.get(dev, -1)

    def fits(self, per_device: dict[str, int]) -> bool:
        return all(self.known(d) and self.cost(d, b) <= self.left(d) for d, b in per_device.items())

    def take(self, per_device: dict[str, int]) -> None:
        for d, b in per_device.items():
            if d == self.host_id:
                if self.host_room is not None:
                    self.host_room -= b
            else:
                self.room[d] -= self.cost(d, b)

    def why_not(self, dev: str, nbytes: int) -> str:
        if dev in self.lost:
            return f"{dev} is lost"
        if not self.known(dev):
            return f"no device {dev}"
        if dev == self.host_id:
            return f"host cap leaves {fmt_bytes(self.left(dev))}, needs {fmt_bytes(nbytes)}"
        return (f"{dev} has {fmt_bytes(max(0, self.left(dev)))} for devmapd{self.after_reserve()}, "
                f"needs {fmt_bytes(self.cost(dev, nbytes))}")

    def after_reserve(self) -> str:
        """Names the per-GPU reserve when there is one: a small GPU can hold nothing because of
        it, and "0 B on cuda:0" alone does not say why."""
        if not self.policy.reserve:
            return ""
        return f" after the {fmt_bytes(self.policy.reserve)} reserve (devices.reserve_mib)"


def _groups_of(m: ModelDemand) -> list[tuple[str, int]]:
    groups = [(g, max(0, int(b))) for g, b in m.groups]
    missing = m.bytes - sum(b for _, b in groups)
    if groups and missing > 0:
        groups[0] = (groups[0][0], groups[0][1] + missing)
    return groups


def _sum_by_device(assign: list[tuple[str, int, str]]) -> dict[str, int]:
    """(group, bytes, device) in file order -> device -> bytes, devices in order of first use."""
    out: dict[str, int] = {}
    for _, b, d in assign:
        out[d] = out.get(d, 0) + b
    return out


def _result(name: str, assign: list[tuple[str, int, str]], host_id: str, reason: str) -> Placement:
    per = _sum_by_device(assign)
    holding = [d for d, b in per.items() if b]
    if holding and len(holding) < len(per):
        # A device that would hold only empty groups holds nothing: reporting it (cuda:0 -> 0 B)
        # makes a placement that the next replan cannot reproduce. Its empty groups go with the first.
        assign = [(g, b, d if d in holding else holding[0]) for g, b, d in assign]
        per = _sum_by_device(assign)
    if len(per) == 1:
        (dev, b), = per.items()
        return Placement(name, "cpu" if dev == host_id else "gpu", ((dev, b),), (), reason)
    return Placement(name, "split", tuple(per.items()), tuple((g, d) for g, _, d in assign), reason)


def _whole(name: str, dev: str, nbytes: int, host_id: str, reason: str) -> Placement:
    return Placement(name, "cpu" if dev == host_id else "gpu", ((dev, nbytes),), (), reason)


def _choose_gpu(ledger: _Ledger, nbytes: int) -> str | None:
    """The GPU the policy picks for ``nbytes`` as one piece, or None when none has room."""
    fitting = [d for d in ledger.order if ledger.cost(d, nbytes) <= ledger.left(d)]
    if not fitting:
        return None
    if ledger.policy.mode == "spread":
        return max(fitting, key=lambda d: (ledger.left(d), -ledger.order.index(d)))
    return min(fitting, key=lambda d: (ledger.left(d) - ledger.cost(d, nbytes), ledger.order.index(d)))


def _split(ledger: _Ledger, groups: list[tuple[str, int]]) -> list[tuple[str, int, str]] | None:
    """accelerate-style contiguous fill: GPUs with the most room first, the rest on the host.

    None when no group would land on a GPU or the host cannot take the rest.
    """
    gpus = sorted(ledger.order, key=lambda d: (-ledger.left(d), ledger.order.index(d)))
    assign: list[tuple[str, int, str]] = []
    i = 0
    for dev in gpus:
        used = 0
        while i < len(groups) and ledger.cost(dev, used + groups[i][1]) <= ledger.left(dev):
            used += groups[i][1]
            assign.append((groups[i][0], groups[i][1], dev))
            i += 1
        if i == len(groups):
            break
    if not any(d != ledger.host_id for _, _, d in assign):
        return None
    rest = groups[i:]
    if rest:
        if ledger.cost(ledger.host_id, sum(b for _, b in rest)) > ledger.left(ledger.host_id):
            return None
        assign.extend((g, b, ledger.host_id) for g, b in rest)
    return assign


def _place_whole(nbytes: int, groups: list[tuple[str, int]], preferred: Sequence[str], ledger: _Ledger,
                 notes: list[str], what: str = "") -> list[tuple[str, int, str]] | None:
    """Stage 1: the whole model on one device - a preferred one, else the GPU the policy
    picks. Commits to ``ledger``; None when no single GPU (or preferred device) has room."""
    pieces = groups if groups else [("", nbytes)]

    def whole(dev: str, why: str) -> list[tuple[str, int, str]]:
        ledger.take({dev: nbytes})
        notes.append(why)
        return [(g, b, dev) for g, b in pieces]

    for dev in preferred:
        if dev == "auto":
            continue
        if ledger.known(dev) and ledger.fits({dev: nbytes}):
            return whole(dev, f"{what}preferred device {dev}")
        notes.append(f"{what}preferred {dev} skipped: {ledger.why_not(dev, nbytes)}")
    chosen = _choose_gpu(ledger, nbytes)
    if chosen is None:
        return None
    if ledger.policy.mode == "spread":
        why = f"{what}spread: {chosen} has the most room ({fmt_bytes(ledger.left(chosen))} for devmapd)"
    else:
        why = f"{what}best-fit: {chosen} is the tightest GPU with room ({fmt_bytes(ledger.left(chosen))} for devmapd)"
    return whole(chosen, why)


def _place_fallback(nbytes: int, groups: list[tuple[str, int]], ledger: _Ledger, notes: list[str],
                    what: str = "") -> list[tuple[str, int, str]] | None:
    """Stage 2, when no single GPU has room: a split by module group, else the CPU. Commits
    to ``ledger``; None when even the host cannot take it (notes say why)."""
    pieces = groups if groups else [("", nbytes)]
    if ledger.order:
        best = max(ledger.order, key=lambda d: (ledger.left(d), -ledger.order.index(d)))
        no_room = (f"no GPU has room for {fmt_bytes(ledger.cost(best, nbytes))} "
                   f"(most: {fmt_bytes(max(0, ledger.left(best)))} on {best}{ledger.after_reserve()})")
    elif ledger.lost:
        no_room = "every GPU is lost"
    else:
        no_room = "no GPUs"
    if ledger.policy.allow_split and len(groups) >= 2:
        assign = _split(ledger, groups)
        if assign is not None:
            per = _sum_by_device(assign)
            ledger.take(per)
            parts = ", ".join(f"{d} {fmt_bytes(b)}" for d, b in per.items())
            notes.append(f"{what}split by module group across {parts}: {no_room}")
            return assign
    if ledger.fits({ledger.host_id: nbytes}):
        ledger.take({ledger.host_id: nbytes})
        notes.append(f"{what}{no_room}: on the CPU")
        return [(g, b, ledger.host_id) for g, b in pieces]
    notes.append(f"{what}{no_room}, and the {ledger.why_not(ledger.host_id, nbytes)}")
    return None


def _place_by_rules(m: ModelDemand, groups: list[tuple[str, int]], ledger: _Ledger,
                    notes: list[str]) -> list[tuple[str, int, str]] | None:
    """device_map rules first, the unmatched (or unplaceable) groups like a whole model."""
    target: dict[str, str] = {}
    for g, _ in groups:
        for glob, dev in m.device_map:
            if fnmatchcase(g, glob):
                if dev != "auto":
                    target[g] = dev
                break
    if not target:
        notes.append("device_map rules match no module group")
    ruled: dict[str, int] = {}
    for g, b in groups:
        if g in target:
            ruled[target[g]] = ruled.get(target[g], 0) + b
    honoured: set[str] = set()
    for dev, b in ruled.items():  # devices in order of first matching group: deterministic
        if ledger.known(dev) and ledger.fits({dev: b}):
            ledger.take({dev: b})
            honoured.add(dev)
        else:
            globs = sorted({glob for glob, d in m.device_map if d == dev})
            notes.append(f"device_map {', '.join(globs)} -> {dev} cannot be honoured now: {ledger.why_not(dev, b)}")
    placed = {g: d for g, d in target.items() if d in honoured}
    if placed:
        notes.append("device_map: " + ", ".join(f"{d} ({fmt_bytes(ruled[d])})" for d in ruled if d in honoured))
    rest = [(g, b) for g, b in groups if g not in placed]
    rest_assign: dict[str, str] = {}
    if rest:
        what = "rest: " if placed else ""
        nbytes = sum(b for _, b in rest)
        sub = _place_whole(nbytes, rest, m.preferred, ledger, notes, what)
        if sub is None:
            sub = _place_fallback(nbytes, rest, ledger, notes, what)
        if sub is None:
            return None
        rest_assign = {g: d for g, _, d in sub}
    return [(g, b, placed.get(g) or rest_assign[g]) for g, b in groups]


def _reconstruct(groups: list[tuple[str, int]], cur: dict[str, int], host_id: str,
                 device_map: Sequence[tuple[str, str]] = ()) -> list[tuple[str, int, str]] | None:
    """Which groups sit where, for a split ``current`` given only device -> bytes.

    Groups a device_map rule sends to a device of ``current`` sit there; the others form
    contiguous runs per device (how _split fills), so search an order of the devices whose
    remaining byte counts are consumed exactly by consecutive groups, host last. Zero-byte
    groups stay with the run before them. None when no order matches: the caller replans.
    """
    fixed: dict[str, str] = {}
    for g, _ in groups:
        for glob, dev in device_map:
            if fnmatchcase(g, glob):
                if dev in cur:
                    fixed[g] = dev
                break
    budget = dict(cur)
    for g, b in groups:
        if g in fixed:
            budget[fixed[g]] -= b
    if any(b < 0 for b in budget.values()):
        return None
    free_groups = [(g, b) for g, b in groups if g not in fixed]
    devices = sorted((d for d, b in budget.items() if b > 0), key=lambda d: (d == host_id, d))
    if len(devices) > 8:
        return None

    def walk(i: int, left: tuple[str, ...]) -> list[tuple[str, int, str]] | None:
        if not left:
            return [] if i == len(free_groups) else None
        for dev in left:
            if dev == host_id and len(left) > 1:
                continue  # the host takes the tail
            j, acc = i, 0
            while j < len(free_groups) and acc < budget[dev]:
                acc += free_groups[j][1]
                j += 1
            while j < len(free_groups) and free_groups[j][1] == 0:
                j += 1
            if acc != budget[dev]:
                continue
            tail = walk(j, tuple(d for d in left if d != dev))
            if tail is not None:
                return [(g, b, dev) for g, b in free_groups[i:j]] + tail
        return None

    runs = walk(0, tuple(devices))
    if runs is None:
        return None
    where = {g: d for g, _, d in runs} | fixed
    return [(g, b, where[g]) for g, b in groups]


def _keep(m: ModelDemand, groups: list[tuple[str, int]], ledger: _Ledger) -> Placement | None:
    """The model's current placement, if every device is usable and it still fits."""
    cur: dict[str, int] = {}
    for dev, b in m.current:
        cur[dev] = cur.get(dev, 0) + int(b)
    if not cur or any(not ledger.known(d) for d in cur) or not ledger.fits(cur):
        return None
    if len(cur) == 1:
        (dev, b), = cur.items()
        if b != m.bytes:
            return None  # the file changed size: place it afresh
        ledger.take(cur)
        return _whole(m.name, dev, b, ledger.host_id, f"kept on {dev}: still fits")
    if not m.groups:
        # A split we are told about without its groups (the daemon describes models already in
        # memory by what they occupy): keep it exactly as it is.
        ledger.take(cur)
        return Placement(m.name, "split", tuple(cur.items()), (), "kept split across " + ", ".join(cur) + ": still fits")
    assign = _reconstruct(groups, cur, ledger.host_id, m.device_map)
    if assign is None:
        return None
    ledger.take(cur)
    return _result(m.name, assign, ledger.host_id, "kept split across " + ", ".join(_sum_by_device(assign)) + ": still fits")


def _sort_key(m: ModelDemand) -> tuple[int, int, str]:
    return (-m.priority, -m.bytes, m.name)


def plan(gpus: Sequence[DeviceCapacity], host: DeviceCapacity, models: Sequence[ModelDemand],
         policy: Policy) -> dict[str, Placement]:
    """One Placement per model (keyed by name, in input order). Raises ValueError on input
    that cannot be planned (duplicate names or device ids, unknown policy mode)."""
    if policy.mode not in MODES:
        raise ValueError(f"unknown placement policy {policy.mode!r}: use {' or '.join(MODES)}")
    ids = [g.id for g in gpus] + [host.id]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate device ids in {ids}")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError("duplicate model names: " + ", ".join(sorted({n for n in names if names.count(n) > 1})))

    ledger = _Ledger(gpus, host, policy)
    ordered = sorted(models, key=_sort_key)
    out: dict[str, Placement] = {}
    pin_notes: dict[str, str] = {}

    # Pass 1: pins.
    for m in ordered:
        if m.pin is None or (m.lazy and not m.current):
            continue
        if ledger.known(m.pin) and ledger.fits({m.pin: m.bytes}):
            ledger.take({m.pin: m.bytes})
            out[m.name] = _whole(m.name, m.pin, m.bytes, ledger.host_id, f"pinned to {m.pin}")
        else:
            pin_notes[m.name] = f"pin to {m.pin} cannot be honoured now ({ledger.why_not(m.pin, m.bytes)})"

    # Pass 2: stability.
    for m in ordered:
        if m.name in out or not m.current:
            continue
        kept = _keep(m, _groups_of(m), ledger)
        if kept is not None:
            if m.name in pin_notes:
                kept = Placement(kept.name, kept.kind, kept.devices, kept.group_devices,
                                 f"{pin_notes[m.name]}; {kept.reason}")
            out[m.name] = kept

    # Pass 3: the rest, one priority level at a time. Within a level, every model that fits
    # whole on one device is placed before any model is split or sent to the CPU, so one big
    # model cannot take the room that would have held several smaller ones whole.
    levels = sorted({m.priority for m in ordered}, reverse=True)
    for level in levels:
        postponed: list[tuple[ModelDemand, list[str]]] = []
        for m in ordered:
            if m.priority != level or m.name in out:
                continue
            if m.lazy and not m.current:
                extra = f" (pinned to {m.pin})" if m.pin else ""
                out[m.name] = Placement(m.name, "deferred", (), (), f"lazy: loads on first fetch{extra}")
                continue
            notes: list[str] = [pin_notes[m.name]] if m.name in pin_notes else []
            groups = _groups_of(m)
            trial = ledger.copy()
            if m.device_map and groups:
                assign = _place_by_rules(m, groups, trial, notes)
            else:
                if m.device_map:
                    notes.append("device_map ignored: the model has no module groups")
                assign = _place_whole(m.bytes, groups, m.preferred, trial, notes)
                if assign is None:
                    postponed.append((m, notes))
                    continue
            ledger = _finish(m, assign, notes, trial, ledger, out)
        for m, notes in postponed:
            trial = ledger.copy()
            assign = _place_fallback(m.bytes, _groups_of(m), trial, notes)
            ledger = _finish(m, assign, notes, trial, ledger, out)
    return {m.name: out[m.name] for m in models}


def _finish(m: ModelDemand, assign: list[tuple[str, int, str]] | None, notes: list[str], trial: _Ledger,
            ledger: _Ledger, out: dict[str, Placement]) -> _Ledger:
    """Record the model's Placement; return the ledger to go on with (the trial one when the
    model was placed, the untouched one when it was deferred)."""
    reason = "; ".join(notes)
    if assign is None:
        out[m.name] = Placement(m.name, "deferred", (), (), f"not now: {reason}; stays registered and loads on first fetch")
        return ledger
    if len({d for _, _, d in assign}) == 1:
        out[m.name] = _whole(m.name, assign[0][2], m.bytes, trial.host_id, reason)
    else:
        out[m.name] = _result(m.name, assign, trial.host_id, reason)
    return trial
