from __future__ import annotations

import numpy as np
import pytest
import torch

import ks_lens as ks
from ks_lens.errors import HookPointError, LabelError, MetadataMismatchError
from ks_lens.generation import generate
from ks_lens.probes import Probe, ProbeConfig
from ks_lens.steering import (
    CAA,
    CAAConfig,
    KProjection,
    KSteering,
    KSteeringConfig,
    SteeringSpec,
    SteeringVectors,
    combine_gradients,
    label_coefficients,
    objective_value,
    probe_gradients,
)

LABELS = ("alpha", "beta", "gamma")


def _loss(probe, x, target, avoid):
    f = probe(x)
    t = [LABELS.index(n) for n in target]
    a = [LABELS.index(n) for n in avoid]
    la = f[:, a].mean(-1) if a else 0.0
    lt = f[:, t].mean(-1) if t else 0.0
    return (la - lt).sum()


@pytest.mark.parametrize(
    ("target", "avoid"), [(["alpha"], []), (["alpha", "gamma"], ["beta"]), ([], ["beta"])]
)
def test_step_is_minus_alpha_autograd_gradient(tiny_probe, tiny_acts, target, avoid):
    x = tiny_acts.at(2)[:7].clone()
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_loss(tiny_probe, xg, target, avoid), xg)
    out = KSteering(tiny_probe).apply(x, target=target, avoid=avoid, alpha=2.5)
    torch.testing.assert_close(out, x - 2.5 * g, atol=1e-5, rtol=1e-5)


def test_preconditioned_step_is_the_gradient_in_the_probes_standardised_geometry(
    tiny_probe, tiny_acts
):
    """precondition="diag": x' = x - alpha * sigma^2 * grad_x L, which equals
    x - alpha * sigma * grad_h L for the standardised input h = (x - mu) / sigma."""
    x = tiny_acts.at(2)[:7].clone()
    target, avoid = ["alpha", "gamma"], ["beta"]
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(_loss(tiny_probe, xg, target, avoid), xg)
    var = tiny_probe.std**2
    assert float(var.std() / var.mean()) > 0.1  # variances differ by dimension: the step tilts
    k = KSteering(tiny_probe, precondition="diag")
    out = k.apply(x, target=target, avoid=avoid, alpha=2.5)
    torch.testing.assert_close(out, x - 2.5 * var * gx, atol=1e-5, rtol=1e-5)
    # the same step through the standardised coordinates
    h = ((x - tiny_probe.mean) / tiny_probe.std).requires_grad_(True)
    (gh,) = torch.autograd.grad(
        _loss(tiny_probe, h * tiny_probe.std + tiny_probe.mean, target, avoid), h
    )
    torch.testing.assert_close(out, x - 2.5 * tiny_probe.std * gh, atol=1e-5, rtol=1e-5)
    # with step_norm the preconditioned direction is normalised, 3 steps use fresh gradients
    unit = KSteering(tiny_probe, precondition="diag", step_norm="unit")
    delta = unit.apply(x, target=target, avoid=avoid, alpha=0.7) - x
    torch.testing.assert_close(delta.norm(dim=-1), torch.full((7,), 0.7), atol=1e-5, rtol=0)
    cos = torch.nn.functional.cosine_similarity(-delta, var * gx, dim=-1)
    torch.testing.assert_close(cos, torch.ones(7), atol=1e-5, rtol=0)
    assert "precondition='diag'" in repr(k)
    with pytest.raises(ks.ConfigError, match="unknown precondition 'full'"):
        KSteering(tiny_probe, precondition="full")


def test_gradient_matches_finite_differences(tiny_probe, tiny_acts):
    x = tiny_acts.at(2)[:3].double()
    probe = tiny_probe.double()
    try:
        g = KSteering(probe).direction(x, SteeringSpec(("alpha",), ("beta",), 1.0))
        eps = 1e-5
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            i = int(torch.randint(0, x.shape[0], (1,), generator=gen))
            j = int(torch.randint(0, x.shape[1], (1,), generator=gen))
            xp, xm = x.clone(), x.clone()
            xp[i, j] += eps
            xm[i, j] -= eps
            fd = (_loss(probe, xp, ["alpha"], ["beta"]) - _loss(probe, xm, ["alpha"], ["beta"])) / (
                2 * eps
            )
            assert abs(float(fd) - float(g[i, j])) < 1e-6 * max(1.0, abs(float(fd)))
    finally:
        tiny_probe.float()


def test_per_example_gradients_do_not_depend_on_batch(tiny_probe, tiny_acts):
    x = tiny_acts.at(2)[:8]
    ks_ = KSteering(tiny_probe)
    batched = ks_.apply(x, target=["alpha"], alpha=3.0)
    one_by_one = torch.cat([ks_.apply(x[i : i + 1], target=["alpha"], alpha=3.0) for i in range(8)])
    torch.testing.assert_close(batched, one_by_one, atol=2e-5, rtol=2e-5)


def test_multistep_with_decay_and_step_norms(tiny_probe, tiny_acts):
    x = tiny_acts.at(2)[:4]
    spec = SteeringSpec(("beta",), (), 2.0)
    single = KSteering(tiny_probe)
    cur = x.clone()
    for k in range(3):
        cur = cur - 2.0 * 0.5**k * single.direction(cur, spec)
    torch.testing.assert_close(
        KSteering(tiny_probe, steps=3, decay=0.5).apply(x, target=["beta"], alpha=2.0),
        cur,
        atol=1e-5,
        rtol=1e-5,
    )
    unit = KSteering(tiny_probe, step_norm="unit").apply(x, target=["beta"], alpha=0.7)
    torch.testing.assert_close((unit - x).norm(dim=-1), torch.full((4,), 0.7), atol=1e-4, rtol=1e-4)
    rel = KSteering(tiny_probe, step_norm="relative").apply(x, target=["beta"], alpha=0.1)
    torch.testing.assert_close((rel - x).norm(dim=-1), 0.1 * x.norm(dim=-1), atol=1e-3, rtol=1e-4)
    traj = KSteering(tiny_probe, steps=3, decay=0.5).trajectory(x, spec)
    assert len(traj) == 4 and torch.allclose(traj[-1], cur, atol=1e-5)


@pytest.mark.parametrize("objective", ["logits", "logsigmoid", "softmin"])
def test_objective_coefficients_match_autograd(tiny_probe, tiny_acts, objective):
    x = tiny_acts.at(2)[:5].clone().requires_grad_(True)
    t, a = [0, 2], [1]
    logits = tiny_probe(x)
    (g_ref,) = torch.autograd.grad(objective_value(logits, t, a, objective, 0.5).sum(), x)
    c = label_coefficients(logits.detach(), t, a, objective, 0.5)
    (g,) = torch.autograd.grad(tiny_probe(x), x, grad_outputs=c)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    d = KSteering(tiny_probe, objective=objective, temperature=0.5).direction(
        x.detach(), SteeringSpec(("alpha", "gamma"), ("beta",), 1.0)
    )
    torch.testing.assert_close(d, g_ref, atol=1e-5, rtol=1e-5)


def test_combine_rules_on_planted_gradients():
    g1 = torch.tensor([[[1.0, 0.0]]])
    g2 = torch.tensor([[[-3.0, 1.0]]])
    both = torch.cat([g1, g2])  # conflicting: dot = -3
    torch.testing.assert_close(combine_gradients(both, "sum"), torch.tensor([[-2.0, 1.0]]))
    bal = combine_gradients(both, "balanced")
    mean_norm = (1.0 + 10**0.5) / 2
    torch.testing.assert_close(
        bal, mean_norm * (torch.tensor([[1.0, 0.0]]) + torch.tensor([[-3.0, 1.0]]) / 10**0.5)
    )
    pc = combine_gradients(both, "pcgrad")
    # g1 loses its component along g2; g2 loses its component along g1
    g1p = torch.tensor([1.0, 0.0]) - (-3.0 / 10.0) * torch.tensor([-3.0, 1.0])
    g2p = torch.tensor([-3.0, 1.0]) - (-3.0 / 1.0) * torch.tensor([1.0, 0.0])
    torch.testing.assert_close(pc, (g1p + g2p)[None])
    assert float(g1p @ torch.tensor([-3.0, 1.0])) == pytest.approx(0.0, abs=1e-6)
    # no conflict: pcgrad == sum
    agree = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    torch.testing.assert_close(combine_gradients(agree, "pcgrad"), combine_gradients(agree, "sum"))


def test_per_label_gradients_match_separate_backward(tiny_probe, tiny_acts):
    x = tiny_acts.at(2)[:4]
    per, _ = probe_gradients(tiny_probe, x, [0, 2])
    for i, lab in enumerate([0, 2]):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(tiny_probe(xg)[:, lab].sum(), xg)
        torch.testing.assert_close(per[i], g, atol=1e-6, rtol=1e-6)


def _capture(model, batch, hook_name, method=None, positions="all", **kw):
    seen = {}

    def rec(act, hook):
        seen["x"] = act.detach().clone()

    ctx = method.steer(model, positions=positions, **kw) if method else _null()
    with ctx, model.hooks(fwd_hooks=[(hook_name, rec)]):
        model(batch.input_ids, attention_mask=batch.attention_mask)
    return seen["x"]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_same_steered_activation_alone_and_in_padded_batch(tiny_model, tiny_probe):
    ks_ = KSteering(tiny_probe)
    hook = tiny_probe.hook_name
    prompts = ["short one?", "a considerably longer prompt than the other, with padding needed?"]
    batch = ks.tokenize_chat(tiny_model, prompts)
    steered = _capture(tiny_model, batch, hook, ks_, target=["alpha"], alpha=4.0)
    alone = ks.tokenize_chat(tiny_model, prompts[:1])
    steered_alone = _capture(tiny_model, alone, hook, ks_, target=["alpha"], alpha=4.0)
    n = alone.input_ids.shape[1]
    torch.testing.assert_close(steered[0, -n:], steered_alone[0], atol=1e-5, rtol=1e-5)
    # padding positions are never written
    plain = _capture(tiny_model, batch, hook)
    pad = batch.attention_mask[0] == 0
    assert torch.equal(steered[0, pad], plain[0, pad])


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "last"])
def test_exactly_the_chosen_positions_change_in_forward(tiny_model, tiny_probe, positions):
    ks_ = KSteering(tiny_probe)
    hook = tiny_probe.hook_name
    batch = ks.tokenize_chat(tiny_model, ["hi?", "a longer prompt?"])
    plain = _capture(tiny_model, batch, hook)
    steered = _capture(
        tiny_model, batch, hook, ks_, positions=positions, target=["gamma"], alpha=5.0
    )
    changed = (steered != plain).any(-1)
    real = batch.attention_mask.bool()
    expected = {
        "all": real,
        "prompt": real,
        "generated": torch.zeros_like(real),
        "last": torch.zeros_like(real).index_fill_(1, torch.tensor([real.shape[1] - 1]), True),
    }[positions]
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "last"])
def test_exactly_the_chosen_positions_change_during_cached_generation(
    tiny_model, tiny_probe, positions
):
    """Hooks before and after the steering hook on the same hook point see each call's activation
    unsteered and steered: exactly the chosen positions differ, by exactly the K-Steering step."""
    ks_ = KSteering(tiny_probe)
    hook = tiny_probe.hook_name
    pre, post = [], []

    def before(act, hook):
        pre.append(act.detach().clone())

    def after(act, hook):
        post.append(act.detach().clone())

    prompts = ["hi?", "a longer prompt?"]
    with tiny_model.hooks(fwd_hooks=[(hook, before)]):
        with ks_.steer(tiny_model, target=["gamma"], alpha=5.0, positions=positions):
            with tiny_model.hooks(fwd_hooks=[(hook, after)]):
                generate(tiny_model, prompts, max_new_tokens=4)
    assert [p.shape[1] for p in pre][1:] == [
        1,
        1,
        1,
    ]  # the prompt, then one token per step (KV cache)
    real = ks.tokenize_chat(tiny_model, prompts).attention_mask.bool()
    last = torch.zeros_like(real)
    last[:, -1] = True
    none = torch.zeros_like(real)
    expected_prompt = {"all": real, "prompt": real, "generated": none, "last": last}[positions]
    decode_steered = positions in ("all", "generated")
    f = ks_.transform(ks_.spec(["gamma"], None, 5.0))
    for step, (a, b) in enumerate(zip(pre, post, strict=True)):
        changed = (a != b).any(-1)
        want = expected_prompt if step == 0 else torch.full_like(changed, decode_steered)
        assert torch.equal(changed, want), f"step {step}"
        if changed.any():
            torch.testing.assert_close(b[changed], f(a[changed]), atol=1e-6, rtol=1e-6)


def test_hooks_removed_after_context_even_on_error(tiny_model, tiny_probe):
    batch = ks.tokenize_chat(tiny_model, ["hello?", "two prompts?"])
    before = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
    n_hooks = sum(len(h._forward_hooks) for h in tiny_model.hook_dict.values())
    n_pre = len(tiny_model.original_model._forward_pre_hooks)
    with KSteering(tiny_probe).steer(tiny_model, target=["alpha"], alpha=50.0):
        steered = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
    assert not torch.equal(steered, before)
    with (
        pytest.raises(RuntimeError, match="boom"),
        KSteering(tiny_probe).steer(tiny_model, target=["alpha"], alpha=50.0),
    ):
        raise RuntimeError("boom")
    after = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.equal(after, before)
    assert sum(len(h._forward_hooks) for h in tiny_model.hook_dict.values()) == n_hooks
    assert len(tiny_model.original_model._forward_pre_hooks) == n_pre


def test_works_under_inference_mode_and_no_grad(tiny_model, tiny_probe):
    batch = ks.tokenize_chat(tiny_model, ["hello?"])
    with torch.no_grad():
        ref = tiny_model(batch.input_ids)
    with torch.no_grad(), KSteering(tiny_probe).steer(tiny_model, target=["beta"], alpha=20.0):
        a = tiny_model(batch.input_ids)
    with (
        torch.inference_mode(),
        KSteering(tiny_probe, steps=2, combine="pcgrad").steer(
            tiny_model, target=["beta", "gamma"], alpha=20.0
        ),
    ):
        b = tiny_model(batch.input_ids)
    assert not torch.equal(a, ref)
    assert b.shape == ref.shape


def test_gradients_still_flow_through_steered_model(tiny_model, tiny_probe):
    batch = ks.tokenize_chat(tiny_model, ["hello?"])
    emb = {}

    def keep(act, hook):
        emb["x"] = act.detach().clone().requires_grad_(True)
        return emb["x"]

    with torch.enable_grad(), KSteering(tiny_probe).steer(tiny_model, target=["beta"], alpha=5.0):
        with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", keep)]):
            out = tiny_model(batch.input_ids)
        out[0, -1].sum().backward()
    assert emb["x"].grad is not None and emb["x"].grad.abs().sum() > 0


def test_steering_errors(tiny_model, tiny_probe):
    ks_ = KSteering(tiny_probe)
    with pytest.raises(LabelError, match="unknown label"):
        ks_.spec(["delta"])
    with pytest.raises(LabelError, match="both target and avoid"):
        ks_.spec(["alpha"], ["alpha"])
    with pytest.raises(LabelError, match="nothing to steer"):
        ks_.spec([], [])
    with pytest.raises(ValueError, match="finite"):
        ks_.spec(["alpha"], alpha=float("nan"))
    with (
        pytest.raises(HookPointError, match="out of range"),
        ks_.steer(
            tiny_model,
            target=["alpha"],
            hook_names="blocks.9.hook_resid_post",
            allow_other_hooks=True,
        ),
    ):
        pass
    with (
        pytest.raises(MetadataMismatchError, match="outside the hook point it was trained on"),
        ks_.steer(tiny_model, target=["alpha"], hook_names="blocks.1.hook_resid_post"),
    ):
        pass
    with (
        pytest.raises(HookPointError, match="resid_mid"),
        ks_.steer(
            tiny_model,
            target=["alpha"],
            hook_names="blocks.2.hook_resid_mid",
            allow_other_hooks=True,
        ),
    ):
        pass
    other = ks.load_model("tiny-random-llama", seed=1)
    with (
        pytest.raises(MetadataMismatchError, match="another model"),
        ks_.steer(other, target=["alpha"]),
    ):
        pass
    # a probe for a different d_model
    wrong = Probe(
        [(torch.zeros(32, 3), torch.zeros(3))],
        torch.zeros(32),
        torch.ones(32),
        label_names=LABELS,
        hook_name="blocks.2.hook_resid_post",
        model={"model": "tiny-random-llama", "d_model": 32, "n_layers": 4},
        config=ProbeConfig(architecture="linear"),
    )
    with (
        pytest.raises(MetadataMismatchError, match="d_model"),
        KSteering(wrong).steer(tiny_model, target=["alpha"]),
    ):
        pass
    with pytest.raises(ValueError, match="steps"):
        KSteering(tiny_probe, steps=0)
    with (
        pytest.raises(ValueError, match="unknown positions"),
        ks_.steer(tiny_model, target=["alpha"], positions="middle"),
    ):
        pass


def test_other_hooks_when_explicitly_allowed(tiny_model, tiny_probe):
    batch = ks.tokenize_chat(tiny_model, ["hello?"])
    plain = _capture(tiny_model, batch, "blocks.1.hook_resid_post")
    with KSteering(tiny_probe).steer(
        tiny_model,
        target=["alpha"],
        alpha=5.0,
        hook_names=["blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"],
        allow_other_hooks=True,
    ):
        steered = _capture(tiny_model, batch, "blocks.1.hook_resid_post")
    assert not torch.equal(plain, steered)


def test_run_with_hooks_ready_functions(tiny_model, tiny_probe):
    batch = ks.tokenize_chat(tiny_model, ["hello?"])
    hooks = KSteering(tiny_probe).hooks(tiny_model, target=["alpha"], alpha=10.0)
    assert [h[0] for h in hooks] == [tiny_probe.hook_name]
    a = tiny_model.run_with_hooks(batch.input_ids, fwd_hooks=hooks)
    with KSteering(tiny_probe).steer(tiny_model, target=["alpha"], alpha=10.0):
        b = tiny_model(batch.input_ids)
    torch.testing.assert_close(a, b)


def test_caa_vectors_equal_hand_computed_means(tiny_acts):
    vec = SteeringVectors.fit(tiny_acts, 1)
    x = tiny_acts.at(1)
    y = tiny_acts.labels
    for k in range(3):
        torch.testing.assert_close(vec.vectors[k], x[y == k].mean(0) - x[y != k].mean(0))
    cen = SteeringVectors.fit(tiny_acts, 1, method="mean_centring")
    torch.testing.assert_close(cen.vectors[2], x[y == 2].mean(0) - x.mean(0))
    m = vec.combine(["alpha", "beta"], ["gamma"], how="mean")
    torch.testing.assert_close(m, (vec.vectors[0] + vec.vectors[1]) / 2 - vec.vectors[2])
    s = vec.combine(["alpha", "beta"], ["gamma"], how="sum", normalize=True)
    raw = vec.vectors[0] + vec.vectors[1] - vec.vectors[2]
    torch.testing.assert_close(s, raw / raw.norm())


def test_caa_steering_adds_alpha_v_and_ablation(tiny_acts, tiny_model):
    vec = SteeringVectors.fit(tiny_acts, 2)
    x = tiny_acts.at(2)[:5]
    out = CAA(vec).apply(x, target=["alpha", "gamma"], alpha=1.5)
    torch.testing.assert_close(out, x + 1.5 * (vec.vectors[0] + vec.vectors[2]) / 2)
    abl = CAA(vec, avoid_mode="ablate").apply(x, avoid=["beta"], alpha=1.0)
    d = vec.vectors[1] / vec.vectors[1].norm()
    torch.testing.assert_close(abl @ d, torch.zeros(5), atol=1e-4, rtol=0)
    batch = ks.tokenize_chat(tiny_model, ["hello?"])
    plain = _capture(tiny_model, batch, vec.hook_name)
    steered = _capture(tiny_model, batch, vec.hook_name, CAA(vec), target=["beta"], alpha=2.0)
    torch.testing.assert_close(steered, plain + 2.0 * vec.vectors[1], atol=1e-5, rtol=1e-5)


def test_projection_removal(tiny_probe, tiny_acts):
    x = tiny_acts.at(2)[:4]
    per, _ = probe_gradients(tiny_probe, x, [1])
    g = per[0]
    removed = KProjection(tiny_probe, how="remove").apply(x, avoid=["beta"])
    torch.testing.assert_close((removed * g).sum(-1), torch.zeros(4), atol=1e-3, rtol=0)
    reflected = KProjection(tiny_probe, how="reflect").apply(x, avoid=["beta"])
    torch.testing.assert_close((reflected * g).sum(-1), -(x * g).sum(-1), atol=1e-3, rtol=1e-4)
    with pytest.raises(LabelError, match="avoid-only"):
        KProjection(tiny_probe).apply(x, target=["alpha"])


def test_vectors_save_load_round_trip(tiny_acts, tiny_model, tmp_path):
    vec = SteeringVectors.fit(tiny_acts, 2)
    vec.save(tmp_path / "v")
    back = SteeringVectors.load(tmp_path / "v", model=tiny_model)
    assert torch.equal(back.vectors, vec.vectors)
    assert (
        back.label_names == vec.label_names
        and back.hook_name == vec.hook_name
        and back.method == vec.method
    )
    with pytest.raises(MetadataMismatchError, match="not 'blocks.1.hook_resid_post'"):
        SteeringVectors.load(tmp_path / "v", hook_name="blocks.1.hook_resid_post")
    with pytest.raises(MetadataMismatchError, match="another model"):
        SteeringVectors.load(tmp_path / "v", model=ks.load_model("tiny-random-llama", seed=2))


def test_last_position_follows_the_mask_with_right_padding(tiny_model, tiny_probe):
    """Users may pass right-padded batches: 'last' is each row's last real token, and padding
    is never written."""
    tok = tiny_model.tokenizer
    texts = [ks.format_chat(tok, p) for p in ("hi?", "a much longer prompt than that?")]
    enc = tok(
        texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
    )
    batch = ks.TokenBatch(enc["input_ids"], enc["attention_mask"])
    hook = tiny_probe.hook_name
    plain = _capture(tiny_model, batch, hook)
    steered = _capture(
        tiny_model, batch, hook, KSteering(tiny_probe), positions="last", target=["beta"], alpha=5.0
    )
    changed = (steered != plain).any(-1)
    lengths = batch.attention_mask.sum(1)
    expected = torch.zeros_like(changed)
    expected[torch.arange(2), lengths - 1] = True
    assert torch.equal(changed, expected)
    steered_all = _capture(
        tiny_model, batch, hook, KSteering(tiny_probe), positions="all", target=["beta"], alpha=5.0
    )
    assert torch.equal((steered_all != plain).any(-1), batch.attention_mask.bool())


def test_alpha_is_a_non_negative_number_for_every_method(tiny_probe, tiny_acts):
    x = tiny_acts.at(2)[:3]
    caa = CAA(SteeringVectors.fit(tiny_acts, 2))
    for method in (KSteering(tiny_probe), caa, KProjection(tiny_probe)):
        target = [] if isinstance(method, KProjection) else ["alpha"]
        with pytest.raises(ks.ConfigError, match="alpha must be >= 0, got -2: .*put it in avoid"):
            method.apply(x, target=target, avoid=["beta"], alpha=-2.0)
        for bad in (float("inf"), float("nan"), True, "2", torch.tensor([1.0, 2.0])):
            with pytest.raises(ks.ConfigError, match="alpha must be"):
                method.apply(x, target=target, avoid=["beta"], alpha=bad)
        # a 0-d tensor (or a NumPy scalar) is a number
        as_tensor = method.apply(x, target=target, avoid=["beta"], alpha=torch.tensor(2.0))
        as_float = method.apply(x, target=target, avoid=["beta"], alpha=2.0)
        assert torch.equal(as_tensor, as_float)
    assert KSteering(tiny_probe).spec(["alpha"], alpha=np.float32(1.5)).alpha == 1.5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": float("nan")}, "temperature must be a positive finite number, got nan"),
        ({"temperature": float("inf")}, "temperature must be a positive finite number"),
        ({"temperature": 0}, "temperature must be a positive finite number"),
        ({"decay": float("nan")}, r"decay must be in \(0, 1\], got nan"),
        ({"steps": True}, "steps must be a positive int, got True"),
    ],
)
def test_ksteering_options_must_be_finite(tiny_probe, kwargs, message):
    with pytest.raises(ks.ConfigError, match=message):
        KSteering(tiny_probe, **kwargs)


def test_transforms_return_on_the_activation_dtype_and_device(tiny_probe, tiny_acts):
    """A probe (or vectors) in another dtype than the activations: the step is computed in the
    probe's dtype and added back in the activation's own dtype and device."""
    import copy

    x = tiny_acts.at(2)[:3]
    p64 = copy.deepcopy(tiny_probe).to(torch.float64)
    for method, method64 in (
        (KSteering(tiny_probe, steps=2), KSteering(p64, steps=2)),
        (CAA(SteeringVectors.fit(tiny_acts, 2)), None),
    ):
        f = method.transform(method.spec(["beta"], None, 2.0))
        for xin in (x, x.double(), x.to(torch.bfloat16)):
            out = f(xin)
            assert out.dtype == xin.dtype and out.device == xin.device
        if method64 is not None:
            f64 = method64.transform(method64.spec(["beta"], None, 2.0))
            out64 = f64(x)
            assert out64.dtype == torch.float32
            torch.testing.assert_close(out64, f(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- configs (issue 21)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (KSteeringConfig, {"steps": 0}, "steps must be a positive int, got 0"),
        (KSteeringConfig, {"steps": 2.0}, "steps must be a positive int, got 2.0"),
        (KSteeringConfig, {"decay": 0}, r"decay must be in \(0, 1\], got 0"),
        (KSteeringConfig, {"decay": 1.5}, r"decay must be in \(0, 1\], got 1.5"),
        (
            KSteeringConfig,
            {"step_norm": "l2"},
            r"unknown step_norm 'l2'; use one of \(None, 'unit', 'relative'\)",
        ),
        (
            KSteeringConfig,
            {"objective": "mse"},
            r"unknown objective 'mse'; use one of \('logits', 'logsigmoid', 'softmin'\)",
        ),
        (
            KSteeringConfig,
            {"combine": "mean"},
            r"unknown combine 'mean'; use one of \('sum', 'balanced', 'pcgrad'\)",
        ),
        (KSteeringConfig, {"temperature": -1.0}, "temperature must be a positive finite number"),
        (KSteeringConfig, {"max_step": 0.0}, "max_step must be a positive finite fraction"),
        (KSteeringConfig, {"max_step": float("inf")}, "max_step must be a positive finite"),
        (
            KSteeringConfig,
            {"precondition": "full"},
            r"unknown precondition 'full'; use one of \(None, 'diag'\)",
        ),
        (
            CAAConfig,
            {"combine": "pcgrad"},
            r"unknown combine 'pcgrad'; use one of \('mean', 'sum'\)",
        ),
        (CAAConfig, {"normalize": "yes"}, "normalize must be True or False, got 'yes'"),
        (
            CAAConfig,
            {"avoid_mode": "drop"},
            r"unknown avoid_mode 'drop'; use one of \('subtract', 'ablate'\)",
        ),
    ],
)
def test_config_rules(cls, kwargs, message):
    with pytest.raises(ks.ConfigError, match=message):
        cls(**kwargs)
    cls()  # the defaults are valid


def test_the_objective_check_is_one_message(tiny_probe, tiny_acts):
    logits = tiny_probe(tiny_acts.at(2)[:2])
    with pytest.raises(ks.ConfigError) as from_config:
        KSteeringConfig(objective="mse")
    for f in (label_coefficients, objective_value):
        with pytest.raises(ks.ConfigError) as from_function:
            f(logits, [0], [], objective="mse")
        assert str(from_function.value) == str(from_config.value)


def test_configs_store_numbers_as_floats():
    c = KSteeringConfig(decay=1, temperature=2, max_step=1)
    assert (c.decay, c.temperature, c.max_step) == (1.0, 2.0, 1.0)
    assert all(type(v) is float for v in (c.decay, c.temperature, c.max_step))
    assert c == KSteeringConfig(decay=1.0, temperature=2.0, max_step=1.0)


def test_keyword_options_and_config_build_the_same_method(tiny_probe, tiny_acts):
    x = tiny_acts.at(2)[:5]
    options = dict(
        steps=3,
        decay=0.9,
        step_norm="relative",
        objective="softmin",
        combine="pcgrad",
        temperature=0.5,
        max_step=0.3,
        precondition="diag",
    )
    by_kwargs = KSteering(tiny_probe, **options)
    by_config = KSteering(tiny_probe, config=KSteeringConfig(**options))
    positional = KSteering(tiny_probe, KSteeringConfig(**options))
    assert by_kwargs.config == by_config.config == positional.config
    assert repr(by_kwargs) == repr(by_config)
    assert (by_kwargs.steps, by_kwargs.decay, by_kwargs.precondition) == (3, 0.9, "diag")
    spec = dict(target=["alpha", "gamma"], avoid=["beta"], alpha=0.7)
    steered = by_kwargs.apply(x, **spec)
    assert not torch.equal(steered, x)
    assert torch.equal(steered, by_config.apply(x, **spec))
    assert torch.equal(steered, positional.apply(x, **spec))
    assert KSteering(tiny_probe).config == KSteeringConfig()
    # CAA likewise
    vecs = SteeringVectors.fit(tiny_acts, 2)
    caa_kwargs = CAA(vecs, combine="sum", normalize=True, avoid_mode="ablate")
    caa_config = CAA(vecs, config=CAAConfig("sum", True, "ablate"))
    assert caa_kwargs.config == caa_config.config and repr(caa_kwargs) == repr(caa_config)
    assert torch.equal(caa_kwargs.apply(x, **spec), caa_config.apply(x, **spec))
    assert CAA(vecs).config == CAAConfig()


def test_config_and_keyword_options_together_are_refused(tiny_probe, tiny_acts):
    with pytest.raises(ks.ConfigError, match=r"both config= and the options \['decay', 'steps'\]"):
        KSteering(tiny_probe, KSteeringConfig(), steps=2, decay=0.5)
    with pytest.raises(ks.WrongTypeError, match=r"KSteering takes config=KSteeringConfig\(...\)"):
        KSteering(tiny_probe, config=CAAConfig())
    with pytest.raises(TypeError, match="stepz"):
        KSteering(tiny_probe, stepz=2)
    vecs = SteeringVectors.fit(tiny_acts, 2)
    with pytest.raises(
        ks.ConfigError, match=r"CAA got both config= and the options \['normalize'\]"
    ):
        CAA(vecs, CAAConfig(), normalize=True)
    with pytest.raises(ks.WrongTypeError, match="CAA takes config=CAAConfig"):
        CAA(vecs, KSteeringConfig())
