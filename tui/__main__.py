"""`python -m devmapd_tui [--socket S]`: the dashboard without going through the devmapd CLI."""
from __future__ import annotations

import argparse
import sys

from . import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devmapd-tui", description="The devmapd dashboard.")
    parser.add_argument("--socket", help="daemon socket (default: $DEVMAPD_SOCKET, else the configured one)")
    args = parser.parse_args(argv)
    return run(args.socket)


if __name__ == "__main__":
    sys.exit(main())
