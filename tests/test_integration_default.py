"""Integration tests on the real default model (SmolLM2-135M-Instruct, offline from a PyPI wheel)."""

from __future__ import annotations

import json

import pytest
import torch

import ks_lens as ks
from ks_lens.demo import run_demo
from ks_lens.pipeline import PipelineConfig

pytestmark = pytest.mark.integration


def test_default_model_loads_offline_with_every_resid_hook(default_model, monkeypatch):
    model = default_model
    assert model.cfg.n_layers == 30 and model.cfg.d_model == 576
    batch = ks.tokenize_chat(model, [ks.ChatPrompt("What is the capital of France?")])
    ids = batch.input_ids[0].tolist()
    assert (
        ids[0] == model.tokenizer.bos_token_id and ids[1] != model.tokenizer.bos_token_id
    )  # no double BOS
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(30)]
    logits, cache = model.run_with_cache(batch.input_ids, names_filter=names)
    assert logits.shape == (1, len(ids), model.cfg.d_vocab)
    for name in names:
        assert cache[name].shape == (1, len(ids), 576)
        assert torch.isfinite(cache[name]).all()
    # resid_post of block L is resid_pre of block L+1
    _, c2 = model.run_with_cache(
        batch.input_ids, names_filter=["blocks.5.hook_resid_post", "blocks.6.hook_resid_pre"]
    )
    assert torch.equal(c2["blocks.5.hook_resid_post"], c2["blocks.6.hook_resid_pre"])


def test_default_model_answers_sensibly(default_model):
    gen = ks.generate(
        default_model, ["What is the capital of France? Answer in one sentence."], max_new_tokens=20
    )
    text = gen.texts[0]
    assert "Paris" in text
    assert text[0].isupper() and len(text.split()) >= 4


def test_second_load_uses_the_cache_and_is_fast(default_model):
    import time

    t0 = time.perf_counter()
    again = ks.load_model("default")
    assert time.perf_counter() - t0 < 30
    p1 = next(default_model.original_model.parameters())
    p2 = next(again.original_model.parameters())
    assert torch.equal(p1, p2)


def test_fast_demo_on_default_model(tmp_path):
    (result,) = run_demo(
        PipelineConfig.fast(), tmp_path / "demo", log=lambda s: None, progress=False
    )
    on_disk = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert on_disk["model"] == "SmolLM2-135M-Instruct-Q4_1" and on_disk["layer"] == 18
    assert on_disk["steering_probe_metrics"]["val_accuracy"] >= 0.9
    rows = {(r.method, r.k): r for r in result.summary("activation")}
    base = rows[("unsteered", 1)].target_prob.estimate
    for m in ("caa_mean", "caa_sum", "ksteer", "ksteer_multistep"):
        assert rows[(m, 1)].target_prob.estimate > base + 0.05, m
        for k in (1, 2, 3):
            cal = on_disk["calibration"][m][str(k)]
            assert (
                0 < cal["alpha"]
                and cal["metric_at_alpha"] <= on_disk["comparison_config"]["kl_budget"]
            )
    # the text level ran at every alpha factor, and the validity of the evaluators is reported
    assert len(result.curves) > 0 and on_disk["text_evaluator_validity"]["n_texts"] >= 1000
