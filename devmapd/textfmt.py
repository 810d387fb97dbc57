"""Plain-text rendering for the CLI: byte sizes and the `devmapd status` tables.

Kept apart from cli.py so the TUI and the benchmarks can format numbers the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: int | float | None) -> str:
    """1536 -> '1.5 KiB'; None -> '-'."""
    if n is None:
        return "-"
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


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
    cells = [[str(h) for h in headers]] + [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def placement_text(placement: dict[str, int]) -> str:
    if not placement:
        return "-"
    return ", ".join(f"{dev} {human_bytes(n)}" for dev, n in sorted(placement.items()))


def status_text(status: dict[str, Any]) -> str:
    d = status.get("daemon", {})
    head = (f"devmapd {d.get('version', '?')} on {d.get('host', '?')}  pid {d.get('pid', '?')}  "
            f"up {d.get('uptime_s', 0):.0f}s  backend {d.get('backend', '?')}\n"
            f"models from {d.get('model_dir', '?')}  socket {d.get('socket', '?')}")
    if d.get("warning"):
        head += f"\nwarning: {d['warning']}"
    devices = table(
        ("DEVICE", "NAME", "TOTAL", "FREE", "DEVMAPD", "NOTE"),
        ((dev["id"], dev["name"], human_bytes(dev["total"]), human_bytes(dev["free"]), human_bytes(dev.get("held")),
          "LOST" if dev.get("lost") else (dev.get("error") or ("simulated" if dev.get("simulated") else "")))
         for dev in status.get("devices", [])),
    )
    models = status.get("models", [])
    if models:
        body = table(
            ("MODEL", "STATE", "PLACEMENT", "SIZE", "DTYPES", "CLIENTS", "PIN", "NOTE"),
            ((m["name"], m["state"] + (f" {m['progress']:.0%}" if m.get("progress") is not None else ""),
              placement_text(m.get("placement") or {}), human_bytes(m.get("bytes")),
              ",".join(sorted(m.get("dtypes") or {})) or "-", m.get("clients", 0), m.get("pin") or "",
              (m.get("diagnosis") or {}).get("message") or m.get("error") or "")
             for m in models),
        )
    else:
        body = "no models (drop a checkpoint into the model directory)"
    return f"{head}\n\n{devices}\n\n{body}"
