"""The ``devmapd`` command. The only place exceptions become exit codes.

Exit codes (documented in the README):
  0  success
  1  error (the daemon failed, or refused an action: the reason is printed)
  2  usage error (bad arguments, bad config)
  3  the daemon is unreachable
  4  no such model
  5  permission denied
  6  the checkpoint cannot be served (``inspect``: it has a diagnosis)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from devmapd._version import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NOT_FOUND, EXIT_DENIED, EXIT_UNSERVABLE = range(7)


def _socket_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", help="daemon socket (default: $DEVMAPD_SOCKET, else the configured default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devmapd", description="Preloaded PyTorch checkpoints, shared zero-copy.")
    parser.add_argument("--version", action="version", version=f"devmapd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    p.add_argument("--config", help="config file (default /etc/devmapd/devmapd.toml if present)")
    p.add_argument("--model-dir", help="directory of checkpoints to serve")
    p.add_argument("--socket", help="socket path to listen on")
    p.add_argument("--simulate", metavar="FILE", help="simulated GPUs from a JSON file (see README)")
    p.add_argument("--state-dir", help="where pins and remaps are kept")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    p = sub.add_parser("status", help="devices and models")
    _socket_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable (contract in the README)")

    for name, helptext, has_device in (
        ("remap", "move a model to a device (or 'auto')", True),
        ("pin", "place a model on a device and never demote it", True),
        ("unpin", "let the planner and pressure move a model again", False),
        ("evict", "drop a model from memory (stays registered)", False),
        ("reload", "re-read a model from its file", False),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("name", help="model name (see `devmapd status`)")
        if has_device:
            p.add_argument("device", help="cuda:N, cpu" + (" or auto" if name == "remap" else ""))
        p.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
        _socket_arg(p)

    p = sub.add_parser("inspect", help="what a checkpoint file or directory holds, without reading tensor data")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("fetch", help="fetch a model from the daemon and report how long it took")
    p.add_argument("name")
    _socket_arg(p)

    p = sub.add_parser("tui", help="the dashboard")
    _socket_arg(p)

    p = sub.add_parser("demo", help="sample checkpoints + simulated GPUs + the dashboard")
    from devmapd.demo import add_arguments as add_demo_arguments

    add_demo_arguments(p)

    p = sub.add_parser("install-service", help="install the systemd service (see README, Operations)")
    from devmapd.service.install import add_arguments

    add_arguments(p)
    return parser


# --------------------------------------------------------------------------- commands
def cmd_serve(args: argparse.Namespace) -> int:
    from devmapd import config as configmod
    from devmapd.daemon.lifecycle import serve

    cfg = configmod.load(args.config)

    def overrides(c: configmod.Config) -> configmod.Config:
        changes: dict[str, Any] = {}
        if args.model_dir:
            changes["model_dir"] = args.model_dir
        if args.state_dir:
            changes["state_dir"] = args.state_dir
        if args.log_level:
            changes["log_level"] = args.log_level
        if args.socket:
            changes["server"] = dataclasses.replace(c.server, socket=args.socket)
        elif os.geteuid() != 0 and c.server.socket == configmod.ServerConfig().socket:
            # A user's own daemon cannot create /run/devmapd: use the per-user path clients look at.
            from devmapd.client import default_socket

            changes["server"] = dataclasses.replace(c.server, socket=default_socket())
        if args.simulate:
            changes["devices"] = dataclasses.replace(c.devices, simulate=os.path.abspath(args.simulate),
                                                     backend="simulated")
        return c.replace(**changes)

    effective = overrides(cfg)
    _configure_logging(effective.log_level)
    return serve(cfg, config_path=args.config, overrides=overrides)


def _configure_logging(level: str) -> None:
    try:
        from devmapd.service.systemd import configure_logging, running_under_systemd

        configure_logging(level, running_under_systemd())
    except ImportError:
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # watchdog's own debug chatter (every inotify event) drowns our decisions.
    logging.getLogger("watchdog").setLevel(max(logging.INFO, logging.getLogger().level))


def _client(args: argparse.Namespace):
    from devmapd.client import Client

    return Client(args.socket)


def cmd_status(args: argparse.Namespace) -> int:
    from devmapd.textfmt import status_text

    with _client(args) as client:
        status = client.status()
    if args.json:
        json.dump({"devices": status["devices"], "models": status["models"], "daemon": status.get("daemon")},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(status_text(status))
    return EXIT_OK


def _action(op: str) -> Callable[[argparse.Namespace], int]:
    """An operator action: print what the daemon says happened (applied, pending and why,
    unchanged); a refusal is an error reply and exits non-zero with the daemon's reason."""

    def run(args: argparse.Namespace) -> int:
        from devmapd.client import DaemonUnavailable, DevmapdError, ModelNotFound, PermissionDenied
        from devmapd.textfmt import action_text, safe

        device = getattr(args, "device", None)
        try:
            with _client(args) as client:
                method = getattr(client, op)
                result = method(args.name, device) if device is not None else method(args.name)
        except (DaemonUnavailable, ModelNotFound, PermissionDenied):
            raise                 # their own exit codes, in main()
        except DevmapdError as exc:
            what = f"{op} {safe(args.name)}" + (f" -> {safe(device)}" if device else "")
            verb = "failed" if exc.code in ("unavailable", "internal") else "refused"
            print(f"devmapd: {what} {verb}: {safe(exc)}", file=sys.stderr)
            return EXIT_ERROR
        if args.json:
            json.dump(result, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(action_text(op, args.name, device, result))
        return EXIT_OK

    return run


def cmd_inspect(args: argparse.Namespace) -> int:
    from devmapd.engine import checkpoint

    insp = checkpoint.inspect(args.path)
    if args.json:
        json.dump(insp.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from devmapd.textfmt import safe_text

        print(safe_text(checkpoint.summary(insp)))   # names inside come from the file
    return EXIT_UNSERVABLE if insp.diagnosis is not None else EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    import torch

    from devmapd.textfmt import human_bytes, safe

    started = time.perf_counter()
    with _client(args) as client:
        obj = client.fetch(args.name)
        elapsed = time.perf_counter() - started
        tensors = []

        def walk(node: Any) -> None:
            if isinstance(node, torch.Tensor):
                tensors.append(node)
            elif isinstance(node, dict):
                for v in node.values():
                    walk(v)
            elif isinstance(node, (list, tuple, set)):
                for v in node:
                    walk(v)

        walk(obj)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        devices = sorted({str(t.device) for t in tensors})
        print(f"{safe(args.name)}: {len(tensors)} tensors, {human_bytes(nbytes)} on {', '.join(devices) or '-'}, "
              f"fetched in {elapsed * 1000:.2f} ms")
    return EXIT_OK


def cmd_tui(args: argparse.Namespace) -> int:
    from devmapd_tui import run

    return run(args.socket)


def cmd_demo(args: argparse.Namespace) -> int:
    from devmapd.demo import run

    return run(args)


def cmd_install_service(args: argparse.Namespace) -> int:
    from devmapd.service.install import run

    return run(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve, "status": cmd_status, "inspect": cmd_inspect, "fetch": cmd_fetch,
    "tui": cmd_tui, "demo": cmd_demo, "install-service": cmd_install_service,
    **{op: _action(op) for op in ("remap", "pin", "unpin", "evict", "reload")},
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from devmapd.client import DaemonUnavailable, DevmapdError, ModelNotFound, PermissionDenied
    from devmapd.config import ConfigError

    # Most specific first: the client's errors are all DevmapdErrors.
    failures: tuple[tuple[type[BaseException], int, str], ...] = (
        (ConfigError, EXIT_USAGE, "config error: "),
        (DaemonUnavailable, EXIT_UNREACHABLE, "daemon unreachable: "),
        (ModelNotFound, EXIT_NOT_FOUND, ""),
        (PermissionDenied, EXIT_DENIED, "permission denied: "),
        (DevmapdError, EXIT_ERROR, ""),
    )
    try:
        return COMMANDS[args.command](args)
    except tuple(kind for kind, _code, _prefix in failures) as exc:
        from devmapd.textfmt import safe

        code, prefix = next((c, p) for kind, c, p in failures if isinstance(exc, kind))
        print(f"devmapd: {prefix}{safe(exc)}", file=sys.stderr)   # messages quote model names
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `devmapd status | head`
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
