"""devmapd.hf.from_pretrained: a served Hugging Face directory built from the side files the
daemon ships, weights assigned zero-copy; compared with transformers' own from_pretrained of
the same directory (real BERT classes from a tiny config)."""
from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("transformers")

import devmapd  # noqa: E402
import devmapd.hf  # noqa: E402
from devmapd.engine.assign import AssignError  # noqa: E402
from tests.client.test_load_into import served_memory  # noqa: E402
from tests.wire.conftest import start_wire_daemon  # noqa: E402


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 99, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_base_model_equals_automodel_bit_for_bit(served, models):
    from transformers import AutoModel, BertModel
    got = devmapd.hf.from_pretrained("bert", socket=served.socket)
    ref = AutoModel.from_pretrained(models["bert"])
    assert type(got) is BertModel and not got.training
    with torch.no_grad():
        a, b = got(**_inputs()).last_hidden_state, ref(**_inputs()).last_hidden_state
    assert torch.equal(a, b)
    for name, p in got.named_parameters():
        assert served_memory(p), f"{name} was copied"
    # non-persistent buffers come from the model's own __init__, as transformers builds them
    assert torch.equal(got.embeddings.position_ids, ref.embeddings.position_ids)


def test_head_model_ties_its_decoder_to_the_served_embedding(served, models):
    from transformers import AutoModelForMaskedLM, BertForMaskedLM
    got = devmapd.hf.from_pretrained("bertmlm", model_class=AutoModelForMaskedLM, socket=served.socket)
    ref = BertForMaskedLM.from_pretrained(models["bertmlm"])
    assert type(got) is BertForMaskedLM
    assert got.cls.predictions.decoder.weight is got.bert.embeddings.word_embeddings.weight
    assert served_memory(got.cls.predictions.decoder.weight)
    with torch.no_grad():
        assert torch.equal(got(**_inputs()).logits, ref(**_inputs()).logits)


def test_base_prefix_both_ways_and_missing_weights_are_an_error(served, models):
    from transformers import BertForMaskedLM, BertModel
    # a head model from a base checkpoint: "bert." is added; the MLM head is not served
    with pytest.raises(AssignError, match=r"no weights for .*cls\.predictions"):
        devmapd.hf.from_pretrained("bert", model_class=BertForMaskedLM, socket=served.socket)
    # a base model from a head checkpoint: "bert." is stripped, the head is left out (warned);
    # that checkpoint has no pooler, which transformers would initialise randomly: refused
    with pytest.warns(UserWarning, match="not used by BertModel"), \
            pytest.raises(AssignError, match=r"pooler\.dense"):
        devmapd.hf.from_pretrained("bertmlm", model_class=BertModel, socket=served.socket)


def test_config_overrides_reach_the_model(served):
    got = devmapd.hf.from_pretrained("bert", socket=served.socket, output_hidden_states=True)
    assert got.config.output_hidden_states is True
    with torch.no_grad():
        assert len(got(**_inputs()).hidden_states) == 3


def test_a_daemon_that_ships_no_side_files_is_named_too_old(tmp_path, models):
    d = start_wire_daemon(tmp_path / "old", {"net": models["net"]}, side_files=False)
    try:
        with pytest.raises(devmapd.hf.TooOldDaemon, match="too old"):
            devmapd.hf.from_pretrained("bert", socket=d.socket)
    finally:
        assert d.stop() == 0


def test_import_devmapd_never_imports_transformers():
    import subprocess
    code = "import sys, devmapd, devmapd.client; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_real_daemon_ships_the_side_files_and_the_model_matches_automodel(tmp_path, models):
    """End to end: `devmapd serve` on a directory holding a transformers-written BERT. The client
    reads no file: its config comes in the fetch reply (without it from_pretrained raises
    TooOldDaemon, see above)."""
    import shutil

    from transformers import AutoModel

    from tests.harness import start_daemon

    model_dir = tmp_path / "models"
    shutil.copytree(models["bert"], model_dir / "bert")
    d = start_daemon(tmp_path, model_dir=model_dir)
    try:
        d.wait_model("bert", "ready", timeout=120)
        got = devmapd.hf.from_pretrained("bert", socket=d.socket)
        ref = AutoModel.from_pretrained(model_dir / "bert")
        with torch.no_grad():
            assert torch.equal(got(**_inputs()).last_hidden_state, ref(**_inputs()).last_hidden_state)
        for name, p in got.named_parameters():
            assert served_memory(p), f"{name} was copied"
    finally:
        assert d.stop() == 0, d.log()[-3000:]
