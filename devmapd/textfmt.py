"""Plain-text rendering: byte sizes, escaping of untrusted names, `devmapd status` and action replies.

Kept apart from cli.py so the TUI, the daemon's log lines and the benchmarks format numbers the
same way: :func:`human_bytes` is THE size formatter of every view. It imports nothing of devmapd.

Names come from files and clients, so they may hold any character. :func:`safe` makes one
printable line of any text (``\n`` -> ``\\n``, ESC -> ``\\x1b``, ...; ordinary Unicode is
kept), so a name can neither forge a line of output or of the log nor send escape sequences to
an operator's terminal. :func:`safe_text` does the same for a block of lines whose newlines
are our own. JSON output needs neither: ``json.dumps`` escapes control characters itself.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")

# What a terminal or a log reader may act on: C0 and C1 controls and DEL, the Unicode line and
# paragraph separators (line breaks to some viewers), the bidirectional overrides and isolates
# (they reorder what is shown: "Trojan Source"), and lone surrogates (undecodable bytes of a file
# name, from os.fsdecode's surrogateescape: printing one raises UnicodeEncodeError).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                     "\u2066-\u2069\ud800-\udfff]")
_UNSAFE_KEEP_NL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029"
                             "\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:      # a byte that was not UTF-8, carried by surrogateescape
        return f"\\x{o - 0xDC00:02x}"
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def safe(value: Any) -> str:
    """``value`` as one line with every control character escaped: 'a\\nb' -> 'a\\\\nb',
    ESC -> '\\\\x1b', BEL -> '\\\\x07'. Ordinary Unicode ('modèle-中文') is kept as is."""
    text = value if isinstance(value, str) else str(value)
    return _UNSAFE.sub(_escape, text) if _UNSAFE.search(text) else text


def safe_text(value: Any) -> str:
    """Like :func:`safe` but keeps newlines: for a block of lines we laid out ourselves."""
    text = value if isinstance(value, str) else str(value)
    return _UNSAFE_KEEP_NL.sub(_escape, text) if _UNSAFE_KEEP_NL.search(text) else text


def human_bytes(n: int | float | None, *, short: bool = False) -> str:
    """Binary units, three significant digits: 1536 -> '1.5 KiB', 98 MiB -> '98.0 MiB',
    512 MiB -> '512 MiB', 100 -> '100 B'; ``short``: '512M'. None -> '-'.

    The one size formatter of devmapd: the CLI, the daemon's reasons and the dashboard use it,
    so one number never reads differently in two places.
    """
    if n is None:
        return "-"
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    unit = _UNITS[0]
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            break
        value /= 1024
    if unit == "B":
        text = f"{value:.0f}"
    else:
        text = f"{value:.0f}" if round(value, 1) >= 100 else f"{value:.1f}"
    return f"{sign}{text}{unit[0] if short else ' ' + unit}"


def ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "never"
    seconds = max(0.0, (now or time.time()) - ts)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Aligned columns; every cell passes through :func:`safe` (cells hold names and reasons)."""
    cells = [[str(h) for h in headers]] + [[("-" if c is None else safe(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def placement_text(placement: dict[str, int]) -> str:
    if not placement:
        return "-"
    return ", ".join(f"{dev} {human_bytes(n)}" for dev, n in sorted(placement.items()))


def _why(m: Mapping[str, Any]) -> str:
    """What to tell the operator about a model: its failure if it failed, else why it sits where it does."""
    return str((m.get("diagnosis") or {}).get("message") or m.get("error") or m.get("reason") or "")


def _listing(title: str, entries: Any) -> str:
    """'title:' then one '  key: message' line per entry (a dict, or a list of strings)."""
    if not entries:
        return ""
    if isinstance(entries, Mapping):
        lines = [f"  {safe(k)}: {safe(v)}" for k, v in sorted(entries.items(), key=lambda kv: str(kv[0]))]
    else:
        lines = [f"  {safe(e)}" for e in entries]
    return f"{title}:\n" + "\n".join(lines)


def status_text(status: dict[str, Any]) -> str:
    """`devmapd status` as text: daemon line, devices, models (each with why it is where it is),
    then the files that are not served (daemon.problems) and directories waiting for shards."""
    d = status.get("daemon") or {}
    head = (f"devmapd {safe(d.get('version', '?'))} on {safe(d.get('host', '?'))}  pid {safe(d.get('pid', '?'))}  "
            f"up {d.get('uptime_s') or 0:.0f}s  backend {safe(d.get('backend', '?'))}\n"
            f"models from {safe(d.get('model_dir', '?'))}  socket {safe(d.get('socket', '?'))}")
    fds, state = d.get("fds"), d.get("state_dir")
    if isinstance(fds, dict) and fds.get("limit"):
        head += f"\nfile descriptors {fds.get('open', '?')} of {fds['limit']} open (new loads stop {fds.get('reserve', '?')} short)"
    if isinstance(state, dict) and state.get("path"):
        head += f"\nstate in {safe(state['path'])} ({safe(state.get('why') or state.get('source') or '')})"
    if d.get("warning"):
        head += f"\nwarning: {safe(d['warning'])}"
    devices = table(
        ("DEVICE", "NAME", "TOTAL", "FREE", "DEVMAPD", "NOTE"),
        ((dev["id"], dev["name"], human_bytes(dev["total"]), human_bytes(dev["free"]), human_bytes(dev.get("held")),
          "LOST" if dev.get("lost") else (dev.get("error") or ("simulated" if dev.get("simulated") else "")))
         for dev in status.get("devices", [])),
    )
    models = status.get("models", [])
    if models:
        body = table(
            ("MODEL", "STATE", "PLACEMENT", "SIZE", "DTYPES", "CLIENTS", "PIN", "WHY"),
            ((m["name"], m["state"] + (f" {m['progress']:.0%}" if m.get("progress") is not None else ""),
              placement_text(m.get("placement") or {}), human_bytes(m.get("bytes")),
              ",".join(sorted(m.get("dtypes") or {})) or "-", m.get("clients", 0), m.get("pin") or "",
              _why(m))
             for m in models),
        )
    else:
        body = "no models (drop a checkpoint into the model directory)"
    sections = [head, devices, body,
                _listing("not served (daemon.problems)", d.get("problems")),
                _listing("waiting for shards (daemon.pending)", d.get("pending"))]
    return "\n\n".join(s for s in sections if s)


# The outcomes an operator action's reply may report (the daemon's reply contract).
OUTCOMES = ("applied", "pending", "unchanged")


def action_text(op: str, name: str, device: str | None, result: Any) -> str:
    """One line saying what an operator action did, from the daemon's reply.

    The reply carries ``outcome`` (applied | pending | unchanged) and ``message`` (one plain
    sentence). A daemon that predates them sends only ``state``: then the line says the request
    was accepted and where to look, never a bare "ok" it cannot vouch for.
    """
    reply = result if isinstance(result, Mapping) else {}
    target = reply.get("device") or device
    what = f"{op} {safe(name)}" + (f" -> {safe(target)}" if target else "")
    outcome, message = reply.get("outcome"), reply.get("message")
    if outcome:
        return f"{what}: {safe(outcome)}" + (f": {safe(message)}" if message else "")
    state = reply.get("state")
    return (f"{what}: accepted" + (f" (state: {safe(state)})" if state else "")
            + (f": {safe(message)}" if message else "")
            + "; this daemon does not report whether it was applied: see `devmapd status`")
