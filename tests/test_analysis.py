"""Analysis functions on constructed cases with known answers."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from ks_lens.analysis.diagnosis import (
    VanishedCase,
    best_remedy,
    diagnose,
    diagnose_cases,
    remedy_table,
    vanished_cases,
)
from ks_lens.analysis.directions import (
    cosine,
    direction_stats,
    label_gradient_geometry,
    multistep_rotation,
    pca_explained,
    step_directions,
)
from ks_lens.analysis.sweep import (
    DEFAULT_EVAL_GAP,
    LayerAccuracy,
    LayerRecord,
    evaluator_placement,
    layer_sweep,
    recommend,
    recommend_layer,
    train_evaluators,
)
from ks_lens.comparison import ActivationEvaluation, ComparisonConfig, SummaryRow
from ks_lens.evaluation import VanishRule
from ks_lens.evaluation.stats import Interval
from ks_lens.probes import Probe, ProbeConfig
from ks_lens.steering import CAA, KSteering, SteeringSpec, SteeringVectors, combine_gradients

LABELS = ("a", "b", "c")


def linear_probe(w: torch.Tensor, b: torch.Tensor | None = None) -> Probe:
    d, k = w.shape
    return Probe(
        [(w, torch.zeros(k) if b is None else b)],
        torch.zeros(d),
        torch.ones(d),
        label_names=LABELS[:k],
        hook_name="blocks.1.hook_resid_post",
        model={"model": "x", "d_model": d, "n_layers": 2},
        config=ProbeConfig(architecture="linear"),
        metrics={"val_per_label_accuracy": dict.fromkeys(LABELS[:k], 1.0)},
    )


def test_linear_probe_gives_identical_directions_for_all_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, generator=g)
    probe = linear_probe(w)
    x = torch.randn(50, 8, generator=g) * 3
    d = step_directions(KSteering(probe), x, SteeringSpec(("a", "b"), (), 1.0))
    expected = (w[:, 0] + w[:, 1]) / 2
    torch.testing.assert_close(d, (expected / expected.norm()).expand_as(d), atol=1e-6, rtol=1e-6)
    stats = direction_stats(d, expected)
    assert stats.mean_resultant_length == pytest.approx(1.0, abs=1e-5)
    assert stats.std_cos == pytest.approx(0.0, abs=1e-5)
    assert stats.mean_cos == pytest.approx(1.0, abs=1e-5)
    assert (
        float(stats.pca_explained.sum()) == pytest.approx(0.0, abs=1e-6)
        or float(stats.pca_explained[0]) <= 1.0
    )


def test_mlp_directions_vary_with_input():
    torch.manual_seed(0)
    w1, w2 = torch.randn(8, 16), torch.randn(16, 3)
    probe = Probe(
        [(w1, torch.zeros(16)), (w2, torch.zeros(3))],
        torch.zeros(8),
        torch.ones(8),
        label_names=LABELS,
        hook_name="blocks.1.hook_resid_post",
        model={},
        config=ProbeConfig(hidden=16, depth=1),
    )
    x = torch.randn(64, 8)
    d = step_directions(KSteering(probe), x, SteeringSpec(("a",), (), 1.0))
    stats = direction_stats(d, torch.ones(8))
    assert stats.mean_resultant_length < 0.999
    assert stats.std_cos > 1e-3
    assert (
        float(stats.pca_explained.sum()) == pytest.approx(1.0, abs=1e-4)
        or len(stats.pca_explained) == 8
    )


def test_pca_spectrum_is_sklearn_pca_and_matches_the_svd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    ratios = pca_explained(x, 10)
    s = torch.linalg.svdvals((x - x.mean(0)).double())
    torch.testing.assert_close(ratios.double(), s**2 / (s**2).sum(), atol=1e-6, rtol=1e-5)
    assert len(ratios) == 6 and float(ratios.sum()) == pytest.approx(1.0, abs=1e-5)
    assert len(pca_explained(x, 2)) == 2 and torch.equal(pca_explained(x, 2), ratios[:2])
    stats = direction_stats(x, torch.ones(6), n_components=3)
    torch.testing.assert_close(
        stats.pca_explained, pca_explained(x / x.norm(dim=-1, keepdim=True), 3)
    )
    assert len(direction_stats(x[:1], torch.ones(6)).pca_explained) == 0


def test_orthogonal_planted_labels_have_zero_cosine_and_conflicts_are_found():
    w = torch.zeros(6, 3)
    w[0, 0] = 2.0  # a along e0
    w[1, 1] = 1.0  # b along e1: orthogonal to a
    w[0, 2] = -0.5  # c along -e0: conflicts with a
    w[2, 2] = 0.1
    geo = label_gradient_geometry(linear_probe(w), torch.randn(10, 6))
    assert float(geo.cos_matrix[0, 1]) == pytest.approx(0.0, abs=1e-6)
    assert float(geo.cos_matrix[0, 2]) < -0.9
    torch.testing.assert_close(geo.norms, w.norm(dim=0))
    conflicts = geo.conflicts()
    assert conflicts[0][:2] == ("a", "c")
    assert all(pair[:2] != ("a", "b") for pair in conflicts)


def test_remedies_change_the_combined_gradient_as_documented():
    # two target gradients: a strong one and a weak one pointing partly against it
    ga = torch.tensor([[[4.0, 0.0]]])
    gb = torch.tensor([[[-0.5, 0.5]]])
    g = torch.cat([ga, gb])
    summed = combine_gradients(g, "sum")
    balanced = combine_gradients(g, "balanced")
    pcgrad = combine_gradients(g, "pcgrad")
    ub = gb[0, 0] / gb[0, 0].norm()
    # the weak label's share of the combined step grows under balancing
    assert float(cosine(balanced[0], ub)) > float(cosine(summed[0], ub))
    # pcgrad removes the conflict: the result has a non-negative dot with both labels' gradients
    assert float(pcgrad[0] @ ga[0, 0]) >= 0 and float(pcgrad[0] @ gb[0, 0]) >= -1e-6
    assert float(summed[0] @ gb[0, 0]) < 0  # plain sum moves against the weak label


def test_multistep_rotation_is_zero_for_linear_probe():
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    rot = multistep_rotation(
        KSteering(linear_probe(w), steps=4, decay=0.5),
        torch.randn(7, 5),
        SteeringSpec(("a",), ("b",), 2.0),
    )
    torch.testing.assert_close(rot.cos_to_first, torch.ones(7, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        rot.step_norms[:, 1] / rot.step_norms[:, 0], torch.full((7,), 0.5), atol=1e-5, rtol=0
    )


def test_diagnose_flags_dominated_and_conflicting_targets():
    w = torch.zeros(4, 3)
    w[0, 0] = 5.0
    w[0, 1] = -0.2  # conflicts with a
    w[1, 2] = 0.1  # orthogonal but tiny: dominated
    probe = linear_probe(w)
    x = torch.zeros(8, 4)
    d = diagnose(KSteering(probe, steps=2), x, ["a", "b", "c"], alpha=1.0, vanished=["b", "c"])
    assert d.geometry == "probe gradients" and d.settings["steps"] == 2
    assert d.per_target["b"].cause == "conflict"
    assert d.per_target["c"].cause == "dominated"
    assert d.per_target["a"].cause is None and not d.per_target["a"].vanished
    traj = d.per_target["a"].prob_trajectory
    assert len(traj) == 3 and traj[-1] > traj[0]
    assert d.per_target["b"].prob_trajectory[-1] < d.per_target["b"].prob_trajectory[0]
    assert d.to_json()["targets"] == ["a", "b", "c"]


def caa_vectors(vecs: torch.Tensor) -> SteeringVectors:
    return SteeringVectors(
        vecs,
        label_names=LABELS[: vecs.shape[0]],
        hook_name="blocks.1.hook_resid_post",
        model={"model": "x", "d_model": vecs.shape[1], "n_layers": 2},
    )


def test_caa_diagnosis_uses_the_caa_vector_geometry():
    # v_a = (3, 0, 0, 0), v_b = (0, 4, 0, 0), v_c = (-1, 1, 0, 0)
    vecs = torch.tensor([[3.0, 0, 0, 0], [0, 4.0, 0, 0], [-1.0, 1.0, 0, 0]])
    caa = CAA(caa_vectors(vecs), combine="mean")
    # a probe whose gradients disagree with the vectors: it must not enter the geometry
    probe = linear_probe(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    d = diagnose(caa, torch.zeros(5, 4), ["a", "b"], alpha=2.0, readout=probe, vanished=["a"])
    assert d.geometry == "CAA vectors" and d.settings["combine"] == "mean"
    # combined v = (1.5, 2, 0, 0); push_t = alpha * v . v_t / |v_t|
    a, b = d.per_target["a"], d.per_target["b"]
    assert a.push == pytest.approx(2.0 * 1.5) and b.push == pytest.approx(2.0 * 2.0)
    assert a.push_ratio == pytest.approx(0.75)
    assert a.norm == pytest.approx(3.0) and a.norm_ratio == pytest.approx(0.75)
    assert a.cos_to_step == pytest.approx(1.5 / 2.5) and b.cos_to_step == pytest.approx(2 / 2.5)
    assert a.min_cos_to_other_targets == pytest.approx(0.0, abs=1e-9)
    assert d.move_norm == pytest.approx(2.0 * 2.5)
    assert math.isnan(a.probe_accuracy)  # no probe accuracy in a CAA diagnosis
    assert len(a.prob_trajectory) == 2  # readout before and after the one CAA step
    # cos(v_a, v_c) = -3 / (3 * sqrt 2): a conflict between CAA vectors
    d2 = diagnose(caa, torch.zeros(5, 4), ["a", "c"], alpha=1.0, vanished=["c"])
    assert d2.cos_matrix[0][1] == pytest.approx(-1 / math.sqrt(2))
    assert d2.per_target["c"].cause == "conflict" and d2.per_target["c"].prob_trajectory == []
    # sum + unit norm: v = (v_a + v_b) / 5 = (0.6, 0.8); push_b = alpha * 0.8
    d3 = diagnose(
        CAA(caa_vectors(vecs), combine="sum", normalize=True),
        torch.zeros(1, 4),
        ["a", "b"],
        alpha=10.0,
    )
    assert d3.per_target["b"].push == pytest.approx(8.0) and d3.move_norm == pytest.approx(10.0)


def test_caa_diagnosis_on_tiny_model_matches_hand_computation(tiny_acts, tiny_probe):
    vectors = SteeringVectors.fit(tiny_acts, 2)
    caa = CAA(vectors)
    x = tiny_acts.at(2)[:6].float()
    d = diagnose(caa, x, ["alpha", "gamma"], alpha=3.0, readout=tiny_probe)
    va, vg = vectors.vectors[0].double(), vectors.vectors[2].double()
    v = (va + vg) / 2
    assert d.per_target["gamma"].push == pytest.approx(float(3.0 * v @ vg / vg.norm()), rel=1e-6)
    assert d.cos_matrix[0][1] == pytest.approx(float(va @ vg / (va.norm() * vg.norm())), rel=1e-6)
    p0 = torch.sigmoid(tiny_probe(x)[:, 0]).mean()
    p1 = torch.sigmoid(tiny_probe(x + 3.0 * v.float())[:, 0]).mean()
    assert d.per_target["alpha"].prob_trajectory == pytest.approx([float(p0), float(p1)], rel=1e-5)


def test_each_method_is_diagnosed_with_its_own_alpha_and_settings(tiny_acts, tiny_probe):
    from ks_lens.comparison import METHODS, SteeringKit

    vectors = SteeringVectors.fit(tiny_acts, 2)
    names = ("ksteer", "ksteer_multistep", "ksteer_logsigmoid", "ksteer_pcgrad", "caa_mean")
    steerers = {m: METHODS[m].build(SteeringKit(tiny_probe, vectors)) for m in names}
    alphas = {m: {2: 0.5 + i} for i, m in enumerate(names)}
    cases = [VanishedCase(m, ("alpha", "beta"), ("beta",), {"beta": 1.0}, {}) for m in names]
    cases.append(VanishedCase("caa_sum", ("alpha", "beta"), ("beta",), {"beta": 1.0}, {}))
    x = tiny_acts.at(2)[:5].float()
    ds = diagnose_cases(cases, steerers, alphas, x, readout=tiny_probe)
    assert [d.method for d in ds] == list(names)  # caa_sum: no steerer given, skipped
    for d in ds:
        assert d.alpha == alphas[d.method][2]
        s = steerers[d.method]
        if isinstance(s, KSteering):
            assert d.geometry == "probe gradients"
            assert (d.settings["steps"], d.settings["objective"], d.settings["combine"]) == (
                s.steps,
                s.objective,
                s.combine,
            )
            assert len(d.per_target["alpha"].prob_trajectory) == s.steps + 1
            # the recorded move is this method's own: its trajectory at its own alpha
            traj = s.trajectory(x, SteeringSpec(("alpha", "beta"), (), alphas[d.method][2]))
            move = (traj[-1] - traj[0]).norm(dim=-1).mean()
            assert d.move_norm == pytest.approx(float(move), rel=1e-5)
        else:
            assert d.geometry == "CAA vectors"
            v = vectors.combine(("alpha", "beta"))
            assert d.move_norm == pytest.approx(float(alphas["caa_mean"][2] * v.norm()), rel=1e-5)


def test_linear_probe_push_is_alpha_times_projected_gradient():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    probe = linear_probe(w)
    x = torch.zeros(3, 3)
    # one step of the logits objective: move = alpha * (w_a + w_b) / 2 = alpha * (0.5, 1, 0)
    d1 = diagnose(KSteering(probe), x, ["a", "b"], alpha=2.0)
    assert d1.per_target["a"].push == pytest.approx(1.0)
    assert d1.per_target["b"].push == pytest.approx(2.0)
    # three steps with decay 0.5: the total move is (1 + 0.5 + 0.25) times longer
    d3 = diagnose(KSteering(probe, steps=3, decay=0.5), x, ["a", "b"], alpha=2.0)
    assert d3.per_target["b"].push == pytest.approx(2.0 * 1.75)


def _evaluation(probs: dict[str, list[np.ndarray]], combos, alphas) -> ActivationEvaluation:
    n = next(iter(probs.values()))[0].shape[0]
    return ActivationEvaluation(LABELS, combos, alphas, np.full((n, 3), 0.2), probs)


def test_remedy_table_pairs_each_method_with_one_step_ksteering():
    rule = VanishRule(floor=0.1, reach=0.5)
    combos = [("a", "b", "c")]
    n = 40
    gone = np.tile([0.9, 0.9, 0.05], (n, 1))  # c vanished on every question
    kept = np.tile([0.9, 0.6, 0.4], (n, 1))
    half = np.where(np.arange(n)[:, None] % 2 == 0, gone, kept)
    ev = _evaluation(
        {"ksteer": [gone], "ksteer_pcgrad": [half], "caa_mean": [kept.copy()]},
        combos,
        {m: {3: 1.0} for m in ("ksteer", "ksteer_pcgrad", "caa_mean")},
    )
    kl = {"ksteer": 0.24, "ksteer_pcgrad": 0.25, "caa_mean": 0.23}
    rows = {r.method: r for r in remedy_table(ev, rule, k=3, calibrated_kl=kl, n_resamples=200)}
    assert rows["ksteer"].vanish_rate.estimate == 1.0 and rows["ksteer"].vanish_diff is None
    assert rows["ksteer_pcgrad"].vanish_rate.estimate == pytest.approx(0.5)
    assert rows["ksteer_pcgrad"].vanish_diff.estimate == pytest.approx(-0.5)
    assert rows["caa_mean"].vanish_diff.estimate == pytest.approx(-1.0)
    t = rows["caa_mean"].vanish_test
    assert (t.only_a, t.only_b, t.n) == (0, n, n) and t.p_value < 1e-6
    # clustered by question: 40 units of -1 (one combination each); 2**40 sign patterns do not
    # fit in 200 resamples, so p is the smallest a 200-pattern test can give, 2/201
    c = rows["caa_mean"].vanish_cluster_test
    assert (c.n_questions, c.mean_a, c.mean_b, c.exact) == (n, 0.0, 1.0, False)
    assert c.p_value == pytest.approx(2 / 201) == pytest.approx(c.p_floor)
    verdict = best_remedy(list(rows.values()))
    assert verdict.best == "caa_mean" and verdict.significant
    assert "excludes 0" in verdict.statement
    assert "calibrated KL 0.230 vs 0.240" in verdict.statement
    # no method below the reference: the verdict says so
    same = _evaluation(
        {"ksteer": [gone], "ksteer_balanced": [gone.copy()]},
        combos,
        {"ksteer": {3: 1.0}, "ksteer_balanced": {3: 2.0}},
    )
    v2 = best_remedy(remedy_table(same, rule, k=3, n_resamples=200))
    assert not v2.significant and "no remedy significantly reduces vanishing" in v2.statement
    # a cut on one question of 40: not significant
    one = gone.copy()
    one[0] = kept[0]
    few = _evaluation(
        {"ksteer": [gone], "ksteer_softmin": [one]},
        combos,
        {"ksteer": {3: 1.0}, "ksteer_softmin": {3: 2.0}},
    )
    v3 = best_remedy(remedy_table(few, rule, k=3, n_resamples=200))
    assert v3.best == "ksteer_softmin" and not v3.significant
    assert "no remedy significantly reduces vanishing" in v3.statement


def test_vanished_cases_use_the_per_question_rule():
    combos = [("a", "b"), ("a", "c")]
    p1 = np.tile([0.9, 0.05, 0.3], (4, 1))  # b vanished everywhere in a+b
    ev = _evaluation({"ksteer": [p1, p1]}, combos, {"ksteer": {2: 1.0}})
    cases = vanished_cases(ev, VanishRule())
    assert [(c.targets, c.vanished) for c in cases] == [(("a", "b"), ("b",))]
    assert cases[0].share == {"b": 1.0} and cases[0].to_json()["method"] == "ksteer"


def _row(method: str, k: int, gain: float, n: int = 4) -> SummaryRow:
    iv = Interval(gain, gain, gain, n)
    return SummaryRow("activation", method, k, 1.0, n, n, iv, iv, iv)


def _record(layer: int, cal: float, test: float, *, n_layers: int = 30) -> LayerRecord:
    rows = {
        name: [_row("unsteered", 1, 0.0), _row("ksteer", 1, g), _row("ksteer", 2, g)]
        for name, g in (("cal", cal), ("test", test))
    }
    return LayerRecord(evaluator_placement(layer, n_layers), 0.9, {}, rows["cal"], rows["test"])


@pytest.mark.parametrize("n_layers", [4, 12, 30])
@pytest.mark.parametrize("gap", [0, 2, 4, 6])
def test_evaluator_layer_is_at_least_gap_after_the_steering_layer_or_flagged(n_layers, gap):
    for layer in range(n_layers):
        p = evaluator_placement(layer, n_layers, gap)
        assert layer <= p.eval_layer <= n_layers - 1
        if p.capped:
            assert p.eval_layer == n_layers - 1 and layer + gap > n_layers - 1
        else:
            assert p.eval_layer == layer + gap
        assert p.to_json()["capped"] == p.capped
    assert evaluator_placement(10, 30).eval_layer == 10 + DEFAULT_EVAL_GAP
    with pytest.raises(ValueError, match="out of range"):
        evaluator_placement(30, 30)


def test_recommend_layer_decides_on_calibration_questions_only():
    acc = [LayerAccuracy(layer, 0.5 if layer == 1 else 1.0, 1.0, {}) for layer in (1, 2, 3, 28)]
    # test questions would pick layer 2; calibration questions pick layer 3; layer 1's probe is
    # too weak; layer 28 is best on calibration but its evaluator gap is capped (30 layers)
    records = [
        _record(1, cal=0.9, test=0.9),
        _record(2, cal=0.3, test=0.8),
        _record(3, cal=0.4, test=0.2),
        _record(28, cal=0.95, test=0.95),
    ]
    choice = recommend_layer(acc, {r.layer: r.calibration for r in records[:3]})
    assert choice.layer == 3 and "next best layer 2" in choice.reason
    assert 1 in choice.excluded and choice.scores == {2: 0.3, 3: 0.4}
    rec = recommend(acc, records)
    assert rec.layer == 3 and not rec.capped_used
    assert rec.test_score == pytest.approx(0.2) and rec.test_best_layer == 2
    assert "capped" in rec.choice.excluded[28]
    assert "test questions alone would favour layer 2" in rec.reason
    assert rec.to_json()["chosen_on"] == "calibration questions"
    # only capped layers: they are used, and the reason says so
    only_capped = recommend(acc, [records[3]])
    assert only_capped.layer == 28 and only_capped.capped_used and "capped" in only_capped.reason
    with pytest.raises(ValueError, match="no swept layer"):
        recommend_layer(acc, {r.layer: r.calibration for r in records}, min_accuracy=1.1)


def test_layer_sweep_on_tiny_model(tiny_model, tiny_dataset, tiny_acts, caplog):
    qs = [q.text for q in tiny_dataset.questions]
    calib, test = qs[:3], qs[3:6]
    placements = [evaluator_placement(layer, 4, 2) for layer in (0, 1, 2)]
    evaluators = train_evaluators(
        tiny_acts, placements, config=ProbeConfig(epochs=3, hidden=16, val_fraction=0.25)
    )
    assert sorted(evaluators) == [2, 3]
    config = ComparisonConfig(
        methods=("caa_mean", "ksteer"),
        sizes=(1, 2),
        calibration_metric="first_token_kl",
        act_combos_per_size=1,
        curve_factors=(1.0,),
        calib_bisect_steps=1,
        n_resamples=20,
    )
    kw = dict(
        layers=[0, 1, 2],
        calib_questions=calib,
        test_questions=test,
        config=config,
        eval_gap=2,
        progress=False,
    )
    with pytest.raises(ValueError, match="both calibration and test"):
        layer_sweep(
            tiny_model, tiny_acts, evaluators=evaluators, **{**kw, "test_questions": qs[2:5]}
        )
    with pytest.raises(ValueError, match="no evaluator"):
        layer_sweep(tiny_model, tiny_acts, evaluators={3: evaluators[3]}, **kw)
    with pytest.raises(ValueError, match="reads layer 3"):
        layer_sweep(tiny_model, tiny_acts, evaluators={2: evaluators[3], 3: evaluators[3]}, **kw)
    caplog.set_level(logging.INFO, logger="ks_lens")
    records = layer_sweep(tiny_model, tiny_acts, evaluators=evaluators, **kw)
    assert [r.layer for r in records] == [0, 1, 2]
    # one log line per layer; the inner comparisons' calibration lines are kept quiet
    names = [r.name for r in caplog.records if r.name.startswith("ks_lens")]
    assert names == ["ks_lens.analysis.sweep"] * 3
    assert logging.getLogger("ks_lens.comparison").level == logging.NOTSET  # restored
    for r in records:
        assert r.eval_layer >= r.layer + 2 or (r.capped and r.eval_layer == 3)
        assert {row.n_questions for row in r.calibration} == {len(calib)}
        assert {row.n_questions for row in r.test} == {len(test)}
        assert set(r.alphas) == {"caa_mean", "ksteer"}
    assert [r.capped for r in records] == [False, False, True]
    js = records[2].to_json()
    assert js["eval_layer"] == 3 and js["capped"] and js["actual_gap"] == 1
    assert js["calibration"] and js["test"] and js["text"] == []


def test_token_view_html_is_offline(tiny_model, tiny_probe, tmp_path):
    from ks_lens.analysis.viz import save_token_view, token_probabilities, token_view_html

    tokens, probs = token_probabilities(tiny_model, "hello?", "some answer text", tiny_probe)
    assert len(tokens) == probs.shape[0] and probs.shape[1] == 3
    page = token_view_html(
        tiny_model, "hello?", {"unsteered": "one", "steered": "two three"}, tiny_probe, title="t"
    )
    path = save_token_view(tmp_path / "v.html", page)
    text = path.read_text()
    assert "unpkg.com" not in text and "cdn.jsdelivr" not in text
    assert text.count("CircuitsVis") >= 2 and "steered" in text
