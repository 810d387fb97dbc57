"""The unit files, checked by systemd's own tools (systemd-analyze, -sysusers, -tmpfiles).

`systemd-analyze verify` exits 0 on some warnings, so its output is grepped. It also insists
that ExecStart's binary exists: the repo's unit runs /usr/bin/env (present everywhere), and the
installed copy points at this venv's devmapd script, which exists, so both are verified as they
are, with no doctored copy.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devmapd.service import install, systemd

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")


def _verify(*paths: Path) -> tuple[int, str]:
    proc = subprocess.run([ANALYZE, "verify", *map(str, paths)], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def _unit_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _values(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in _unit_lines(text) if line.startswith(key + "=")]


@needs_analyze
def test_repo_units_verify_without_any_warning():
    rc, output = _verify(UNITS / "devmapd.service", UNITS / "devmapd.socket")
    assert rc == 0, output
    assert output.strip() == "", f"systemd-analyze verify warned:\n{output}"


@needs_analyze
def test_verify_output_check_catches_a_broken_unit(tmp_path):
    # The grep above must be able to fail: a typo'd key only warns (exit status 0).
    broken = tmp_path / "devmapd.service"
    broken.write_text((UNITS / "devmapd.service").read_text().replace("NotifyAccess=main", "NotifyAcess=main"))
    shutil.copy(UNITS / "devmapd.socket", tmp_path / "devmapd.socket")
    rc, output = _verify(broken, tmp_path / "devmapd.socket")
    assert "NotifyAcess" in output


@needs_analyze
def test_installed_units_verify_without_any_warning(tmp_path):
    install.install_service(tmp_path, dry_run=False, python=sys.executable, out=lambda _: None)
    unit_dir = tmp_path / "etc/systemd/system"
    exec_start = _values((unit_dir / "devmapd.service").read_text(), "ExecStart")[0]
    assert Path(exec_start.split()[0]).is_file()
    rc, output = _verify(unit_dir / "devmapd.service", unit_dir / "devmapd.socket")
    assert rc == 0 and output.strip() == "", output


@needs_analyze
def test_security_exposure_is_at_most_2():
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(UNITS / "devmapd.service")],
        capture_output=True, text=True, timeout=120,
    )
    match = re.search(r"Overall exposure level for devmapd\.service:\s*([0-9.]+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0, proc.stdout


def test_service_has_the_settings_the_issue_requires():
    text = (UNITS / "devmapd.service").read_text()
    lines = set(_unit_lines(text))
    for required in (
        "Type=notify", "NotifyAccess=main", "Restart=on-failure", "ExecReload=/bin/kill -HUP $MAINPID",
        "User=devmapd", "DevicePolicy=closed", "ProtectSystem=strict", "ProtectHome=yes", "NoNewPrivileges=yes",
        "PrivateTmp=yes", "PrivateNetwork=yes", "CapabilityBoundingSet=", "AmbientCapabilities=",
        "RestrictAddressFamilies=AF_UNIX", "SystemCallArchitectures=native", "UMask=0027",
        "After=nvidia-persistenced.service", "ReadOnlyPaths=-/srv/models", "MemoryDenyWriteExecute=no",
        "ExecStart=/usr/bin/env devmapd serve --config /etc/devmapd/devmapd.toml",
    ):
        assert required in lines, required
    assert set(_values(text, "SupplementaryGroups")[0].split()) >= {"video", "render"}
    assert "devmapd" in _values(text, "RuntimeDirectory")[0].split()
    assert _values(text, "StateDirectory") == ["devmapd"] and _values(text, "ConfigurationDirectory") == ["devmapd"]
    assert int(_values(text, "FileDescriptorStoreMax")[0]) > 0
    assert _values(text, "WatchdogSec")
    allowed = set(_values(text, "DeviceAllow"))
    assert {"/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "/dev/nvidia-uvm-tools rw", "char-nvidia-frontend rw",
            "char-nvidia-uvm rw"} <= allowed
    assert any(v.startswith("char-nvidia-caps") for v in allowed)
    # Ordering only: nvidia-persistenced must not be pulled in.
    assert not any("nvidia-persistenced" in v for key in ("Wants", "Requires") for v in _values(text, key))
    # PrivateDevices would hide /dev/nvidia*; it must not be switched on.
    assert "PrivateDevices=yes" not in lines


def _expand(groups: list[str]) -> set[str]:
    """Syscall names in groups/names, expanded recursively by systemd-analyze syscall-filter."""
    out: set[str] = set()
    todo, seen = list(groups), set()
    while todo:
        item = todo.pop()
        if not item.startswith("@"):
            out.add(item)
            continue
        if item in seen:
            continue
        seen.add(item)
        proc = subprocess.run([ANALYZE, "syscall-filter", item], capture_output=True, text=True, timeout=60, check=True)
        for line in proc.stdout.splitlines()[1:]:
            word = line.strip()
            if word and not word.startswith("#"):
                todo.append(word)
    return out


@needs_analyze
def test_system_call_filter_keeps_what_devmapd_and_cuda_need():
    text = (UNITS / "devmapd.service").read_text()
    allow: set[str] = set()
    deny: set[str] = set()
    for value in _values(text, "SystemCallFilter"):
        if value.startswith("~"):
            deny |= _expand(value[1:].split())
        else:
            allow |= _expand(value.split())
    effective = allow - deny
    # memfd_create + sendfile: the arena; ioctl/mmap: CUDA and NVML; the rest: sockets, fd passing, threads.
    for needed in ("memfd_create", "sendfile", "fcntl", "ioctl", "mmap", "mprotect", "sendmsg", "recvmsg",
                   "accept4", "epoll_wait", "clone3", "futex", "pread64", "ftruncate", "inotify_add_watch"):
        assert needed in effective, needed
    for blocked in ("setuid", "chown", "init_module", "mount", "reboot", "setrlimit", "sched_setaffinity"):
        assert blocked not in effective, blocked
    assert _values(text, "SystemCallErrorNumber") == ["EPERM"]


def test_socket_unit_matches_what_the_daemon_looks_for():
    text = (UNITS / "devmapd.socket").read_text()
    assert _values(text, "ListenStream") == ["/run/devmapd/devmapd.sock"]
    assert _values(text, "FileDescriptorName") == [systemd.LISTEN_FDNAME]
    assert _values(text, "SocketGroup") == ["devmapd"] and _values(text, "SocketMode") == ["0660"]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_snippet_creates_the_static_user_with_gpu_groups(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tmp_path / "etc/group").write_text("root:x:0:\nvideo:x:44:\n")
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "sysusers.d/devmapd.conf")],
                   check=True, capture_output=True, timeout=60)
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()}
    user = passwd["devmapd"]
    assert 0 < int(user[2]) < 1000, "a system uid"
    assert user[5] == "/var/lib/devmapd" and user[6].endswith("nologin")
    assert user[3] == groups["devmapd"][2]
    assert "devmapd" in groups["video"][3].split(",") and "devmapd" in groups["render"][3].split(",")
    assert groups["video"][2] == "44", "an existing group is reused, not recreated"


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None or shutil.which("systemd-sysusers") is None,
                    reason="systemd-tmpfiles/systemd-sysusers are not installed")
def test_tmpfiles_snippet_creates_the_directories(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tmp_path / "etc/group").write_text("root:x:0:\nvideo:x:44:\n")
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "sysusers.d/devmapd.conf")],
                   check=True, capture_output=True, timeout=60)
    uid = int(next(line for line in (tmp_path / "etc/passwd").read_text().splitlines()
                   if line.startswith("devmapd:")).split(":")[2])
    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(UNITS / "tmpfiles.d/devmapd.conf")],
                   check=True, capture_output=True, timeout=60)
    for rel, mode in (("run/devmapd", 0o755), ("run/devmapd/metrics", 0o755), ("var/lib/devmapd", 0o750)):
        st = (tmp_path / rel).stat()
        assert (st.st_mode & 0o7777, st.st_uid) == (mode, uid), rel
