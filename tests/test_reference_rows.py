"""The reference rows of a comparison: ``instructed`` (asked by system prompt) and
``ksteer_linear`` (K-Steering with a linear probe); hand-computed KL, prompts and shares."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from ks_lens.comparison import (
    METHODS,
    REFERENCE_METHODS,
    Answer,
    Cell,
    ComparisonConfig,
    ComparisonResult,
    SteeringKit,
    TextEvaluation,
    plan_comparison,
    summarise_combinations,
    summarise_text,
    trade_off,
)
from ks_lens.datasets import load_dataset
from ks_lens.errors import ConfigError, KsLensError
from ks_lens.evaluation import generate_and_score_rows, readout
from ks_lens.evaluation.instructed import (
    INSTRUCTED,
    MIN_INSTRUCTED_GAIN,
    check_instructions,
    instructed_fraction,
    instructed_readout,
    instructed_system,
)
from ks_lens.evaluation.stats import interpolate_at
from ks_lens.models.chat import ChatPrompt, encode_chat
from ks_lens.probes import ProbeConfig, train_probe
from ks_lens.steering import KSteering, SteeringVectors

# ----------------------------------------------------------------------------- the prompt


def test_instructed_system_prompt_for_one_two_three_targets():
    """The instructed row asks exactly what a combined behaviour's instruction says (the
    instructions joined in label order, as with_combinations joins them), whatever the
    order the targets come in."""
    ds = load_dataset("tones")
    ins = ds.instructions
    assert list(ins) == list(ds.labels) and ins["casual"] == ds.instruction("casual")
    combined = ds.with_combinations((2, 3))
    assert instructed_system(ins, ("casual",)) == ds.instruction("casual")
    two = instructed_system(ins, ("concise", "casual"))
    assert two == combined.instruction("casual+concise")
    assert two == ds.instruction("casual") + " " + ds.instruction("concise")
    three = instructed_system(ins, ("concise", "expert", "casual"))
    assert three == combined.instruction("expert+casual+concise")
    assert three == " ".join(ds.instruction(t) for t in ("expert", "casual", "concise"))
    with pytest.raises(ConfigError, match=r"no instruction for target\(s\) \['zany'\]"):
        instructed_system(ins, ("casual", "zany"))
    with pytest.raises(ConfigError, match="repeat a label"):
        instructed_system(ins, ("casual", "casual"))
    with pytest.raises(ConfigError, match="at least one target"):
        instructed_system(ins, ())
    with pytest.raises(ConfigError, match=r"none for \['concise'\]"):
        check_instructions({**ins, "concise": " "}, ds.labels)


# ----------------------------------------------------------------------------- KL accounting


def _logps(model, ids: Sequence[int], start: int, steps: int) -> torch.Tensor:
    """Next-token log-probs of one unbatched forward pass at positions start-1 .. start+steps-2."""
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)]))
    return torch.log_softmax(logits[0, start - 1 : start - 1 + steps].double(), -1)


def test_instructed_answer_kl_against_two_forward_passes(tiny_model):
    """An instructed answer's KL/token is KL(instructed || unsteered) of the next-token
    distributions along its tokens: the instructed side given instruction + question, the
    unsteered side given the question alone, computed here by two plain forward passes."""
    q = "How do I keep basil alive indoors?"
    system = "Answer like a pirate, with many arrs and nautical words. Be brief."
    n_new = 5
    scores = generate_and_score_rows(
        tiny_model,
        [q, "What causes ocean tides?"],
        [None],
        [(0, 0), (0, 1), (0, 0)],
        response_probe=None,
        max_new_tokens=n_new,
        batch_size=3,
        systems=[None, system, system],
    )
    tok = tiny_model.tokenizer
    for r, (qi, sys_prompt) in enumerate(((0, None), (1, system), (0, system))):
        question = [q, "What causes ocean tides?"][qi]
        answer = scores.answer_ids[r]
        steps = scores.kl_steps[r]
        assert steps in (len(answer), len(answer) + 1) and steps >= 1
        asked = encode_chat(tok, ChatPrompt(question, sys_prompt))
        plain = encode_chat(tok, ChatPrompt(question))
        p = _logps(tiny_model, asked + answer, len(asked), steps)  # the generating side
        u = _logps(tiny_model, plain + answer, len(plain), steps)  # the unsteered side
        # the answer is the greedy answer under its own prompt
        assert p[: len(answer)].argmax(-1).tolist() == list(answer)
        kl = float((p.exp() * (p - u)).sum(-1).mean())
        assert scores.kl[r] == pytest.approx(kl, rel=1e-3, abs=1e-6)
        nll = -float(u[: len(answer)].gather(-1, torch.tensor(answer)[:, None]).mean())
        if answer:
            assert scores.nll[r] == pytest.approx(nll, rel=1e-3)
    assert scores.kl[0] == pytest.approx(0.0, abs=1e-5)  # unsteered against itself
    assert scores.kl[2] > 1e-4  # the instruction moves the next-token distributions
    with pytest.raises(ConfigError, match="2 system prompts for 3 rows"):
        generate_and_score_rows(
            tiny_model, [q], [None], [(0, 0)] * 3, response_probe=None, systems=[None, None]
        )


def test_instructed_readout_equals_whole_prompt_passes(tiny_model, tiny_probe, tiny_dataset):
    """The activation-level instructed row (system prefix run once per instruction) equals the
    evaluator read on whole instruction + question prompts."""
    qs = ["How do I boil an egg?", "Why is the sky blue?", "What is a good way to start running?"]
    ins = tiny_dataset.instructions
    systems = [instructed_system(ins, c) for c in (("alpha",), ("beta", "gamma"))]
    got = instructed_readout(tiny_model, qs, systems, tiny_probe, batch_size=2)
    assert len(got) == 2 and all(g.shape == (3, 3) for g in got)
    for system, g in zip(systems, got, strict=True):
        want = readout(tiny_model, [ChatPrompt(q, system) for q in qs], probe=tiny_probe).probs
        np.testing.assert_allclose(g, want.double().numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- share of the gain


def test_instructed_fraction_hand_computed_and_withheld():
    pm = np.array([0.5, 0.7, 0.6])
    pu = np.array([0.1, 0.3, 0.2])
    pi = np.array([0.9, 0.7, 0.8])

    def at(idx: np.ndarray) -> float:
        return float(pm[idx].mean())

    frac, note = instructed_fraction(at, pu, pi, seed=0, n_resamples=200)
    assert note is None and frac is not None
    assert frac.estimate == pytest.approx((0.6 - 0.2) / (0.8 - 0.2))
    assert frac.low <= frac.estimate <= frac.high and frac.n == 3
    # no gain, a tiny gain, and a gain whose interval reaches 0: withheld with a reason
    for inst, why in (
        (pu, "is not above 0"),
        (pu - 0.1, "is not above 0"),
        (pu + MIN_INSTRUCTED_GAIN / 2, f"is below {MIN_INSTRUCTED_GAIN}"),
        (pu + np.array([0.3, -0.2, 0.0]), "its interval reaches below it"),
        # an interval above 0 but reaching below the threshold: resampled gains near 0 would
        # make the share's interval explode (seen in a debates report: [-0.08, 100909.59])
        (pu + np.array([0.05, 0.03, 0.005]), "its interval reaches below it"),
    ):
        frac, note = instructed_fraction(at, pu, inst, seed=0, n_resamples=200)
        assert frac is None and note is not None and why in note, note
        assert note.startswith("instructed gain ") and "no share of it is shown" in note


# ----------------------------------------------------------------------------- summaries


def _ans(method: str, q: int, targets: tuple[str, ...], factor: float, kl: float, p: float):
    probs = [0.0, 0.0]
    for t in targets:
        probs["ab".index(t)] = p
    return Answer(
        method, q, targets, factor, factor, "some text", 4, kl, 1.0, None, probs, None, {}
    )


def _text_eval(instructed_p: Sequence[float]) -> tuple[TextEvaluation, ComparisonConfig]:
    """Two questions, one cell each (target a): unsteered p 0.1, CAA along KL 0.1 -> p 0.2 and
    KL 0.4 -> p 0.6, instructed p as given at KL 0.05 / 0.15."""
    cells = [Cell(0, ("a",)), Cell(1, ("a",))]
    answers = [_ans("unsteered", q, ("a",), 0.0, 0.0, 0.1) for q in (0, 1)]
    for f, kl, p in ((0.5, 0.1, 0.2), (1.0, 0.4, 0.6)):
        answers += [_ans("caa_mean", q, ("a",), f, kl, p) for q in (0, 1)]
    answers += [
        _ans(INSTRUCTED, q, ("a",), 0.0, kl, p)
        for q, kl, p in zip((0, 1), (0.05, 0.15), instructed_p, strict=True)
    ]
    te = TextEvaluation(
        ("a", "b"), ["q0", "q1"], cells, {"caa_mean": {1: 1.0}}, (0.5, 1.0), answers, ("text",)
    )
    cfg = ComparisonConfig(
        methods=("caa_mean",), sizes=(1,), kl_budget=0.2, curve_factors=(0.5, 1.0), n_resamples=100
    )
    return te, cfg


def test_text_summaries_curves_and_equal_kl_carry_the_instructed_row():
    te, cfg = _text_eval([0.5, 0.7])
    rows = {r.method: r for r in summarise_text(te, cfg)}
    ins = rows[INSTRUCTED]
    assert ins.target_prob.estimate == pytest.approx(0.6) and ins.alpha == 0.0
    assert ins.kl.estimate == pytest.approx(0.1)  # mean of its answers' own KL
    assert ins.diff_vs_baseline.estimate == pytest.approx(0.0)  # CAA's 0.6 at its alpha
    caa = rows["caa_mean"]
    # (0.6 - 0.1) / (0.6 - 0.1) at the calibrated alpha
    assert caa.instructed_fraction.estimate == pytest.approx(1.0) and caa.instructed_note is None
    assert rows["unsteered"].instructed_fraction is None
    curves, equal = trade_off(te, cfg)
    point = [c for c in curves if c.method == INSTRUCTED]
    assert len(point) == 1 and (point[0].factor, point[0].alpha) == (0.0, 0.0)
    assert point[0].kl.estimate == pytest.approx(0.1) and point[0].n_answers == 2
    by = {e.method: e for e in equal}
    assert by[INSTRUCTED].kl == pytest.approx(0.1) and by[INSTRUCTED].diff_vs_baseline is None
    want = interpolate_at([0.1, 0.4], [0.2, 0.6], 0.2)  # CAA at equal KL 0.2
    assert by["caa_mean"].target_prob.estimate == pytest.approx(want)
    assert by["caa_mean"].instructed_fraction.estimate == pytest.approx((want - 0.1) / 0.5)
    assert by[INSTRUCTED].instructed_fraction is None
    combos = summarise_combinations(te, cfg)
    assert [r.method for r in combos] == ["unsteered", INSTRUCTED, "caa_mean"]
    assert combos[1].target_prob == pytest.approx(0.6)


def test_no_share_when_asking_does_not_help_and_the_report_says_so():
    from ks_lens.report import equal_kl_table, instructed_notes, summary_table

    te, cfg = _text_eval([0.1, 0.05])  # asking does nothing (or worse)
    rows = summarise_text(te, cfg)
    caa = next(r for r in rows if r.method == "caa_mean")
    assert caa.instructed_fraction is None and "is not above 0" in caa.instructed_note
    table = summary_table(rows, text=True)
    assert "share of instructed gain" in table and "n/a*" in table
    assert "| Instructed (system prompt) | 1 | — |" in table
    notes = instructed_notes(rows)
    assert len(notes) == 1 and notes[0].startswith("\\* k=1: instructed gain -0.025")
    _, equal = trade_off(te, cfg)
    eq = equal_kl_table(equal)
    assert "n/a*" in eq and "0.100 (own)" in eq and "(reference, no alpha)" in eq
    # a clear instructed gain: the share is shown, no note
    te, cfg = _text_eval([0.5, 0.7])
    shown = summary_table(summarise_text(te, cfg), text=True)
    # per question (0.6 - 0.1) / (0.5 - 0.1) = 1.25 and / (0.7 - 0.1) = 0.83; both: 0.5 / 0.5
    assert "1.00 [0.83, 1.25]" in shown and "n/a*" not in shown


# ----------------------------------------------------------------------------- ksteer_linear


def test_ksteer_linear_builds_from_the_linear_probe_and_steers(tiny_acts, tiny_probe):
    """ksteer_linear is K-Steering with the kit's linear probe: one step moves every token by
    the same vector, alpha x the gradient of the target logit (a linear probe's gradient does
    not depend on x), and the probe's target logit rises."""
    assert "ksteer_linear" in REFERENCE_METHODS
    linear = train_probe(tiny_acts, 2, config=ProbeConfig(architecture="linear", epochs=5))
    assert len(linear.linears) == 1 and linear.hook_name == tiny_probe.hook_name
    vec = SteeringVectors.fit(tiny_acts, 2)
    with pytest.raises(ConfigError, match="needs a linear steering probe"):
        METHODS["ksteer_linear"].build(SteeringKit(tiny_probe, vec))
    steerer = METHODS["ksteer_linear"].build(SteeringKit(tiny_probe, vec, linear_probe=linear))
    assert isinstance(steerer, KSteering) and steerer.probe is linear
    x = tiny_acts[2][:4].float()
    alpha = 0.7
    x_new = steerer.apply(x, target="alpha", alpha=alpha)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(linear(xg)[:, linear.label_indices(["alpha"])].sum(), xg)
    torch.testing.assert_close(x_new - x, alpha * grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, grad[:1].expand_as(grad))  # the same step for every token
    t = linear.label_indices(["alpha"])
    assert bool((linear(x_new)[:, t] > linear(x)[:, t]).all())


# ----------------------------------------------------------------------------- records


def _synthetic(instructed: bool) -> dict:
    """A complete result on labels a, b (text level only) with or without the instructed row."""
    from ks_lens.calibration import Calibration

    cfg = ComparisonConfig(
        methods=("caa_mean",),
        sizes=(1, 2),
        curve_factors=(0.5, 1.0),
        n_resamples=50,
        instructed=instructed,
    )
    plan = plan_comparison(("a", "b"), cfg, n_calib=1, n_test=2)
    answers = [
        Answer("unsteered", q, (), 0.0, 0.0, "plain", 3, math.nan, 1.0, None, [0.2, 0.2], None, {})
        for q in (0, 1)
    ]
    for f in cfg.curve_factors:
        for c in plan.gen_cells:
            p = [0.2 + 0.4 * f * (t in c.targets) for t in "ab"]
            answers.append(
                Answer(
                    "caa_mean", c.question, c.targets, f, f, "x", 4, 0.3 * f, 1.2, None, p, None, {}
                )
            )
    if instructed:
        for c in plan.gen_cells:
            p = [0.2 + 0.5 * (t in c.targets) for t in "ab"]
            answers.append(
                Answer(
                    INSTRUCTED, c.question, c.targets, 0.0, 0.0, "y", 4, 0.1, 1.1, None, p, None, {}
                )
            )
    alphas = {"caa_mean": {1: 1.0, 2: 2.0}}
    text = TextEvaluation(
        ("a", "b"), ["q0?", "q1?"], plan.gen_cells, alphas, (0.5, 1.0), answers, ("text",)
    )
    calib = {
        "caa_mean": {k: Calibration(a, 0.5, 0.4, [(a, 0.4)]) for k, a in alphas["caa_mean"].items()}
    }
    res = ComparisonResult(cfg, plan, calib, None, text, [], [], [], 1, 2, 2)
    return json.loads(json.dumps(res.to_json()))


def test_instructed_rows_round_trip_and_are_checked():
    doc = _synthetic(True)
    res = ComparisonResult.from_json(doc)
    assert {(r.method, r.k) for r in res.summaries if r.method == INSTRUCTED} == {
        (INSTRUCTED, 1),
        (INSTRUCTED, 2),
    }
    assert any(e.method == INSTRUCTED for e in res.equal_kl)
    again = json.loads(json.dumps(res.to_json()))
    assert json.dumps(ComparisonResult.from_json(again).to_json()) == json.dumps(again)
    assert again["method_labels"][INSTRUCTED] == "Instructed (system prompt)"
    shares = [r["instructed_fraction"] for r in again["summaries"] if r["method"] == "caa_mean"]
    assert all(s is not None for s in shares)  # gain 0.5 vs CAA's 0.4: share 0.8
    assert [s["estimate"] for s in shares] == pytest.approx([0.8, 0.8])  # (0.6-0.2)/(0.7-0.2)
    # a result written before the row existed (no "instructed" setting) loads without it
    old = _synthetic(False)
    del old["comparison_config"]["instructed"]
    assert ComparisonResult.from_json(old).config.instructed is False
    # instructed answers where the settings have none, and missing ones where they ask
    with pytest.raises(KsLensError, match=r"hold 2 instructed answers; .*need one per cell"):
        bad = json.loads(json.dumps(doc))
        bad["text_eval"]["answers"] = bad["text_eval"]["answers"][:-2]
        ComparisonResult.from_json(bad)
    with pytest.raises(KsLensError, match=r"\(instructed false\) allow none"):
        bad = json.loads(json.dumps(doc))
        bad["comparison_config"]["instructed"] = False
        ComparisonResult.from_json(bad)
    with pytest.raises(KsLensError, match="instructed must be true or false"):
        bad = json.loads(json.dumps(doc))
        bad["comparison_config"]["instructed"] = "yes"
        ComparisonResult.from_json(bad)


def test_run_comparison_needs_instructions_for_the_instructed_row(
    tiny_model, tiny_acts, tiny_probe
):
    from ks_lens.comparison import run_comparison

    kw = dict(
        probe=tiny_probe,
        vectors=SteeringVectors.fit(tiny_acts, 2),
        evaluator=tiny_probe,
        text_evaluator=None,
        calib_questions=["x?"],
        test_questions=["y?"],
        progress=False,
    )
    with pytest.raises(
        ConfigError, match="instructed reference row .* needs the labels' instructions"
    ):
        run_comparison(tiny_model, config=ComparisonConfig(methods=("caa_mean",)), **kw)
    with pytest.raises(
        ConfigError, match=r"needs an instruction for every label; none for \['gamma'\]"
    ):
        run_comparison(
            tiny_model,
            config=ComparisonConfig(methods=("caa_mean",)),
            instructions={"alpha": "Arr.", "beta": "Be brief."},
            **kw,
        )


def test_report_renders_the_reference_row_and_the_share(tmp_path):
    from ks_lens.report import render_summary, write_report

    res = ComparisonResult.from_json(_synthetic(True))
    paths = write_report(res, {"command": "test"}, tmp_path)
    md = paths["markdown"].read_text()
    assert "| Instructed (system prompt) | 1 | — |" in md  # summary row, no alpha
    assert "share of instructed gain" in md and "0.80 [0.80, 0.80]" in md
    assert "- reference, text, k=1: asked by system prompt 0.700 [0.700, 0.700]" in md
    assert "| Instructed (system prompt) | 1 | 0.100 (own) |" in md  # equal-KL: its own KL
    assert "- share of instructed gain: (p_method - p_unsteered)" in md
    assert paths["text_tradeoff"].stat().st_size > 1000
    text = render_summary(res)
    ref = "k=1 Instructed (system prompt) 0.700 [0.700, 0.700]  (reference, at its own KL 0.100)"
    assert ref in text
    # CAA at the equal-KL level: 0.5, so (0.5 - 0.2) / (0.7 - 0.2)
    assert "k=1 CAA (mean)             0.500 [0.500, 0.500]; share of instructed gain 0.60" in text
