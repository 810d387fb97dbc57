"""devmapd.load_into: a module's parameters and buffers BECOME the served tensors (no copy).

Every test compares with what torch itself gives for the same file (torch.load +
load_state_dict), and checks that the weights really are the daemon's memory: their addresses
lie in a devmapd memfd mapping of this process (/proc/self/maps), not in private memory.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import devmapd
from devmapd.engine.assign import AssignError
from tests.client.conftest import Net


def memfd_ranges() -> list[tuple[int, int]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if "memfd:devmapd" in line:
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def served_memory(t: torch.Tensor) -> bool:
    p = t.untyped_storage().data_ptr()
    return any(lo <= p < hi for lo, hi in memfd_ranges())


def reference(path, module: nn.Module, **kw) -> nn.Module:
    module.load_state_dict(torch.load(path, weights_only=True), assign=True, **kw)
    return module


def assert_same_module(got: nn.Module, ref: nn.Module) -> None:
    g, r = got.state_dict(keep_vars=True), ref.state_dict(keep_vars=True)
    assert list(g) == list(r)
    for k in r:
        assert type(g[k]) is type(r[k]), k
        assert g[k].dtype == r[k].dtype and g[k].shape == r[k].shape, k
        assert g[k].stride() == r[k].stride() and g[k].requires_grad == r[k].requires_grad, k
        assert torch.equal(g[k], r[k]), k


def test_module_built_normally_becomes_the_served_weights(served, models):
    net = Net()
    assert devmapd.load_into(net, "net", socket=served.socket) is net
    ref = reference(models["net"], Net())
    assert_same_module(net, ref)
    for name, p in net.named_parameters():
        assert isinstance(p, nn.Parameter) and p.requires_grad, name
        assert served_memory(p), f"{name} was copied into private memory"
    assert served_memory(net.bn.running_mean) and served_memory(net.scale)
    assert net.out.weight is net.emb.weight                      # still tied: one Parameter
    idx = torch.arange(10)
    net.eval(), ref.eval()
    assert torch.equal(net(idx), ref(idx))


def test_meta_module_needs_no_init_and_unfilled_buffers_are_named(served, models):
    with torch.device("meta"):
        net = Net(pos=False)
    devmapd.load_into(net, "net", socket=served.socket)
    assert not any(t.is_meta for t in net.state_dict().values())
    assert net.out.weight is net.emb.weight
    assert_same_module(net, reference(models["net"], Net(pos=False)))
    with torch.device("meta"):
        with_pos = Net()          # "pos" is non-persistent: no checkpoint carries it
    with pytest.raises(AssignError, match=r"still on the meta device.*\bpos\b"):
        devmapd.load_into(with_pos, "net", socket=served.socket)


def test_strict_missing_and_unexpected_keys_as_torch_reports_them(served, models):
    with pytest.raises(AssignError, match=r"Missing key\(s\).*extra\.weight"):
        devmapd.load_into(Net(extra=True), "net", socket=served.socket)
    net = Net(extra=True)
    kept = net.extra.weight
    devmapd.load_into(net, "net", strict=False, socket=served.socket)
    assert net.extra.weight is kept and served_memory(net.lin.weight)

    class Smaller(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)
    with pytest.raises(AssignError, match=r"Unexpected key\(s\).*emb\.weight"):
        devmapd.load_into(Smaller(), "net", socket=served.socket)
    small = devmapd.load_into(Smaller(), "net", strict=False, socket=served.socket)
    assert torch.equal(small.lin.weight, torch.load(models["net"], weights_only=True)["lin.weight"])
    with torch.device("meta"):
        meta_extra = Net(extra=True, pos=False)
    with pytest.raises(AssignError, match=r"meta device.*extra\.weight"):
        devmapd.load_into(meta_extra, "net", strict=False, socket=served.socket)


def test_prefixes_wrappers_and_nested_checkpoints(served, models):
    ref = reference(models["net"], Net())
    # served with "module." on every key (a DDP checkpoint) into a plain module
    assert_same_module(devmapd.load_into(Net(), "wrapped", socket=served.socket), ref)
    # a plain checkpoint into wrapped modules: DataParallel and a torch.compile wrapper
    dp = nn.DataParallel(Net())
    devmapd.load_into(dp, "net", socket=served.socket)
    assert_same_module(dp.module, ref)
    compiled = torch.compile(Net())
    devmapd.load_into(compiled, "net", socket=served.socket)
    assert_same_module(compiled._orig_mod, ref)
    # {"state_dict": ..., "epoch": 3}
    assert_same_module(devmapd.load_into(Net(), "nested", socket=served.socket), ref)


def test_dtype_and_shape_mismatches(served, models):
    # assign=True semantics: the module takes the served dtype, exactly as torch gives it
    net = devmapd.load_into(Net(), "half", socket=served.socket)
    assert net.lin.weight.dtype == torch.float16
    assert_same_module(net, reference(models["half"], Net()))
    with pytest.raises(AssignError, match="size mismatch for lin.weight"):
        devmapd.load_into(Net(dim=8), "net", socket=served.socket)


def test_device_mismatch_is_refused_and_leaves_the_module_alone(served):
    if torch.cuda.is_available():
        pytest.skip("this checks the error on a machine without CUDA")
    net = Net()
    before = net.lin.weight
    with pytest.raises(Exception, match="cuda") as info:
        devmapd.load_into(net, "net", map_location="cuda:0", socket=served.socket)
    assert not isinstance(info.value, AssignError)
    assert net.lin.weight is before
    moved = devmapd.load_into(Net(), "net", map_location="cpu", socket=served.socket)
    assert moved.lin.weight.device.type == "cpu"


def test_writes_stay_private_copy_on_write(served, models):
    a = devmapd.load_into(Net(), "net", socket=served.socket)
    with torch.no_grad():
        a.lin.weight.fill_(123.0)
    b = devmapd.load_into(Net(), "net", socket=served.socket)
    want = torch.load(models["net"], weights_only=True)["lin.weight"]
    assert torch.equal(b.lin.weight, want) and not torch.equal(a.lin.weight, want)


def test_meta_init_builds_without_initialisers_and_restores_them(served, models):
    import torch.nn.init as init
    normal = init.normal_
    with devmapd.meta_init():
        net = Net(pos=False)
        assert init.normal_ is not normal
    assert init.normal_ is normal
    assert all(t.is_meta for t in net.state_dict().values())
    devmapd.load_into(net, "net", socket=served.socket)
    assert_same_module(net, reference(models["net"], Net(pos=False)))
