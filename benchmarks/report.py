"""Rows of ratios, the text table, the JSON file and docs/benchmarks.md."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One measurement against its peer. ``ratio`` is defined by ``ratio_means`` (e.g.
    "peer/devmapd time": a speed-up); ``target`` is (op, value) on that ratio, or None."""
    section: str
    metric: str
    devmapd: str                  # the devmapd figure, human-readable ("3.1 ms")
    peer: str                     # "torch.load 412 ms"
    ratio: float | None
    ratio_means: str
    target: tuple[str, float] | None = None
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)   # raw numbers for the JSON
    ratio_text: str | None = None    # overrides the "12.3x" rendering (e.g. "0.4%")
    target_label: str | None = None  # overrides the ">= 5x" rendering (e.g. "< 1%")

    @property
    def verdict(self) -> str:
        if self.target is None or self.ratio is None:
            return "info"
        op, val = self.target
        ok = self.ratio >= val if op == ">=" else self.ratio <= val
        return "PASS" if ok else "MISS"

    def target_text(self) -> str:
        if self.target_label is not None:
            return self.target_label
        return "" if self.target is None else f"{self.target[0]} {self.target[1]:g}x"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict
        d["target"] = None if self.target is None else {"op": self.target[0], "value": self.target[1]}
        return d


def fmt_s(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"


def fmt_b(n: float) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


HEADER = ("measurement", "devmapd", "peer", "ratio", "ratio means", "target", "result")


def _cells(r: Row) -> tuple[str, ...]:
    ratio = r.ratio_text if r.ratio_text is not None else fmt_ratio(r.ratio)
    return (f"{r.section}: {r.metric}", r.devmapd, r.peer, ratio, r.ratio_means,
            r.target_text(), r.verdict)


def text_table(rows: list[Row]) -> str:
    cells = [HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    line = lambda c: "  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip()   # noqa: E731
    out = [line(cells[0]), line(tuple("-" * w for w in widths))]
    out += [line(c) for c in cells[1:]]
    notes = [f"  [{r.section}: {r.metric}] {r.note}" for r in rows if r.note]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def markdown_table(rows: list[Row]) -> str:
    esc = lambda s: s.replace("|", "\\|")   # noqa: E731
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(esc(c) for c in _cells(r)) + " |" for r in rows]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    """What the numbers were measured on (and how busy it was: the machine is shared)."""
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    import torch
    fs = "?"
    try:
        for line in open("/proc/mounts"):
            dev, mnt, typ = line.split()[:3]
            if mnt in ("/", "/tmp"):
                fs = f"{typ} ({dev} on {mnt})"
                if mnt == "/tmp":
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__, "tmp_fs": fs,
            "loadavg": os.getloadavg(), "disk_free_tmp": shutil.disk_usage("/tmp").free}


def now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_json(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**meta, "rows": [r.to_json() for r in rows]}, indent=2, default=str))
    os.replace(tmp, path)


def write_markdown(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    m = meta["machine"]
    passed = sum(r.verdict == "PASS" for r in rows)
    missed = sum(r.verdict == "MISS" for r in rows)
    notes = [f"- **{r.section}: {r.metric}** — {r.note}" for r in rows if r.note]
    text = f"""# devmapd benchmarks

Latest `python -m benchmarks{' --quick' if meta['profile'] == 'quick' else ''}` run, {meta['date']}
({meta['wall_s']:.0f} s; profile `{meta['profile']}`). Every devmapd figure is measured against its
peer in the same run; "ratio means" says which way the ratio reads. Targets come from issues 3, 6
and 13. {passed} targets met, {missed} missed. Raw numbers: `benchmarks/results/latest.json`
(re-run with `make bench`, or `make bench-quick` for the under-two-minute version).

**Machine:** {m['cpu'] or 'unknown CPU'}, {m['cores']} cores, {m['memory'] / (1 << 30):.1f} GiB RAM,
Linux {m['kernel']}, Python {m['python']}, torch {m['torch']}; files on {m['tmp_fs']}, page cache
warm for every peer. Load average at start {meta['loadavg_start'][0]:.1f}, at end
{m['loadavg'][0]:.1f}: the machine is shared, so treat small differences as noise.

{markdown_table(rows)}

## Notes

{chr(10).join(notes) if notes else '(none)'}

## How each figure is taken

- **fetch**: each repeat is a fresh process (forked from a server that imported torch, numpy
  and safetensors, as a user's script has; not devmapd) that calls the loader once. devmapd's
  clock starts BEFORE `import devmapd` (compiled bytecode), so its figure includes importing
  the client; the peers' libraries are already imported. "tensors" stops the clock when the
  call returns, "+ read every byte" after a sum over each tensor; "repeat fetch" is a second
  `devmapd.load` of the unchanged model in the same process. Median of
  {meta['profile_detail']['fetch_repeats']} repeats, methods interleaved. devmapd is a real
  `devmapd serve` process on a Unix socket.
- **ready**: time until a module is built, filled and in eval mode, in fresh processes that
  imported torch (and transformers with the model's code: off the clock for both methods).
  The fp16 module: `devmapd.load_into` into a module built with `devmapd.meta_init()` vs the
  copy path `model.load_state_dict(devmapd.load(...))` into a normally built (initialised)
  module, vs the same with `safetensors.torch.load_file`, vs
  `load_state_dict(torch.load(mmap=True), assign=True)` into a `torch.device("meta")` module.
  The Hugging Face case: `devmapd.hf.from_pretrained` vs `transformers.AutoModel.from_pretrained`
  of the same directory (written by transformers); outputs on a fixed input are compared byte
  for byte (sha256) and must be identical. PSS: 4 processes hold the ready model after a
  forward pass; the growth of their summed PSS over a baseline taken after their imports and
  a tiny warm-up forward pass.
- **memory**: N processes hold the model at once, each having read every byte; the figure is the
  growth of their summed PSS (`/proc/<pid>/smaps_rollup`) from before the load to after it.
- **cold load**: `devmapd.engine.checkpoint.read` (what the daemon runs per model) vs one `memcpy` from a
  mapping of the cached file into freshly allocated memory, vs `torch.load`; rates are payload
  bytes per second; fresh process each, median.
- **watch**: a checkpoint written under a temporary name is renamed into the watched directory;
  latency runs to the `ready` event on a subscription; the model's own `load_time_s` is subtracted.
  The daemon's `watch.settle_s` (shipped default {meta.get('settle_s', 1.0):g} s) is part of it by
  design.
- **idle**: a daemon with 2 simulated GPUs and N models, all ready, measured over a window with
  `utime+stime` from `/proc/<pid>/stat`; RSS overhead is `RssAnon+RssFile` (the arenas are
  memfd shmem, counted separately), against a bare Python process that imported torch.
- **scale**: start-up (spawn to all models ready) and median `status` latency on one connection,
  with 1, 10, 100 and 1,000 small models.
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def rows_from_json(doc: dict[str, Any]) -> list[Row]:
    """The rows of a JSON file written by ``write_json`` (to re-render the markdown)."""
    rows = []
    for r in doc["rows"]:
        t = r.get("target")
        rows.append(Row(section=r["section"], metric=r["metric"], devmapd=r["devmapd"], peer=r["peer"],
                        ratio=r["ratio"], ratio_means=r["ratio_means"],
                        target=None if t is None else (t["op"], t["value"]), note=r.get("note", ""),
                        data=r.get("data", {}), ratio_text=r.get("ratio_text"),
                        target_label=r.get("target_label")))
    return rows


if __name__ == "__main__":   # python -m benchmarks.report RESULTS.json MARKDOWN.md: re-render only
    import sys
    doc = json.loads(Path(sys.argv[1]).read_text())
    write_markdown(Path(sys.argv[2]), rows_from_json(doc), doc)
