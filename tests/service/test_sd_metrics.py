"""Prometheus exposition: rendered by devmapd.service.metrics, parsed by prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import urllib.error
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from devmapd.service.metrics import CONTENT_TYPE, FETCH_BUCKETS, Metrics, MetricsHTTPServer, write_textfile

GIB = 1 << 30
STATUS = {
    "daemon": {"version": "0.1.0", "pid": 1, "started_at": 1_790_000_000.5},
    "devices": [
        {"id": "cuda:0", "uuid": "GPU-aaaa", "name": "NVIDIA H100", "total": 80 * GIB, "free": 60 * GIB,
         "used": 20 * GIB, "held": 12 * GIB, "simulated": False, "lost": False, "kind": "gpu"},
        {"id": "cuda:1", "uuid": "GPU-bbbb", "name": "NVIDIA H100", "total": 80 * GIB, "free": 0,
         "used": 80 * GIB, "held": 0, "simulated": False, "lost": True, "kind": "gpu"},
        {"id": "cpu", "uuid": "host", "name": "host", "total": 512 * GIB, "free": 400 * GIB, "used": 112 * GIB,
         "held": 3 * GIB, "simulated": False, "lost": False, "kind": "cpu"},
    ],
    "models": [
        {"name": "llama/7b", "state": "ready", "placement": {"cuda:0": 12 * GIB, "cpu": 1 * GIB}, "clients": 3,
         "load_time_s": 4.25},
        {"name": "bert", "state": "ready", "placement": {"cpu": 2 * GIB}, "clients": 0, "load_time_s": 0.5},
        {"name": "broken", "state": "failed", "placement": {}, "clients": 0, "load_time_s": None},
        {"name": "next", "state": "loading", "placement": {}, "clients": 0},
    ],
}


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _types(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_render_parses_and_carries_the_status():
    m = Metrics(version="9.9.9")
    for seconds in (0.0004, 0.002, 0.002, 0.03, 7.0):
        m.observe_fetch("llama/7b", seconds)
    m.observe_fetch("bert", 0.001)
    m.observe_load("llama/7b", 4.25)
    m.count_demotion("llama/7b")
    m.count_demotion("llama/7b")
    m.count_failure("broken")
    text = m.render(STATUS)
    s = _samples(text)

    assert s[("devmapd_up", ())] == 1
    assert s[("devmapd_build_info", (("python", pytest.importorskip("platform").python_version()), ("version", "9.9.9")))] == 1
    assert s[("devmapd_device_total_bytes", (("device", "cuda:0"),))] == 80 * GIB
    assert s[("devmapd_device_free_bytes", (("device", "cuda:0"),))] == 60 * GIB
    assert s[("devmapd_device_held_bytes", (("device", "cuda:0"),))] == 12 * GIB
    assert s[("devmapd_device_held_bytes", (("device", "cpu"),))] == 3 * GIB
    assert s[("devmapd_device_lost", (("device", "cuda:1"),))] == 1
    assert s[("devmapd_model_bytes", (("device", "cuda:0"), ("model", "llama/7b")))] == 12 * GIB
    assert s[("devmapd_model_bytes", (("device", "cpu"), ("model", "llama/7b")))] == 1 * GIB
    assert s[("devmapd_model_state", (("model", "broken"), ("state", "failed")))] == 1
    assert s[("devmapd_model_state", (("model", "broken"), ("state", "ready")))] == 0
    assert s[("devmapd_models", (("state", "ready"),))] == 2
    assert s[("devmapd_model_clients", (("model", "llama/7b"),))] == 3
    assert s[("devmapd_model_load_seconds", (("model", "llama/7b"),))] == 4.25
    assert ("devmapd_model_load_seconds", (("model", "broken"),)) not in s
    assert s[("devmapd_fetches_total", (("model", "llama/7b"),))] == 5
    assert s[("devmapd_demotions_total", (("model", "llama/7b"),))] == 2
    assert s[("devmapd_failures_total", (("model", "broken"),))] == 1
    assert s[("devmapd_start_time_seconds", ())] == 1_790_000_000.5

    # Histogram: cumulative buckets, +Inf == count, sum of observations.
    lbl = (("model", "llama/7b"),)
    buckets = sorted(
        (float(dict(k[1])["le"]), v) for k, v in s.items()
        if k[0] == "devmapd_fetch_duration_seconds_bucket" and dict(k[1])["model"] == "llama/7b"
    )
    assert [b for b, _ in buckets] == [*FETCH_BUCKETS, float("inf")]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == 5
    assert dict(buckets)[0.0005] == 1 and dict(buckets)[0.0025] == 3 and dict(buckets)[5.0] == 4
    assert s[("devmapd_fetch_duration_seconds_count", lbl)] == 5
    assert s[("devmapd_fetch_duration_seconds_sum", lbl)] == pytest.approx(7.0344)
    assert s[("devmapd_load_duration_seconds_count", ())] == 1

    types = _types(text)
    assert types["devmapd_fetch_duration_seconds"] == "histogram"
    assert types["devmapd_fetches"] == "counter" and types["devmapd_device_free_bytes"] == "gauge"


def test_render_of_an_empty_daemon_still_parses():
    s = _samples(Metrics(version="1").render({}))
    assert s[("devmapd_up", ())] == 1
    assert ("devmapd_load_duration_seconds_count", ()) in s


@settings(max_examples=60, deadline=None)
@given(name=st.text(min_size=1, max_size=40))
def test_label_values_survive_escaping(name):
    m = Metrics(version="1")
    m.count_failure(name)
    status = {"models": [{"name": name, "state": "ready", "placement": {"cpu": 5}, "clients": 1}]}
    s = _samples(m.render(status))
    assert s[("devmapd_model_bytes", (("device", "cpu"), ("model", name)))] == 5
    assert s[("devmapd_failures_total", (("model", name),))] == 1


def test_write_textfile_is_atomic_and_readable_by_node_exporter(tmp_path):
    target = tmp_path / "textfile" / "devmapd.prom"
    old_umask = os.umask(0o027)  # the unit's UMask=
    try:
        write_textfile(target, "devmapd_up 1\n")
        assert target.read_text() == "devmapd_up 1\n"
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        inode = target.stat().st_ino
        write_textfile(target, Metrics(version="1").render(STATUS))
    finally:
        os.umask(old_umask)
    assert target.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert _samples(target.read_text())[("devmapd_device_total_bytes", (("device", "cuda:0"),))] == 80 * GIB
    assert [p.name for p in target.parent.iterdir()] == ["devmapd.prom"]  # no temp file left


def _get(url: str, method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


async def test_http_endpoint_scraped_on_loopback():
    m = Metrics(version="1")
    m.observe_fetch("bert", 0.01)
    server = MetricsHTTPServer(lambda: m.render(STATUS), host="127.0.0.1", port=0)
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        code, headers, body = await asyncio.to_thread(_get, base + "/metrics")
        assert code == 200 and headers["Content-Type"] == CONTENT_TYPE
        assert _samples(body.decode())[("devmapd_fetches_total", (("model", "bert"),))] == 1
        code, headers, body = await asyncio.to_thread(_get, base + "/metrics", "HEAD")
        assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0
        assert (await asyncio.to_thread(_get, base + "/"))[0] == 404
        assert (await asyncio.to_thread(_get, base + "/metrics", "POST"))[0] == 405
        # A client that connects and says nothing does not block the next scrape.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert (await asyncio.to_thread(_get, base + "/metrics"))[0] == 200
        writer.close()
    finally:
        await server.close()


async def test_render_failure_answers_500_and_the_server_lives_on():
    calls = []

    def render() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return "devmapd_up 1\n"

    server = MetricsHTTPServer(render, port=0)
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        assert (await asyncio.to_thread(_get, url))[0] == 500
        assert (await asyncio.to_thread(_get, url))[:1] == (200,)
    finally:
        await server.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_non_loopback_binds_are_refused(host):
    with pytest.raises(ValueError, match="only loopback"):
        MetricsHTTPServer(lambda: "", host=host)


def test_localhost_is_accepted():
    assert MetricsHTTPServer(lambda: "", host="localhost").address in ("127.0.0.1", "::1")
    assert MetricsHTTPServer(lambda: "", host="[::1]").address == "::1"  # as in listen = "[::1]:9477"


def test_counters_are_thread_safe():
    m = Metrics(version="1")

    def hammer() -> None:
        for _ in range(2000):
            m.observe_fetch("x", 0.001)
            m.count_demotion("x")

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = _samples(m.render({}))
    assert s[("devmapd_fetches_total", (("model", "x"),))] == 8000
    assert s[("devmapd_demotions_total", (("model", "x"),))] == 8000


def test_file_descriptors_are_exported_when_status_has_them():
    status = {**STATUS, "daemon": {**STATUS.get("daemon", {}), "fds": {"open": 70, "limit": 1024, "reserve": 64}}}
    s = _samples(Metrics(version="1").render(status))
    assert (s[("devmapd_fds_open", ())], s[("devmapd_fds_limit", ())], s[("devmapd_fds_reserve", ())]) == (70, 1024, 64)
    assert ("devmapd_fds_open", ()) not in _samples(Metrics(version="1").render(STATUS))
