"""A repeat fetch of an unchanged model reuses the parsed manifest and its checked build plan,
and still gives fresh, private (copy-on-write) tensors with torch.load's exact semantics."""
from __future__ import annotations

import json

import pytest
import torch

import devmapd
from devmapd import client as C
from devmapd.wire import protocol as P


def assert_like_torch(got: dict, ref: dict) -> None:
    assert list(got) == list(ref)
    for k, r in ref.items():
        g = got[k]
        assert (g.dtype, g.shape, g.stride(), g.storage_offset()) == \
            (r.dtype, r.shape, r.stride(), r.storage_offset()), k
        assert g.untyped_storage().nbytes() == r.untyped_storage().nbytes(), k
        assert torch.equal(g, r), k
    # tensors sharing a storage in the file share one here (tied weights)
    def groups(sd: dict) -> list[list[str]]:
        by: dict[int, list[str]] = {}
        for k, t in sd.items():
            by.setdefault(t.untyped_storage().data_ptr(), []).append(k)
        return sorted(v for v in by.values())
    assert groups(got) == groups(ref)


@pytest.mark.parametrize("name", ["many", "net"])
def test_repeat_fetch_reuses_the_manifest_and_stays_copy_on_write(served, models, name):
    ref = torch.load(models[name], weights_only=True)
    client = C.Client(served.socket)
    try:
        first = client.fetch(name)
        cached = client._manifests[name][1]
        assert cached._plan is not None
        second = client.fetch(name)
        assert client._manifests[name][1] is cached        # bytes equal: not parsed again
        assert_like_torch(first, ref)
        assert_like_torch(second, ref)
        k = next(iter(ref))
        assert first[k].data_ptr() != second[k].data_ptr()   # a mapping of its own
        first[k].fill_(-7)
        assert torch.equal(second[k], ref[k])                # the write stayed in `first`
        third = client.fetch(name)
        assert torch.equal(third[k], ref[k])
    finally:
        client.close()


def test_module_level_load_reuses_too(served, models):
    ref = torch.load(models["many"], weights_only=True)
    a = devmapd.load("many", socket=served.socket)
    b = devmapd.load("many", socket=served.socket)
    assert_like_torch(b, ref)
    assert a["block0.p0"].data_ptr() != b["block0.p0"].data_ptr()


def _reply(manifest: dict, model: dict | None = None) -> bytes:
    # the server's layout (wire/server.py): manifest spliced in last
    return (b'{"id":3,"ok":true,"result":{"lease":1,"model":' + json.dumps(model or {}).encode()
            + b',"manifest":' + json.dumps(manifest, separators=(",", ":")).encode() + b"}}")


def test_split_parses_only_the_head_when_the_manifest_bytes_are_unchanged():
    body = _reply({"tree": 1, "x": [1, 2]}, {"name": "m", "generation": 1})
    tail: list[bytes] = []
    msg = C._split_fetch(body, None, tail)
    assert msg == json.loads(body)
    sentinel = object()
    again = C._split_fetch(_reply({"tree": 1, "x": [1, 2]}, {"name": "m", "fetches": 9}),
                           (tail[0], sentinel), [])
    assert again["result"]["manifest"] is sentinel and again["result"]["model"]["fetches"] == 9
    # a changed manifest is parsed, not taken from the cache
    changed = C._split_fetch(_reply({"tree": 2, "x": [1, 2]}), (tail[0], sentinel), [])
    assert changed["result"]["manifest"] == {"tree": 2, "x": [1, 2]}


@pytest.mark.parametrize("body", [
    b'{"id":3,"ok":true,"result":{"manifest":{"a":1},"lease":1}}',           # manifest not last
    b'{"id":3,"ok":true,"result":{"lease":1,"model":{"s":",\\"manifest\\":"},"manifest":{}}}',
    b'{"id":3,"ok":false,"error":{"code":"not_found","message":"x \\"manifest\\":"}}',
])
def test_split_falls_back_to_a_full_parse_for_any_other_layout(body):
    assert C._split_fetch(body, None, []) == json.loads(body)


def test_split_reports_broken_json_as_a_protocol_error():
    with pytest.raises(P.ProtocolError):
        C._split_fetch(b'{"id":3,"ok":true,"result":{"lease":1,"manifest":{]}}', None, [])
