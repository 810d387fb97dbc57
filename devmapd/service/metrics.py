"""Prometheus metrics: text exposition format 0.0.4, written by hand (no runtime dependency).

Two ways out, both fed by ``Metrics.render(status)``:

* ``write_textfile(path, text)``: an atomic file for node_exporter's textfile collector. The
  shipped unit uses this one, because it keeps ``PrivateNetwork=yes`` (the daemon has no
  network at all, loopback included). Default path: ``/run/devmapd/metrics/devmapd.prom``;
  point node_exporter at it with ``--collector.textfile.directory=/run/devmapd/metrics``.
* ``MetricsHTTPServer``: ``GET /metrics`` on a loopback address only, for setups that run
  without PrivateNetwork (a drop-in with ``PrivateNetwork=no`` and
  ``RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6``).

Metric names (all prefixed ``devmapd_``): ``up``, ``build_info``, ``start_time_seconds``,
``device_{total,free,used,held}_bytes``, ``device_lost``, ``model_bytes`` (per model and
device), ``model_state`` (one series per state, 1 for the current one), ``model_clients``,
``model_load_seconds``, ``models`` (per state), ``fetches_total``, ``fetch_duration_seconds``
(histogram), ``load_duration_seconds`` (histogram), ``demotions_total``, ``failures_total``.
"""

from __future__ import annotations

import asyncio
import bisect
import ipaddress
import logging
import math
import os
import platform
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_TEXTFILE",
    "FETCH_BUCKETS",
    "LOAD_BUCKETS",
    "Metrics",
    "MetricsHTTPServer",
    "write_textfile",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_TEXTFILE = "/run/devmapd/metrics/devmapd.prom"
MODEL_STATES = ("queued", "loading", "ready", "failed", "evicted")
# A fetch is milliseconds (manifest + fds over the socket); a load is seconds to minutes.
FETCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _value(v: float | int) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _escape(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last one: above every bound (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds
        self.count += 1


class _Writer:
    """Accumulates families; each family's HELP/TYPE once, its samples grouped under it."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[str, Mapping[str, Any], float]]) -> None:
        samples = list(samples)
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for sample_name, labels, value in samples:
            self.lines.append(f"{sample_name}{_labels(labels)} {_value(value)}")

    def histogram(self, name: str, help_text: str, series: Iterable[tuple[Mapping[str, Any], _Histogram]]) -> None:
        samples: list[tuple[str, Mapping[str, Any], float]] = []
        for labels, h in series:
            cumulative = 0
            for bound, n in zip(h.buckets, h.counts):
                cumulative += n
                samples.append((f"{name}_bucket", {**labels, "le": _value(float(bound))}, cumulative))
            samples.append((f"{name}_bucket", {**labels, "le": "+Inf"}, h.count))
            samples.append((f"{name}_sum", labels, h.sum))
            samples.append((f"{name}_count", labels, h.count))
        self.family(name, "histogram", help_text, samples)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class Metrics:
    """Counters the daemon feeds as things happen, plus gauges read from the status dict.

    Thread-safe: the daemon's loaders run in threads. Counters live for the process lifetime
    (Prometheus handles the reset on restart); gauges follow the status dict at render time.
    """

    def __init__(self, version: str | None = None) -> None:
        if version is None:
            from devmapd._version import __version__ as version
        self.version = version
        self._lock = threading.Lock()
        self._fetch: dict[str, _Histogram] = {}
        self._load = _Histogram(LOAD_BUCKETS)
        self._last_load: dict[str, float] = {}
        self._demotions: dict[str, int] = {}
        self._failures: dict[str, int] = {}

    def observe_fetch(self, name: str, seconds: float) -> None:
        with self._lock:
            self._fetch.setdefault(name, _Histogram(FETCH_BUCKETS)).observe(seconds)

    def observe_load(self, name: str, seconds: float) -> None:
        with self._lock:
            self._load.observe(seconds)
            self._last_load[name] = seconds

    def count_demotion(self, name: str) -> None:
        with self._lock:
            self._demotions[name] = self._demotions.get(name, 0) + 1

    def count_failure(self, name: str) -> None:
        with self._lock:
            self._failures[name] = self._failures.get(name, 0) + 1

    def render(self, status: Mapping[str, Any]) -> str:
        """The exposition text for ``status`` (the daemon's status dict, INTERNALS.md)."""
        daemon = status.get("daemon") or {}
        devices = list(status.get("devices") or [])
        models = list(status.get("models") or [])
        w = _Writer()
        w.family("devmapd_up", "gauge", "1 while the daemon serves.", [("devmapd_up", {}, 1)])
        w.family(
            "devmapd_build_info",
            "gauge",
            "Version of devmapd and Python; always 1.",
            [("devmapd_build_info", {"version": self.version, "python": platform.python_version()}, 1)],
        )
        if daemon.get("started_at") is not None:
            w.family(
                "devmapd_start_time_seconds",
                "gauge",
                "Unix time the daemon started.",
                [("devmapd_start_time_seconds", {}, float(daemon["started_at"]))],
            )
        fds = daemon.get("fds")
        if isinstance(fds, dict) and fds.get("limit"):
            # Each served model holds memfds: alert well before new loads start being refused.
            for key, help_text in (("open", "File descriptors the daemon holds open."),
                                   ("limit", "The daemon's soft RLIMIT_NOFILE (LimitNOFILE= under systemd)."),
                                   ("reserve", "Descriptors kept free: new loads are refused below this.")):
                name = f"devmapd_fds_{key}"
                w.family(name, "gauge", help_text, [(name, {}, int(fds.get(key) or 0))])

        dev = [(d, {"device": d.get("id", "?")}) for d in devices]
        for field, help_text in (
            ("total", "Device memory in bytes (host RAM for device=cpu)."),
            ("free", "Free device memory in bytes as the inventory reports it."),
            ("used", "Used device memory in bytes, all processes."),
            ("held", "Bytes devmapd holds on the device."),
        ):
            name = f"devmapd_device_{field}_bytes"
            w.family(name, "gauge", help_text, [(name, lbl, d.get(field) or 0) for d, lbl in dev])
        w.family(
            "devmapd_device_info",
            "gauge",
            "Device identity; always 1.",
            [
                (
                    "devmapd_device_info",
                    {**lbl, "uuid": d.get("uuid") or "", "name": d.get("name") or "", "kind": d.get("kind") or "gpu",
                     "simulated": "true" if d.get("simulated") else "false"},
                    1,
                )
                for d, lbl in dev
            ],
        )
        w.family(
            "devmapd_device_lost", "gauge", "1 when the device stopped answering.",
            [("devmapd_device_lost", lbl, bool(d.get("lost"))) for d, lbl in dev],
        )

        w.family(
            "devmapd_model_bytes",
            "gauge",
            "Bytes of a model placed on each device.",
            [
                ("devmapd_model_bytes", {"model": m.get("name", "?"), "device": device}, nbytes or 0)
                for m in models
                for device, nbytes in sorted((m.get("placement") or {}).items())
            ],
        )
        w.family(
            "devmapd_model_state",
            "gauge",
            "1 for the state a model is in, 0 for the others.",
            [
                ("devmapd_model_state", {"model": m.get("name", "?"), "state": s}, m.get("state") == s)
                for m in models
                for s in MODEL_STATES
            ],
        )
        w.family(
            "devmapd_model_clients", "gauge", "Processes holding the model now.",
            [("devmapd_model_clients", {"model": m.get("name", "?")}, int(m.get("clients") or 0)) for m in models],
        )
        with self._lock:
            last_load = dict(self._last_load)
            fetch = [({"model": k}, _copy(h)) for k, h in sorted(self._fetch.items())]
            load = _copy(self._load)
            demotions = sorted(self._demotions.items())
            failures = sorted(self._failures.items())
        load_samples = []
        for m in models:
            seconds = m.get("load_time_s")
            if seconds is None:
                seconds = last_load.get(m.get("name", ""))
            if seconds is not None:
                load_samples.append(("devmapd_model_load_seconds", {"model": m.get("name", "?")}, float(seconds)))
        w.family("devmapd_model_load_seconds", "gauge", "How long the model's last load took.", load_samples)
        counts = {s: 0 for s in MODEL_STATES}
        for m in models:
            counts[m.get("state", "unknown")] = counts.get(m.get("state", "unknown"), 0) + 1
        w.family("devmapd_models", "gauge", "Models per state.", [("devmapd_models", {"state": s}, n) for s, n in counts.items()])

        w.family(
            "devmapd_fetches_total", "counter", "Fetches served since the daemon started.",
            [("devmapd_fetches_total", lbl, h.count) for lbl, h in fetch],
        )
        w.histogram("devmapd_fetch_duration_seconds", "Time to serve a fetch.", fetch)
        w.histogram("devmapd_load_duration_seconds", "Time to load a checkpoint into memory.", [({}, load)])
        w.family(
            "devmapd_demotions_total", "counter", "Models moved off a GPU under memory pressure.",
            [("devmapd_demotions_total", {"model": k}, v) for k, v in demotions],
        )
        w.family(
            "devmapd_failures_total", "counter", "Loads that ended in the failed state.",
            [("devmapd_failures_total", {"model": k}, v) for k, v in failures],
        )
        return w.text()


def _copy(h: _Histogram) -> _Histogram:
    c = _Histogram(h.buckets)
    c.counts, c.sum, c.count = list(h.counts), h.sum, h.count
    return c


# ------------------------------------------------------------------------------- textfile
def write_textfile(path: str | os.PathLike[str], text: str) -> None:
    """Atomically replace ``path`` with ``text`` (write a temp file beside it, fsync, rename).

    node_exporter may read at any moment; a rename means it sees the old or the new file,
    never half of one. Mode 0644 whatever the umask (the unit's UMask=0027 would otherwise hide
    it from node_exporter's user).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ------------------------------------------------------------------------------- HTTP
def _loopback(host: str) -> str:
    """Resolve ``host`` and insist it is a loopback address; returns the address to bind."""
    host = host.strip("[]")  # "[::1]" as written in "[::1]:9477"
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve metrics host {host!r}: {exc}") from None
    addresses = {info[4][0] for info in infos}
    bad = [a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if bad or not addresses:
        raise ValueError(
            f"refusing to serve metrics on {host!r} ({', '.join(sorted(addresses))}): only loopback "
            "addresses (127.0.0.1, ::1, localhost) are allowed; scrape from this machine or use the "
            "textfile output with node_exporter"
        )
    return sorted(addresses)[0]


class MetricsHTTPServer:
    """Minimal asyncio HTTP/1.0 server: GET/HEAD /metrics on a loopback address, nothing else.

    ``render`` is called per scrape and returns the exposition text.
    """

    MAX_REQUEST = 8192
    TIMEOUT_S = 5.0

    def __init__(self, render: Callable[[], str], host: str = "127.0.0.1", port: int = 9477) -> None:
        self.address = _loopback(host)
        self.port = port
        self._render = render
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.address, self.port)
        self.port = self._server.sockets[0].getsockname()[1]  # the real one when port=0
        log.info("metrics on http://%s:%d/metrics", self.address, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.TIMEOUT_S)
            if len(head) > self.MAX_REQUEST:
                raise ValueError("request too large")
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await self._reply(writer, 405, "method not allowed\n", extra="Allow: GET, HEAD\r\n")
            elif path != "/metrics":
                await self._reply(writer, 404, "not found: try /metrics\n")
            else:
                try:
                    body = self._render()
                except Exception:  # a broken render must answer 500, not kill the server
                    log.exception("rendering metrics failed")
                    await self._reply(writer, 500, "rendering metrics failed; see the daemon log\n")
                else:
                    await self._reply(writer, 200, body, content_type=CONTENT_TYPE, head=method == "HEAD")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            await self._reply(writer, 400, "bad request\n")
        except ConnectionError:
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    @staticmethod
    async def _reply(
        writer: asyncio.StreamWriter, code: int, body: str, *, content_type: str = "text/plain; charset=utf-8",
        head: bool = False, extra: str = "",
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}[code]
        data = body.encode()
        header = (
            f"HTTP/1.0 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
            f"{extra}Connection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(header if head else header + data)
            await writer.drain()
        except ConnectionError:
            pass
