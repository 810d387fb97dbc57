"""Restart without reloading: park sealed model memfds in systemd's file descriptor store.

While a model is served, the daemon stores its sealed data memfd(s) with systemd
(FDSTORE=1, needs FileDescriptorStoreMax= in the unit), plus one small sealed "meta" memfd
holding the manifest JSON, the source files' fingerprint and a few facts for the status.
After a crash, `systemctl restart` or an upgrade, systemd hands every stored fd back
(LISTEN_FDS/LISTEN_FDNAMES); `recover()` regroups them per model, `reconcile()` keeps the
ones whose fingerprint still matches the file on disk (serve at once, no disk read) and drops
the rest from the store (FDSTOREREMOVE=1).

FDNAME layout (systemd allows <= 255 printable ASCII characters, no ':'):

    dm1.<key>.<generation>.<part>      part = "m" (meta) or the segment index ("0", "1", ...)
    key = "n" + base64url(utf-8 name)  when it fits, else "h" + sha256(name)[:40]

The key only groups the fds; the model's real name lives in the meta memfd. Each fd gets its
own name because systemd does not promise to keep the order of fds sharing one name.

The boundary is plain data (ints and JSON dicts), so this module does not import arena.py:
``manifest`` is ``Manifest.to_json()`` and ``fds[i]`` the memfd of ``manifest["segments"][i]``
(None for a segment that is not a memfd, e.g. a cuda-ipc one: those die with the process and
must be uploaded again from a host copy, so store the host-side form of a GPU model).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "FDNAME_PREFIX",
    "Recovery",
    "StoredModel",
    "decode_fdname",
    "fdname",
    "fingerprint_matches",
    "reconcile",
    "recover",
    "stash",
    "unstash",
]

log = logging.getLogger(__name__)

FDNAME_PREFIX = "dm1"
META_PART = "m"
_FDNAME_MAX = 255
_META_VERSION = 1
_META_MAX_BYTES = 256 << 20  # a manifest of a million tensors is ~100 MiB; refuse anything wilder

_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_ALL_SEALS = (
    getattr(fcntl, "F_SEAL_SEAL", 0x1)
    | getattr(fcntl, "F_SEAL_SHRINK", 0x2)
    | getattr(fcntl, "F_SEAL_GROW", 0x4)
    | getattr(fcntl, "F_SEAL_WRITE", 0x8)
)


class _Notifier(Protocol):  # systemd.Notifier, or a test double speaking the same protocol
    @property
    def enabled(self) -> bool: ...
    def fdstore(self, fds: Sequence[int], name: str) -> bool: ...
    def fdstore_remove(self, name: str) -> bool: ...


# ------------------------------------------------------------------------------- names
def _key(name: str, generation: int) -> str:
    encoded = base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")
    # Room for "dm1.n<key>.<generation>.<part>" with a part of up to 5 digits.
    room = _FDNAME_MAX - len(f"{FDNAME_PREFIX}..{generation}.99999") - 1
    if len(encoded) <= room:
        return "n" + encoded
    return "h" + hashlib.sha256(name.encode()).hexdigest()[:40]


def fdname(name: str, generation: int, part: str | int) -> str:
    """The FDNAME for one fd of ``name`` at ``generation``; part is "m" or a segment index."""
    if generation < 0:
        raise ValueError(f"generation must be >= 0, got {generation}")
    return f"{FDNAME_PREFIX}.{_key(name, generation)}.{generation}.{part}"


def decode_fdname(value: str) -> tuple[str, int, str] | None:
    """FDNAME -> (key, generation, part), or None when it is not one of ours."""
    pieces = value.split(".")
    if len(pieces) != 4 or pieces[0] != FDNAME_PREFIX or pieces[1][:1] not in ("n", "h"):
        return None
    key, gen, part = pieces[1], pieces[2], pieces[3]
    if not gen.isdigit() or not (part == META_PART or part.isdigit()):
        return None
    return key, int(gen), part


# ------------------------------------------------------------------------------- memfds
def _sealed_memfd(label: str, data: bytes) -> int:
    fd = os.memfd_create(label, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, _F_ADD_SEALS, _ALL_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_sealed(fd: int) -> bool:
    try:
        return fcntl.fcntl(fd, _F_GET_SEALS) & _ALL_SEALS == _ALL_SEALS
    except OSError:
        return False


def _read_all(fd: int, limit: int) -> bytes:
    size = os.fstat(fd).st_size
    if size > limit:
        raise ValueError(f"meta memfd is {size} bytes, over the {limit}-byte limit")
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _freeze(value: Any) -> Any:
    """JSON-decoded fingerprint -> the tuple form names.fingerprint() returns."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _canonical(fingerprint: Any) -> Any:
    # A JSON round trip gives both sides the same shape (Paths -> str, tuples -> lists -> tuples).
    return _freeze(json.loads(json.dumps(fingerprint, default=str)))


def fingerprint_matches(stored: Any, current: Any) -> bool:
    return stored is not None and current is not None and _canonical(stored) == _canonical(current)


# ------------------------------------------------------------------------------- storing
def stash(
    notifier: _Notifier,
    name: str,
    generation: int,
    manifest: Mapping[str, Any],
    fds: Sequence[int | None],
    fingerprint: Any,
    extra: Mapping[str, Any] | None = None,
) -> list[str]:
    """Store one model's memfds + a meta memfd in the fd store; returns the FDNAMEs used.

    Call when a model becomes ready (and again with a new generation after a reload, then
    ``unstash`` the old one). Data fds go first and the meta last, so a meta in the store
    implies its data was sent. Returns [] when there is no service manager. Our fds stay ours.
    """
    if not notifier.enabled:
        return []
    segments = list(manifest.get("segments", []))
    if len(fds) != len(segments):
        raise ValueError(f"{len(fds)} fds for {len(segments)} manifest segments of {name!r}")
    for index, fd in enumerate(fds):
        if fd is not None and not _is_sealed(fd):
            raise ValueError(f"segment {index} of {name!r} is not a sealed memfd; only sealed arenas are stored")
    # Clear these names first: an entry left by an earlier run under the same generation
    # number would otherwise share the name with ours, and recover() drops ambiguous entries.
    unstash(notifier, [fdname(name, generation, i) for i, fd in enumerate(fds) if fd is not None]
            + [fdname(name, generation, META_PART)])
    stored: list[int] = []
    names: list[str] = []
    for index, fd in enumerate(fds):
        if fd is None:
            continue
        part = fdname(name, generation, index)
        if not notifier.fdstore([fd], part):
            unstash(notifier, names)
            return []
        stored.append(index)
        names.append(part)
    meta = {
        "v": _META_VERSION,
        "name": name,
        "generation": generation,
        "stored_segments": stored,
        "fingerprint": json.loads(json.dumps(fingerprint, default=str)),
        "manifest": manifest,
        "extra": dict(extra or {}),
        "stored_at": time.time(),
    }
    meta_fd = _sealed_memfd("devmapd-meta", json.dumps(meta, separators=(",", ":")).encode())
    try:
        meta_name = fdname(name, generation, META_PART)
        if not notifier.fdstore([meta_fd], meta_name):
            unstash(notifier, names)
            return []
        names.append(meta_name)
    finally:
        os.close(meta_fd)  # systemd holds its own duplicate
    return names


def unstash(notifier: _Notifier, names: Iterable[str]) -> None:
    """FDSTOREREMOVE each FDNAME (from stash(), or StoredModel.fdnames)."""
    for value in names:
        notifier.fdstore_remove(value)


# ------------------------------------------------------------------------------- recovering
@dataclass
class StoredModel:
    """One model recovered from the fd store. Its fds are ours now: close() or hand them on."""

    name: str
    generation: int
    manifest: dict
    fds: list[int | None]  # per manifest segment; None where nothing was stored
    fingerprint: Any  # tuple form, comparable with names.fingerprint()
    extra: dict
    stored_at: float
    fdnames: list[str]  # every FDNAME it occupies in the store (for FDSTOREREMOVE)

    def close(self) -> None:
        for fd in self.fds:
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fds = [None] * len(self.fds)


@dataclass
class Recovery:
    models: dict[str, StoredModel] = field(default_factory=dict)  # newest complete generation per name
    stale: list[str] = field(default_factory=list)  # FDNAMEs to FDSTOREREMOVE (their fds are closed)
    problems: list[str] = field(default_factory=list)  # one sentence per dropped entry, for the log
    others: dict[str, list[int]] = field(default_factory=dict)  # fds that are not ours (the socket)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recover(listened: Mapping[str, list[int]]) -> Recovery:
    """Regroup ``systemd.listen_fds()`` into models; validate seals, sizes and the meta JSON.

    Anything incomplete or corrupt is closed and listed in ``stale`` (with a reason in
    ``problems``); older generations of a model are stale too. Fds whose names are not ours
    land in ``others`` untouched.
    """
    result = Recovery()
    groups: dict[tuple[str, int], dict[str, tuple[str, list[int]]]] = {}
    for value, fds in listened.items():
        parsed = decode_fdname(value)
        if parsed is None:
            result.others[value] = list(fds)
            continue
        key, generation, part = parsed
        groups.setdefault((key, generation), {})[part] = (value, list(fds))

    candidates: list[StoredModel] = []
    for (key, generation), parts in groups.items():
        names = [value for value, _ in parts.values()]
        try:
            candidates.append(_assemble(key, generation, parts))
        except ValueError as exc:
            result.problems.append(f"dropped fd store entry {key}.{generation}: {exc}")
            result.stale.extend(names)
            _close_all(fd for _, fds in parts.values() for fd in fds)

    for model in sorted(candidates, key=lambda m: m.generation, reverse=True):
        if model.name in result.models:
            result.problems.append(
                f"dropped generation {model.generation} of {model.name!r}: generation "
                f"{result.models[model.name].generation} is newer"
            )
            result.stale.extend(model.fdnames)
            model.close()
        else:
            result.models[model.name] = model
    return result


def _assemble(key: str, generation: int, parts: dict[str, tuple[str, list[int]]]) -> StoredModel:
    if META_PART not in parts:
        raise ValueError("its meta memfd is missing (the previous daemon stopped mid-store)")
    meta_name, meta_fds = parts[META_PART]
    if len(meta_fds) != 1 or not _is_sealed(meta_fds[0]):
        raise ValueError("its meta memfd is not a single sealed memfd")
    try:
        meta = json.loads(_read_all(meta_fds[0], _META_MAX_BYTES))
        name, manifest = str(meta["name"]), meta["manifest"]
        segments = manifest["segments"]
        stored = [int(i) for i in meta["stored_segments"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"its meta memfd does not hold devmapd metadata ({exc})") from None
    if meta.get("v") != _META_VERSION:
        raise ValueError(f"meta version {meta.get('v')!r} is not {_META_VERSION}")
    if int(meta.get("generation", -1)) != generation or _key(name, generation) != key:
        raise ValueError("its FDNAME does not match the model it describes")
    fds: list[int | None] = [None] * len(segments)
    fdnames = [meta_name]
    for index in stored:
        if not 0 <= index < len(segments) or str(index) not in parts:
            raise ValueError(f"segment {index} of {name!r} is missing from the store")
        value, seg_fds = parts[str(index)]
        if len(seg_fds) != 1:
            raise ValueError(f"segment {index} of {name!r} has {len(seg_fds)} fds, expected 1")
        fd = seg_fds[0]
        if not _is_sealed(fd):
            raise ValueError(f"segment {index} of {name!r} is not a sealed memfd")
        want = int(segments[index].get("nbytes", 0))
        have = os.fstat(fd).st_size
        if have < want:
            raise ValueError(f"segment {index} of {name!r} holds {have} bytes, its manifest says {want}")
        fds[index] = fd
        fdnames.append(value)
    for part in parts:
        if part != META_PART and int(part) not in stored:
            raise ValueError(f"segment {part} of {name!r} is in the store but not in its meta")
    os.close(meta_fds[0])  # everything it held is in `meta` now
    return StoredModel(
        name=name,
        generation=generation,
        manifest=manifest,
        fds=fds,
        fingerprint=_freeze(meta.get("fingerprint")),
        extra=dict(meta.get("extra") or {}),
        stored_at=float(meta.get("stored_at", 0.0)),
        fdnames=fdnames,
    )


def reconcile(
    recovery: Recovery,
    current: Mapping[str, Any],
    notifier: _Notifier | None = None,
) -> dict[str, StoredModel]:
    """Keep the models whose stored fingerprint equals ``current[name]`` (the files on disk now).

    Everything else (file changed, deleted, or found stale by ``recover``) is closed and, when a
    notifier is given, removed from the fd store. Returns {name: StoredModel} to serve at once.
    """
    kept: dict[str, StoredModel] = {}
    drop = list(recovery.stale)
    for name, model in recovery.models.items():
        if name not in current or current[name] is None:
            recovery.problems.append(f"dropped stored {name!r}: its file is gone from the model directory")
        elif not fingerprint_matches(model.fingerprint, current[name]):
            recovery.problems.append(f"dropped stored {name!r}: its file changed since it was stored")
        else:
            kept[name] = model
            continue
        drop.extend(model.fdnames)
        model.close()
    for problem in recovery.problems:
        log.info("%s", problem)
    if notifier is not None:
        unstash(notifier, drop)
    return kept
