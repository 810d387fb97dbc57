"""Restart without reloading: the daemon's side of the systemd fd-store handoff.

``fdstore.py`` knows how to park sealed memfds with systemd and regroup them
after a restart; this module turns a served version into what gets parked
(manifest, fds, fingerprint, and the inspection facts status needs), and a
recovered entry back into a :class:`ServedVersion` that serves at once, with
no disk read. Only memfd segments travel: a CUDA allocation dies with the
process, so GPU-resident models (without a host copy) are loaded again.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from devmapd.daemon.loader import ServedVersion, placement_of
from devmapd.engine.arena import Manifest, SealedSegment
from devmapd.engine.checkpoint import Inspection
from devmapd.service import fdstore
from devmapd.wire.protocol import encode_manifest

log = logging.getLogger("devmapd.daemon.handoff")


def inspection_facts(insp: Inspection) -> dict[str, Any]:
    """What status and the planner need of an inspection, as JSON."""
    return insp.to_json()


def inspection_from_facts(facts: dict[str, Any]) -> Inspection:
    return Inspection(
        path=str(facts["path"]), format=str(facts["format"]), tensors=int(facts["tensors"]),
        bytes=int(facts["bytes"]), dtypes={str(k): int(v) for k, v in facts["dtypes"].items()},
        locations={str(k): int(v) for k, v in facts["locations"].items()},
        prefixes=tuple(facts.get("prefixes", ())), containers=tuple(facts.get("containers", ())),
        groups=tuple((str(g), int(b)) for g, b in facts.get("groups", ())),
        largest_tensor=int(facts.get("largest_tensor", 0)), files=tuple(facts.get("files", ())),
        diagnosis=None,
    )


def storable(version: ServedVersion) -> bool:
    """A version can be parked when every segment it serves is a host memfd."""
    # A version sharing storages (engine.dedup) is not: its segments are the store's and move on
    # compaction, so a parked copy would keep old segments alive; it is read (and shared) again.
    return all(seg is not None for seg in version.segments) and not version.gpu_segments \
        and getattr(version, "shared", None) is None


def park(notifier: Any, name: str, version: ServedVersion) -> list[str]:
    """Hand ``version``'s memfds to the service manager; returns the FDNAMEs (empty if none)."""
    if notifier is None or not notifier.enabled or not storable(version) or version.inspection is None:
        return []
    try:
        return fdstore.stash(notifier, name, version.generation, version.manifest.to_json(), version.fds,
                             version.fingerprint, extra={"inspection": inspection_facts(version.inspection),
                                                         "load_time_s": version.load_time_s,
                                                         "side_files": _side_files_text(version)})
    except (OSError, ValueError) as exc:  # the store is an optimisation: never fail a load over it
        log.warning("%s: not parked in the fd store: %s", name, exc)
        return []


def unpark(notifier: Any, fdnames: list[str]) -> None:
    if notifier is not None and fdnames:
        fdstore.unstash(notifier, fdnames)


def revive(stored: fdstore.StoredModel) -> ServedVersion:
    """A recovered fd-store entry as a served version (takes ownership of its fds)."""
    manifest = Manifest.from_json(stored.manifest)
    segments: list[SealedSegment | None] = []
    for info, fd in zip(manifest.segments, stored.fds):
        if fd is None:
            raise ValueError("a segment was not stored")
        segments.append(SealedSegment(fd, info.nbytes, f"devmapd:{stored.name}"))
    placement = placement_of(manifest)
    insp = inspection_from_facts(stored.extra["inspection"])
    return ServedVersion(generation=stored.generation, manifest=manifest, segments=segments,
                         placement=placement, fingerprint=stored.fingerprint,
                         load_time_s=float(stored.extra.get("load_time_s", 0.0)), inspection=insp,
                         manifest_json=encode_manifest(manifest),
                         side_files_json=_side_files_of(stored.extra.get("side_files")))


def _side_files_text(version: ServedVersion) -> str | None:
    return version.side_files_json.decode("utf-8") if version.side_files_json is not None else None


def _side_files_of(text: Any) -> bytes | None:
    """The parked side files, re-checked: an fd-store entry is ours, but never trusted blindly."""
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return text.encode("utf-8") if isinstance(value, dict) else None
