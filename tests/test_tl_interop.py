"""How ks-lens fits with plain TransformerLens idioms: hook-name aliases, hooks beyond the
residual stream, positions outside ``steer()``, return types."""

from __future__ import annotations

import pytest
import torch
from _marks import needs_bridge_cache

import ks_lens as ks
from ks_lens.activations import CollectSpec, capture_batch, collect_activations
from ks_lens.errors import ConfigError, HookPointError, MetadataMismatchError
from ks_lens.hooks import (
    HOOK_KINDS,
    STEERABLE_KINDS,
    canonical_hook_name,
    check_steerable,
    ks_hook_name,
    parse_hook,
    same_hook_point,
)
from ks_lens.probes import Probe
from ks_lens.steering import CAA, KSteering, SteeringVectors

# ------------------------------------------------------------------------------ (3) aliases


def test_alias_helpers_agree_with_the_bridge(tiny_model):
    for layer in (0, 3):
        for kind in HOOK_KINDS:
            alias = f"blocks.{layer}.hook_{kind}"
            canon = tiny_model.hook_dict[alias].name
            assert canonical_hook_name(alias) == canon  # static table matches TL
            assert canonical_hook_name(alias, tiny_model) == canon
            assert ks_hook_name(canon) == alias
            assert same_hook_point(alias, canon)
            assert parse_hook(canon) == parse_hook(alias) == (layer, kind)
    assert not same_hook_point("blocks.1.hook_resid_post", "blocks.2.hook_resid_pre")


def test_hook_fn_sees_canonical_name(tiny_model):
    seen = []

    def spy(act, hook):
        seen.append(hook.name)

    batch = ks.tokenize_chat(tiny_model, "hi")
    tiny_model.run_with_hooks(batch.input_ids, fwd_hooks=[("blocks.1.hook_resid_post", spy)])
    assert seen == ["blocks.1.hook_out"]
    assert same_hook_point(seen[0], "blocks.1.hook_resid_post")


def test_steer_accepts_the_canonical_spelling(tiny_model, tiny_probe):
    method = KSteering(tiny_probe)
    assert tiny_probe.hook_name == "blocks.2.hook_resid_post"
    batch = ks.tokenize_chat(tiny_model, "How do I boil an egg?")
    kw = dict(attention_mask=batch.attention_mask)
    with method.steer(tiny_model, target="beta", alpha=5.0):
        a = tiny_model(batch.input_ids, **kw)
    with method.steer(tiny_model, target="beta", alpha=5.0, hook_names="blocks.2.hook_out"):
        b = tiny_model(batch.input_ids, **kw)
    assert torch.equal(a, b)
    base = tiny_model(batch.input_ids, **kw)
    assert not torch.allclose(a, base)
    # a really different hook point is still refused
    with pytest.raises(MetadataMismatchError):
        method.hooks(tiny_model, target="beta", hook_names="blocks.3.hook_out")


def test_artefacts_made_with_canonical_names(tiny_model, tiny_acts, tmp_path):
    vec = SteeringVectors.fit(tiny_acts, 1)
    canon = SteeringVectors(
        vec.vectors,
        label_names=vec.label_names,
        hook_name="blocks.1.hook_out",
        model=vec.model_info,
    )
    assert canon.hook_name == "blocks.1.hook_resid_post" and canon.layer == 1
    canon.save(tmp_path / "v")
    again = SteeringVectors.load(tmp_path / "v", model=tiny_model, hook_name="blocks.1.hook_out")
    assert torch.equal(again.vectors, vec.vectors)
    with pytest.raises(MetadataMismatchError):
        SteeringVectors.load(tmp_path / "v", hook_name="blocks.2.hook_out")


def test_probe_check_compatible_with_canonical(tiny_probe):
    tiny_probe.check_compatible(hook_name="blocks.2.hook_out")
    with pytest.raises(MetadataMismatchError):
        tiny_probe.check_compatible(hook_name="blocks.1.hook_out")


# ------------------------------------------------------------------ (7) beyond the residual


def test_steering_errors_list_exactly_what_is_allowed(tiny_model):
    with pytest.raises(HookPointError) as e:
        check_steerable(tiny_model, "blocks.1.attn.hook_z")
    msg = str(e.value)
    for kind in STEERABLE_KINDS:
        assert f"hook_{kind}" in msg
    assert "resid_mid" not in msg
    with pytest.raises(HookPointError) as e:
        check_steerable(tiny_model, "blocks.1.hook_resid_mid")
    assert (
        "blocks.1.hook_mlp_out" in str(e.value)
        and "'blocks.1.hook_resid_mid'"
        not in str(e.value).split("instead")[0].split("Steer at")[-1]
    )


def test_collect_and_steer_at_attn_and_mlp_out(tiny_model, tiny_dataset):
    acts = collect_activations(
        tiny_model,
        tiny_dataset,
        layers=[1],
        hook_kinds=("attn_out", "mlp_out", "resid_mid"),
        progress=False,
    )
    # resid_mid - attn_out is resid_pre: the captured numbers are really those hook points
    batch = ks.tokenize_chat(tiny_model, "Why is the sky blue?")
    pre, attn, mid = capture_batch(
        tiny_model,
        batch,
        ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_out", "blocks.1.hook_resid_mid"],
    ).unbind(1)
    assert torch.allclose(pre + attn, mid, atol=1e-5)
    assert acts.at(1, "mlp_out").shape == (len(acts), 64)
    vec = SteeringVectors.fit(acts, 1, kind="mlp_out")
    assert vec.hook_name == "blocks.1.hook_mlp_out"
    method = CAA(vec, normalize=False)
    v = method.vector(method.spec(target="beta", alpha=1.0))
    names = ["blocks.1.hook_resid_post"]
    base = capture_batch(tiny_model, batch, names)
    with method.steer(tiny_model, target="beta", alpha=1.0):
        steered = capture_batch(tiny_model, batch, names)
    # a write to mlp_out lands in the residual stream at resid_post, unchanged
    assert torch.allclose(steered[0, 0] - base[0, 0], v, atol=1e-4)


def test_collect_spec_error_lists_every_kind(tiny_model):
    with pytest.raises(ConfigError) as e:
        CollectSpec(hook_kinds=("attn.hook_zz",)).validate(tiny_model)
    for kind in HOOK_KINDS:
        assert kind in str(e.value)
    assert "did you mean 'blocks.0.attn.hook_z'" in str(e.value)
    assert "'attn.hook_z' [batch, pos, n_heads, d_head]" in str(e.value)


def test_probe_at_attn_out(tiny_dataset, tiny_model):
    from ks_lens.probes import ProbeConfig, train_probe

    acts = collect_activations(
        tiny_model, tiny_dataset, layers=[1], hook_kinds=("attn_out",), progress=False
    )
    probe = train_probe(acts, 1, kind="attn_out", config=ProbeConfig(epochs=2, hidden=16))
    assert isinstance(probe, Probe) and probe.hook_name == "blocks.1.hook_attn_out"
    with KSteering(probe).steer(tiny_model, target="beta", alpha=1.0):
        pass


# ------------------------------------------------------------------ (5) positions and TL generate


def _counting_steerer():
    from ks_lens.steering.base import Steerer

    class Counter(Steerer):
        label_names = ("a",)

        def __init__(self) -> None:
            self.rows: list[int] = []
            self.seen: list[torch.Tensor] = []

        @property
        def hook_name(self) -> str:
            return "blocks.1.hook_resid_post"

        def transform(self, spec):
            def f(x):
                self.rows.append(int(x.shape[0]))
                self.seen.append(x.detach().clone())
                return x

            return f

    return Counter()


@pytest.mark.parametrize("cache", [pytest.param(True, marks=needs_bridge_cache), False])
@pytest.mark.parametrize("positions", ["prompt", "generated", "last"])
def test_steer_positions_in_tl_generate(tiny_model, positions, cache):
    """Inside steer(), TL's model.generate steers the same tokens with and without a KV cache."""
    method = _counting_steerer()
    batch = ks.tokenize_chat(tiny_model, "How do I boil an egg?")
    p, n = batch.input_ids.shape[1], 4
    with method.steer(tiny_model, target="a", positions=positions):
        tiny_model.generate(
            batch.input_ids,
            max_new_tokens=n,
            do_sample=False,
            use_past_kv_cache=cache,
            stop_at_eos=False,
            verbose=False,
        )
    calls = n if not cache else None
    steered = sum(method.rows)
    # every token is steered once with the cache; without it, each step re-steers what it re-runs
    expected = {
        ("prompt", True): p,
        ("generated", True): n - 1,
        ("last", True): 1,
        ("prompt", False): p * calls if calls else 0,
        ("generated", False): sum(range(n)),
        ("last", False): calls or 0,
    }[(positions, cache)]
    assert steered == expected
    if positions == "last":  # always the last PROMPT token, never a generated one
        ref = tiny_model.run_with_cache(batch.input_ids, names_filter="blocks.1.hook_out")[1]
        last = ref["blocks.1.hook_out"][0, -1]
        for x in method.seen:
            assert torch.allclose(x[0], last, atol=1e-4)


def test_bare_hooks_refuse_positions_other_than_all(tiny_model, tiny_probe):
    with pytest.raises(ConfigError, match=r"steer\(model"):
        KSteering(tiny_probe).hooks(tiny_model, target="beta", positions="generated")
    assert len(KSteering(tiny_probe).hooks(tiny_model, target="beta", positions="all")) == 1


# ------------------------------------------------------------------------ (4) return types


def test_activations_accessors(tiny_acts):
    n = len(tiny_acts)
    assert tiny_acts.shape == (n, 4, 64)
    assert torch.equal(tiny_acts[3], tiny_acts.at(3, "resid_post"))
    assert torch.equal(tiny_acts[-1], tiny_acts.at(3))
    assert torch.equal(tiny_acts[-2, "resid_post"], tiny_acts.acts["resid_post"][:, 2])
    assert torch.equal(tiny_acts.tensor(), tiny_acts.acts["resid_post"])
    assert torch.equal(tiny_acts.tensor(1), tiny_acts.at(1))
    r = repr(tiny_acts)
    assert r.startswith(f"Activations(n={n}") and "layers=[0, 1, 2, 3]" in r and "tensor" not in r
    with pytest.raises(ks.StoreError, match="available"):
        tiny_acts[1, "attn_out"]


def test_probe_set_negative_layers(tiny_acts, tmp_path):
    from ks_lens.probes import ProbeConfig, ProbeSet, load_probes, save_probes, train_probes

    probes = train_probes(tiny_acts, layers=[1, -1], config=ProbeConfig(epochs=2), progress=False)
    assert isinstance(probes, ProbeSet) and sorted(probes) == [1, 3]
    assert probes[-1] is probes[3] and probes[-3] is probes[1]
    assert -1 in probes and -2 not in probes
    with pytest.raises(ks.MissingKeyError, match=r"layers \[1, 3\]"):
        probes[-2]
    assert "ProbeSet(layers=[1, 3]" in repr(probes)
    save_probes(probes, tmp_path / "ps")
    loaded = load_probes(tmp_path / "ps")
    assert isinstance(loaded, ProbeSet) and loaded[-1].layer == 3


def test_token_batch_unpacks_into_the_model(tiny_model):
    batch = ks.tokenize_chat(tiny_model, ["hi", "a longer question here"])
    a = tiny_model(**batch)
    b = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.equal(a, b)
    _, cache = tiny_model.run_with_cache(**batch, names_filter="blocks.1.hook_resid_post")
    assert cache["blocks.1.hook_resid_post"].shape[:2] == batch.input_ids.shape


def test_load_model_is_annotated_with_the_bridge_type():
    import typing

    from transformer_lens.model_bridge import TransformerBridge

    # the annotation names TL's class (imported for type checkers only, TL loads lazily)
    assert ks.load_model.__annotations__["return"] == "TransformerBridge"
    hints = typing.get_type_hints(ks.load_model, localns={"TransformerBridge": TransformerBridge})
    assert hints["return"] is TransformerBridge


# ------------------------------------------------------------------------ (8) docs snippet


def test_calibrate_alpha_snippet_in_docs_runs(tiny_model, tiny_probe):
    """The 'Picking alpha' snippet of docs/steering.md runs as written on the tiny model."""
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "steering.md").read_text()
    section = text[text.index("## Picking alpha") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    code = code.replace('"casual"', '"beta"').replace("max_new_tokens=40", "max_new_tokens=3")
    code = code.replace("budget=0.5", "budget=0.002")  # the random tiny model reacts weakly
    env = {"model": tiny_model, "method": KSteering(tiny_probe), "ks_lens": ks}
    exec(compile(code, "docs/steering.md", "exec"), env)
    cal = env["cal"]
    assert cal.alpha > 0 and cal.metric <= 0.002
    assert any(m > 0.002 for _, m in cal.evaluations)  # the budget was actually binding


# ------------------------------------------------------------------------ (9) d_model errors


def test_wrong_d_model_names_the_argument_and_size(tiny_probe, tiny_acts):
    x = torch.randn(3, 32)
    with pytest.raises(ConfigError, match=r"x has last dimension 32.*d_model = 64"):
        tiny_probe(x)
    with pytest.raises(ConfigError, match=r"x has last dimension 32.*KSteering.*d_model = 64"):
        KSteering(tiny_probe).apply(x, target="beta")
    caa = CAA(SteeringVectors.fit(tiny_acts, -1))
    assert caa.hook_name == "blocks.3.hook_resid_post"
    with pytest.raises(ConfigError, match=r"x has last dimension 32.*CAA.*d_model = 64"):
        caa.apply(x, target="beta")
    with pytest.raises(ConfigError, match=r"vectors has last dimension 8.*d_model = 64"):
        SteeringVectors(
            torch.zeros(3, 8),
            label_names=("alpha", "beta", "gamma"),
            hook_name="blocks.1.hook_out",
            model={"model": "tiny-random-llama", "d_model": 64},
        )


def test_public_functions_have_examples():
    from ks_lens.activations import collect_activations
    from ks_lens.probes import train_probes

    for f in (
        train_probes,
        collect_activations,
        ks.load_model,
        ks.generate,
        KSteering,
        CAA,
        SteeringVectors.fit,
    ):
        doc = f.__doc__ or ""
        assert ">>> " in doc, f  # runnable examples, run by tests/test_doctests.py
        assert "Args:" in doc or f is KSteering, f


# ------------------------------------------------------------------- the first-hour script


@needs_bridge_cache  # the script shows TL's own model.generate (with its KV cache)
def test_tl_first_hour_script_runs_on_tiny_model(capsys):
    """analysis/tl_first_hour.py: README flow + TL idioms, every check passes on the tiny model."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "analysis" / "tl_first_hour.py"
    spec = importlib.util.spec_from_file_location("tl_first_hour", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--model", "tiny-random-llama", "--fast"]) == 0
    out = capsys.readouterr().out
    assert "[FAIL]" not in out and out.count("[ok]") >= 14
    assert "all checks passed" in out
