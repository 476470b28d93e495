"""Likelihood-trained steering (issue 24, lever 3): the loss against hand-computed numbers, the
answer log-probs against a manual gather, training on the tiny model (loss down, weights and
hooks untouched, deterministic), save/load, the pipeline's cache, and bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from ks_lens.comparison import ComparisonConfig
from ks_lens.datasets.gold_texts import LabelledText
from ks_lens.errors import ConfigError, DatasetError, LabelError
from ks_lens.models.chat import ChatPrompt, encode_chat, left_pad
from ks_lens.pipeline import likelihood_vectors, needs_likelihood_vectors
from ks_lens.steering import CAA, SteeringVectors
from ks_lens.steering.likelihood import (
    LikelihoodConfig,
    answer_logprobs,
    binned_kl,
    frozen,
    preference_loss,
    preference_pairs,
    train_likelihood_vectors,
)
from ks_lens.steering.registry import LIKELIHOOD_METHODS, METHODS, SteeringKit

LABELS = ("alpha", "beta", "gamma")
SMALL = LikelihoodConfig(steps=6, batch_size=2, max_tokens=6, max_pairs=12, lr=0.05, seed=3)


def _texts() -> list[LabelledText]:
    out = []
    answers = {
        ("alpha",): "Arr, boil it ten minutes, matey.",
        ("beta",): "Ten minutes.",
        ("gamma",): "Careful: hot water burns. Boil for ten minutes.",
        ("alpha", "beta"): "Arr, ten minutes.",
    }
    for q, question in enumerate(["How do I boil an egg?", "Why is the sky blue?"]):
        for j, (labels, text) in enumerate(answers.items()):
            out.append(LabelledText(f"t{q}{j}", text, labels, f"q{q}", question))
    return out


# ----------------------------------------------------------------------------- the loss


def test_preference_loss_hand_computed():
    pw, pl = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rw, rl = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -2.0])
    # margins: (-10 + 11) - (-12 + 11) = 2 and (-4 + 5) - (-3 + 2) = 2; beta 0.5:
    # -log sigmoid(0.5 * 2) = log(1 + e^-1)
    want = math.log1p(math.exp(-1.0))
    got = preference_loss(pw, pl, rw, rl, beta=0.5)
    assert torch.allclose(got, torch.tensor([want, want]), atol=1e-6)
    # a flipped sign prefers y_l: -log sigmoid(-1) = log(1 + e)
    got = preference_loss(pw, pl, rw, rl, beta=0.5, sign=torch.tensor([1.0, -1.0]))
    assert torch.allclose(got, torch.tensor([want, math.log1p(math.e)]), atol=1e-6)
    # equal policy and reference: log 2
    z = torch.zeros(1)
    assert torch.allclose(preference_loss(z, z, z, z, beta=0.1), torch.tensor([math.log(2)]))


def test_binned_kl_exact_with_every_token_and_a_lower_bound_with_fewer():
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 7, generator=g).log_softmax(-1)
    p = torch.randn(3, 7, generator=g).log_softmax(-1)
    exact = (p0.exp() * (p0 - p)).sum(-1)
    assert torch.allclose(binned_kl(p0, p), exact, atol=1e-5)
    top = p0.topk(3, dim=-1).indices
    binned = binned_kl(p0.gather(-1, top), p.gather(-1, top))
    # by hand: kept tokens plus one "rest" bin on both sides
    k0, k = p0.gather(-1, top).exp(), p.gather(-1, top).exp()
    r0, r = 1 - k0.sum(-1), 1 - k.sum(-1)
    hand = (k0 * (k0.log() - k.log())).sum(-1) + r0 * (r0.log() - r.log())
    assert torch.allclose(binned, hand, atol=1e-5)
    assert bool((binned <= exact + 1e-6).all())
    assert torch.allclose(binned_kl(p0, p0), torch.zeros(3), atol=1e-6)


def test_answer_logprobs_sum_only_the_answer_tokens(tiny_model):
    tok = tiny_model.tokenizer
    rows = []
    for q, a in [("Hi there?", "Hello to you."), ("How do I boil an egg?", "Ten minutes.")]:
        head = encode_chat(tok, ChatPrompt(q))
        rows.append((head + list(tok(a, add_special_tokens=False)["input_ids"]), len(head)))
    b = left_pad([r[0] for r in rows], 0)
    mask = torch.zeros_like(b.input_ids, dtype=torch.bool)
    for i, (ids, start) in enumerate(rows):
        mask[i, b.input_ids.shape[1] - len(ids) + start :] = True
    with torch.no_grad():
        logits = tiny_model(b.input_ids, attention_mask=b.attention_mask)
    got = answer_logprobs(logits, b.input_ids, mask)
    for i, (ids, start) in enumerate(rows):
        pad = b.input_ids.shape[1] - len(ids)
        lp = logits[i].float().log_softmax(-1)
        want = sum(float(lp[t - 1, b.input_ids[i, t]]) for t in range(pad + start, len(ids) + pad))
        assert got[i].item() == pytest.approx(want, rel=1e-5)
        # the same row alone (no padding) gives the same number
        with torch.no_grad():
            alone = tiny_model(torch.tensor([ids]))
        m = torch.zeros(1, len(ids), dtype=torch.bool)
        m[0, start:] = True
        assert answer_logprobs(alone, torch.tensor([ids]), m).item() == pytest.approx(
            want, rel=1e-4
        )


def test_pairs_are_answers_of_one_question_without_all_the_winners_labels():
    texts = _texts()
    pairs = preference_pairs(texts, LABELS)
    for w, lo in pairs:
        assert texts[w].question_id == texts[lo].question_id and w != lo
        assert not set(texts[w].labels) <= set(texts[lo].labels)
    # per question: alpha beats beta, gamma (not alpha+beta); alpha+beta beats all three others
    by_w = {texts[w].labels: set() for w, _ in pairs if texts[w].question_id == "q0"}
    for w, lo in pairs:
        if texts[w].question_id == "q0":
            by_w[texts[w].labels].add(texts[lo].labels)
    assert by_w[("alpha",)] == {("beta",), ("gamma",)}
    assert by_w[("alpha", "beta")] == {("alpha",), ("beta",), ("gamma",)}
    assert len(pairs) == 2 * (2 + 2 + 3 + 3)


# ----------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_leaves_the_model_alone(tiny_model):
    texts = _texts()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    grads = [p.requires_grad for p in tiny_model.parameters()]
    n_hooks = sum(len(m._forward_hooks) for m in tiny_model.modules())
    cfg = replace(SMALL, steps=12, bidirectional=False, kl_weight=0.0, max_pairs=4, batch_size=4)
    vecs = train_likelihood_vectors(tiny_model, texts, 2, LABELS, cfg, progress=False)
    loss = [h[0] for h in vecs.source["loss"]]
    assert len(loss) == 12 and loss[0] == pytest.approx(math.log(2), abs=1e-5)  # v = 0 at start
    assert loss[-1] < loss[0] - 0.05  # the same 4 pairs every step: the loss must fall
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in tiny_model.parameters()] == grads
    assert sum(len(m._forward_hooks) for m in tiny_model.modules()) == n_hooks
    assert vecs.method == "likelihood" and vecs.hook_name == "blocks.2.hook_resid_post"
    assert vecs.vectors.shape == (3, tiny_model.cfg.d_model) and vecs.label_names == LABELS
    assert vecs.source["config"] == cfg.to_json() and len(vecs.source["dataset_hash"]) == 64
    # the learned vectors raise the preferred answers' likelihood margin under CAA (mean)
    assert float(vecs.vectors.norm()) > 0


def test_training_is_deterministic_given_a_seed_and_the_kl_part_is_recorded(tiny_model):
    a = train_likelihood_vectors(tiny_model, _texts(), 1, LABELS, SMALL, progress=False)
    b = train_likelihood_vectors(tiny_model, _texts(), 1, LABELS, SMALL, progress=False)
    assert torch.equal(a.vectors, b.vectors) and a.source["loss"] == b.source["loss"]
    kl = [h[2] for h in a.source["loss"]]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and max(kl) > 0  # zero vectors: no KL at first
    assert all(h[0] == pytest.approx(h[1] + SMALL.kl_weight * h[2], rel=1e-5) for h in a.source["loss"])
    c = train_likelihood_vectors(
        tiny_model, _texts(), 1, LABELS, replace(SMALL, seed=4), progress=False
    )
    assert not torch.equal(a.vectors, c.vectors)


def test_frozen_restores_training_mode_and_grads_even_on_error(tiny_model):
    params = list(tiny_model.parameters())
    flags = [p.requires_grad for p in params]
    params[0].requires_grad_(True)
    was = tiny_model.training
    tiny_model.train()
    try:
        with pytest.raises(RuntimeError), frozen(tiny_model):
            assert not tiny_model.training
            assert not any(p.requires_grad for p in params)
            raise RuntimeError("boom")
        assert tiny_model.training and params[0].requires_grad
    finally:
        tiny_model.train(was)
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


def test_save_load_round_trip(tiny_model, tmp_path):
    vecs = train_likelihood_vectors(
        tiny_model, _texts(), 2, LABELS, replace(SMALL, steps=2), progress=False
    )
    vecs.save(tmp_path / "v")
    back = SteeringVectors.load(tmp_path / "v", model=tiny_model)
    assert torch.equal(back.vectors, vecs.vectors)
    assert back.method == "likelihood" and back.source == vecs.source
    assert (back.label_names, back.hook_name, back.model_info) == (
        vecs.label_names,
        vecs.hook_name,
        vecs.model_info,
    )


def test_pipeline_cache_reuses_matching_vectors_and_retrains_otherwise(tiny_model, tmp_path):
    cfg = replace(SMALL, steps=2)
    a = likelihood_vectors(tiny_model, _texts(), 2, LABELS, cfg, tmp_path / "lv", progress=False)
    b = likelihood_vectors(tiny_model, _texts(), 2, LABELS, cfg, tmp_path / "lv", progress=False)
    assert b.source["train_s"] == a.source["train_s"]  # loaded, not retrained
    c = likelihood_vectors(
        tiny_model, _texts(), 2, LABELS, replace(cfg, seed=9), tmp_path / "lv", progress=False
    )
    assert c.source["config"]["seed"] == 9 and not torch.equal(a.vectors, c.vectors)
    (tmp_path / "lv" / "meta.json").write_text("{damaged")  # retrained and saved, not trusted
    d = likelihood_vectors(tiny_model, _texts(), 2, LABELS, cfg, tmp_path / "lv", progress=False)
    assert torch.equal(d.vectors, a.vectors)  # seeded: the same vectors again
    e = likelihood_vectors(tiny_model, _texts(), 2, LABELS, cfg, tmp_path / "lv", progress=False)
    assert e.source["train_s"] == d.source["train_s"]  # the rebuilt cache is used
    assert needs_likelihood_vectors(ComparisonConfig(methods=("caa_mean", "likelihood")))
    assert not needs_likelihood_vectors(ComparisonConfig(methods=("caa_mean", "ksteer")))


# ----------------------------------------------------------------------------- the method


def test_the_method_is_caa_mean_on_the_learned_vectors(tiny_model, tiny_probe, tiny_acts):
    assert LIKELIHOOD_METHODS == {"likelihood"}
    vecs = train_likelihood_vectors(
        tiny_model, _texts(), 2, LABELS, replace(SMALL, steps=2), progress=False
    )
    kit = SteeringKit(tiny_probe, SteeringVectors.fit(tiny_acts, 2), likelihood_vectors=vecs)
    method = METHODS["likelihood"].build(kit)
    assert isinstance(method, CAA) and method.vectors is vecs and method.combine == "mean"
    x = tiny_acts.at(2)[:3]
    want = x + 1.5 * (vecs.vectors[0] + vecs.vectors[1]) / 2
    assert torch.allclose(method.apply(x, target=["alpha", "beta"], alpha=1.5), want)
    with pytest.raises(ConfigError, match="likelihood-trained vectors"):
        METHODS["likelihood"].build(SteeringKit(tiny_probe, SteeringVectors.fit(tiny_acts, 2)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"batch_size": 1.5}, "batch_size must be an int >= 1"),
        ({"lr": 0}, "lr must be > 0"),
        ({"beta": float("nan")}, "beta must be a finite number"),
        ({"kl_weight": -1.0}, "kl_weight must be >= 0"),
        ({"max_tokens": True}, "max_tokens must be an int >= 1"),
        ({"bidirectional": 1}, "bidirectional must be True or False"),
        ({"seed": "0"}, "seed must be an int"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LikelihoodConfig(**kwargs)


def test_bad_texts_raise(tiny_model):
    texts = _texts()
    with pytest.raises(LabelError, match="unknown label"):
        preference_pairs(texts, ("alpha", "beta"))
    with pytest.raises(ConfigError, match="has no question"):
        preference_pairs([replace(texts[0], question=None)], LABELS)
    with pytest.raises(DatasetError, match="no preference pairs"):
        train_likelihood_vectors(tiny_model, texts[:1], 2, LABELS, SMALL, progress=False)
    assert LikelihoodConfig(lr=1).lr == 1.0 and isinstance(LikelihoodConfig(lr=1).lr, float)
