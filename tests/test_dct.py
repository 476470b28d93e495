"""DCT vectors (ks_lens.steering.dct): the objective, the constrained ascent, the label mapping,
the Steerer contract, the artefact and the comparison registry entry."""

from __future__ import annotations

import math

import pytest
import torch

from ks_lens.comparison import (
    METHODS,
    REFERENCE_METHODS,
    ComparisonConfig,
    SteeringKit,
    build_methods,
    fit_comparison_dct,
    run_comparison,
)
from ks_lens.errors import ConfigError, LabelError, MetadataMismatchError
from ks_lens.evaluation import map_dct_labels
from ks_lens.models import model_signature
from ks_lens.models.chat import encode_chat
from ks_lens.probes import Probe, ProbeConfig, train_probe
from ks_lens.steering import CAA, SteeringSpec, SteeringVectors
from ks_lens.steering.dct import (
    DCT,
    DCTConfig,
    DCTSettings,
    DCTVectors,
    LabelMap,
    _model_objective,
    _prompt_batches,
    assign_labels,
    fit_directions,
    objective,
    orthonormalise,
)

PROMPTS = ["How do I boil an egg?", "Why is the sky blue?", "Name a river."]


# ----------------------------------------------------------------------------- objective


def test_objective_by_hand():
    delta = torch.tensor([[[3.0, 4.0], [1.0, 0.0]], [[0.0, 2.0], [6.0, 8.0]]])  # [2, 2, 2]
    mask = torch.tensor([[1, 0], [1, 1]])
    assert objective(delta, mask, 2.0).item() == pytest.approx(25 + 4 + 100)
    assert objective(delta, mask, 1.0).item() == pytest.approx(5 + 2 + 10)


def _linear_problem(d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    s = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.25, 0.1])
    return u @ torch.diag(s) @ v.T, v  # W and its right-singular vectors (columns)


def test_ascent_finds_the_top_right_singular_vectors_of_a_linear_map():
    w, v = _linear_problem()
    radius = 2.0

    def value_and_grad(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        th = theta.clone().requires_grad_(True)
        per = ((th @ w.T) ** 2).sum(-1)  # ||W theta_k||^2 = ||h(x + theta) - h(x)||^2
        (g,) = torch.autograd.grad(per.sum(), th)
        return per.detach(), g

    cfg = DCTConfig(source_layer=0, n_vectors=2, steps=200, lr=0.3, seed=1)
    theta, values = fit_directions(value_and_grad, 6, cfg, radius)
    cos = (theta / radius) @ v[:, :2]  # [2 vectors, 2 singular vectors]
    assert abs(cos[0, 0].item()) > 0.9999 and abs(cos[1, 1].item()) > 0.9999
    assert values.tolist() == pytest.approx([radius**2 * 9.0, radius**2 * 4.0], rel=1e-4)
    torch.testing.assert_close(theta @ theta.T, radius**2 * torch.eye(2), atol=1e-5, rtol=0)


def test_orthonormalise_keeps_row_order_and_refuses_dependent_rows():
    q = orthonormalise(torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    torch.testing.assert_close(q, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    with pytest.raises(ConfigError, match="linearly dependent"):
        orthonormalise(torch.tensor([[1.0, 0.0], [2.0, 0.0]]))


@pytest.mark.parametrize("shared", [True, False])
def test_model_objective_equals_a_direct_steered_pass(tiny_model, monkeypatch, shared):
    import ks_lens.steering.dct as dct_module

    assert dct_module.can_bypass(tiny_model)  # the shared-lower-layers path is the default here
    if not shared:
        monkeypatch.setattr(dct_module, "can_bypass", lambda model: False)  # full passes
    cfg = DCTConfig(source_layer=1, target_offset=2, n_vectors=2, batch_size=2)
    batches = _prompt_batches(tiny_model, PROMPTS, cfg.batch_size)
    vg, _ = _model_objective(tiny_model, batches, cfg, 2)
    theta = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    values, grad = vg(theta)
    expected = []
    for th in theta:
        total, n = 0.0, 0
        for p in PROMPTS:
            ids = torch.tensor([encode_chat(tiny_model.tokenizer, p)])
            _, c0 = tiny_model.run_with_cache(ids, names_filter="blocks.3.hook_resid_post")
            add = [("blocks.1.hook_resid_post", lambda a, hook, th=th: a + th)]
            with tiny_model.hooks(fwd_hooks=add):
                _, c1 = tiny_model.run_with_cache(ids, names_filter="blocks.3.hook_resid_post")
            d = c1["blocks.3.hook_resid_post"] - c0["blocks.3.hook_resid_post"]
            total += float((d.norm(dim=-1) ** 2).sum())
            n += ids.shape[1]
        expected.append(total / n)
    assert values.tolist() == pytest.approx(expected, rel=1e-4)
    assert grad.shape == (2, 64) and bool(grad.abs().sum() > 0)


# ----------------------------------------------------------------------------- fitting


def test_fit_on_tiny_constraints_determinism_and_ascent(tiny_model):
    cfg = DCTConfig(source_layer=1, target_offset=2, n_vectors=3, steps=6, radius=3.0, seed=5)
    a = DCTVectors.fit(tiny_model, PROMPTS, cfg)
    b = DCTVectors.fit(tiny_model, PROMPTS, cfg)
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.values, b.values)
    torch.testing.assert_close(a.vectors @ a.vectors.T, 9.0 * torch.eye(3), atol=1e-4, rtol=0)
    assert a.hook_name == "blocks.1.hook_resid_post" and a.radius == 3.0
    c = DCTVectors.fit(tiny_model, PROMPTS, DCTConfig(**{**cfg.__dict__, "seed": 6}))
    assert not torch.equal(a.vectors, c.vectors)
    # the ascent raised the first vector's objective above its random start
    vg, median = _model_objective(tiny_model, _prompt_batches(tiny_model, PROMPTS, 32), cfg, 3)
    g = torch.Generator().manual_seed(cfg.seed)
    start = 3.0 * orthonormalise(torch.randn(3, 64, generator=g))
    assert a.values[0] > vg(start)[0][0]
    # radius=None: radius_fraction x the median source token norm
    auto = DCTVectors.fit(
        tiny_model,
        PROMPTS,
        DCTConfig(source_layer=1, target_offset=2, n_vectors=2, steps=1, radius_fraction=0.5),
    )
    assert auto.radius == pytest.approx(0.5 * median)
    assert auto.vectors.norm(dim=-1).tolist() == pytest.approx([auto.radius] * 2, rel=1e-5)


# ----------------------------------------------------------------------------- label mapping


def test_assign_labels_known_answer():
    gains = torch.zeros(3, 2, 3)
    gains[2, 1, 0] = 0.30  # label 0: vector 2, sign -
    gains[0, 0, 1] = 0.20  # label 1: vector 0, sign +
    gains[1, 0, 2] = 0.10  # label 2: vector 1, sign +
    m = assign_labels(gains, ["a", "b", "c"])
    assert (m.vector, m.sign) == ((2, 0, 1), (-1, 1, 1))
    assert m.table()[0] == {"label": "a", "vector": 2, "sign": -1, "gain": pytest.approx(0.3)}
    # a conflict: label c's best is vector 2 too, but label a holds it; c takes its next best
    gains[2, 0, 2] = 0.25
    m = assign_labels(gains, ["a", "b", "c"])
    assert (m.vector, m.sign) == ((2, 0, 1), (-1, 1, 1))
    # fewer vectors than labels: labels may share a vector
    m = assign_labels(gains[:1], ["a", "b", "c"])
    assert m.vector == (0, 0, 0)
    with pytest.raises(ConfigError, match="gains must be"):
        assign_labels(gains, ["a", "b"])


def _basis(k: int, d: int = 64) -> torch.Tensor:
    return torch.eye(d)[:k]


def _hand_vectors(model, radius: float = 4.0, mapping: LabelMap | None = None) -> DCTVectors:
    cfg = DCTConfig(source_layer=1, target_offset=2, n_vectors=3, radius=radius)
    return DCTVectors(
        radius * _basis(3),
        config=cfg,
        radius=radius,
        values=torch.tensor([3.0, 2.0, 1.0]),
        model=model_signature(model),
        mapping=mapping,
    )


def _fake_evaluator(model) -> Probe:
    """A linear probe at the source hook: label a reads +e1, label b reads -e0, label c +e2."""
    w = torch.zeros(64, 3)
    w[1, 0], w[0, 1], w[2, 2] = 1.0, -1.0, 1.0
    return Probe(
        [(w, torch.zeros(3))],
        torch.zeros(64),
        torch.ones(64),
        label_names=("a", "b", "c"),
        hook_name="blocks.1.hook_resid_post",
        model=model_signature(model),
        config=ProbeConfig(architecture="linear"),
    )


def test_map_dct_labels_with_a_fake_evaluator_on_tiny(tiny_model):
    vecs = _hand_vectors(tiny_model)
    m = map_dct_labels(tiny_model, vecs, PROMPTS, _fake_evaluator(tiny_model))
    assert (m.vector, m.sign) == ((1, 0, 2), (1, -1, 1))
    designed = {(1, 0, 0), (1, 1, 0), (0, 0, 1), (0, 1, 1), (2, 0, 2), (2, 1, 2)}
    for k in range(3):
        for s in range(2):
            for lab in range(3):
                if (k, s, lab) not in designed:
                    assert abs(m.gains[k, s, lab].item()) < 1e-6, (k, s, lab)
    assert m.gains[1, 0, 0] > 0.05 and m.gains[1, 1, 0] < -0.05
    with pytest.raises(ConfigError, match="at or after the DCT source layer"):
        cfg = DCTConfig(source_layer=2, target_offset=1, n_vectors=3, radius=4.0)
        late = DCTVectors(
            4.0 * _basis(3), config=cfg, radius=4.0, values=torch.zeros(3),
            model=model_signature(tiny_model),
        )
        map_dct_labels(tiny_model, late, PROMPTS, _fake_evaluator(tiny_model))


# ----------------------------------------------------------------------------- the steerer


def _mapped(model) -> DCTVectors:
    gains = torch.zeros(3, 2, 3)
    return _hand_vectors(model, mapping=LabelMap(("a", "b", "c"), gains, (1, 0, 2), (1, -1, 1)))


def test_dct_direction_steer_and_hooks_removed(tiny_model):
    dct = DCT(_mapped(tiny_model))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    e = torch.eye(64)
    torch.testing.assert_close(
        dct.apply(x, target=["a", "c"], alpha=2.0), x + 2.0 * (e[1] + e[2]) / math.sqrt(2)
    )
    # avoid b (mapped to -e0): subtract -e0
    torch.testing.assert_close(
        dct.apply(x, target="a", avoid="b", alpha=1.0), x + (e[1] + e[0]) / math.sqrt(2)
    )
    tokens = torch.tensor([[1, 5, 9, 13]])
    base = tiny_model(tokens)
    with dct.steer(tiny_model, target=["a"], alpha=3.0):
        steered = tiny_model(tokens)
    assert not torch.equal(steered, base)
    assert torch.equal(tiny_model(tokens), base)
    with pytest.raises(RuntimeError, match="boom"), dct.steer(tiny_model, target="c", alpha=3.0):
        raise RuntimeError("boom")
    assert torch.equal(tiny_model(tokens), base)
    with pytest.raises(LabelError):
        dct.apply(x, target="zzz")


def test_dct_refuses_unmapped_vectors_and_cancelling_labels(tiny_model):
    with pytest.raises(ConfigError, match="not mapped"):
        DCT(_hand_vectors(tiny_model))
    shared = LabelMap(("a", "b"), torch.zeros(3, 2, 2), (0, 0), (1, -1))
    v = _hand_vectors(tiny_model).mapped(shared)
    with pytest.raises(ConfigError, match="cancel out"):
        DCT(v).apply(torch.zeros(1, 64), target=["a", "b"])


# ----------------------------------------------------------------------------- artefact, config


def test_save_load_identical(tiny_model, tmp_path):
    v = _mapped(tiny_model)
    v.save(tmp_path / "dct")
    w = DCTVectors.load(tmp_path / "dct", model=tiny_model)
    assert torch.equal(w.vectors, v.vectors) and torch.equal(w.values, v.values)
    assert w.config == v.config and w.radius == v.radius
    assert w.mapping is not None and v.mapping is not None
    assert torch.equal(w.mapping.gains, v.mapping.gains) and w.mapping.table() == v.mapping.table()
    assert torch.equal(DCT(w).apply(torch.ones(2, 64), "a"), DCT(v).apply(torch.ones(2, 64), "a"))
    unmapped = _hand_vectors(tiny_model)
    unmapped.save(tmp_path / "raw")
    assert DCTVectors.load(tmp_path / "raw").mapping is None
    other = DCTVectors(
        v.vectors, config=v.config, radius=4.0, values=v.values, model={"model": "other"}
    )
    other.save(tmp_path / "other")
    with pytest.raises(MetadataMismatchError, match="DCT vectors was made for another model"):
        DCTVectors.load(tmp_path / "other", model=tiny_model)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"source_layer": -1}, "source_layer must be an integer >= 0"),
        ({"n_vectors": 0}, "n_vectors must be an integer >= 1"),
        ({"target_offset": 0}, "target_offset must be an integer >= 1"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"radius": -1.0}, "radius must be a positive finite number"),
        ({"lr": float("nan")}, "lr must be a positive finite number"),
        ({"power": 0}, "power must be a positive finite number"),
        ({"seed": True}, "seed must be an integer"),
    ],
)
def test_bad_config_raises(kw, match):
    with pytest.raises(ConfigError, match=match):
        DCTConfig(**{"source_layer": 1, **kw})


def test_config_against_the_model(tiny_model):
    with pytest.raises(ConfigError, match="target layer 5 .* beyond the model's last layer 3"):
        DCTConfig(source_layer=2, target_offset=3).check_model(tiny_model)
    with pytest.raises(ConfigError, match="65 orthogonal vectors do not fit in d_model=64"):
        DCTConfig(source_layer=0, n_vectors=65).check_model(tiny_model)
    assert DCTConfig.for_model(tiny_model, 2).target_layer == 3
    with pytest.raises(ConfigError, match="needs a target layer after the source layer 3"):
        DCTConfig.for_model(tiny_model, 3)
    with pytest.raises(ConfigError, match="at least one training prompt"):
        DCTVectors.fit(tiny_model, [], DCTConfig(source_layer=1, target_offset=1))


# ----------------------------------------------------------------------------- comparison


def test_registry_entry_not_default_and_needs_vectors(tiny_model, tiny_acts, tiny_probe):
    assert "dct" in METHODS and "dct" not in REFERENCE_METHODS
    assert "dct" not in ComparisonConfig().methods
    vec = SteeringVectors.fit(tiny_acts, 2)
    cfg = ComparisonConfig(methods=("caa_mean", "dct"))
    with pytest.raises(ConfigError, match="needs mapped DCT vectors"):
        build_methods(cfg, SteeringKit(tiny_probe, vec))
    built = build_methods(cfg, SteeringKit(tiny_probe, vec, dct=_mapped(tiny_model)))
    assert isinstance(built["dct"], DCT) and isinstance(built["caa_mean"], CAA)


def test_run_comparison_fits_and_compares_dct_on_tiny(tiny_model, tiny_acts, tiny_probe):
    vec = SteeringVectors.fit(tiny_acts, 2)
    evaluator = train_probe(tiny_acts, 3, config=ProbeConfig(hidden=16, epochs=3, seed=1))
    cfg = ComparisonConfig(
        methods=("caa_mean", "dct"),
        calibration_metric="first_token_kl",
        kl_budget=0.05,
        sizes=(1, 2),
        act_combos_per_size=2,
        calib_bisect_steps=1,
        n_resamples=50,
        instructed=False,
    )
    res = run_comparison(
        tiny_model,
        probe=tiny_probe,
        vectors=vec,
        evaluator=evaluator,
        text_evaluator=None,
        calib_questions=["hi?", "yo?"],
        test_questions=["a?", "b?"],
        config=cfg,
        progress=False,
    )
    assert set(res.alphas) == {"caa_mean", "dct"} and set(res.alphas["dct"]) == {1, 2}
    assert "dct_fit_s" in res.timings
    assert {r.method for r in res.summaries} == {"unsteered", "caa_mean", "dct"}


def test_a_comparison_gives_every_label_its_own_dct_vector(tiny_model, tiny_acts):
    """Issue 25's defect: with fewer vectors than labels, two labels could share one vector with
    opposite signs and a 2-label target had no direction (the debates comparison stopped). A
    comparison now learns at least one vector per label, so the assignment is one to one and
    every label set has a unit direction."""
    evaluator = train_probe(tiny_acts, 3, config=ProbeConfig(hidden=16, epochs=3, seed=1))
    labels = evaluator.label_names
    cfg = ComparisonConfig(dct=DCTSettings(n_vectors=1, steps=3), instructed=False)
    dct = fit_comparison_dct(tiny_model, 1, PROMPTS, evaluator, cfg)
    assert dct.n_vectors == len(labels) > cfg.dct.n_vectors
    assert dct.mapping is not None and sorted(dct.mapping.vector) == list(range(len(labels)))
    steerer = DCT(dct)
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            assert steerer.direction(SteeringSpec.make([a, b], None, 1.0, labels)).norm() == (
                pytest.approx(1.0, abs=1e-5)
            )
