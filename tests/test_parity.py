"""Parity with plain Hugging Face on the real default model, under the installed versions.

A second copy of the default model's weights is loaded with plain ``transformers`` (no
TransformerLens, no ks-lens hooks) and compared with what ks-lens computes:

- greedy generation through ks-lens's default path equals HF ``generate`` token for token;
- activations through the fast forward path equal HF's ``hidden_states``;
- steering at zero strength (CAA and K-Steering, every position) equals unsteered generation;
- the TransformerLens full-bridge path either equals HF or is refused, under versions known to
  diverge (``ks_lens.compat.bridge_cache_diverges``), with a message naming them.

``scripts/lock.sh`` runs this file against every refreshed lock.
"""

from __future__ import annotations

import pytest
import torch

import ks_lens as ks
from ks_lens._runtime.batching import record_activations
from ks_lens._runtime.hf_path import plain_forward
from ks_lens.compat import bridge_cache_diverges
from ks_lens.errors import VersionError

pytestmark = pytest.mark.integration

PROMPTS = [
    "How do I boil an egg?",
    "Why is the sky blue? Explain it to a ten-year-old in a few sentences.",
    "Name three rivers in Europe.",
    "What should I pack for a weekend beach trip with two small children and a dog?",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def hf_twin():
    """The default model's weights loaded a second time by plain transformers, fp32."""
    from transformers import AutoModelForCausalLM

    from ks_lens.models.packaged import ensure_model

    directory = ensure_model()
    return AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, local_files_only=True, use_safetensors=True
    ).eval()


@pytest.fixture(scope="module")
def batch(default_model):
    return ks.tokenize_chat(default_model, PROMPTS)


def _hf_greedy(hf_twin, tok, batch) -> list[list[int]]:
    with torch.no_grad():
        out = hf_twin.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    rows = out[:, batch.input_ids.shape[1] :].tolist()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    return [[t for t in r[: r.index(eos) if eos in r else len(r)] if t != pad] for r in rows]


def test_greedy_generation_equals_plain_hf_generate(default_model, hf_twin, batch):
    expected = _hf_greedy(hf_twin, default_model.tokenizer, batch)
    got = ks.generate(default_model, PROMPTS, max_new_tokens=NEW_TOKENS).output_ids
    assert got == expected
    assert all(len(ids) > 3 for ids in got)  # real answers, not an immediate end of turn


def test_fast_path_activations_equal_plain_hf_hidden_states(default_model, hf_twin, batch):
    n_layers = default_model.cfg.n_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    with torch.no_grad(), record_activations(default_model, names) as rec:
        plain_forward(default_model, batch.input_ids, attention_mask=batch.attention_mask)
    with torch.no_grad():
        ref = hf_twin(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
        ).hidden_states  # [embeddings, after block 0, ..., after the final norm]
    real = batch.attention_mask.bool()
    for layer, name in enumerate(names):
        # the same fp32 computation up to the order of float operations (the bridge's model
        # runs its own attention kernel): within 1e-6 of the layer's largest entry, which
        # reaches ~2.5e4 (a routing bug shows as differences of the entries' own size)
        got, want = rec[name][real], ref[layer][real]
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) <= 1e-6 * scale, (layer, scale)


def _train_pieces(default_model):
    """CAA vectors and a small probe at layer 18 from 12 prompt-mode rows (cheap)."""
    data = ks.load_dataset("tones").split("train").head(2)
    acts = ks.collect_activations(default_model, data, layers=[18], progress=False)
    vectors = ks.SteeringVectors.fit(acts, 18)
    probe = ks.train_probes(acts, config=ks.ProbeConfig(epochs=2, hidden=16))[18]
    return vectors, probe


def test_zero_strength_steering_equals_unsteered_generation(default_model):
    """Every steering hook runs (all positions) yet changes nothing at alpha 0; the same
    methods with steps of length 8 do change the text (so the equality is not vacuous)."""
    vectors, probe = _train_pieces(default_model)
    plain = ks.generate(default_model, PROMPTS, max_new_tokens=NEW_TOKENS).output_ids
    methods = {
        "CAA": ks.CAA(vectors),
        "K-Steering": ks.KSteering(probe, steps=2),
        "K-Steering (unit steps)": ks.KSteering(probe, steps=2, step_norm="unit"),
    }
    for name, method in methods.items():
        with method.steer(default_model, target=["casual", "concise"], alpha=0.0):
            steered = ks.generate(default_model, PROMPTS, max_new_tokens=NEW_TOKENS).output_ids
        assert steered == plain, name
    for name in ("CAA", "K-Steering (unit steps)"):  # raw K steps scale with the probe's gradient
        with methods[name].steer(default_model, target=["casual"], alpha=8.0):
            moved = ks.generate(default_model, PROMPTS, max_new_tokens=NEW_TOKENS).output_ids
        assert moved != plain, f"{name} at alpha 8 changed nothing"


def test_full_bridge_generation_equals_plain_hf_or_is_refused(default_model, hf_twin, batch):
    expected = _hf_greedy(hf_twin, default_model.tokenizer, batch)
    if bridge_cache_diverges():
        with pytest.raises(VersionError, match=r"transformers .*transformer-lens|transformer-lens"):
            ks.generate(default_model, PROMPTS, max_new_tokens=NEW_TOKENS, full_bridge=True)
        return
    got = ks.generate(default_model, PROMPTS, max_new_tokens=NEW_TOKENS, full_bridge=True)
    assert got.output_ids == expected
