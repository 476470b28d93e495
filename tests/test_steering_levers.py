"""Bounded K-Steering steps (per-token trust region) and multi-layer steering."""

from __future__ import annotations

import pytest
import torch

import ks_lens as ks
from ks_lens.activations import collect_activations
from ks_lens.probes import ProbeConfig, train_probe
from ks_lens.steering import (
    CAA,
    DenseSteering,
    KSteering,
    MultiLayer,
    Steerer,
    SteeringMethod,
    SteeringSpec,
    SteeringVectors,
    clip_step,
)


def test_clip_step_hand_computed():
    x = torch.tensor([[3.0, 4.0], [3.0, 4.0], [0.0, 1.0]])  # norms 5, 5, 1
    delta = torch.tensor([[10.0, 0.0], [0.5, 0.0], [0.0, -3.0]])
    out = clip_step(delta, x, 0.2)  # caps 1, 1, 0.2
    expected = torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.0, -0.2]])
    assert torch.allclose(out, expected, atol=1e-7)


def test_max_step_clips_the_total_change_per_token(tiny_probe, tiny_acts):
    x = tiny_acts.at(2)[:8]
    free = KSteering(tiny_probe, steps=2).apply(x, target=["alpha"], alpha=200.0)
    clipped = KSteering(tiny_probe, steps=2, max_step=0.1).apply(x, target=["alpha"], alpha=200.0)
    d_free = free - x
    cap = 0.1 * x.norm(dim=-1, keepdim=True)
    scale = torch.clamp(cap / d_free.norm(dim=-1, keepdim=True), max=1.0)
    assert torch.allclose(clipped - x, d_free * scale, atol=1e-5)
    assert bool(((clipped - x).norm(dim=-1) <= cap.squeeze(-1) * (1 + 1e-5)).all())
    assert bool((scale < 1).any())  # at alpha 200 some tokens really were clipped
    # a tiny alpha stays inside the region: identical to unclipped
    small = KSteering(tiny_probe, max_step=0.1).apply(x, target=["alpha"], alpha=1e-4)
    assert torch.allclose(small, KSteering(tiny_probe).apply(x, target=["alpha"], alpha=1e-4))
    traj = KSteering(tiny_probe, steps=2, max_step=0.1).trajectory(
        x, SteeringSpec(("alpha",), (), 200.0)
    )
    assert torch.allclose(traj[-1], clipped, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf"), True, "0.5"])
def test_max_step_must_be_a_positive_fraction(tiny_probe, bad):
    with pytest.raises(ks.ConfigError, match="max_step must be a positive finite fraction"):
        KSteering(tiny_probe, max_step=bad)


@pytest.fixture(scope="module")
def layer_probes(tiny_model, tiny_dataset):
    acts = collect_activations(tiny_model, tiny_dataset, layers=[1, 2], progress=False)
    cfg = ProbeConfig(epochs=10, hidden=32, val_fraction=0.25)
    return {L: train_probe(acts, L, config=cfg) for L in (1, 2)}, acts


def _n_hooks(model) -> int:
    points = {id(h): h for h in model.hook_dict.values()}  # aliases name the same HookPoint
    return sum(len(h._forward_hooks) for h in points.values())


def test_multilayer_equals_members_at_split_alpha_and_removes_hooks(tiny_model, layer_probes):
    probes, _ = layer_probes
    batch = ks.tokenize_chat(tiny_model, ["hello?", "two prompts here?"])

    def run():
        return tiny_model(batch.input_ids, attention_mask=batch.attention_mask)

    before = run()
    n0 = _n_hooks(tiny_model)
    k1, k2 = KSteering(probes[1]), KSteering(probes[2])
    ml = MultiLayer([k1, k2], weights=[0.25, 0.75])
    with ml.steer(tiny_model, target=["alpha"], avoid=["beta"], alpha=40.0):
        assert _n_hooks(tiny_model) == n0 + 2
        multi = run()
    with (
        k1.steer(tiny_model, target=["alpha"], avoid=["beta"], alpha=10.0),
        k2.steer(tiny_model, target=["alpha"], avoid=["beta"], alpha=30.0),
    ):
        manual = run()
    assert not torch.allclose(multi, before)
    assert torch.allclose(multi, manual, atol=1e-5)
    with (
        pytest.raises(RuntimeError, match="boom"),
        ml.steer(tiny_model, target=["alpha"], alpha=40.0),
    ):
        raise RuntimeError("boom")
    assert _n_hooks(tiny_model) == n0
    assert torch.equal(run(), before)


def test_multilayer_in_grouped_generation(tiny_model, layer_probes):
    probes, _ = layer_probes
    ml = MultiLayer([KSteering(probes[1]), KSteering(probes[2])])
    spec = ml.spec(target=["gamma"], alpha=30.0)
    batch = ks.tokenize_chat(tiny_model, ["hi?", "hi?"])
    with ks.steering.steer_groups(tiny_model, [None, (ml, spec)], [0, 1]):
        out = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
    with ml.steer(tiny_model, target=["gamma"], alpha=30.0):
        alone = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
    plain = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.allclose(out[0], plain[0], atol=1e-6)
    assert torch.allclose(out[1], alone[1], atol=1e-5)


def test_multilayer_errors(tiny_model, layer_probes):
    probes, acts = layer_probes
    k1, k2 = KSteering(probes[1]), KSteering(probes[2])
    with pytest.raises(ks.ConfigError, match="at least one member"):
        MultiLayer([])
    with pytest.raises(ks.ConfigError, match="distinct hook points"):
        MultiLayer([k1, KSteering(probes[1], steps=2)])
    with pytest.raises(ks.ConfigError, match="sum to 1"):
        MultiLayer([k1, k2], weights=[0.5, 0.7])
    with pytest.raises(ks.ConfigError, match="2 weights for 1 members"):
        MultiLayer([k1], weights=[0.5, 0.5])
    with pytest.raises(ks.WrongTypeError, match="single-hook Steerers"):
        MultiLayer([MultiLayer([k1])])
    vecs = SteeringVectors.fit(acts, 1)
    mixed = MultiLayer([CAA(vecs), k2])  # CAA and K-Steering may be mixed
    assert mixed.hook_names == ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
    # a SteeringMethod, not a Steerer: no single transform, no apply() on one tensor
    assert isinstance(mixed, SteeringMethod) and not isinstance(mixed, Steerer)
    assert not hasattr(mixed, "apply") and not hasattr(mixed, "transform")
    with pytest.raises(ks.ConfigError, match="other hook_names"):
        mixed.hooks(tiny_model, target=["alpha"], hook_names=["blocks.0.hook_resid_post"])
    with pytest.raises(ks.LabelError, match="unknown label"):
        mixed.hooks(tiny_model, target=["nope"])


# ----------------------------------------------------------------------------- issue 21


def test_multilayer_honours_the_steering_method_contract(tiny_model, layer_probes):
    probes, acts = layer_probes
    k1, k2 = KSteering(probes[1]), KSteering(probes[2])
    ml = MultiLayer([k1, k2], weights=[0.25, 0.75])
    spec = ml.spec(target=["alpha"], avoid=["beta"], alpha=8.0)
    pairs = ml.transforms(spec)
    assert [h for h, _ in pairs] == list(ml.hook_names) == [k1.hook_name, k2.hook_name]
    # each member's own transform at its own hook point, with its share of alpha
    for (hook, f), member, w in zip(pairs, ml.members, ml.weights, strict=True):
        x = acts.at(int(hook.split(".")[1]))[:3]
        expected = member.apply(x, target=["alpha"], avoid=["beta"], alpha=8.0 * w)
        assert not torch.equal(expected, x) and torch.equal(f(x), expected)
    # hooks() serves every member's hook point; its own hook points may be named (either spelling)
    hooks = ml.hooks(tiny_model, target=["alpha"], alpha=1.0)
    assert [h for h, _ in hooks] == list(ml.hook_names)
    named = ml.hooks(
        tiny_model, target=["alpha"], hook_names=["blocks.1.hook_out", "blocks.2.hook_resid_post"]
    )
    assert [h for h, _ in named] == list(ml.hook_names)
    # a single-hook Steerer is the one-pair case of the same contract
    for m in (k1, k2):
        assert isinstance(m, SteeringMethod) and m.hook_names == (m.hook_name,)
        ((hook, f),) = m.transforms(spec)
        x = acts.at(int(hook.split(".")[1]))[:3]
        assert hook == m.hook_name and torch.equal(f(x), m.transform(spec)(x))


def test_registry_methods_from_configs_equal_the_hand_built_ones(tiny_model, layer_probes):
    from ks_lens.steering import CAAConfig, DynamicComposition, KSteeringConfig
    from ks_lens.steering.registry import CLIP_FRACTION, METHODS, SteeringKit

    probes, acts = layer_probes
    probe, linear, vectors = probes[2], probes[1], SteeringVectors.fit(acts, 2)
    token = probes[1]  # stands in for the per-token probe (ksteer_token)
    kit = SteeringKit(
        probe,
        vectors,
        layer_probes=probes,
        linear_probe=linear,
        token_probe=token,
        likelihood_vectors=vectors,
    )
    # the keyword bundles the registry was written with before its configs
    old = {
        "caa_mean": CAA(vectors, combine="mean"),
        "caa_sum": CAA(vectors, combine="sum", normalize=True),
        "ksteer": KSteering(probe, steps=1),
        "ksteer_multistep": KSteering(probe, steps=3, decay=0.95),
        "ksteer_linear": KSteering(linear, steps=1),
        "ksteer_balanced": KSteering(probe, combine="balanced"),
        "ksteer_pcgrad": KSteering(probe, combine="pcgrad"),
        "ksteer_logsigmoid": KSteering(probe, objective="logsigmoid", steps=3, decay=0.95),
        "ksteer_softmin": KSteering(probe, objective="softmin", steps=3, decay=0.95),
        "ksteer_unit": KSteering(probe, step_norm="unit"),
        "ksteer_relative": KSteering(probe, step_norm="relative"),
        "ksteer_precond": KSteering(probe, precondition="diag"),
        "ksteer_token": KSteering(token, precondition="diag"),
        "ksteer_clip": KSteering(probe, max_step=CLIP_FRACTION),
        "ksteer_multilayer": MultiLayer([KSteering(probes[1]), KSteering(probes[2])]),
        "ksteer_dense": DenseSteering(probe, precondition="diag"),
        "likelihood": CAA(vectors, combine="mean"),
        "dac": DynamicComposition(vectors),  # its static (forward-pass) step is CAA (mean)'s
    }
    assert set(old) == set(METHODS) - {"dct"}
    assert METHODS["ksteer_precond"].config == KSteeringConfig(precondition="diag")
    assert METHODS["caa_sum"].config == CAAConfig(combine="sum", normalize=True)
    assert METHODS["dct"].config is None
    batch = ks.tokenize_chat(tiny_model, ["hello?", "two prompts here?"])
    spec = SteeringSpec(("alpha", "gamma"), ("beta",), 2.0)
    for name, before in old.items():
        method = METHODS[name].build(kit)
        assert type(method) is type(before) and repr(method) == repr(before), name
        if isinstance(method, (KSteering, CAA)):
            assert method.config == METHODS[name].config
        for (hook, f), (hook0, f0) in zip(
            method.transforms(spec), before.transforms(spec), strict=True
        ):
            x = acts.at(max(1, int(hook.split(".")[1])))[:4]  # ksteer_dense hooks layer 0 too
            assert hook == hook0 and torch.equal(f(x), f0(x)), name
        outs = []
        for m in (method, before):
            with m.steer(tiny_model, target=spec.target, avoid=spec.avoid, alpha=spec.alpha):
                outs.append(tiny_model(batch.input_ids, attention_mask=batch.attention_mask))
        assert torch.equal(outs[0], outs[1]), name
