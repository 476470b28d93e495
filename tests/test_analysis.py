"""Analysis functions on constructed cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from ks_lens.analysis.geometry import (
    cosine,
    direction_stats,
    label_gradient_geometry,
    multistep_rotation,
    step_directions,
)
from ks_lens.analysis.sweep import recommend_layer
from ks_lens.analysis.vanishing import TargetDiagnosis, classify_cause, diagnose
from ks_lens.probes import Probe, ProbeConfig
from ks_lens.steering import KSteering, SteeringSpec, combine_gradients

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
        config=ProbeConfig(kind="linear"),
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
    d = diagnose(probe, x, ["a", "b", "c"], alpha=1.0, steps=2, vanished=["b", "c"])
    assert d.per_target["b"].cause == "conflict"
    assert d.per_target["c"].cause == "dominated"
    assert d.per_target["a"].cause is None and not d.per_target["a"].vanished
    traj = d.per_target["a"].prob_trajectory
    assert len(traj) == 3 and traj[-1] > traj[0]
    assert d.per_target["b"].prob_trajectory[-1] < d.per_target["b"].prob_trajectory[0]
    assert d.to_json()["targets"] == ["a", "b", "c"]


def test_classify_cause_order():
    base = dict(
        label="x",
        grad_norm=1.0,
        grad_norm_ratio=1.0,
        min_cos_to_other_targets=0.2,
        base_logit=0.0,
        base_prob=0.5,
        prob_trajectory=[0.1, 0.5],
        probe_accuracy=1.0,
    )
    assert classify_cause(TargetDiagnosis(**{**base, "probe_accuracy": 0.5})) == "weak label"
    assert (
        classify_cause(TargetDiagnosis(**{**base, "min_cos_to_other_targets": -0.5})) == "conflict"
    )
    assert classify_cause(TargetDiagnosis(**{**base, "grad_norm_ratio": 0.1})) == "dominated"
    assert classify_cause(TargetDiagnosis(**base)) == "not transferred"
    assert (
        classify_cause(TargetDiagnosis(**{**base, "prob_trajectory": [0.1, 0.9, 0.3]}))
        == "overshoot"
    )
    assert classify_cause(TargetDiagnosis(**{**base, "prob_trajectory": [0.1, 0.15]})) == "other"


def test_recommend_layer():
    acc = [
        {"layer": 1, "mlp_val_accuracy": 0.5},
        {"layer": 2, "mlp_val_accuracy": 1.0},
        {"layer": 3, "mlp_val_accuracy": 1.0},
    ]
    sweep = [
        {"layer": layer, "activation": [{"method": "ksteer", "k": 1, "gain": {"estimate": d}}]}
        for layer, d in ((1, 0.9), (2, 0.3), (3, 0.4))
    ]
    layer, reason = recommend_layer(acc, sweep)
    assert layer == 3 and "next best layer 2" in reason  # layer 1 excluded: probe too weak
    with pytest.raises(ValueError, match="no swept layer"):
        recommend_layer(acc, sweep, min_accuracy=1.1)
    assert not math.isnan(sweep[0]["activation"][0]["gain"]["estimate"])


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
