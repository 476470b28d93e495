from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ks_lens as ks
from ks_lens.calibration import calibrate_alpha
from ks_lens.comparison import label_combinations, spread
from ks_lens.evaluation import (
    DegenerateRule,
    VanishRule,
    distinct_n,
    generate_and_score_groups,
    kl_divergence,
    kl_metric,
    readout,
)
from ks_lens.probes import Probe, ProbeConfig
from ks_lens.steering import CAA, SteeringSpec, SteeringVectors


def _linear_probe(
    w: torch.Tensor, b: torch.Tensor, hook: str, labels=("alpha", "beta", "gamma")
) -> Probe:
    d = w.shape[0]
    return Probe(
        [(w, b)],
        torch.zeros(d),
        torch.ones(d),
        label_names=labels,
        hook_name=hook,
        model={"model": "tiny-random-llama", "d_model": d, "n_layers": 4},
        config=ProbeConfig(architecture="linear"),
    )


def test_readout_matches_hand_computed_probability(tiny_model, tiny_acts):
    """Evaluator = a hand-built linear probe at the steering hook; CAA adds alpha*v there, so the
    expected probability is sigmoid(w . (x + alpha v) + b), with x from a plain forward pass."""
    hook = "blocks.2.hook_resid_post"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 3, generator=g)
    b = torch.tensor([0.1, -0.2, 0.3])
    probe = _linear_probe(w, b, hook)
    vec = SteeringVectors.fit(tiny_acts, 2)
    prompts = ["hello?", "what is the weather like?", "tell me a story?"]
    batch = ks.tokenize_chat(tiny_model, prompts)
    _, cache = tiny_model.run_with_cache(
        batch.input_ids, attention_mask=batch.attention_mask, names_filter=[hook]
    )
    x = cache[hook][:, -1]
    r0 = readout(tiny_model, prompts, probe=probe)
    torch.testing.assert_close(r0.probs, torch.sigmoid(x @ w + b), atol=1e-5, rtol=1e-5)
    r1 = readout(
        tiny_model,
        prompts,
        probe=probe,
        steering=(CAA(vec), SteeringSpec(("beta",), (), 3.0)),
        batch_size=2,
    )
    torch.testing.assert_close(
        r1.probs, torch.sigmoid((x + 3.0 * vec.vectors[1]) @ w + b), atol=1e-5, rtol=1e-5
    )


def test_kl_metric_is_zero_at_zero_and_increasing(tiny_model, tiny_acts):
    vec = SteeringVectors.fit(tiny_acts, 2)
    prompts = ["hello?", "why?"]
    metric = kl_metric(tiny_model, CAA(vec), [SteeringSpec(("beta",), (), 1.0)], prompts)
    assert metric(0.0) == pytest.approx(0.0, abs=1e-6)
    vals = [metric(a) for a in (1.0, 10.0, 100.0)]
    assert vals[0] < vals[1] < vals[2]
    p = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.5]]), -1)
    assert float(kl_divergence(p, p)) == pytest.approx(0.0, abs=1e-7)


def test_calibration_finds_largest_alpha_within_budget():
    cal = calibrate_alpha(lambda a: a**2, 4.0, alpha0=1.0, factor=4.0, bisect_steps=6)
    assert cal.alpha**2 <= 4.0
    # the power law through (1, 1) aims at 0.95 * budget: alpha = sqrt(3.8), found in 2 steps
    assert cal.alpha == pytest.approx(3.8**0.5) and len(cal.evaluations) == 2
    assert all(a > 0 for a, _ in cal.evaluations)
    # without the tolerance stop, the bracket closes to factor ** (1 / 2**bisect_steps)
    exact = calibrate_alpha(lambda a: a**2, 4.0, factor=4.0, bisect_steps=6, tolerance=0.0)
    assert exact.alpha**2 <= 4.0 and exact.alpha >= 2.0 / 4.0 ** (1 / 2**6)
    # an inf metric (too many degenerate answers) past alpha 3 is bisected around, not fitted
    cliff = calibrate_alpha(lambda a: 0.01 * a if a < 3 else math.inf, 1.0, bisect_steps=3)
    assert cliff.alpha < 3 and cliff.alpha >= 3 / 4 ** (1 / 8) and math.isfinite(cliff.metric)
    with pytest.raises(ValueError, match="tolerance must be in"):
        calibrate_alpha(lambda a: a, 1.0, tolerance=1.0)
    down = calibrate_alpha(lambda a: a, 0.01, alpha0=10.0)
    assert down.alpha <= 0.01 and down.alpha > 0.01 / 4
    capped = calibrate_alpha(lambda a: 0.0 * a, 1.0, max_expand=3)
    assert capped.alpha == 64.0 and "search limit" in capped.note
    never = calibrate_alpha(lambda a: 5.0, 1.0, max_expand=2)
    assert never.alpha == 0.0 and "steering off" in never.note
    with pytest.raises(ValueError, match="budget must be positive"):
        calibrate_alpha(lambda a: a, 0.0)


def test_vanish_rule_per_question_levels():
    rule = VanishRule(floor=0.1, reach=0.5)
    p = np.array(
        [
            [0.9, 0.05, 0.3],  # best reaches 0.5, one target below the floor -> vanished
            [
                0.4,
                0.05,
                0.3,
            ],  # nothing reaches 0.5 -> nothing vanished (a method that moves nothing)
            [0.6, 0.62, 0.58],  # high baseline staying high is not vanished
            [0.5, 0.1, 0.09],  # exactly at reach: counts; 0.1 is not below the floor
        ]
    )
    got = rule.vanished(p)
    assert got.tolist() == [
        [False, True, False],
        [False, False, False],
        [False, False, False],
        [False, False, True],
    ]
    assert not rule.vanished(np.array([[0.0], [1.0]])).any()  # single target never vanishes
    with pytest.raises(ValueError, match=r"\[n, k\]"):
        rule.vanished(np.array([0.1, 0.2]))
    assert "0.1" in rule.to_json()["definition"]


def test_degenerate_rule_flags_each_kind():
    rule = DegenerateRule()
    assert rule.reason("") == "empty"
    assert rule.reason("  1 ") == "empty"
    assert rule.reason("1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1") == "empty"  # no letters at all
    assert rule.reason("a 1.1.1.1.1.1.1.1 b 2.2.2.2.2") == "non-letters"
    rep = "improved self-efficacy, " * 8
    assert rule.reason(rep) == "repetition"
    assert (
        rule.reason("hahahahahahahahahahahahahahahahahahahahahahahahahahahahahahahaha")
        == "repetition"
    )
    ok = (
        "Boil the egg for about nine minutes, then cool it in cold water so the shell peels "
        "off easily and the yolk stays bright."
    )
    assert rule.reason(ok) is None and not rule.is_degenerate(ok)
    assert "zlib" in rule.to_json()["definition"]


def test_distinct_n():
    assert distinct_n("a b a b a b") == pytest.approx(2 / 5)
    assert distinct_n("one two three") == 1.0
    assert math.isnan(distinct_n("single"))


def test_generation_scores_unsteered_kl_is_zero_and_nll_is_correct(tiny_model, tiny_probe):
    qs = ["hello?", "what is a cat?", "why?"]
    (s,) = generate_and_score_groups(
        tiny_model, qs, [None], response_probe=tiny_probe, max_new_tokens=5, batch_size=2
    )
    assert len(s.texts) == 3 and s.probs.shape == (3, 3)
    for k in s.kl:
        assert math.isnan(k) or abs(k) < 1e-4
    # NLL of the first answer by hand
    tok = tiny_model.tokenizer
    head = tok(ks.format_chat(tok, ks.ChatPrompt(qs[0])), add_special_tokens=False)["input_ids"]
    ans = s.answer_ids[0]
    assert ans, "tiny model should produce tokens"
    with torch.no_grad():
        logits = tiny_model(torch.tensor([head + ans]))
    lp = torch.log_softmax(logits[0, len(head) - 1 : -1], -1)
    nll = float(-lp.gather(-1, torch.tensor(ans)[:, None]).mean())
    assert s.nll[0] == pytest.approx(nll, rel=1e-4)
    assert s.perplexity > 1.0


def test_combinations_and_spread():
    combos = label_combinations(["a", "b", "c", "d"], (1, 2, 3))
    assert len(combos) == 4 + 6 + 4
    assert spread(list(range(10)), 3) == [0, 3, 6]
    assert spread([1, 2], None) == [1, 2]
    with pytest.raises(ValueError, match="impossible"):
        label_combinations(["a"], (2,))


def test_answers_cut_short_by_steering_still_pay_kl(tiny_model):
    """Steering that makes the model end its turn at once produces empty answers; the step that
    chose end-of-turn must still count as a (large) coherence cost, not as zero."""
    from ks_lens.evaluation import generate_and_score_groups
    from ks_lens.models import model_signature

    emb = tiny_model.original_model.get_input_embeddings().weight.detach()
    eos = tiny_model.tokenizer.eos_token_id
    vecs = torch.zeros(3, 64)
    vecs[0] = emb[eos]
    push_eos = SteeringVectors(
        vecs,
        label_names=("alpha", "beta", "gamma"),
        hook_name="blocks.3.hook_resid_post",
        model=model_signature(tiny_model),
    )
    qs = ["hello?", "what is a cat?"]
    base, steered = generate_and_score_groups(
        tiny_model,
        qs,
        [None, (CAA(push_eos), SteeringSpec(("alpha",), (), 1e4))],
        response_probe=None,
        max_new_tokens=4,
    )
    assert steered.answer_ids == [[], []] and steered.n_empty == 2
    assert steered.kl_steps == [1, 1]  # the end-of-turn step is scored
    assert steered.mean_kl > 0.01 and steered.mean_kl > 100 * abs(base.mean_kl)
    assert all(
        n == len(ids) + (1 if len(ids) < 4 else 0) or n == len(ids)
        for n, ids in zip(base.kl_steps, base.answer_ids, strict=True)
    )
    assert abs(base.mean_kl) < 1e-4


def test_shared_lower_layers_equal_full_passes(tiny_model, tiny_acts, tiny_probe, monkeypatch):
    """readout_groups runs the layers below the lowest steered layer once per prompt batch and
    resumes each configuration there: same probabilities and next-token log-probs as full
    passes, for CAA, K-Steering, a multi-layer method and an unsteered group, with ragged
    batches (5 prompts, batch 4) that mix configurations in one pass."""
    import ks_lens._runtime.hf_path as hf_path
    from ks_lens.evaluation import readout_groups
    from ks_lens.steering import KSteering, MultiLayer

    evaluator = ks.train_probe(tiny_acts, 3, config=ProbeConfig(epochs=5, hidden=16, seed=1))
    vec = SteeringVectors.fit(tiny_acts, 2)
    vec1 = SteeringVectors.fit(tiny_acts, 1)
    prompts = ["hello?", "what is the weather like?", "tell me a story?", "why?", "a b c d e f?"]
    steerings = [
        (CAA(vec), SteeringSpec(("beta",), (), 3.0)),
        None,
        (KSteering(tiny_probe), SteeringSpec(("alpha", "gamma"), (), 2.0)),
        (MultiLayer([CAA(vec1), CAA(vec)]), SteeringSpec(("gamma",), ("alpha",), 4.0)),
    ]
    calls: list[int] = []
    real = hf_path.resume_at

    def counting(model, layer, hidden, as_tuple):
        calls.append(layer)
        return real(model, layer, hidden, as_tuple)

    monkeypatch.setattr("ks_lens.evaluation.readouts.resume_at", counting)
    kw = dict(probe=evaluator, next_token=True, batch_size=4)
    shared = readout_groups(tiny_model, prompts, steerings, **kw)
    # the multi-layer method steers layer 1 first; prompt batches of 4 and 1 x 4 configurations
    # = 16 + 4 rows in chunks of 4
    assert calls == [1] * 5
    full = readout_groups(tiny_model, prompts, steerings, share_lower_layers=False, **kw)
    assert len(calls) == 5  # no resuming in the full passes
    for a, b in zip(shared, full, strict=True):
        torch.testing.assert_close(a.probs, b.probs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.next_logprobs, b.next_logprobs, atol=1e-4, rtol=1e-5)
    # steering really changed the readout (the comparison is not vacuous)
    assert not torch.allclose(shared[0].probs, shared[1].probs, atol=1e-3)
    # the model is restored: no hooks, the bridge's own blocks back in place
    assert not any(hp._forward_hooks for hp in tiny_model.hook_dict.values())
    layers = hf_path.decoder_layers(tiny_model)
    assert layers is not None
    assert all(layers[i] is tiny_model.blocks[i] for i in range(len(layers)))


def test_shared_lower_layers_not_used_below_the_evaluator(tiny_model, tiny_acts, monkeypatch):
    """An evaluator reading below the steered layer gets full passes (nothing to share)."""
    from ks_lens.evaluation import readout_groups

    evaluator = ks.train_probe(tiny_acts, 1, config=ProbeConfig(epochs=5, hidden=16, seed=1))
    vec = SteeringVectors.fit(tiny_acts, 2)

    def fail(*a, **k):
        raise AssertionError("resume_at must not be used")

    monkeypatch.setattr("ks_lens.evaluation.readouts.resume_at", fail)
    out = readout_groups(
        tiny_model, ["hi?", "why?"], [(CAA(vec), SteeringSpec(("beta",), (), 3.0))], probe=evaluator
    )
    base = readout(tiny_model, ["hi?", "why?"], probe=evaluator)
    torch.testing.assert_close(out[0].probs, base.probs)


def test_answers_scored_after_a_shared_question_equal_whole_rows(tiny_model, tiny_probe):
    """_score_answers runs each question once and the answers after its cached tokens: the
    response probe, NLL and KL equal whole-row passes, empty answers included, and a row's
    numbers do not depend on the rows batched with it."""
    from ks_lens.evaluation.answers import _score_answers
    from ks_lens.models.chat import ChatPrompt, encode_chat

    tok = tiny_model.tokenizer
    heads = [encode_chat(tok, ChatPrompt(q)) for q in ["Why is the sky blue?", "Hi?"]]
    g = torch.Generator().manual_seed(0)
    lengths = [5, 0, 3, 7, 1, 4, 0]
    answers = [torch.randint(3, 200, (t,), generator=g).tolist() for t in lengths]
    question_of = [0, 0, 1, 0, 1, 1, 1]
    vocab = int(tiny_model.cfg.d_vocab)
    steps = [t + (1 if i % 2 else 0) for i, t in enumerate(lengths)]  # some ended the turn
    step_logps = [torch.log_softmax(torch.randn(s, vocab, generator=g), -1) for s in steps]
    kw = dict(batch_size=2)
    shared = _score_answers(
        tiny_model, heads, answers, question_of, step_logps, tiny_probe, share_prefix=True, **kw
    )
    whole = _score_answers(
        tiny_model, heads, answers, question_of, step_logps, tiny_probe, share_prefix=False, **kw
    )
    alone = _score_answers(
        tiny_model, heads, answers, question_of, step_logps, tiny_probe, batch_size=1
    )
    torch.testing.assert_close(shared[0], whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[0], alone[0], atol=1e-6, rtol=1e-6)
    for a, b, c in zip(shared[1:3], whole[1:3], alone[1:3], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # nll, kl (nan where empty)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)
    assert shared[3] == whole[3] == steps
    assert math.isnan(shared[1][1]) and not math.isnan(shared[2][1])  # empty: no NLL, 1 KL step


@pytest.mark.parametrize(
    "rule, kw, message",
    [
        (VanishRule, {"floor": math.nan}, "vanish.floor must be a number between 0 and 1, got nan"),
        (VanishRule, {"floor": 2.0}, "vanish.floor must be a number between 0 and 1, got 2.0"),
        (VanishRule, {"reach": -1.0}, "vanish.reach must be a number between 0 and 1, got -1.0"),
        (VanishRule, {"floor": "0.1"}, "vanish.floor must be a number between 0 and 1, got '0.1'"),
        (VanishRule, {"floor": 0.6, "reach": 0.5}, r"vanish.floor \(0.6\) must not exceed"),
        (DegenerateRule, {"min_letters": -1}, "degenerate.min_letters must be a non-negative"),
        (DegenerateRule, {"min_words": 2.5}, "degenerate.min_words must be a non-negative"),
        (DegenerateRule, {"min_chars": True}, "degenerate.min_chars must be a non-negative"),
        (
            DegenerateRule,
            {"min_compression": math.nan},
            "degenerate.min_compression must be a number between 0 and 1, got nan",
        ),
        (DegenerateRule, {"min_letter_share": 1.5}, "degenerate.min_letter_share must be a"),
        (DegenerateRule, {"min_distinct2": math.inf}, "degenerate.min_distinct2 must be a"),
    ],
)
def test_rule_thresholds_are_validated(rule, kw, message):
    """A NaN floor never fires (the demo reported 'vanished 0/12' where the default rule gives
    12/12, and stored null); out-of-range thresholds are refused where the rule is made."""
    with pytest.raises(ks.ConfigError, match=message):
        rule(**kw)
    assert VanishRule(floor=0.0, reach=1.0).floor == 0.0  # the closed range is allowed


def test_readout_refuses_prompts_beyond_the_context_window(tiny_model, tiny_probe, monkeypatch):
    """Like generate, readout refuses a prompt longer than the context window before any
    forward pass (positions beyond it give garbage, and memory grows with the length)."""
    from ks_lens.steering import base

    calls = []
    monkeypatch.setattr(base, "steer_groups", lambda *a, **k: calls.append(1))
    long = "word " * 1100  # far beyond the tiny model's 2048 positions
    with pytest.raises(
        ks.ContextLengthError,
        match=r"prompt 2 of 2 has \d+ tokens, more than the model's context window of 2048",
    ):
        readout(tiny_model, ["short?", long], probe=tiny_probe)
    with pytest.raises(ks.ContextLengthError, match="the prompt has"):
        readout(tiny_model, [long], next_token=True)
    assert calls == []


def test_scoring_starts_at_the_steered_layer_and_equals_whole_passes(
    tiny_model, tiny_acts, tiny_probe, monkeypatch
):
    """Answers steered at layer 2 are scored by an unsteered pass that starts at layer 2 with
    the hidden states their generation computed below it (instructed rows, asked under another
    prompt, run whole); every number equals whole-row scoring."""
    from ks_lens.evaluation import answers, scoring
    from ks_lens.steering import CAA, KSteering, SteeringSpec, SteeringVectors

    caa = CAA(SteeringVectors.fit(tiny_acts, 2))
    k = KSteering(tiny_probe, steps=2)
    steerings = [
        None,
        (caa, SteeringSpec(("beta",), (), 3.0)),
        (k, SteeringSpec(("alpha",), (), 3.0)),
    ]
    qs = ["Why is the sky blue?", "Hi?"]
    rows = [(g, q) for q in range(2) for g in range(3)] + [(0, 1)]
    systems = [None] * 6 + ["Be brief."]
    resumed: list[int] = []
    real = answers.resume_at

    def counting(model, layer, hidden, as_tuple):
        resumed.append(hidden.shape[0])
        return real(model, layer, hidden, as_tuple)

    monkeypatch.setattr(answers, "resume_at", counting)
    kw = dict(response_probe=tiny_probe, max_new_tokens=5, batch_size=8, systems=systems)
    fast = scoring.generate_and_score_rows(tiny_model, qs, steerings, rows, **kw)
    assert sum(resumed) == 6  # every default-prompt answer, not the instructed one
    whole = scoring.generate_and_score_rows(
        tiny_model, qs, steerings, rows, share_prefix=False, **kw
    )
    assert fast.answer_ids == whole.answer_ids and sum(resumed) == 6
    torch.testing.assert_close(fast.probs, whole.probs, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(fast.nll, whole.nll, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast.kl, whole.kl, rtol=1e-4, atol=1e-4)
    assert len({tuple(a) for a in fast.answer_ids[:3]}) > 1  # the steering changed the answers


def test_stacked_cache_left_pads_each_rows_question(tiny_model):
    """Row b of the stacked cache holds its own question's keys and values, right aligned, zero
    (and masked) on the left; layers below from_layer hold zeros only."""
    from ks_lens.activations import prefix_pass, stacked_cache
    from ks_lens.models.chat import ChatPrompt, encode_chat

    tok = tiny_model.tokenizer
    ids = [encode_chat(tok, ChatPrompt(q)) for q in ["Hi?", "Why is the sky blue today?"]]
    short, long_ = (prefix_pass(tiny_model, i)[0] for i in ids)
    assert short is not None and long_ is not None and len(short) < len(long_)
    cache, mask = stacked_cache(tiny_model, [short, long_, short], from_layer=1)
    pad = len(long_) - len(short)
    assert mask.tolist() == [[0] * pad + [1] * len(short), [1] * len(long_), mask[0].tolist()]
    keys = cache.layers[1].keys
    assert keys.shape[0] == 3 and keys.shape[-2] == len(long_)
    torch.testing.assert_close(keys[0, :, pad:], short.kv[1][0][0], rtol=0, atol=0)
    torch.testing.assert_close(keys[1], long_.kv[1][0][0], rtol=0, atol=0)
    assert not keys[0, :, :pad].any() and not cache.layers[0].keys.any()
    with pytest.raises(ks.ConfigError, match="no prefixes"):
        stacked_cache(tiny_model, [])


def test_answers_to_several_questions_share_a_pass_and_questions_run_once(
    tiny_model, tiny_probe, monkeypatch
):
    """Chunks mix answers to different questions (left-padded question caches); a QuestionPasses
    kept across calls runs each question once in all; the numbers equal scoring every answer
    alone, and passes made with one model are refused for another."""
    import ks_lens.activations as acts
    from ks_lens.evaluation import QuestionPasses, scoring

    stacked: list[int] = []
    real_stack, real_pass = acts.stacked_cache, acts.prefix_pass
    ran: list[int] = []
    monkeypatch.setattr(
        acts, "stacked_cache", lambda m, p, **k: stacked.append(len(p)) or real_stack(m, p, **k)
    )
    monkeypatch.setattr(acts, "prefix_pass", lambda m, i, n=(): ran.append(1) or real_pass(m, i, n))
    qs = ["Hi?", "Why is the sky blue today?", "Name a river."]
    rows = [(0, 0), (0, 1), (0, 2), (0, 1)]
    kw = dict(response_probe=tiny_probe, max_new_tokens=4, batch_size=4)
    passes = QuestionPasses()
    first = scoring.generate_and_score_rows(tiny_model, qs, [None], rows, passes=passes, **kw)
    assert stacked and max(stacked) > 1 and len(ran) == 3 == len(passes)
    again = scoring.generate_and_score_rows(tiny_model, qs, [None], rows, passes=passes, **kw)
    assert len(ran) == 3  # every question's pass came from the store
    alone = scoring.generate_and_score_rows(
        tiny_model, qs, [None], rows, **{**kw, "batch_size": 1}
    )
    for other in (again, alone):
        assert other.answer_ids == first.answer_ids
        torch.testing.assert_close(other.probs, first.probs, atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(other.nll, first.nll, atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(other.kl, first.kl, atol=1e-6, rtol=1e-6)
    with pytest.raises(ks.ConfigError, match="another model"):
        passes.get(ks.load_model("tiny-random-llama"), [1, 2, 3], [])
    # a call's own store drops each question's pass once its last answer is scored
    dropped: list[int] = []
    real_discard = QuestionPasses.discard
    monkeypatch.setattr(
        QuestionPasses, "discard", lambda s, i, n: dropped.append(1) or real_discard(s, i, n)
    )
    scoring.generate_and_score_rows(tiny_model, qs, [None], rows, **kw)
    assert len(dropped) == 3
    head = scoring.encode_chat(tiny_model.tokenizer, scoring.ChatPrompt(qs[0]))
    passes.discard(head, [])  # not held: the passes read the probe's hook
    assert len(passes) == 3
    passes.discard(head, [tiny_probe.hook_name])
    assert len(passes) == 2


def test_steered_prefix_readout_equals_full_passes(tiny_model, tiny_acts, tiny_probe, monkeypatch):
    """Prompts that share a system prompt: with positions="all" the shared start runs once per
    configuration (steered) and each prompt only its own tokens; probabilities and next-token
    log-probs equal full passes, with ragged batches mixing configurations in one pass."""
    from ks_lens.evaluation import readout_groups
    from ks_lens.evaluation.shared_prefix import SteeredPrefix
    from ks_lens.models.chat import ChatPrompt
    from ks_lens.steering import KSteering

    evaluator = ks.train_probe(tiny_acts, 3, config=ProbeConfig(epochs=5, hidden=16, seed=1))
    vec = SteeringVectors.fit(tiny_acts, 2)
    system = "You are a careful assistant."
    prompts = [ChatPrompt(q, system) for q in ["hello?", "what is the weather like?", "why?"]]
    steerings = [
        (CAA(vec), SteeringSpec(("beta",), (), 3.0)),
        None,
        (KSteering(tiny_probe), SteeringSpec(("alpha", "gamma"), (), 2.0)),
    ]
    made: list[int] = []
    real_build = SteeredPrefix.build.__func__

    def counting(cls, reader, ids, batch_size):
        out = real_build(cls, reader, ids, batch_size)
        made.append(len(out) if out is not None else 0)
        return out

    monkeypatch.setattr(SteeredPrefix, "build", classmethod(counting))
    kw = dict(probe=evaluator, next_token=True, batch_size=2)
    shared = readout_groups(tiny_model, prompts, steerings, **kw)
    # the chat header and the system prompt, up to where the user's turn begins
    assert made and made[0] > len(system)
    full = readout_groups(tiny_model, prompts, steerings, share_lower_layers=False, **kw)
    for a, b in zip(shared, full, strict=True):
        torch.testing.assert_close(a.probs, b.probs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.next_logprobs, b.next_logprobs, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(shared[0].probs, shared[1].probs, atol=1e-3)  # steering acted
    # another position set does not share the start (its steering differs by position)
    made.clear()
    readout_groups(tiny_model, prompts, steerings, positions="last", **kw)
    assert made == []
    assert not any(hp._forward_hooks for hp in tiny_model.hook_dict.values())


def test_common_start():
    from ks_lens.evaluation.shared_prefix import common_start

    assert common_start([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == (1, 2)
    assert common_start([[7, 8, 9], [7, 8, 9]]) == (7, 8)  # each row keeps a token
    assert common_start([[1], [1, 2]]) == ()
    assert common_start([]) == ()
