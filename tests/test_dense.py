"""Dense K-Steering (issue 24, lever 4): one probe's step at a band of hook points, alpha split."""

from __future__ import annotations

import pytest
import torch
from _marks import needs_bridge_cache

import ks_lens as ks
from ks_lens._runtime.hf_path import can_bypass
from ks_lens.hooks import canonical_hook_name
from ks_lens.steering import DenseSteering, KSteering, MultiLayer, SteeringVectors, dense_band
from ks_lens.steering.config import KSteeringConfig
from ks_lens.steering.registry import METHODS, SteeringKit

BAND = [
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_resid_post",
    "blocks.2.hook_resid_pre",
    "blocks.2.hook_resid_post",
]
WEIGHTS = [0.1, 0.2, 0.3, 0.4]


def _hooked_points(model) -> dict[str, int]:
    """Canonical hook name -> number of forward hooks on that HookPoint (aliases counted once)."""
    points = {id(h): h for h in model.hook_dict.values()}
    return {h.name: len(h._forward_hooks) for h in points.values() if h._forward_hooks}


def _tokens(model):
    return ks.tokenize_chat(model, "How do I keep basil alive indoors?").input_ids


def _record(store: dict[str, torch.Tensor]):
    def hook(act, hook):
        store[hook.name] = act.detach().clone()

    return hook


def test_default_band_and_registry_method(tiny_model, tiny_probe, tiny_acts):
    assert dense_band(18) == tuple(range(12, 19)) and dense_band(2) == (0, 1, 2)
    kit = SteeringKit(tiny_probe, SteeringVectors.fit(tiny_acts, 2))
    dense = METHODS["ksteer_dense"].build(kit)
    assert isinstance(dense, DenseSteering) and isinstance(dense, MultiLayer)
    assert dense.config == KSteeringConfig(precondition="diag") == METHODS["ksteer_dense"].config
    assert METHODS["ksteer_dense"].alpha0 == METHODS["ksteer_precond"].alpha0
    # the probe sits at blocks.2.hook_resid_post: the band is L-6..L, clipped at layer 0
    assert dense.hook_names == tuple(f"blocks.{i}.hook_resid_post" for i in (0, 1, 2))
    assert dense.weights == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    # = the precond K-Steering step at each of those hook points with alpha / 3
    tokens = _tokens(tiny_model)
    plain = tiny_model(tokens)
    with dense.steer(tiny_model, target=["alpha", "gamma"], avoid=["beta"], alpha=30.0):
        steered = tiny_model(tokens)
    single = KSteering(tiny_probe, precondition="diag")
    with single.steer(
        tiny_model,
        target=["alpha", "gamma"],
        avoid=["beta"],
        alpha=10.0,
        hook_names=list(dense.hook_names),
        allow_other_hooks=True,
    ):
        manual = tiny_model(tokens)
    assert not torch.allclose(steered, plain, atol=1e-4)
    assert torch.allclose(steered, manual, atol=1e-5)
    assert "DenseSteering(probe at 'blocks.2.hook_resid_post'" in repr(dense)


def test_each_hook_gets_its_share_of_alpha(tiny_model, tiny_probe):
    dense = DenseSteering(
        tiny_probe, layers=[2, 1], kinds=("hook_resid_post", "resid_pre"), weights=WEIGHTS
    )
    assert dense.hook_names == tuple(BAND)  # forward order, whatever order was given
    assert dense.layers == (1, 2) and dense.kinds == ("resid_pre", "resid_post")
    target, avoid, alpha = ["gamma"], ["alpha"], 50.0
    hooks = dense.hooks(tiny_model, target=target, avoid=avoid, alpha=alpha)
    assert [name for name, _ in hooks] == BAND
    before = _hooked_points(tiny_model)
    seen_in: dict[str, torch.Tensor] = {}
    seen_out: dict[str, torch.Tensor] = {}
    tokens = _tokens(tiny_model)
    # spies registered before the steering hooks see each hook's input, after it its output
    with tiny_model.hooks(fwd_hooks=[(h, _record(seen_in)) for h in BAND]):
        with dense.steer(tiny_model, target=target, avoid=avoid, alpha=alpha):
            during = _hooked_points(tiny_model)
            tiny_model.run_with_hooks(tokens, fwd_hooks=[(h, _record(seen_out)) for h in BAND])
    # exactly the band's four hook points got one steering hook each (beside the spies)
    added = {k: during[k] - before.get(k, 0) for k in during if during[k] != before.get(k, 0)}
    assert added == {canonical_hook_name(h): 2 for h in BAND}  # the spy and the steering hook
    probe = tiny_probe
    t, a = probe.label_indices(target), probe.label_indices(avoid)
    for h, w in zip(BAND, WEIGHTS, strict=True):
        x = seen_in[canonical_hook_name(h)]
        y = seen_out[canonical_hook_name(h)]
        expected = KSteering(probe).apply(x, target=target, avoid=avoid, alpha=alpha * w)
        assert torch.allclose(y, expected, atol=1e-5), h
        # by hand: one raw step, x - alpha * w * grad(mean f_avoid - mean f_target)
        xg = x.detach().clone().requires_grad_(True)
        logits = probe(xg)
        loss = (logits[..., a].mean(-1) - logits[..., t].mean(-1)).sum()
        (g,) = torch.autograd.grad(loss, xg)
        assert torch.allclose(y - x, -alpha * w * g, atol=1e-5), h
        assert float((y - x).norm()) > 1e-3  # each hook really moved its activation
    # pre of layer 2 sees post of layer 1 (the same point of the stream, stepped once already)
    assert torch.allclose(
        seen_in[canonical_hook_name(BAND[2])], seen_out[canonical_hook_name(BAND[1])]
    )
    assert _hooked_points(tiny_model) == before


def test_hooks_removed_on_exit_and_after_an_exception(tiny_model, tiny_probe):
    dense = DenseSteering(tiny_probe, layers=range(4), kinds=["resid_pre", "resid_post"])
    tokens = _tokens(tiny_model)
    plain = tiny_model(tokens)
    before = _hooked_points(tiny_model)
    with dense.steer(tiny_model, target=["beta"], alpha=20.0):
        assert len(_hooked_points(tiny_model)) == len(before) + 8
        assert not torch.equal(tiny_model(tokens), plain)
    assert _hooked_points(tiny_model) == before
    with (
        pytest.raises(RuntimeError, match="boom"),
        dense.steer(tiny_model, target=["beta"], alpha=20.0),
    ):
        raise RuntimeError("boom")
    assert _hooked_points(tiny_model) == before
    assert torch.equal(tiny_model(tokens), plain)


def test_bad_bands_raise_config_errors(tiny_model, tiny_probe):
    with pytest.raises(ks.ConfigError, match="band is empty"):
        DenseSteering(tiny_probe, layers=[])
    with pytest.raises(ks.ConfigError, match="no hook kinds"):
        DenseSteering(tiny_probe, kinds=[])
    with pytest.raises(ks.ConfigError, match="resid_mid changes only that block's MLP input"):
        DenseSteering(tiny_probe, kinds=("resid_pre", "resid_mid"))
    with pytest.raises(ks.ConfigError, match="unknown hook kind 'attn_out'"):
        DenseSteering(tiny_probe, kinds=("attn_out",))
    with pytest.raises(ks.ConfigError, match="non-negative block indices"):
        DenseSteering(tiny_probe, layers=[-1, 2])
    with pytest.raises(ks.ConfigError, match="repeated"):
        DenseSteering(tiny_probe, layers=[1, 1])
    with pytest.raises(ks.ConfigError, match="repeated"):
        DenseSteering(tiny_probe, kinds=["resid_post", "hook_resid_post"])
    with pytest.raises(ks.ConfigError, match="sequence of block indices"):
        DenseSteering(tiny_probe, layers="12")
    with pytest.raises(ks.ConfigError, match="sum to 1"):
        DenseSteering(tiny_probe, layers=[1, 2], weights=[0.5, 0.6])
    with pytest.raises(ks.ConfigError, match="both config= and the options"):
        DenseSteering(tiny_probe, config=KSteeringConfig(), steps=2)
    with pytest.raises(ks.WrongTypeError, match="needs a ks_lens Probe"):
        DenseSteering("probe")  # type: ignore[arg-type]
    with pytest.raises(ks.ConfigError, match="non-negative int"):
        dense_band(-1)
    # a layer past the model's last (tiny model: 4 layers) is refused before any hook goes in
    before = _hooked_points(tiny_model)
    far = DenseSteering(tiny_probe, layers=[2, 3, 4])
    with pytest.raises(ks.ConfigError, match=r"reaches layer\(s\) \[4\].*4 layers \(0..3\)"):
        with far.steer(tiny_model, target=["beta"], alpha=1.0):
            pass
    with pytest.raises(ks.ConfigError, match="reaches layer"):
        ks.steering.steer_groups(tiny_model, [(far, far.spec(["beta"]))], [0]).__enter__()
    assert _hooked_points(tiny_model) == before


@needs_bridge_cache
def test_fast_path_routes_the_band(tiny_model, tiny_probe):
    """resid_pre and resid_post are both routed on the plain-HF fast path: generation there
    gives the full bridge's tokens."""
    dense = DenseSteering(tiny_probe, layers=[1, 2], kinds=("resid_pre", "resid_post"))

    def gen(full_bridge: bool):
        with dense.steer(tiny_model, target=["gamma"], alpha=30.0, positions="generated"):
            assert can_bypass(tiny_model)
            return ks.generate(
                tiny_model, ["hi?"], max_new_tokens=6, full_bridge=full_bridge
            ).output_ids

    steered = gen(False)
    assert steered == gen(True)
    assert steered != ks.generate(tiny_model, ["hi?"], max_new_tokens=6).output_ids


def test_comparison_runs_the_dense_lever(tiny_model, tiny_acts, tiny_probe, tiny_dataset):
    """The study's dense lever, ("caa_mean", "ksteer_precond", "ksteer_dense"), runs end to end
    through the comparison (calibration, grouped generation, activation readouts)."""
    from test_comparison import _FakeTextEvaluator

    from ks_lens.comparison import ComparisonConfig, run_comparison
    from ks_lens.probes import ProbeConfig, train_probe

    methods = ("caa_mean", "ksteer_precond", "ksteer_dense")
    res = run_comparison(
        tiny_model,
        probe=tiny_probe,
        vectors=SteeringVectors.fit(tiny_acts, 2),
        evaluator=train_probe(tiny_acts, 3, config=ProbeConfig(hidden=16, epochs=3, seed=1)),
        text_evaluator=_FakeTextEvaluator(),
        calib_questions=["hi?", "yo?"],
        test_questions=["a?", "b?"],
        config=ComparisonConfig(
            methods=methods,
            kl_budget=0.05,
            act_combos_per_size=1,
            sizes=(1,),
            max_new_tokens=3,
            calib_tokens=3,
            calib_bisect_steps=1,
            n_resamples=50,
            instructed=False,
        ),
        progress=False,
        instructions=tiny_dataset.instructions,
    )
    acts = {r.method: r for r in res.summaries if r.lens == "activation"}
    assert set(methods) <= set(acts)
    assert acts["ksteer_dense"].target_prob.estimate != acts["unsteered"].target_prob.estimate
    assert {e.method for e in res.equal_kl if e.lens == "text"} >= set(methods)
