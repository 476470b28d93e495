"""Dynamic Activation Composition (issue 24, lever 6): truncated KL and weights against hand
values, generation against CAA and against manual passes, the scoring path, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import ks_lens as ks
from ks_lens._runtime.batching import sorted_batches
from ks_lens.errors import ConfigError
from ks_lens.evaluation import generate_and_score_rows
from ks_lens.generation import generate_from_batch
from ks_lens.models import pad_token_id
from ks_lens.models.chat import ChatPrompt, encode_chat
from ks_lens.steering import CAA, SteeringVectors, steer_groups
from ks_lens.steering.dac import (
    DACConfig,
    DynamicComposition,
    generate_composed,
    nucleus,
    term_weights,
    truncated_kl,
)
from ks_lens.steering.registry import METHODS, SteeringKit

QUESTIONS = ["How do I boil an egg?", "Why is the sky blue? Tell me in detail."]


@pytest.fixture(scope="module")
def vectors(tiny_tone_acts) -> SteeringVectors:
    return SteeringVectors.fit(tiny_tone_acts, 2)


def _batch(model):
    ids = [encode_chat(model.tokenizer, ChatPrompt(q)) for q in QUESTIONS]
    ((idx, batch),) = sorted_batches(ids, 8, pad_id=pad_token_id(model.tokenizer), device="cpu")
    return [QUESTIONS[i] for i in idx], batch


def _log(p: list[float]) -> torch.Tensor:
    return torch.tensor([p]).log()


def test_truncated_kl_hand_computed():
    p = [0.5, 0.3, 0.15, 0.05]
    q = [0.05, 0.05, 0.1, 0.8]
    # top_p 0.6: p keeps {0, 1} (0.5, then 0.8 >= 0.6), q keeps {3}; union {0, 1, 3}
    assert nucleus(_log(p), 0.6).tolist() == [[True, True, False, False]]
    assert nucleus(_log(q), 0.6).tolist() == [[False, False, False, True]]
    keep = [0, 1, 3]
    ps = [p[i] / sum(p[j] for j in keep) for i in keep]
    qs = [q[i] / sum(q[j] for j in keep) for i in keep]
    want = sum(a * math.log(a / b) for a, b in zip(ps, qs, strict=True))
    got = truncated_kl(_log(p), _log(q), 0.6)
    assert got.shape == (1,) and got.item() == pytest.approx(want, rel=1e-5)
    # top_p 1: the plain KL over the whole vocabulary
    full = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    assert truncated_kl(_log(p), _log(q), 1.0).item() == pytest.approx(full, rel=1e-5)
    # the most likely token is always kept, even for a tiny top_p
    assert nucleus(_log(p), 1e-6).tolist() == [[True, False, False, False]]
    assert truncated_kl(_log(p), _log(p), 0.9).item() == pytest.approx(0.0, abs=1e-7)


def test_term_weights_clip_the_kl_at_the_scale():
    p = _log([0.5, 0.3, 0.15, 0.05]).expand(2, -1)
    q = torch.cat([_log([0.05, 0.05, 0.1, 0.8]), _log([0.5, 0.3, 0.15, 0.05])])
    kl = truncated_kl(p, q, 1.0)
    assert kl[0] > 1.0 and kl[1] == pytest.approx(0.0, abs=1e-7)
    assert term_weights(p, q, DACConfig(top_p=1.0, kl_scale=1.0)).tolist() == pytest.approx(
        [1.0, 0.0], abs=1e-6
    )
    w = term_weights(p, q, DACConfig(top_p=1.0, kl_scale=4.0))
    assert w[0].item() == pytest.approx(kl[0].item() / 4.0, rel=1e-6)


def test_dac_at_full_weight_equals_caa_mean_generation(tiny_model, vectors):
    """A KL scale far below any KL gives every term weight 1: the answers are CAA (mean)'s."""
    _, batch = _batch(tiny_model)
    dac = DynamicComposition(vectors, DACConfig(kl_scale=1e-12))
    specs = [
        dac.spec(target=["casual", "expert"], alpha=4.0),
        dac.spec(target="casual", avoid=["concise", "helpful"], alpha=3.0),
    ]
    got = generate_composed(tiny_model, batch, [(dac, s) for s in specs], max_new_tokens=6)
    caa = CAA(vectors)
    with steer_groups(tiny_model, [(caa, s) for s in specs], [0, 1]):
        want = generate_from_batch(tiny_model, batch, max_new_tokens=6, return_logits=True)
    assert got.generation.ids == want.ids and got.generation.finished == want.finished
    assert want.logits is not None and got.generation.logits is not None
    steps = got.generation.logits.shape[1]
    torch.testing.assert_close(got.generation.logits, want.logits[:, :steps], atol=1e-5, rtol=0)
    assert [w.shape for w in got.weights] == [(steps, 2), (steps, 3)]
    assert all(bool((w == 1).all()) for w in got.weights)
    # the static step (readouts, steer()) is CAA (mean) too
    x = torch.randn(3, vectors.vectors.shape[1])
    torch.testing.assert_close(dac.apply(x, **_kw(specs[1])), caa.apply(x, **_kw(specs[1])))


def _kw(spec):
    return {"target": list(spec.target), "avoid": list(spec.avoid), "alpha": spec.alpha}


def test_dac_weights_equal_manual_passes(tiny_model, vectors):
    """Each recorded weight is min(1, KL(unsteered || label alone) / scale) of whole-sequence
    passes over the prompt and the answer so far (no KV cache)."""
    questions, batch = _batch(tiny_model)
    config = DACConfig(top_p=0.9, kl_scale=0.01)
    dac = DynamicComposition(vectors, config)
    spec = dac.spec(target=["casual"], avoid=["expert"], alpha=6.0)
    got = generate_composed(tiny_model, batch, [(dac, spec)] * 2, max_new_tokens=4)
    caa = CAA(vectors)
    for b, q in enumerate(questions):
        prompt = encode_chat(tiny_model.tokenizer, ChatPrompt(q))
        answer = got.generation.ids[b]
        for t in range(min(len(answer) + 1, got.weights[b].shape[0])):
            tokens = torch.tensor([prompt + answer[:t]])
            base = tiny_model(tokens)[:, -1]
            for j, label in enumerate(["casual", "expert"]):
                single = {"target": label} if j == 0 else {"avoid": label}
                with caa.steer(tiny_model, alpha=6.0, **single):
                    steered = tiny_model(tokens)[:, -1]
                want = term_weights(base, steered, config).item()
                assert got.weights[b][t, j].item() == pytest.approx(want, abs=2e-4), (b, t, j)
    assert 0 < float(got.weights[0].min()) and float(got.weights[0].max()) <= 1


def test_dac_rows_in_the_scoring_path(tiny_model, vectors):
    """A batch mixing DAC, CAA and unsteered rows gives each the answers it gets alone, and the
    hooks are gone afterwards."""
    tokens = ks.tokenize_chat(tiny_model, QUESTIONS[0]).input_ids
    before = tiny_model(tokens)
    dac = DynamicComposition(vectors, DACConfig(kl_scale=0.01))
    dspec = dac.spec(target=["casual", "empathetic"], alpha=6.0)
    caa = CAA(vectors)
    steerings = [(dac, dspec), (caa, caa.spec(target="casual", alpha=6.0)), None]
    rows = [(g, i) for g in range(3) for i in range(len(QUESTIONS))]
    scores = generate_and_score_rows(
        tiny_model, QUESTIONS, steerings, rows, response_probe=None, max_new_tokens=5
    )
    torch.testing.assert_close(tiny_model(tokens), before, atol=0, rtol=0)
    for g in range(3):
        alone = generate_and_score_rows(
            tiny_model, QUESTIONS, [steerings[g]], [(0, i) for i in range(len(QUESTIONS))],
            response_probe=None, max_new_tokens=5,
        )  # fmt: skip
        mixed = scores.select(range(g * 2, g * 2 + 2))
        assert mixed.answer_ids == alone.answer_ids
        assert mixed.kl == pytest.approx(alone.kl, abs=1e-5)
    assert all(math.isfinite(k) for k in scores.kl)


def test_registry_builds_dac_from_the_kit(tiny_probe, tiny_acts):
    kit = SteeringKit(tiny_probe, SteeringVectors.fit(tiny_acts, 2))
    method = METHODS["dac"].build(kit)
    assert isinstance(method, DynamicComposition) and method.vectors is kit.vectors
    assert method.dac == DACConfig()


@pytest.mark.parametrize(
    "kwargs",
    [{"top_p": 0.0}, {"top_p": 1.5}, {"kl_scale": -1.0}, {"kl_scale": float("nan")},
     {"top_p": True}, {"kl_scale": "1"}],
)  # fmt: skip
def test_dac_config_refuses_bad_values(kwargs):
    with pytest.raises(ConfigError):
        DACConfig(**kwargs)


def test_dac_bad_input(tiny_model, vectors):
    _, batch = _batch(tiny_model)
    dac = DynamicComposition(vectors)
    spec = dac.spec(target="casual", alpha=1.0)
    with pytest.raises(ConfigError, match="steerings for a batch"):
        generate_composed(tiny_model, batch, [(dac, spec)], max_new_tokens=2)
    with pytest.raises(ConfigError, match="DACConfig"):
        DynamicComposition(vectors, config={"top_p": 0.9})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="positions"):
        generate_and_score_rows(
            tiny_model, QUESTIONS, [(dac, spec)], [(0, 0)], response_probe=None,
            positions="generated", max_new_tokens=2,
        )  # fmt: skip


def test_weight_summary_hand_computed():
    from ks_lens.generation import BatchGeneration
    from ks_lens.steering.dac import ComposedGeneration, summarize_weights

    w0 = torch.tensor([[1.0, 0.2], [0.4, 1.0], [0.9, 0.9]])  # 2 tokens, then the end-of-turn step
    w1 = torch.tensor([[0.6], [0.3], [1.0]])  # 2 tokens, not finished: the third step is padding
    gen = ComposedGeneration(
        BatchGeneration([[5, 6], [7, 8]], [True, False], None), [w0, torch.cat([w1, w1])]
    )
    kept = gen.answer_weights()
    assert [tuple(w.shape) for w in kept] == [(3, 2), (2, 1)]
    s = summarize_weights(kept)
    flat = [1.0, 0.2, 0.4, 1.0, 0.9, 0.9, 0.6, 0.3]
    assert s.mean == pytest.approx(sum(flat) / 8)
    assert s.first_step == pytest.approx((1.0 + 0.2 + 0.6) / 3)
    assert s.later_steps == pytest.approx((0.4 + 1.0 + 0.9 + 0.9 + 0.3) / 5)
    assert s.at_one == pytest.approx(2 / 8) and s.below_half == pytest.approx(3 / 8)
    assert (s.n_weights, s.n_answers) == (8, 2)
    with pytest.raises(ConfigError, match="no DAC weights"):
        summarize_weights([torch.zeros(0, 2)])


def test_dac_hooks_are_removed_after_an_error(tiny_model, vectors, monkeypatch):
    """The one hook generate_composed installs is gone after a pass fails mid-generation."""
    import ks_lens.steering.dac as dac_module

    def hooked() -> int:
        return sum(
            len(h._forward_hooks)
            for h in {id(h): h for h in tiny_model.hook_dict.values()}.values()
        )

    _, batch = _batch(tiny_model)
    dac = DynamicComposition(vectors)
    spec = dac.spec(target="casual", alpha=1.0)
    calls = []

    def failing(*args, **kwargs):
        calls.append(hooked())
        raise RuntimeError("boom")

    monkeypatch.setattr(dac_module, "plain_forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        generate_composed(tiny_model, batch, [(dac, spec)] * 2, max_new_tokens=2)
    assert calls == [1] and hooked() == 0
