"""`devmapd install-service`: put the systemd units, sysusers/tmpfiles snippets and config in place.

What goes where (all under ``--root``, default ``/``):

    /etc/systemd/system/devmapd.service   from systemd/devmapd.service, ExecStart and
                                         ReadOnlyPaths= rewritten for this install
    /etc/systemd/system/devmapd.socket   from systemd/devmapd.socket
    /etc/sysusers.d/devmapd.conf         the static devmapd user (+ video/render membership)
    /etc/tmpfiles.d/devmapd.conf         /run/devmapd, /run/devmapd/metrics, /var/lib/devmapd
    /etc/devmapd/devmapd.toml            from config/devmapd.toml; never overwritten, and the
                                         fresh copy writes metrics to the textfile the unit allows

ExecStart: the ``devmapd`` script beside ``--python`` (default: the interpreter running this,
so `sudo /opt/devmapd/venv/bin/devmapd install-service` wires that venv), or
``<prefix>/bin/devmapd`` with ``--prefix``, else ``/usr/bin/env devmapd`` (systemd's PATH).
On the live root it then runs systemd-sysusers, systemd-tmpfiles and `systemctl daemon-reload`
(and, with ``--enable``, `systemctl enable --now devmapd.socket devmapd.service`). Every action
is printed; ``--dry-run`` prints them and touches nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["InstallError", "add_arguments", "find_sources", "install_service", "main", "render_service", "run",
           "uninstall_service"]

CONFIG_PATH = "/etc/devmapd/devmapd.toml"
DEFAULT_MODEL_DIR = "/srv/models"
METRICS_TEXTFILE = "/run/devmapd/metrics/devmapd.prom"
STATE_DIR = "/var/lib/devmapd"
UNITS = ("devmapd.socket", "devmapd.service")  # socket first: it must exist when the service starts
SYSUSERS = "etc/sysusers.d/devmapd.conf"
TMPFILES = "etc/tmpfiles.d/devmapd.conf"
UNIT_DIR = "etc/systemd/system"
# ProtectHome=yes hides these from the service: an ExecStart or model_dir under them cannot work.
_HIDDEN = ("/root", "/home", "/run/user")


class InstallError(Exception):
    """Something the admin must fix; the message says what and how."""


@dataclass(frozen=True)
class Sources:
    service: Path
    socket: Path
    sysusers: Path
    tmpfiles: Path
    config: Path | None


def find_sources() -> Sources:
    """The files to install: a source checkout / editable install first, then the data files
    of a wheel (sys.prefix/share/devmapd), so the same code works from git and from pip."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent.parent, Path(sys.prefix) / "share" / "devmapd", here / "data"]
    for base in candidates:
        unit_dir = base / "systemd"
        if (unit_dir / "devmapd.service").is_file():
            config = base / "config" / "devmapd.toml"
            return Sources(
                service=unit_dir / "devmapd.service",
                socket=unit_dir / "devmapd.socket",
                sysusers=unit_dir / "sysusers.d" / "devmapd.conf",
                tmpfiles=unit_dir / "tmpfiles.d" / "devmapd.conf",
                config=config if config.is_file() else None,
            )
    raise InstallError(
        "cannot find the systemd unit files (looked in " + ", ".join(str(c / "systemd") for c in candidates)
        + "); run install-service from a devmapd source checkout or a package that ships them"
    )


# ------------------------------------------------------------------------------- rendering
def _quote(word: str) -> str:
    """Quote one word for a unit file (systemd follows shell-like double quotes)."""
    if any(ord(c) < 32 for c in word):
        raise InstallError(f"{word!r} contains control characters; use a path without them")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def resolve_exec(prefix: str | os.PathLike[str] | None, python: str | os.PathLike[str] | None) -> list[str]:
    """argv[0..] of ExecStart before `serve ...` (see the module docstring for the order)."""
    if prefix is not None:
        return [str(Path(prefix) / "bin" / "devmapd")]
    # No resolve(): a venv's python is a symlink, and its bin/ is where the script lives.
    script = Path(python or sys.executable).absolute().parent / "devmapd"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return ["/usr/bin/env", "devmapd"]


def _interpreter(script: str) -> str | None:
    """The resolved #! interpreter of a console script (a venv python is a symlink to the base
    interpreter, which must be visible to the service too)."""
    try:
        with open(script, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return str(Path(words[0]).resolve()) if words else None


def render_service(template: str, exec_argv: Sequence[str], model_dir: str, config_path: str = CONFIG_PATH) -> str:
    """The unit text with ExecStart= and ReadOnlyPaths= set for this install."""
    exec_line = "ExecStart=" + " ".join(_quote(w) for w in [*exec_argv, "serve", "--config", config_path])
    text, n = re.subn(r"(?m)^ExecStart=.*$", lambda _: exec_line, template)
    if n != 1:
        raise InstallError("the service template must have exactly one ExecStart= line")
    # '-' prefix: a missing model directory must not stop the unit from starting (the daemon
    # says what is wrong instead).
    text, n = re.subn(r"(?m)^ReadOnlyPaths=.*$", lambda _: "ReadOnlyPaths=-" + _quote(model_dir), text)
    if n != 1:
        raise InstallError("the service template must have exactly one ReadOnlyPaths= line")
    return text


def render_config(template: str) -> str:
    """Fresh config: metrics go to the textfile the hardened unit can write (PrivateNetwork)."""
    return re.sub(r'(?m)^textfile = ""', f'textfile = "{METRICS_TEXTFILE}"', template, count=1)


def _config_model_dir(text: str | None) -> str | None:
    if not text:
        return None
    try:
        value = tomllib.loads(text).get("model_dir")
    except tomllib.TOMLDecodeError:
        return None
    return value if isinstance(value, str) and value else None


# ------------------------------------------------------------------------------- actions
class _Actions:
    def __init__(self, root: Path, dry_run: bool, out: Callable[[str], None]) -> None:
        self.root, self.dry_run, self.out = root, dry_run, out
        self.live = root.resolve() == Path("/")

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def say(self, text: str) -> None:
        self.out(("would " if self.dry_run else "") + text)

    def mkdir(self, rel: str, mode: int) -> None:
        target = self.path(rel)
        if target.is_dir():
            return
        self.say(f"create directory {target} (mode {mode:04o})")
        if not self.dry_run:
            target.mkdir(parents=True, exist_ok=True)
            os.chmod(target, mode)

    def write(self, rel: str, text: str, mode: int = 0o644, *, keep_existing: bool = False) -> None:
        target = self.path(rel)
        if target.exists():
            if keep_existing:
                self.out(f"keep existing {target} (not overwritten)")
                return
            if target.read_text(errors="replace") == text and (target.stat().st_mode & 0o7777) == mode:
                self.out(f"unchanged {target}")
                return
        self.say(f"write {target} (mode {mode:04o})")
        if self.dry_run:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)

    def remove(self, rel: str) -> None:
        target = self.path(rel)
        if not target.exists() and not target.is_symlink():
            return
        self.say(f"remove {target}")
        if not self.dry_run:
            target.unlink()

    def run(self, argv: list[str], *, check: bool = True) -> None:
        cmd = shlex.join(argv)
        if not self.live:
            self.out(f"skip (not the live root): {cmd}")
            return
        self.say(f"run {cmd}")
        if self.dry_run:
            return
        if shutil.which(argv[0]) is None:
            self.out(f"  {argv[0]} not found; run this by hand on the target system")
            return
        result = subprocess.run(argv, check=False)
        if result.returncode != 0 and check:
            raise InstallError(f"{cmd} failed with exit status {result.returncode}")


def _require_root(actions: _Actions) -> None:
    if actions.live and not actions.dry_run and os.geteuid() != 0:
        raise InstallError("installing into / needs root: run it with sudo, or pass --dry-run or --root DIR")


def install_service(
    root: Path = Path("/"),
    *,
    dry_run: bool,
    prefix: str | os.PathLike[str] | None = None,
    python: str | os.PathLike[str] | None = None,
    model_dir: str | None = None,
    enable: bool = False,
    out: Callable[[str], None] = print,
) -> None:
    """Install the service under ``root`` (see the module docstring). Raises InstallError."""
    actions = _Actions(Path(root), dry_run, out)
    _require_root(actions)
    src = find_sources()
    config_target = actions.path(CONFIG_PATH)
    existing_config = config_target.read_text(errors="replace") if config_target.is_file() else None
    shipped_config = src.config.read_text() if src.config else None
    model_dir = model_dir or _config_model_dir(existing_config) or _config_model_dir(shipped_config) or DEFAULT_MODEL_DIR
    if not model_dir.startswith("/"):
        raise InstallError(f"model_dir {model_dir!r} must be an absolute path")
    exec_argv = resolve_exec(prefix, python)

    for hidden in _HIDDEN:
        for what, path in (("ExecStart", exec_argv[0]), ("its interpreter", _interpreter(exec_argv[0]))):
            if path and (path == hidden or path.startswith(hidden + "/")):
                out(f"warning: {what} {path} is under {hidden}, which ProtectHome=yes hides from the service; "
                    "install devmapd into a venv such as /opt/devmapd/venv and run install-service from it")
        if model_dir == hidden or model_dir.startswith(hidden + "/"):
            out(f"warning: model_dir {model_dir} is under {hidden}, which ProtectHome=yes hides; move the models "
                "(e.g. to /srv/models) or add a drop-in with ProtectHome=read-only")

    actions.mkdir(UNIT_DIR, 0o755)
    actions.write(f"{UNIT_DIR}/devmapd.service", render_service(src.service.read_text(), exec_argv, model_dir))
    actions.write(f"{UNIT_DIR}/devmapd.socket", src.socket.read_text())
    actions.mkdir("etc/sysusers.d", 0o755)
    actions.write(SYSUSERS, src.sysusers.read_text())
    actions.mkdir("etc/tmpfiles.d", 0o755)
    actions.write(TMPFILES, src.tmpfiles.read_text())
    actions.mkdir("etc/devmapd", 0o755)
    if shipped_config is not None:
        # 0644: the config holds no secrets, and the CLI of every user reads the socket path from it.
        actions.write(CONFIG_PATH, render_config(shipped_config), 0o644, keep_existing=True)
    elif existing_config is None:
        out(f"note: no default config shipped with this devmapd; create {config_target} (an empty file "
            "means all defaults) before starting the service")

    actions.run(["systemd-sysusers", f"/{SYSUSERS}"])
    actions.run(["systemd-tmpfiles", "--create", f"/{TMPFILES}"])
    actions.run(["systemctl", "daemon-reload"])
    if enable:
        actions.run(["systemctl", "enable", "--now", *UNITS])
    elif actions.live:
        out("next: sudo systemctl enable --now devmapd.socket devmapd.service")
    out("users who may connect: sudo usermod -aG devmapd USER (then log in again); logs: journalctl -u devmapd")


def uninstall_service(root: Path = Path("/"), *, dry_run: bool, out: Callable[[str], None] = print) -> None:
    """Stop and remove the units and snippets. Keeps /etc/devmapd, /var/lib/devmapd and the
    devmapd user, so a reinstall picks up where it left off; says how to purge them."""
    actions = _Actions(Path(root), dry_run, out)
    _require_root(actions)
    actions.run(["systemctl", "disable", "--now", *UNITS], check=False)
    for unit in UNITS:
        actions.remove(f"{UNIT_DIR}/{unit}")
    actions.remove(SYSUSERS)
    actions.remove(TMPFILES)
    actions.run(["systemctl", "daemon-reload"])
    out(f"kept {actions.path(CONFIG_PATH)} and {actions.path(STATE_DIR)}; to purge: "
        f"sudo rm -r /etc/devmapd {STATE_DIR} && sudo userdel devmapd && sudo groupdel devmapd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The install-service options, for the CLI's subparser (so `--help` lists them)."""
    parser.add_argument("--root", type=Path, default=Path("/"), help="install under this root (default /)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    parser.add_argument("--prefix", help="ExecStart runs PREFIX/bin/devmapd (default: the devmapd beside --python)")
    parser.add_argument("--python", help="interpreter whose bin/ holds the devmapd script (default: this one)")
    parser.add_argument("--model-dir", help="model directory made read-only for the service (default: the config's)")
    parser.add_argument("--enable", action="store_true", help="also enable and start the socket and service")
    parser.add_argument("--uninstall", action="store_true", help="remove the units and snippets instead")


def run(args: argparse.Namespace) -> int:
    """Carry out parsed install-service arguments; returns the exit status."""
    try:
        if args.uninstall:
            uninstall_service(args.root, dry_run=args.dry_run)
        else:
            install_service(args.root, dry_run=args.dry_run, prefix=args.prefix, python=args.python,
                            model_dir=args.model_dir, enable=args.enable)
    except (InstallError, OSError) as exc:
        print(f"devmapd install-service: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`devmapd install-service [--root R] [--dry-run] [--prefix P] [--python PY] [--model-dir D]
    [--enable] [--uninstall]`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="devmapd install-service", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(list(argv) if argv is not None else None))


if __name__ == "__main__":
    sys.exit(main())
