"""A fixed, in-process stand-in for devmapd.client.Client — for SNAPSHOT tests only.

Snapshots must not depend on the clock, the host name or live memory numbers, so they are fed
this frozen status. Every behaviour test (bindings, dialogs, actions, recovery) talks to a real
daemon process instead (see conftest.py).
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from typing import Any

GIB = 1 << 30
MIB = 1 << 20
NOW = 1_767_225_600.0           # 2026-01-01 00:00:00 UTC: the frozen clock
STARTED = NOW - (2 * 3600 + 5 * 60 + 7)


def _gpu(i: int, name: str, uuid: str, total: int, used_others: int, held: int,
         util: float) -> dict[str, Any]:
    used = used_others + held
    return {"id": f"cuda:{i}", "index": i, "uuid": uuid, "name": name, "total": total,
            "free": total - used, "used": used, "simulated": True, "lost": False, "error": None,
            "utilization": util, "held": held, "reserve": 1 * GIB, "kind": "gpu", "processes": []}


def model_record(name: str, state: str = "ready", **extra: Any) -> dict[str, Any]:
    """A fixed model record (for tests that add their own models to the frozen status)."""
    placement = extra.pop("placement", {"cpu": 4 * MIB})
    dtypes = extra.pop("dtypes", {"float32": 4 * MIB})
    return _model(name, state, placement, dtypes, **extra)


def _model(name: str, state: str, placement: dict[str, int], dtypes: dict[str, int],
           **extra: Any) -> dict[str, Any]:
    rec = {"name": name, "path": f"/srv/models/{name}.pt", "format": "torch-zip", "state": state,
           "placement": placement, "bytes": sum(dtypes.values()), "dtypes": dtypes, "tensors": 120,
           "clients": 0, "pinned": False, "pin": None, "error": None, "diagnosis": None,
           "load_time_s": 0.42, "loaded_at": NOW - 3000, "last_fetch": None, "fetches": 0,
           "progress": None, "reason": "best fit", "locations": {"cpu": sum(dtypes.values())},
           "prefixes": [], "generation": 1}
    rec.update(extra)
    return rec


def fixed_status() -> dict[str, Any]:
    models = [
        _model("llama-7b-chat", "ready", {"cuda:0": 13 * GIB + 512 * MIB},
               {"float16": 13 * GIB + 512 * MIB}, clients=3, fetches=41, last_fetch=NOW - 95,
               load_time_s=6.8, pinned=True, pin="cuda:0", reason="pinned by operator"),
        _model("resnet50-ddp", "ready", {"cuda:1": 98 * MIB}, {"float32": 98 * MIB},
               prefixes=["module."], clients=1, fetches=7, last_fetch=NOW - 12, load_time_s=0.21,
               locations={"cuda:1": 98 * MIB}),
        _model("bert-base-fp16", "ready", {"cpu": 210 * MIB}, {"float16": 210 * MIB},
               last_fetch=NOW - 7200, fetches=2, load_time_s=0.35,
               reason="demoted under pressure on cuda:0"),
        _model("mistral-7b/sharded", "loading", {"cuda:1": 6 * GIB}, {"bfloat16": 14 * GIB},
               format="hf-dir", progress=0.45, load_time_s=None, loaded_at=None,
               path="/srv/models/mistral-7b/sharded"),
        _model("vit-large-split", "ready", {"cuda:0": 700 * MIB, "cuda:1": 500 * MIB},
               {"float32": 1200 * MIB}, reason="split: no single GPU had room"),
        _model("broken/truncated", "failed", {}, {}, error="truncated",
               diagnosis={"code": "truncated",
                          "message": "The file ends early (copy still in progress or interrupted); "
                                     "copy it again, then devmapd loads it by itself."},
               load_time_s=None, loaded_at=None, tensors=0),
        _model("tiny-mlp", "queued", {}, {"float32": 3 * MIB}, load_time_s=None, loaded_at=None),
    ]
    devices = [
        _gpu(0, "Simulated A100 40GB", "GPU-5f3c9a21-0b7e-4c1d-9a7f-2d8e6b1c0a11", 40 * GIB,
             14 * GIB, 14 * GIB + 212 * MIB, 37.0),
        _gpu(1, "Simulated RTX 4090", "GPU-9e1d7b44-3a2c-4f5e-8b6d-7c0a1e2f3b45", 24 * GIB,
             3 * GIB, 6 * GIB + 598 * MIB, 5.0),
        {"id": "cpu", "index": None, "uuid": "host", "name": "Host RAM", "total": 64 * GIB,
         "free": 41 * GIB, "used": 23 * GIB, "simulated": False, "lost": False, "error": None,
         "utilization": None, "held": 210 * MIB + 3 * MIB, "reserve": 4 * GIB, "kind": "cpu",
         "processes": []},
    ]
    return {"daemon": {"version": "0.1.0", "pid": 4242, "host": "lab-gpu-01",
                       "socket": "/run/devmapd/devmapd.sock", "backend": "simulated",
                       "model_dir": "/srv/models", "started_at": STARTED,
                       "uptime_s": NOW - STARTED, "warning": None, "problems": dict(FIXED_PROBLEMS),
                       "pending": {}},
            "devices": devices, "models": models}


# What the daemon reports in daemon.problems for a name clash and a FIFO (devmapd/daemon/names.py).
FIXED_PROBLEMS = {
    "st.pt": "same model name 'st' as st.safetensors; st.safetensors is used — rename or remove one of them",
    "incoming/pipe.pt": "refused: a FIFO (named pipe), not a regular file",
}


FIXED_EVENTS = [
    {"type": "decision", "ts": NOW - 3000, "action": "placed", "name": "llama-7b-chat",
     "from": None, "to": "cuda:0", "message": "placed llama-7b-chat on cuda:0 (13.5 GiB, best fit)"},
    {"type": "decision", "ts": NOW - 2400, "action": "demoted", "name": "bert-base-fp16",
     "from": "cuda:0", "to": "cpu",
     "message": "demoted bert-base-fp16 cuda:0 → cpu: free memory on cuda:0 fell below 2.0 GiB"},
    {"type": "decision", "ts": NOW - 60, "action": "failed", "name": "broken/truncated",
     "from": None, "to": None, "message": "broken/truncated failed: truncated"},
]


class FixedClient:
    """Answers like devmapd.client.Client from frozen data; events() replays FIXED_EVENTS and
    then blocks until closed (as a quiet daemon would)."""

    def __init__(self, *, operator: bool = True, unreachable: bool = False,
                 extra_models: list[dict[str, Any]] | None = None,
                 extra_events: list[dict[str, Any]] | None = None,
                 problems: dict[str, str] | None = None) -> None:
        self.operator = operator
        self.unreachable = unreachable
        self.extra_models = extra_models or []
        self.extra_events = extra_events or []
        self.problems = problems
        self._closed = threading.Event()
        self.calls: list[tuple] = []

    def _check(self) -> None:
        if self.unreachable:
            from devmapd_tui.connection import DaemonUnavailable
            raise DaemonUnavailable("no daemon is listening on /run/devmapd/devmapd.sock "
                                    "(start it with: systemctl start devmapd)")

    def hello(self) -> dict:
        self._check()
        return {"version": "0.1.0", "protocol": 1, "pid": 4242, "operator": self.operator,
                "uid": 0 if self.operator else 1000, "backend": "simulated",
                "socket": "/run/devmapd/devmapd.sock", "host": "lab-gpu-01", "started_at": STARTED}

    def status(self) -> dict:
        self._check()
        status = fixed_status()
        status["models"].extend(copy.deepcopy(self.extra_models))
        if self.problems is not None:
            status["daemon"]["problems"] = dict(self.problems)
        return status

    def model(self, name: str) -> dict:
        self._check()
        rec = next(m for m in self.status()["models"] if m["name"] == name)
        insp = {"path": rec["path"], "format": rec["format"], "tensors": rec["tensors"],
                "bytes": rec["bytes"], "dtypes": rec["dtypes"], "locations": rec["locations"],
                "prefixes": rec["prefixes"], "containers": [""],
                "groups": [["layers.0", rec["bytes"] // 2], ["layers.1", rec["bytes"] // 2]],
                "largest_tensor": rec["bytes"] // 8, "files": [rec["path"]],
                "diagnosis": rec["diagnosis"]}
        return dict(copy.deepcopy(rec), inspection=insp)

    def _action(self, op: str, *args: Any) -> dict:
        self._check()
        self.calls.append((op, *args))
        return {"message": f"{op} accepted"}

    def remap(self, name: str, device: str) -> dict:
        return self._action("remap", name, device)

    def pin(self, name: str, device: str) -> dict:
        return self._action("pin", name, device)

    def unpin(self, name: str) -> dict:
        return self._action("unpin", name)

    def evict(self, name: str) -> dict:
        return self._action("evict", name)

    def reload(self, name: str) -> dict:
        return self._action("reload", name)

    def events(self, *, reconnect: bool = True) -> Iterator[dict]:
        self._check()
        yield from copy.deepcopy(FIXED_EVENTS + self.extra_events)
        self._closed.wait()

    def close(self) -> None:
        self._closed.set()
