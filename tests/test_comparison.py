"""The comparison's stages and records: planning, summaries (hand-computed), equal-KL curves,
and an end-to-end run on the tiny model."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest

from ks_lens.comparison import (
    ActivationEvaluation,
    Answer,
    Cell,
    ComparisonConfig,
    ComparisonPlan,
    ComparisonResult,
    TextEvaluation,
    label_combinations,
    plan_comparison,
    rotate_cells,
    run_comparison,
    summarise_activations,
    summarise_combinations,
    summarise_text,
    trade_off,
)
from ks_lens.comparison.checks import _check_text_records
from ks_lens.datasets.coverage import coverage_counts
from ks_lens.errors import StoreError
from ks_lens.evaluation.stats import interpolate_at
from ks_lens.probes import ProbeConfig, train_probe
from ks_lens.steering import SteeringVectors


def test_rotate_cells_balances_combinations():
    combos = label_combinations(list("abcdef"), (2,))  # 15 pairs
    cells = rotate_cells(30, combos, 2, seed=0)
    assert len(cells) == 60 and {c.question for c in cells} == set(range(30))
    counts = Counter(c.targets for c in cells)
    assert set(counts) == set(combos) and set(counts.values()) == {4}
    assert rotate_cells(30, combos, 2, seed=0) == cells
    assert rotate_cells(30, combos, 2, seed=1) != cells
    # a question never gets the same combination twice
    for q in range(30):
        mine = [c.targets for c in cells if c.question == q]
        assert len(mine) == len(set(mine))


def test_plan_uses_every_size_and_validates():
    cfg = ComparisonConfig(gen_combos_per_question=1, act_combos_per_size=None)
    plan = plan_comparison(list("abcdef"), cfg, n_calib=5, n_test=7)
    assert Counter(len(c) for c in plan.act_combos) == {1: 6, 2: 15, 3: 20}
    assert Counter(len(c.targets) for c in plan.gen_cells) == {1: 7, 2: 7, 3: 7}
    assert Counter(len(c.targets) for c in plan.calib_cells) == {1: 5, 2: 5, 3: 5}
    with pytest.raises(ValueError, match="unknown method"):
        ComparisonConfig(methods=("magic",)).validate()
    with pytest.raises(ValueError, match="baseline"):
        ComparisonConfig(methods=("ksteer",)).validate()
    with pytest.raises(ValueError, match=r"include 1\.0"):
        ComparisonConfig(curve_factors=(0.5, 2.0)).validate()
    with pytest.raises(ValueError, match="kl_budget"):
        ComparisonConfig(kl_budget=float("nan")).validate()
    with pytest.raises(ValueError, match="unknown avoid label"):
        ComparisonConfig(avoid=("zzz",)).validate(["a", "b"])


def test_plan_all_combinations_covers_every_combination():
    cfg = ComparisonConfig(text_coverage="all-combinations", avoid=("f",))
    plan = plan_comparison(list("abcdef"), cfg, n_calib=5, n_test=7)
    per_combo, per_question = coverage_counts([(c.question, c.targets) for c in plan.gen_cells])
    pool = list("abcde")  # the avoided label is never a target
    assert set(per_combo) == set(label_combinations(pool, (1, 2, 3)))
    assert min(per_combo.values()) >= 2
    assert {k: sum(v.values()) for k, v in per_question.items()} == {1: 10, 2: 20, 3: 20}
    # the default coverage is unchanged: one combination per size and question, rotating
    default = plan_comparison(list("abcdef"), ComparisonConfig(), n_calib=5, n_test=7)
    assert default.gen_cells == [
        c
        for k in (1, 2, 3)
        for c in rotate_cells(7, label_combinations(list("abcdef"), (k,)), 1, 100 + k)
    ]
    with pytest.raises(ValueError, match="but there are only 1"):
        plan_comparison(list("abcdef"), cfg, n_calib=5, n_test=1)
    with pytest.raises(ValueError, match="unknown text_coverage"):
        ComparisonConfig(text_coverage="most").validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_questions_per_combination must be at least 1"):
        ComparisonConfig(min_questions_per_combination=0).validate()


def test_summarise_combinations_hand_computed():
    cells = [Cell(0, ("a",)), Cell(1, ("a",)), Cell(0, ("a", "b")), Cell(1, ("a", "b"))]
    answers = [_answer("unsteered", q, ("a",), 0.0, 0.0, 0.1) for q in (0, 1)]
    answers += [_answer("caa_mean", q, ("a",), 1.0, 0.3, p) for q, p in ((0, 0.4), (1, 0.6))]
    answers += [_answer("caa_mean", q, ("a", "b"), 1.0, 0.3, 0.7) for q in (0, 1)]
    answers[-1].text_probs = [0.9, 0.05]  # question 1: b vanished under the 0.1 / 0.5 rule
    answers += [_answer("caa_mean", 0, ("a",), 0.5, 0.1, 0.2)]  # another alpha: not counted
    te = TextEvaluation(
        ("a", "b"),
        ["q0", "q1"],
        cells,
        {"caa_mean": {1: 1.0, 2: 1.0}},
        (0.5, 1.0),
        answers,
        ("text",),
    )
    rows = summarise_combinations(te, ComparisonConfig(methods=("caa_mean",), sizes=(1, 2)))
    got = [(r.method, r.targets, r.n_questions, r.n_cells) for r in rows]
    assert got == [
        ("unsteered", ("a",), 2, 2),
        ("unsteered", ("a", "b"), 2, 2),
        ("caa_mean", ("a",), 2, 2),
        ("caa_mean", ("a", "b"), 2, 2),
    ]
    by = {(r.method, r.targets): r for r in rows}
    assert by[("caa_mean", ("a",))].target_prob == pytest.approx(0.5)
    assert by[("caa_mean", ("a",))].vanish_rate is None
    ab = by[("caa_mean", ("a", "b"))]
    assert ab.target_prob == pytest.approx((0.7 + 0.475) / 2)
    assert ab.min_target_prob == pytest.approx((0.7 + 0.05) / 2)
    assert (ab.vanish_rate, ab.n_vanished) == (0.5, 1)
    un = by[("unsteered", ("a", "b"))]  # the unsteered answer (a=0.1, b=0) on both questions
    assert (un.target_prob, un.min_target_prob, un.n_vanished) == (0.05, 0.0, 0)


def _act_eval() -> ActivationEvaluation:
    labels = ("a", "b", "c")
    base = np.array([[0.1, 0.2, 0.3], [0.2, 0.2, 0.2]])
    combos = [("a",), ("a", "b")]
    probs = {
        "caa_mean": [
            np.array([[0.5, 0, 0], [0.7, 0, 0]]),
            np.array([[0.9, 0.05, 0], [0.4, 0.4, 0]]),
        ],
        "ksteer": [np.array([[0.6, 0, 0], [0.9, 0, 0]]), np.array([[0.8, 0.6, 0], [0.6, 0.5, 0]])],
    }
    return ActivationEvaluation(
        labels, combos, {"caa_mean": {1: 1.0, 2: 2.0}, "ksteer": {1: 3.0, 2: 4.0}}, base, probs
    )


def test_summarise_activations_hand_computed():
    cfg = ComparisonConfig(methods=("caa_mean", "ksteer"), sizes=(1, 2), n_resamples=200)
    rows = {(r.method, r.k): r for r in summarise_activations(_act_eval(), cfg)}
    # k=1: per question target prob: caa [0.5, 0.7] -> 0.6; ksteer [0.6, 0.9] -> 0.75
    assert rows[("caa_mean", 1)].target_prob.estimate == pytest.approx(0.6)
    assert rows[("ksteer", 1)].target_prob.estimate == pytest.approx(0.75)
    assert rows[("ksteer", 1)].diff_vs_baseline.estimate == pytest.approx(0.15)
    assert rows[("unsteered", 1)].target_prob.estimate == pytest.approx(0.15)
    # normalised gain, ksteer k=1: q0 (0.6-0.1)/0.9, q1 (0.9-0.2)/0.8
    assert rows[("ksteer", 1)].gain.estimate == pytest.approx(((0.5 / 0.9) + (0.7 / 0.8)) / 2)
    # k=2 targets (a, b): caa q0 [0.9, 0.05] -> vanished (b < 0.1, a >= 0.5); q1 [0.4, 0.4] -> not
    assert rows[("caa_mean", 2)].n_vanished == 1 and rows[("caa_mean", 2)].n_cells == 2
    assert rows[("ksteer", 2)].n_vanished == 0
    assert rows[("caa_mean", 2)].min_target_prob.estimate == pytest.approx((0.05 + 0.4) / 2)
    assert rows[("ksteer", 2)].vanish_test.only_b == 1  # caa vanished where ksteer did not
    # clustered by question: k=1 units (ksteer - caa) 0.1, 0.2; the 4 sign patterns give
    # +-0.3, +-0.1, so p = 2 x 1/4
    t1 = rows[("ksteer", 1)].diff_test
    assert (t1.n_questions, t1.p_value, t1.exact) == (2, 0.5, True)
    assert t1.diff.estimate == pytest.approx(rows[("ksteer", 1)].diff_vs_baseline.estimate)
    # vanished, k=2: ksteer 0, 0 vs caa 1, 0 per question: units -1, 0 -> p = 2 x 2/4 = 1
    v2 = rows[("ksteer", 2)].vanish_cluster_test
    assert (v2.mean_a, v2.mean_b, v2.p_value, v2.n_cells) == (0.0, 0.5, 1.0, 2)
    assert rows[("caa_mean", 2)].vanish_cluster_test is None  # the baseline itself
    assert rows[("caa_mean", 2)].diff_vs_baseline is None  # the baseline itself
    assert rows[("ksteer", 2)].alpha == 4.0


def _answer(
    method: str, q: int, targets: Sequence[str], factor: float, kl: float, p: float
) -> Answer:
    probs = [0.0, 0.0]
    for t in targets:
        probs["ab".index(t)] = p
    return Answer(
        method,
        q,
        tuple(targets),
        factor,
        factor,
        "some text here",
        5,
        kl,
        1.0,
        None,
        probs,
        None,
        {},
    )


def test_trade_off_reads_curves_at_equal_kl():
    cells = [Cell(0, ("a",)), Cell(1, ("a",))]
    answers = [_answer("unsteered", q, ("a",), 0.0, 0.0, 0.1) for q in (0, 1)]
    # caa: KL 0.1 -> p 0.2, KL 0.4 -> p 0.6 ; ksteer: KL 0.05 -> 0.3, KL 0.8 -> 0.9 (same for both questions)
    for f, kl, p in ((0.5, 0.1, 0.2), (1.0, 0.4, 0.6)):
        answers += [_answer("caa_mean", q, ("a",), f, kl, p) for q in (0, 1)]
    for f, kl, p in ((0.5, 0.05, 0.3), (1.0, 0.8, 0.9)):
        answers += [_answer("ksteer", q, ("a",), f, kl, p) for q in (0, 1)]
    te = TextEvaluation(
        ("a", "b"),
        ["q0", "q1"],
        cells,
        {"caa_mean": {1: 1.0}, "ksteer": {1: 1.0}},
        (0.5, 1.0),
        answers,
        ("text",),
    )
    cfg = ComparisonConfig(
        methods=("caa_mean", "ksteer"),
        sizes=(1,),
        kl_budget=0.2,
        curve_factors=(0.5, 1.0),
        n_resamples=100,
    )
    curves, equal = trade_off(te, cfg)
    assert len(curves) == 4
    by = {e.method: e for e in equal}
    want_caa = interpolate_at([0.1, 0.4], [0.2, 0.6], 0.2)
    want_ks = interpolate_at([0.05, 0.8], [0.3, 0.9], 0.2)
    assert by["caa_mean"].target_prob.estimate == pytest.approx(want_caa)
    assert by["ksteer"].target_prob.estimate == pytest.approx(want_ks)
    assert by["ksteer"].diff_vs_baseline.estimate == pytest.approx(want_ks - want_caa)
    # a KL level beyond a curve: compared inside the KL range both curves reach, never
    # extrapolated
    far_cfg = ComparisonConfig(
        methods=("caa_mean", "ksteer"),
        sizes=(1,),
        kl_budget=5.0,
        curve_factors=(0.5, 1.0),
        n_resamples=50,
    )
    _, far = trade_off(te, far_cfg)
    fb = {e.method: e for e in far}
    lvl = math.sqrt(0.1 * 0.4)  # inside caa's (the shorter curve's) last segment
    assert fb["ksteer"].kl == pytest.approx(lvl) and fb["caa_mean"].kl == pytest.approx(lvl)
    want_caa = interpolate_at([0.1, 0.4], [0.2, 0.6], lvl)
    assert fb["caa_mean"].target_prob.estimate == pytest.approx(want_caa)
    assert fb["ksteer"].diff_vs_baseline.estimate == pytest.approx(
        interpolate_at([0.05, 0.8], [0.3, 0.9], lvl) - want_caa
    )
    rows = {r.method: r for r in summarise_text(te, cfg)}
    assert rows["ksteer"].target_prob.estimate == pytest.approx(0.9)
    assert rows["ksteer"].kl.estimate == pytest.approx(0.8)
    assert rows["unsteered"].target_prob.estimate == pytest.approx(0.1)


class _FakeTextEvaluator:
    """A deterministic stand-in for the text evaluator (labels of the tiny dataset)."""

    label_names = ("alpha", "beta", "gamma")

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([[len(t) % 7 / 7, len(t.split()) % 5 / 5, 0.5] for t in texts])


def test_run_comparison_end_to_end_on_tiny(tiny_model, tiny_acts, tiny_probe, tiny_dataset):
    vec = SteeringVectors.fit(tiny_acts, 2)
    evaluator = train_probe(tiny_acts, 3, config=ProbeConfig(hidden=16, epochs=3, seed=1))
    linear = train_probe(tiny_acts, 2, config=ProbeConfig(architecture="linear", epochs=3))
    cfg = ComparisonConfig(
        methods=("caa_mean", "ksteer", "ksteer_linear"),
        kl_budget=0.05,
        act_combos_per_size=2,
        max_new_tokens=3,
        calib_tokens=3,
        calib_bisect_steps=1,
        n_resamples=100,
    )
    res = run_comparison(
        tiny_model,
        probe=tiny_probe,
        vectors=vec,
        evaluator=evaluator,
        text_evaluator=_FakeTextEvaluator(),
        response_evaluator=tiny_probe,
        calib_questions=["hi?", "yo?"],
        test_questions=["a?", "b?", "c?"],
        text_questions=["a?", "b?"],
        config=cfg,
        progress=False,
        linear_probe=linear,
        instructions=tiny_dataset.instructions,
    )
    assert isinstance(res, ComparisonResult)
    assert set(res.alphas) == {"caa_mean", "ksteer", "ksteer_linear"}
    assert set(res.alphas["ksteer"]) == {1, 2, 3}
    te = res.text
    assert te is not None
    n_cells = len(res.plan.gen_cells)
    assert n_cells == 2 * 3  # 2 text questions x one combination per size
    # unsteered + methods x alphas x cells + one instructed answer per cell
    assert len(te.answers) == 2 + 3 * len(cfg.curve_factors) * n_cells + n_cells
    instructed = [a for a in te.answers if a.method == "instructed"]
    assert [(a.question, a.targets) for a in instructed] == [
        (c.question, c.targets) for c in res.plan.gen_cells
    ]
    assert all(a.factor == 0.0 and a.alpha == 0.0 and a.kl >= 0 for a in instructed)
    steered = [a for a in te.answers if a.method not in ("unsteered", "instructed")]
    assert {a.factor for a in steered} == set(cfg.curve_factors)
    for a in steered:
        assert a.alpha == pytest.approx(res.alphas[a.method][len(a.targets)] * a.factor)
    assert {r.lens for r in res.summaries} == {"activation", "text", "text_activation"}
    assert {(r.lens, r.k) for r in res.summaries if r.method == "instructed"} == {
        (lens, k) for lens in ("activation", "text", "text_activation") for k in (1, 2, 3)
    }
    assert res.activation is not None and res.activation.instructed is not None
    assert len(res.activation.instructed) == len(res.plan.act_combos)
    # lenses x k x (methods x alphas + the instructed point)
    assert len(res.curves) == 2 * 3 * (3 * len(cfg.curve_factors) + 1)
    assert {(e.lens, e.method, e.k) for e in res.equal_kl} == {
        (lens, m, k)
        for lens in ("text", "text_activation")
        for m in (*cfg.methods, "instructed")
        for k in (1, 2, 3)
    }
    doc = json.loads(json.dumps(res.to_json()))  # what report.json holds
    again = ComparisonResult.from_json(doc)  # summaries recomputed from the stored records
    assert json.dumps(again.to_json()) == json.dumps(doc)
    assert doc["text_eval"]["answers"][0]["method"] == "unsteered"
    with pytest.raises(ValueError, match="differ from the steering probe"):
        bad = _FakeTextEvaluator()
        bad.label_names = ("x", "y", "z")
        run_comparison(
            tiny_model,
            probe=tiny_probe,
            vectors=vec,
            evaluator=evaluator,
            text_evaluator=bad,
            calib_questions=["x?"],
            test_questions=["y?"],
            progress=False,
        )
    with pytest.raises(ValueError, match="at or after the steering layer"):
        run_comparison(
            tiny_model,
            probe=evaluator,
            vectors=vec,
            evaluator=tiny_probe,
            text_evaluator=None,
            calib_questions=["x?"],
            test_questions=["y?"],
            progress=False,
        )


def test_normalised_gain_and_common_level():
    from ks_lens.comparison.curves import _common_level
    from ks_lens.comparison.summary import normalised_gain

    g = normalised_gain(np.array([0.6, 0.2, 0.5, 0.0]), np.array([0.2, 0.8, 0.5, 0.5]))
    np.testing.assert_allclose(g, [0.5, -0.75, 0.0, -1.0])  # room gained / share lost
    assert np.all(np.abs(normalised_gain(np.random.rand(50), np.random.rand(50))) <= 1)
    ranges = {"a": [0.1, 0.2, 0.4], "b": [0.05, 0.8], "c": [0.5, 0.9]}
    assert _common_level(ranges, ["a", "b"], 0.2) == 0.2
    # beyond a's curve: inside a's last segment (geometric middle of 0.2 and 0.4)
    assert _common_level(ranges, ["a", "b"], 0.6) == pytest.approx(math.sqrt(0.08))
    # below c's curve: inside c's first segment
    assert _common_level(ranges, ["b", "c"], 0.2) == pytest.approx(math.sqrt(0.45))
    assert math.isnan(_common_level(ranges, ["a", "c"], 0.2))  # no overlap


def test_merge_results_pairs_runs_and_multilayer_method(
    tiny_model, tiny_acts, tiny_probe, tiny_dataset
):
    from ks_lens.comparison import merge_results, method_label

    vec = SteeringVectors.fit(tiny_acts, 2)
    evaluator = train_probe(tiny_acts, 3, config=ProbeConfig(hidden=16, epochs=3, seed=1))
    layer1 = train_probe(tiny_acts, 1, config=ProbeConfig(hidden=16, epochs=3, seed=2))
    base = ComparisonConfig(
        methods=("caa_mean", "ksteer"),
        kl_budget=0.05,
        act_combos_per_size=1,
        sizes=(1, 2),
        max_new_tokens=3,
        calib_tokens=3,
        calib_bisect_steps=1,
        n_resamples=50,
    )

    def run(**kw):
        return run_comparison(
            tiny_model,
            probe=tiny_probe,
            vectors=vec,
            evaluator=evaluator,
            text_evaluator=_FakeTextEvaluator(),
            layer_probes={1: layer1, 2: tiny_probe},
            calib_questions=["hi?", "yo?"],
            test_questions=["a?", "b?"],
            config=replace(base, **kw),
            progress=False,
            instructions=tiny_dataset.instructions,
        )

    a = run()
    b = run(methods=("caa_mean", "ksteer_multilayer"), positions="generated")
    merged = merge_results({"all": a, "gen": b}, baseline="caa_mean@all")
    assert merged.config.methods == (
        "caa_mean@all",
        "ksteer@all",
        "caa_mean@gen",
        "ksteer_multilayer@gen",
    )
    assert method_label("ksteer_multilayer@gen") == "K-Steer multi-layer [gen]"
    te = merged.text
    assert te is not None
    n_un = sum(x.method == "unsteered" for x in te.answers)
    n_ins = sum(x.method == "instructed" for x in te.answers)
    assert n_ins == len(a.plan.gen_cells)  # the reference row once, not once per run
    assert n_un == 2 and len(te.answers) == n_un + n_ins + sum(
        len([x for x in r.text.answers if x.method not in ("unsteered", "instructed")])
        for r in (a, b)
    )
    assert merged.activation is not None and merged.activation.instructed is not None
    # per-method summaries at the calibrated alpha are those of the separate runs
    own = {(r.lens, r.method, r.k): r.target_prob.estimate for r in a.summaries}
    for r in merged.summaries:
        if r.method == "ksteer@all":
            assert r.target_prob.estimate == pytest.approx(own[(r.lens, "ksteer", r.k)])
    assert any(
        r.diff_vs_baseline is not None for r in merged.summaries if r.method.endswith("@gen")
    )
    doc = json.loads(json.dumps(merged.to_json()))
    assert ComparisonResult.from_json(doc).config.methods == merged.config.methods
    with pytest.raises(ValueError, match="baseline"):
        merge_results({"all": a}, baseline="caa_mean")
    no_ref = run(instructed=False)
    with pytest.raises(ValueError, match="differ in the instructed reference row"):
        merge_results({"all": a, "plain": no_ref}, baseline="caa_mean@all")
    c = run(sizes=(1,))
    with pytest.raises(ValueError, match="another plan"):
        merge_results({"all": a, "c": c}, baseline="caa_mean@all")
    with pytest.raises(ValueError, match="two or more layers"):
        run_comparison(
            tiny_model,
            probe=tiny_probe,
            vectors=vec,
            evaluator=evaluator,
            text_evaluator=None,
            calib_questions=["x?"],
            test_questions=["y?"],
            config=replace(base, methods=("caa_mean", "ksteer_multilayer"), instructed=False),
            progress=False,
        )


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            {"sizes": (1, 1)},
            r"sizes \[1, 1\] repeat \[1\]: each number of targets is evaluated once",
        ),
        ({"sizes": ()}, "sizes must name at least one number of targets"),
        ({"sizes": (0, 1)}, r"sizes must be at least 1 .*got \[0, 1\]"),
        ({"n_resamples": 0}, "n_resamples must be a positive number of bootstrap resamples, got 0"),
        ({"n_resamples": -5}, "n_resamples must be a positive number"),
        ({"act_combos_per_size": 0}, "act_combos_per_size must be positive"),
        ({"calib_bisect_steps": -1}, "calib_bisect_steps must be >= 0"),
        ({"kl_budget": "0.5"}, "comparison setting kl_budget must be a number, got '0.5'"),
        ({"sizes": (1.5,)}, "comparison setting sizes must be whole numbers"),
        ({"n_resamples": True}, "comparison setting n_resamples must be a whole number"),
    ],
)
def test_comparison_settings_are_checked_before_compute(kw, message):
    """--sizes 1,1 double-counted every k=1 row; --n-resamples 0 and --sizes "" ran everything
    and then failed in scipy / the plot."""
    with pytest.raises(ValueError, match=message):
        ComparisonConfig(**kw).validate()
    with pytest.raises(ValueError, match="combination size 7 is impossible with 6 labels"):
        ComparisonConfig(sizes=(1, 7)).validate(list("abcdef"))


def _synthetic_result() -> dict:
    """A complete two-method result on labels a, b, c (every stage), as report.json holds it."""
    from ks_lens.calibration import Calibration

    cfg = ComparisonConfig(
        methods=("caa_mean", "ksteer"),
        sizes=(1, 2),
        act_combos_per_size=1,
        curve_factors=(0.5, 1.0),
        n_resamples=50,
        instructed=False,  # tests/test_reference_rows.py checks results with the row
    )
    plan = plan_comparison(("a", "b", "c"), cfg, n_calib=1, n_test=2)
    act = _act_eval()
    assert plan.act_combos == act.combos
    answers = []
    for q in (0, 1):
        answers.append(
            Answer(
                "unsteered",
                q,
                (),
                0.0,
                0.0,
                "plain",
                3,
                math.nan,
                1.0,
                None,
                [0.2, 0.3, 0.1],
                None,
                {},
            )
        )
    for m, gain in (("caa_mean", 0.3), ("ksteer", 0.5)):
        for f in cfg.curve_factors:
            for c in plan.gen_cells:
                p = [0.2 + f * gain * (t in c.targets) for t in "abc"]
                answers.append(
                    Answer(
                        m,
                        c.question,
                        c.targets,
                        f,
                        f,
                        "steered text",
                        4,
                        0.3 * f + 0.1 * c.question,
                        1.2,
                        None,
                        p,
                        None,
                        {},
                    )
                )
    alphas = {"caa_mean": {1: 1.0, 2: 2.0}, "ksteer": {1: 3.0, 2: 4.0}}
    text = TextEvaluation(
        ("a", "b", "c"),
        ["q0?", "q1?"],
        plan.gen_cells,
        alphas,
        cfg.curve_factors,
        answers,
        ("text",),
    )
    calib = {
        m: {k: Calibration(a, 0.5, 0.4, [(a, 0.4)]) for k, a in v.items()}
        for m, v in alphas.items()
    }
    res = ComparisonResult(cfg, plan, calib, act, text, [], [], [], 1, 2, 2)
    return json.loads(json.dumps(res.to_json()))


def _edit(doc: dict, path: str, value) -> dict:
    import copy

    out = copy.deepcopy(doc)
    *head, last = path.split("/")
    node = out
    for p in head:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


_DELETE = object()


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("comparison_config/kl_budget", -1, "kl_budget must be a positive number of nats, got -1"),
        ("comparison_config/baseline", "magic", "the baseline 'magic' is not among the methods"),
        ("comparison_config/vanish/floor", None, "vanish.floor must be a number between 0 and 1"),
        ("comparison_config/sizes", [1, 1], r"sizes \[1, 1\] repeat"),
        (
            "text_eval/labels",
            ["c", "b", "a"],
            r"text_eval.labels \['c', 'b', 'a'\] differ from the plan's",
        ),
        ("activation_eval/labels", ["b", "a", "c"], "activation_eval.labels .* differ"),
        ("labels", ["a", "c", "b"], "labels .* differ from the plan's"),
        ("plan", _DELETE, "the result has no field 'plan'"),
        ("text_eval/answers/3/text_probs/0", "x", "malformed record .*'x'"),
        ("text_eval/answers/3/text_probs/0", 1.5, r"text_eval.answers\[3\].text_probs holds 1.5"),
        ("text_eval/answers/3/text_probs", [0.5], r"text_eval.answers\[3\].text_probs has \(1,\)"),
        ("text_eval/answers", [], "need one unsteered answer per question"),
        ("text_eval/answers/4/question", 99, r"text_eval.answers\[4\] refers to question 99"),
        ("text_eval/answers/4/targets", ["z"], r"targets \['z'\] outside"),
        (
            "activation_eval/probs/caa_mean/0",
            [[0.5]],
            "must hold one \\[2, 3\\] array per combination",
        ),
        ("calibration/ksteer", _DELETE, "calibration has methods \\['caa_mean'\\]"),
    ],
)
def test_from_json_refuses_edited_or_damaged_records(path, value, message):
    """report.json edited by hand (kl_budget -1, an unknown baseline, reversed labels that flip
    a difference) or damaged: one clear error, never a re-rendered wrong report or a traceback."""
    from ks_lens.errors import KsLensError

    doc = _synthetic_result()
    again = ComparisonResult.from_json(doc)  # intact: loads, summaries recomputed
    assert {(r.lens, r.method, r.k) for r in again.summaries} >= {("text", "ksteer", 2)}
    with pytest.raises(KsLensError, match=message):
        ComparisonResult.from_json(_edit(doc, path, value))


def test_from_json_refuses_what_is_not_a_result():
    from ks_lens.errors import StoreError

    with pytest.raises(StoreError, match="a comparison result is a JSON object, got list"):
        ComparisonResult.from_json([1, 2])  # type: ignore[arg-type]


def test_report_command_refuses_a_damaged_report_in_one_line(tmp_path, capsys):
    """ks-lens report on an edited or damaged report.json: exit 2, one line naming the file."""
    from ks_lens.cli import main

    doc = _synthetic_result()
    (tmp_path / "report.json").write_text(json.dumps(doc))
    assert main(["report", str(tmp_path)]) == 0  # intact: re-rendered
    assert (tmp_path / "report.md").is_file()
    capsys.readouterr()
    for path, value, message in (
        ("comparison_config/kl_budget", -1, "kl_budget must be a positive number of nats"),
        ("text_eval/answers/3/question", 7, "text_eval.answers[3] refers to question 7"),
    ):
        (tmp_path / "report.json").write_text(json.dumps(_edit(doc, path, value)))
        assert main(["report", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ks-lens: error: {tmp_path / 'report.json'} cannot be re-rendered: ")
        assert message in err and err.count("\n") == 1
    (tmp_path / "report.json").write_text("[1, 2]")
    assert main(["report", str(tmp_path)]) == 2
    assert "a comparison result is a JSON object, got list" in capsys.readouterr().err


def test_curve_cells_are_one_per_question_and_size_and_carry_the_curves():
    cfg = ComparisonConfig(text_coverage="all-combinations", avoid=("f",))
    plan = plan_comparison(list("abcdef"), cfg, n_calib=5, n_test=7)
    curve = plan.curve_cells(1)
    assert [c for c in plan.gen_cells if c in curve] == curve  # a subset, in plan order
    assert Counter((c.question, len(c.targets)) for c in curve) == {
        (q, k): 1 for q in range(7) for k in (1, 2, 3)
    }
    per = Counter((c.question, len(c.targets)) for c in plan.gen_cells)
    assert len(plan.curve_cells(2)) == sum(min(2, n) for n in per.values()) == 10 + 14 + 14
    assert plan.curve_cells(None) == plan.gen_cells
    with pytest.raises(ValueError, match="curve_cells_per_question must be positive"):
        ComparisonConfig(curve_cells_per_question=0).validate()
    # the curve reads only the cells answered at every factor: question 1's extra cell (answered
    # at the calibrated alpha only, p=0.9) moves the summary at factor 1 but not the curve
    cells = [Cell(0, ("a",)), Cell(1, ("a",)), Cell(1, ("b",))]
    answers = [_answer("unsteered", q, ("a",), 0.0, 0.0, 0.1) for q in (0, 1)]
    for f, kl, p in ((0.5, 0.2, 0.3), (1.0, 0.4, 0.5)):
        answers += [_answer("caa_mean", q, ("a",), f, kl, p) for q in (0, 1)]
    answers.insert(6, _answer("caa_mean", 1, ("b",), 1.0, 0.4, 0.9))
    te = TextEvaluation(
        ("a", "b"), ["q0", "q1"], cells, {"caa_mean": {1: 1.0}}, (0.5, 1.0), answers, ("text",)
    )
    c1 = ComparisonConfig(
        methods=("caa_mean",), sizes=(1,), curve_cells_per_question=1, instructed=False
    )
    curves, _ = trade_off(te, c1)
    at_one = next(p for p in curves if p.factor == 1.0)
    assert at_one.n_answers == 2 and at_one.target_prob.estimate == pytest.approx(0.5)
    row = next(r for r in summarise_text(te, c1) if r.method == "caa_mean")
    assert row.target_prob.estimate == pytest.approx((0.5 + (0.5 + 0.9) / 2) / 2)
    plan2 = ComparisonPlan(("a", "b"), (), [], [], cells)
    _check_text_records(te, c1, plan2)  # the stored answers match the plan
    short = replace(te, answers=[a for a in answers if not (a.factor == 0.5 and a.question == 1)])
    with pytest.raises(StoreError, match="at alpha factor 0.5; the plan needs 2"):
        _check_text_records(short, c1, plan2)
