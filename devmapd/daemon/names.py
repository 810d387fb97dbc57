"""Model naming and discovery: which files in the model directory are models, and their names.

Contract (DESIGN.md "Model names"): a weight file ``<model_dir>/<rel>.<ext>`` is the model
``<rel>`` (POSIX path, extension dropped; extensions ``.pt .pth .bin .ckpt .safetensors``,
matched case-insensitively). A sub-directory that holds a ``config.json`` or a ``*.index.json``
beside at least one weight file (a Hugging Face layout, sharded or not) is ONE model named by the
directory's relative path; its weight files are not separate models and directories nested in it
are not scanned.

Rules this module fixes so the daemon, the watcher and ``source_for`` always agree:

* Ignored without a word: dot-files and dot-dirs, temporary names (``*.tmp``, ``*.part``,
  ``*.partial``, ``*.incomplete``, ``*.crdownload``, ``*~``, ``#*#``) and non-weight files.
* Refused and *reported* (``Scan.problems``, relpath -> reason): weight-named FIFOs, sockets and
  device files; symlinks that resolve outside the model directory, dangling ones, and symlinked
  directories (not followed: they would list the same models twice, or loop). Nothing here ever
  opens a FIFO or a device: classification uses ``lstat``/``stat`` only, and the one file we do
  open (a shard index, to see if all shards are there) goes through the engine's one safe
  opener (``formats.common.read_json_file``: link resolved once and kept inside the model
  directory, regular file checked before and after the open, ``O_NONBLOCK`` so a swap to a FIFO
  in between cannot hang us, size capped, read bounded by the size at open).
* Two files giving one name (``a.pt`` and ``a.safetensors``): the suffix earlier in
  ``SUFFIX_PRIORITY`` wins (safetensors first: it is the safe format), the other is reported. A
  weight file ``x.pt`` and a Hugging Face dir ``x/`` beside it: the file wins, the dir is reported.
* A sharded Hugging Face dir whose index names shards that are not there yet (a copy in
  progress) is listed in ``Scan.pending`` (name -> why); so is one with temporary files at its
  top level. The watcher waits for those before it announces the model.

``scan`` reads directory listings and inode metadata only; ``fingerprint`` is ``stat`` only.
The model directory is never written.
"""
from __future__ import annotations

import os
import stat as stat_mod
from dataclasses import dataclass, field
from pathlib import Path

from devmapd.engine.diagnose import CheckpointError
from devmapd.engine.filenames import WEIGHT_SUFFIXES, is_temporary
from devmapd.engine.formats.common import MAX_SIDE_FILE_BYTES, read_json_file

__all__ = [
    "WEIGHT_SUFFIXES",
    "SUFFIX_PRIORITY",
    "ModelSource",
    "Scan",
    "NameError_",
    "UnknownModel",
    "is_temporary",
    "weight_stem",
    "scan",
    "scan_all",
    "scan_problems",
    "source_for",
    "fingerprint",
]

# Deterministic winner when two files map to one name: safetensors cannot run code on load.
SUFFIX_PRIORITY = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
_HF_MARKER = "config.json"
_INDEX_SUFFIX = ".index.json"
# A shard index is a small JSON map; anything bigger is not one, and we will not read it
# (the loader applies the same cap, [safety] max_side_file_mib, and says so in its diagnosis).
_MAX_INDEX_BYTES = MAX_SIDE_FILE_BYTES
# Index problems that a copy in progress explains (wait for it); any other refusal is final and
# the load reports it, so the directory is not held back as pending for ever.
_TRANSIENT_INDEX_CODES = ("corrupt", "truncated", "empty", "changed_during_read", "not_found")


@dataclass(frozen=True)
class ModelSource:
    name: str                 # POSIX relative path, extension dropped; for an HF dir: the dir's rel path
    path: Path                # the weight file, or the HF directory (inside model_dir, as named there)
    kind: str                 # "file" | "hf-dir"
    files: tuple[Path, ...]   # weight files (one for "file"; the shards/weights for "hf-dir"), sorted


@dataclass(frozen=True)
class Scan:
    models: dict[str, ModelSource]
    problems: dict[str, str] = field(default_factory=dict)   # relpath -> why it is not a model
    pending: dict[str, str] = field(default_factory=dict)    # model name -> why it is not complete yet
    # name -> fingerprint for "file" models, from the stat the scan did anyway (equal to
    # fingerprint(source) at scan time); saves a second stat per file on big directories.
    fingerprints: dict[str, tuple] = field(default_factory=dict)


class NameError_(ValueError):
    """A requested model name is malformed or points outside the model directory."""


class UnknownModel(NameError_):
    """The name is well-formed but no model of that name exists in the model directory."""



def weight_stem(filename: str) -> tuple[str, str] | None:
    """``"a.b.pt"`` -> ``("a.b", ".pt")``; None when the name is not a weight file name."""
    low = filename.lower()
    for suffix in WEIGHT_SUFFIXES:
        if low.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)], suffix
    return None


def _inside(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip("/") + "/")


def _kind_word(mode: int) -> str:
    if stat_mod.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat_mod.S_ISSOCK(mode):
        return "a socket"
    if stat_mod.S_ISCHR(mode) or stat_mod.S_ISBLK(mode):
        return "a device file"
    if stat_mod.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _join(rel_dir: str, name: str) -> str:
    return f"{rel_dir}/{name}" if rel_dir else name


@dataclass
class _Listing:
    """One directory classified: what scan() and source_for() both decide from."""
    weights: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # stem -> [(filename, suffix)]
    markers: list[str] = field(default_factory=list)      # config.json / *.index.json (regular, inside)
    temps: list[str] = field(default_factory=list)        # temporary names (not dot-files)
    subdirs: list[str] = field(default_factory=list)      # real directories worth descending into
    stats: dict[str, os.stat_result] = field(default_factory=dict)  # weight file -> stat (links followed)
    problems: dict[str, str] = field(default_factory=dict)

    def winners(self) -> dict[str, str]:
        """stem -> chosen filename (suffix priority, then name for a stable tie-break)."""
        return {stem: min(c, key=lambda fs: (SUFFIX_PRIORITY.index(fs[1]), fs[0]))[0]
                for stem, c in self.weights.items()}

    def all_weight_files(self) -> list[str]:
        return sorted(f for c in self.weights.values() for f, _ in c)


def _list_dir(abs_dir: str, rel_dir: str, root_real: str) -> _Listing:
    out = _Listing()
    try:
        entries = list(os.scandir(abs_dir))
    except OSError as e:
        out.problems[rel_dir or "."] = f"cannot list this directory ({e.strerror}); fix its permissions"
        return out
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue
        rel = _join(rel_dir, name)
        if is_temporary(name):
            out.temps.append(name)
            continue
        is_weight = weight_stem(name) is not None
        is_marker = name == _HF_MARKER or name.endswith(_INDEX_SUFFIX)
        try:
            lst = entry.stat(follow_symlinks=False)   # lstat: never follows, never opens
        except OSError:
            continue  # vanished between listing and stat: the next scan sees the truth
        mode = lst.st_mode
        if stat_mod.S_ISLNK(mode):
            real = os.path.realpath(entry.path)
            try:
                st = os.stat(entry.path)             # follows the link; stat never opens the target
            except OSError:
                if is_weight or is_marker:
                    out.problems[rel] = "dangling symlink: its target does not exist"
                continue
            if not _inside(real, root_real):
                if is_weight or is_marker or stat_mod.S_ISDIR(st.st_mode):
                    out.problems[rel] = (f"symlink resolves outside the model directory (to {real}); "
                                         "refused — copy the file in or link to a file inside")
                continue
            if stat_mod.S_ISDIR(st.st_mode):
                out.problems[rel] = ("symlinked directory is not followed (it would list the same models "
                                     "twice or loop); move the directory here instead")
                continue
            mode = st.st_mode
        elif stat_mod.S_ISDIR(mode):
            out.subdirs.append(name)
            continue
        if not stat_mod.S_ISREG(mode):
            if is_weight or is_marker:
                out.problems[rel] = f"refused: {_kind_word(mode)}, not a regular file"
            continue
        if is_marker:
            out.markers.append(name)
        elif is_weight:
            stem, suffix = weight_stem(name)  # type: ignore[misc]
            out.weights.setdefault(stem, []).append((name, suffix.lower()))
            out.stats[name] = st if stat_mod.S_ISLNK(lst.st_mode) else lst
    out.subdirs.sort()
    return out


def _is_hf(listing: _Listing, rel_dir: str) -> bool:
    # The model directory itself is never one model: that would be the empty name.
    return bool(rel_dir) and bool(listing.markers) and bool(listing.weights)


def _hf_pending(abs_dir: str, listing: _Listing, root_real: str) -> str | None:
    """Why a Hugging Face dir is not complete yet, or None. Complete when ANY index (a repo may
    ship both a .bin and a .safetensors index) has all its shards, or when there is no index."""
    reasons = []
    if listing.temps:
        reasons.append("temporary files present: " + ", ".join(sorted(listing.temps)[:5]))
    indexes = sorted(m for m in listing.markers if m.endswith(_INDEX_SUFFIX))
    if indexes:
        present = set(listing.all_weight_files())
        missing_all = []
        complete = False
        for idx in indexes:
            shards = _read_index_shards(os.path.join(abs_dir, idx), root_real)
            if shards is None:
                missing_all.append(f"{idx} is not readable JSON yet")
                continue
            if shards is _UNUSABLE:
                complete = True   # not a copy in progress: the load says what is wrong with it
                break
            missing = sorted(shards - present)
            if not missing:
                complete = True
                break
            missing_all.append(f"{idx} lists {len(missing)} missing shard(s): " + ", ".join(missing[:3]))
        if not complete:
            reasons.extend(missing_all)
    return "; ".join(reasons) or None


_UNUSABLE: set[str] = set()   # sentinel: the index can never be read (see _TRANSIENT_INDEX_CODES)


def _read_index_shards(path: str, root_real: str) -> set[str] | None:
    """The shard names an index lists; None while it is not (yet) a readable index; ``_UNUSABLE``
    when it is refused for good (too big, not a regular file, outside the model directory)."""
    try:
        data = read_json_file(path, root=root_real, max_bytes=_MAX_INDEX_BYTES, what="shard index")
    except CheckpointError as e:
        return None if e.diagnosis.code in _TRANSIENT_INDEX_CODES else _UNUSABLE
    except OSError:
        return None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        return None
    return {str(v) for v in weight_map.values()}


def scan_all(model_dir: Path | str) -> Scan:
    """Every model under ``model_dir``, what was refused and why, and which HF dirs are incomplete."""
    root = os.fspath(model_dir)
    root_real = os.path.realpath(root)
    models: dict[str, ModelSource] = {}
    problems: dict[str, str] = {}
    pending: dict[str, str] = {}
    fps: dict[str, tuple] = {}
    stack: list[tuple[str, str]] = [(root, "")]
    while stack:
        abs_dir, rel_dir = stack.pop()
        listing = _list_dir(abs_dir, rel_dir, root_real)
        if _is_hf(listing, rel_dir):
            if rel_dir in models:
                problems[rel_dir] = (f"Hugging Face directory gives the same model name '{rel_dir}' as the "
                                     f"file {models[rel_dir].path.name}; the file is used — rename one")
                continue
            models[rel_dir] = ModelSource(
                name=rel_dir, path=Path(abs_dir), kind="hf-dir",
                files=tuple(Path(abs_dir, f) for f in listing.all_weight_files()))
            problems.update((k, v) for k, v in listing.problems.items())
            why = _hf_pending(abs_dir, listing, root_real)
            if why:
                pending[rel_dir] = why
            continue  # nested dirs of an HF model are part of it, not models of their own
        problems.update(listing.problems)
        winners = listing.winners()
        for stem, cands in listing.weights.items():
            chosen = winners[stem]
            name = _join(rel_dir, stem)
            for fname, _ in cands:
                if fname != chosen:
                    problems[_join(rel_dir, fname)] = (f"same model name '{name}' as {chosen}; {chosen} is "
                                                       "used — rename or remove one of them")
            p = Path(abs_dir, chosen)
            models[name] = ModelSource(name=name, path=p, kind="file", files=(p,))
            st = listing.stats[chosen]
            fps[name] = ((chosen, st.st_size, st.st_mtime_ns, st.st_ino),)
        # Reverse order on a LIFO stack = subdirectories visited in sorted order.
        for d in reversed(listing.subdirs):
            stack.append((os.path.join(abs_dir, d), _join(rel_dir, d)))
    return Scan(models=dict(sorted(models.items())), problems=dict(sorted(problems.items())),
                pending=pending, fingerprints=fps)


def scan(model_dir: Path | str) -> dict[str, ModelSource]:
    """name -> ModelSource for every model under ``model_dir`` (see the module docstring)."""
    return scan_all(model_dir).models


def scan_problems(model_dir: Path | str) -> dict[str, str]:
    """relpath -> reason for every weight-named entry that was refused (FIFO, escaping symlink,
    name conflict, unreadable directory...), so the daemon can say why a file is not a model."""
    return scan_all(model_dir).problems


def _check_name(name: object) -> list[str]:
    if not isinstance(name, str) or not name:
        raise NameError_("model name must be a non-empty string")
    if "\x00" in name:
        raise NameError_("model name contains a NUL byte")
    if name.startswith("/"):
        raise NameError_(f"model name {name!r} is absolute; use the path relative to the model directory")
    parts = name.split("/")
    if ".." in parts:
        raise NameError_(f"model name {name!r} contains '..'; names cannot leave the model directory")
    if any(p in ("", ".") for p in parts):
        raise NameError_(f"model name {name!r} has an empty or '.' component; write it as a plain "
                         "relative path like 'group/model'")
    for p in parts:
        if is_temporary(p):
            raise UnknownModel(f"model name {name!r} names a hidden or temporary path; those are never models")
    return parts


def source_for(model_dir: Path | str, name: str) -> ModelSource:
    """Resolve a requested model name to its source, exactly as ``scan`` would name it.

    Raises ``NameError_`` for '..', absolute names, NULs and anything whose real path leaves
    ``model_dir``; ``UnknownModel`` (a subclass) when no such model exists."""
    parts = _check_name(name)
    root = os.fspath(model_dir)
    root_real = os.path.realpath(root)
    # Every ancestor must be a plain directory (scan does not follow symlinked dirs) that is not
    # itself a Hugging Face model (whose contents are not separate models).
    abs_dir = root
    for i, part in enumerate(parts[:-1]):
        abs_dir = os.path.join(abs_dir, part)
        try:
            st = os.lstat(abs_dir)
        except OSError:
            raise UnknownModel(f"no model named {name!r} in {root}") from None
        if stat_mod.S_ISLNK(st.st_mode):
            if not _inside(os.path.realpath(abs_dir), root_real):
                raise NameError_(f"model name {name!r} goes through a symlink that leaves the model directory")
            raise UnknownModel(f"no model named {name!r}: {'/'.join(parts[:i + 1])} is a symlinked directory, "
                               "which is not followed")
        if not stat_mod.S_ISDIR(st.st_mode):
            raise UnknownModel(f"no model named {name!r} in {root}")
        rel = "/".join(parts[: i + 1])
        if _is_hf(_list_dir(abs_dir, rel, root_real), rel):
            raise UnknownModel(f"{name!r} is inside the Hugging Face model {rel!r}, not a model of its own")
    parent_rel = "/".join(parts[:-1])
    listing = _list_dir(abs_dir, parent_rel, root_real)
    stem = parts[-1]
    chosen = listing.winners().get(stem)
    if chosen is None:
        # Say why a file of that name was refused (escaping symlink, FIFO...) instead of "not found".
        for fname, reason in sorted(listing.problems.items()):
            ws = weight_stem(fname.rsplit("/", 1)[-1])
            if ws is not None and ws[0] == stem:
                raise NameError_(f"model {name!r}: {fname} {reason}")
    if chosen is not None:
        path = Path(abs_dir, chosen)
        source = ModelSource(name=name, path=path, kind="file", files=(path,))
    else:
        sub = os.path.join(abs_dir, stem)
        try:
            st = os.lstat(sub)
        except OSError:
            raise UnknownModel(f"no model named {name!r} in {root}") from None
        if stat_mod.S_ISLNK(st.st_mode) and not _inside(os.path.realpath(sub), root_real):
            raise NameError_(f"model name {name!r} is a symlink that leaves the model directory")
        if not stat_mod.S_ISDIR(st.st_mode):
            raise UnknownModel(f"no model named {name!r} in {root}")
        sub_listing = _list_dir(sub, name, root_real)
        if not _is_hf(sub_listing, name):
            raise UnknownModel(f"{name!r} is a directory but not a model (no config.json or *.index.json "
                               "beside weight files)")
        source = ModelSource(name=name, path=Path(sub), kind="hf-dir",
                             files=tuple(Path(sub, f) for f in sub_listing.all_weight_files()))
    # Defence in depth: whatever the listing said, the real path of every file must stay inside.
    for p in (source.path, *source.files):
        if not _inside(os.path.realpath(p), root_real):
            raise NameError_(f"model {name!r} resolves outside the model directory; refused")
    return source


def fingerprint(source: ModelSource) -> tuple:
    """``((relpath, size, mtime_ns, ino), ...)``, sorted, from ``stat`` only (no file is opened).

    relpath is relative to the model's own location: the file name for a "file" model; for an
    "hf-dir" model every regular, non-hidden, non-temporary file at the top of the directory
    (weights, config, index, tokenizer...), so any change inside the model changes it.
    Raises OSError (FileNotFoundError...) if a file vanished meanwhile."""
    if source.kind == "file":
        st = os.stat(source.path)
        return ((source.path.name, st.st_size, st.st_mtime_ns, st.st_ino),)
    entries = []
    with os.scandir(source.path) as it:
        for entry in it:
            if is_temporary(entry.name):
                continue
            try:
                st = entry.stat()   # follows links (HF cache snapshots are links into blobs/)
            except OSError:
                continue
            if stat_mod.S_ISREG(st.st_mode):
                entries.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(entries))
