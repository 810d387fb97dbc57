"""Names with control characters cannot forge log lines or reach the operator's terminal.

Model names come from file names, and a file name may hold any byte but '/' and NUL. A newline
in one wrote a whole fake record into the daemon's log (``... CRITICAL devmapd: FAKE``), and ESC
or BEL reached the terminal of whoever ran ``devmapd status``. Against a real daemon: its log
has only real records (every line starts with the record prefix, or is a marked continuation),
the CLI's text output holds no control character but its own newlines, and the JSON output
still gives the exact names.
"""
from __future__ import annotations

import json
import os
import re
import subprocess

from devmapd.service.systemd import CONTINUATION
from tests.harness import devmapd_cmd
from tests.reliability import inputs as I

FORGED = "evil\n2026-01-01 00:00:00,000 CRITICAL devmapd: FAKE"
RED = "red\x1b[31mname"
BELL = "bell\x07"
BROKEN = "broken\x1b]0;owned\x07"          # an OSC sequence: would retitle the terminal
FIFO = "fifo\x1b[2J.pt"                      # refused (not a regular file): shown in problems

RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def control_chars(text: str) -> list[str]:
    """Every character a terminal may act on, except the newline."""
    return [c for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F]


def test_names_with_control_characters_are_escaped_in_log_and_cli(rdaemon, guard, tmp_path) -> None:
    d = rdaemon("esc")
    for name in (FORGED, RED, BELL):
        guard.save(I.versioned(1), d.model_dir / f"{name}.pt")
    guard.write(d.model_dir / f"{BROKEN}.pt", b"PK\x03\x04 this is not a checkpoint")
    guard.mkfifo(d.model_dir / FIFO)
    for name in (FORGED, RED, BELL):
        d.wait_model(name)
    d.wait_model(BROKEN, "failed")
    status = d.wait_for(lambda st: FIFO in st["daemon"]["problems"] and st, what="the FIFO in daemon.problems")

    env = {**os.environ, "DEVMAPD_SOCKET": d.socket}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(devmapd_cmd(*args), capture_output=True, text=True, env=env, timeout=60,
                              errors="surrogateescape")

    # An action on such a name, and an error quoting one, print them escaped too.
    pinned = cli("pin", RED, "cpu")
    assert pinned.returncode == 0, pinned.stderr
    missing = cli("evict", "nope\x1b[31m")
    assert missing.returncode == 4 and "nope\\x1b[31m" in missing.stderr, missing.stderr
    fetched = cli("fetch", BELL)
    assert fetched.returncode == 0 and "bell\\x07: 4 tensors" in fetched.stdout, fetched

    text = cli("status")
    assert text.returncode == 0, text.stderr
    for out in (text.stdout, pinned.stdout, missing.stderr, fetched.stdout):
        assert control_chars(out) == [], (control_chars(out), out)
    shown = text.stdout
    assert "evil\\n2026-01-01 00:00:00,000 CRITICAL devmapd: FAKE" in shown
    assert "red\\x1b[31mname" in shown and "bell\\x07" in shown and "broken\\x1b]0;owned\\x07" in shown
    assert "fifo\\x1b[2J.pt" in shown            # the problem is on screen, not only in JSON
    assert not any(line.startswith("2026-01-01") for line in shown.splitlines())

    # JSON stays exact: the real names, as json.dumps escaped them.
    exact = json.loads(cli("status", "--json").stdout)
    assert {FORGED, RED, BELL, BROKEN} <= {m["name"] for m in exact["models"]}
    assert FIFO in exact["daemon"]["problems"] and status["daemon"]["problems"].keys() == exact["daemon"]["problems"].keys()

    # The log: real records only. It did mention the names (escaped), so the check is not vacuous.
    d.stop()
    log = d.log_file.read_bytes().decode("utf-8", "surrogateescape")
    assert control_chars(log) == [], control_chars(log)[:10]
    lines = log.splitlines()
    forged = [ln for ln in lines if not (RECORD.match(ln) or ln.startswith(CONTINUATION))]
    assert forged == [], forged[:5]
    assert any("evil\\n2026-01-01 00:00:00,000 CRITICAL devmapd: FAKE" in ln for ln in lines)
    assert any("red\\x1b[31mname" in ln for ln in lines) and any("bell\\x07" in ln for ln in lines)
    assert not [ln for ln in lines if " CRITICAL " in ln and "FAKE" in ln.split(": ", 1)[0]]
