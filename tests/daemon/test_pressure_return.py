"""Pressure gives everything back: after a squeeze of every GPU is released, each demoted
model returns to a GPU once the cooldown passes, and its reason says where and why.

A real daemon on two small simulated GPUs; pressure is made by rewriting the simulate file
(a new file renamed into place), as another process growing on the GPUs would.
"""

from __future__ import annotations

from tests.daemon.test_daemon_e2e import drop, state_dict
from tests.harness import sim_gpu

MIB = 1 << 20
NAMES = ("a", "b", "c", "d")
TOTAL = 40  # MiB per simulated GPU: best-fit packs the four 8 MiB models onto one of them,
# which after the squeeze has room (free >= high + model) for only three of them again
LOW, HIGH = 10, 16


def test_every_demoted_model_returns_to_a_gpu_after_the_squeeze(daemon_factory) -> None:
    free = [sim_gpu(0, TOTAL, 0), sim_gpu(1, TOTAL, 0)]
    d = daemon_factory(gpus=free, low_mib=LOW, high_mib=HIGH, cooldown_s=1.0)
    for i, name in enumerate(NAMES):
        drop(d.model_dir, f"{name}.pt", state_dict(8, seed=i))
    d.wait_for(lambda st: len(st["models"]) == 4 and all(m["state"] == "ready" and "cpu" not in m["placement"]
                                                         for m in st["models"]),
               timeout=30, what="all four models on a GPU")

    # Another process takes all but 4 MiB of both GPUs: every model leaves for the CPU.
    d.set_gpus([sim_gpu(0, TOTAL, TOTAL - 4), sim_gpu(1, TOTAL, TOTAL - 4)])
    d.wait_for(lambda st: all(m["state"] == "ready" and list(m["placement"]) == ["cpu"] for m in st["models"]),
               timeout=30, what="every model demoted to the CPU")

    demotions = d.log().count(": demoted ")

    # It exits: once the cooldown has passed, every model is back on a GPU and says why.
    d.set_gpus(free)
    back = d.wait_for(lambda st: st if all(m["state"] == "ready" and m["placement"] and "cpu" not in m["placement"]
                                           for m in st["models"])
                      and all(g["free"] >= LOW * MIB for g in st["devices"] if g["kind"] == "gpu") else None,
                      timeout=30, what="every model back on a GPU, no GPU under the low watermark")
    # Promotions in flight were counted: none overfilled a GPU, so nothing had to be demoted again.
    assert d.log().count(": demoted ") == demotions
    for m in back["models"]:
        where = next(iter(m["placement"]))
        assert m["reason"].startswith("promoted from cpu: "), m
        assert f"{where} has had free" in m["reason"], m
        assert "back home" in m["reason"] or "back on a GPU" in m["reason"], m
