"""``python -m benchmarks [--quick] [--json PATH] [--markdown PATH] [--only SECTIONS]``

Runs every section in one process tree, prints the table of ratios, writes the JSON (default
benchmarks/results/latest.json) and, for a full run, docs/benchmarks.md (the README shows it).
A ``--quick`` run writes the markdown only when ``--markdown`` names a file, so a quick check
never overwrites the published full-run table. Exit status 1 if a section failed to run
(a missed target is a finding, not a failure: it is in the table).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from benchmarks import coldload, dedup, fetch, idle, memory, ready, scale, watch
from benchmarks.common import ROOT, ctx
from benchmarks.env import Env
from benchmarks.profiles import PROFILES
from benchmarks.report import Row, machine, now, text_table, write_json, write_markdown

SECTIONS = {"fetch": fetch.run, "ready": ready.run, "memory": memory.run, "coldload": coldload.run,
            "watch": watch.run, "idle": idle.run, "scale": scale.run, "dedup": dedup.run}
NEEDS_SERVE = {"fetch", "ready", "memory", "coldload", "watch"}   # use the shared sample models / daemon


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (< 2 minutes)")
    p.add_argument("--profile", choices=sorted(PROFILES), help=argparse.SUPPRESS)   # "toy": the smoke test
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json",
                   help="where the JSON goes (default benchmarks/results/latest.json)")
    p.add_argument("--markdown", type=Path, default=None,
                   help="where the markdown table goes (default docs/benchmarks.md for a full run)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--tmp", default=None, help="parent of the working directory (default /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the working directory (checkpoints, logs)")
    args = p.parse_args(argv)
    args.profile = args.profile or ("quick" if args.quick else "full")
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    if args.markdown is None and args.profile == "full" and args.sections == list(SECTIONS):
        args.markdown = ROOT / "docs" / "benchmarks.md"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    prof = PROFILES[args.profile]
    t_start = time.monotonic()
    meta = {"date": now(), "profile": prof.name, "profile_detail": prof.to_json(), "sections": args.sections,
            "loadavg_start": os.getloadavg(), "errors": {}}
    # Fresh processes read devmapd's compiled bytecode, as an installed package's users do
    # (PYTHONDONTWRITEBYTECODE only stops writing it; reading works).
    import compileall
    compileall.compile_dir(str(ROOT / "devmapd"), quiet=1)
    env = Env.create(prof, args.tmp)
    rows: list[Row] = []
    log = lambda msg: print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        sections = list(args.sections)
        if NEEDS_SERVE & set(sections):
            log(f"writing sample checkpoints under {env.base}")
            try:
                env.write_models()
                env.start()
                boot = ctx().Process(target=os.getpid)   # start the forkserver while the daemon boots
                boot.start()
                env.daemon.wait_ready(env.model_count())
                boot.join()
                log("daemon ready")
            except Exception as e:   # no daemon: the sections that need it cannot run
                skipped = [s for s in sections if s in NEEDS_SERVE]
                meta["errors"]["setup"] = f"{type(e).__name__}: {e} (skipped: {', '.join(skipped)})"
                log(f"setup FAILED, skipping {', '.join(skipped)}: {type(e).__name__}: {e}")
                sections = [s for s in sections if s not in NEEDS_SERVE]
        for name in sections:
            log(f"running {name}")
            try:
                got = SECTIONS[name](env)
                rows += got
                for r in got:
                    log(f"  {r.section}: {r.metric}: {r.ratio_text or r.ratio} {r.verdict}")
            except Exception as e:
                meta["errors"][name] = f"{type(e).__name__}: {e}"
                log(f"{name} FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        env.close(keep=args.keep)
    meta["wall_s"] = time.monotonic() - t_start
    meta["machine"] = machine()
    meta["settle_s"] = 1.0
    print(text_table(rows))
    if meta["errors"]:
        print("\nsections that failed to run: " + "; ".join(f"{k}: {v}" for k, v in meta["errors"].items()))
    write_json(args.json, rows, meta)
    print(f"\nJSON: {args.json}")
    if args.markdown is not None and meta["errors"]:
        print(f"markdown: {args.markdown} left as it was (a partial run does not replace the published table)")
    elif args.markdown is not None:
        write_markdown(args.markdown, rows, meta)
        print(f"markdown: {args.markdown}")
    return 1 if meta["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
