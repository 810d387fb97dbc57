"""Fixtures for the client tests: real checkpoints written by torch and transformers, served by
the wire test daemon (tests/wire/wiredaemon.py: the real Server over real sealed arenas) in
its own process; the tests are its clients."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.wire.conftest import WireDaemon, start_wire_daemon


class Net(nn.Module):
    """Tied weights (output layer = embedding), BatchNorm buffers, a persistent buffer and a
    non-persistent one (which no state dict carries)."""

    def __init__(self, dim: int = 16, vocab: int = 50, extra: bool = False, pos: bool = True):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lin = nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight
        self.register_buffer("scale", torch.full((dim,), 2.0))
        if pos:
            self.register_buffer("pos", torch.arange(dim, dtype=torch.float32), persistent=False)
        if extra:
            self.extra = nn.Linear(dim, 2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.lin(self.emb(idx))) * self.scale
        if hasattr(self, "pos"):
            h = h + self.pos
        return self.out(h)


def net_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_()
        net.bn.running_var.uniform_(1, 2)
        net.bn.num_batches_tracked.fill_(5)
    return net.state_dict()


def write_hf(d: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM, BertModel
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(3)
    BertModel(cfg).eval().save_pretrained(d / "bert")
    BertForMaskedLM(cfg).eval().save_pretrained(d / "bertmlm")


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("client-models")
    sd = net_state()
    paths = {"net": d / "net.pt", "wrapped": d / "wrapped.pt", "nested": d / "nested.pt",
             "half": d / "half.pt", "many": d / "many.pt"}
    torch.save(sd, paths["net"])
    torch.save({f"module.{k}": v for k, v in sd.items()}, paths["wrapped"])
    torch.save({"state_dict": sd, "epoch": 3}, paths["nested"])
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, paths["half"])
    g = torch.Generator().manual_seed(11)
    torch.save({f"block{i // 10}.p{i % 10}": torch.randn(4, 4, generator=g) for i in range(2000)},
               paths["many"])
    try:   # the hf extra: test_hf.py is skipped without it, the rest runs
        import transformers  # noqa: F401
    except ImportError:
        return paths
    write_hf(d)
    paths["bert"], paths["bertmlm"] = d / "bert", d / "bertmlm"
    return paths


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[WireDaemon]:
    d = start_wire_daemon(tmp_path_factory.mktemp("client-daemon"), models)
    yield d
    rc = d.stop()
    log = d.log.read_text()
    assert rc == 0, f"wire daemon exited with {rc}: {log[-3000:]}"
    assert "Traceback" not in log, log[-5000:]
