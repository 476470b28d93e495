"""Collection at hook points that are not d_model wide (attn.hook_z, mlp.hook_post, ...):
shapes, store round trip, probes on flattened features, and steering refused there."""

from __future__ import annotations

import json

import pytest
import torch

import ks_lens as ks
from ks_lens.activations import (
    ActivationStore,
    CollectSpec,
    capture_batch,
    capture_features,
    collect_activations,
    collect_to_store,
)
from ks_lens.errors import ConfigError, HookPointError
from ks_lens.hooks import STEERABLE_KINDS, block_kind, check_steerable, parse_hook, resid_hook
from ks_lens.io import with_meta_checksum
from ks_lens.probes import Probe, ProbeConfig, train_probe
from ks_lens.steering import KSteering, SteeringVectors

KINDS = ("attn.hook_z", "mlp.hook_post", "resid_post")


@pytest.fixture(scope="module")
def wide_acts(tiny_model, tiny_dataset):
    return collect_activations(
        tiny_model, tiny_dataset, layers=[1, 3], hook_kinds=KINDS, progress=False
    )


def test_kind_names():
    assert block_kind("hook_resid_post") == block_kind("hook_out") == "resid_post"
    assert block_kind("attn.hook_out") == "attn_out"
    assert block_kind("attn.hook_z") == "attn.hook_z"
    assert resid_hook(2, "attn.hook_z") == "blocks.2.attn.hook_z"
    assert resid_hook(2, "mlp_out") == "blocks.2.hook_mlp_out"
    assert parse_hook("blocks.2.mlp.hook_post") == (2, "mlp.hook_post")
    with pytest.raises(HookPointError, match="unknown hook kind"):
        block_kind("blocks.1.attn.hook_z")
    with pytest.raises(HookPointError, match="not a per-block hook point"):
        parse_hook("hook_embed")


def test_shapes_and_values_at_non_d_model_hooks(tiny_model, tiny_dataset, wide_acts):
    cfg = tiny_model.cfg
    n = len(wide_acts)
    assert wide_acts.acts["attn.hook_z"].shape == (n, 2, cfg.n_heads, cfg.d_head)
    assert wide_acts.at(3, "attn.hook_z").shape == (n, cfg.n_heads, cfg.d_head)
    assert wide_acts.features(3, "attn.hook_z").shape == (n, cfg.n_heads * cfg.d_head)
    assert wide_acts.at(1, "mlp.hook_post").shape == (n, cfg.d_mlp)
    assert wide_acts.feature_shape("mlp.hook_post") == (cfg.d_mlp,)
    assert wide_acts.shape == (n, 2, cfg.d_model)  # resid_post is the default kind
    assert wide_acts.d_model == cfg.d_model
    assert wide_acts.meta["feature_shapes"] == {
        "attn.hook_z": [cfg.n_heads, cfg.d_head],
        "mlp.hook_post": [cfg.d_mlp],
        "resid_post": [cfg.d_model],
    }
    assert "feature_shapes={'attn.hook_z': [4, 16], 'mlp.hook_post': [128]}" in repr(wide_acts)
    # row 0 equals the last-token activation of its prompt run alone through run_with_cache
    q, label = tiny_dataset.pairs()[0]
    batch = ks.tokenize_chat(
        tiny_model, ks.ChatPrompt(q.text, tiny_dataset.behaviours[label].instruction)
    )
    names = ["blocks.3.attn.hook_z", "blocks.1.mlp.hook_post"]
    _, cache = tiny_model.run_with_cache(batch.input_ids, names_filter=names)
    assert torch.allclose(wide_acts.at(3, "attn.hook_z")[0], cache[names[0]][0, -1], atol=1e-5)
    assert torch.allclose(wide_acts.at(1, "mlp.hook_post")[0], cache[names[1]][0, -1], atol=1e-5)


def test_mean_response_at_a_multi_dim_hook(tiny_model):
    batch = ks.tokenize_chat(tiny_model, ["Why is the sky blue?", "Hi"])
    start = torch.tensor([3, 1])
    name = "blocks.2.attn.hook_z"
    (got,) = capture_features(
        tiny_model, batch, [name], response_start=start, pooling="mean_response"
    )
    _, cache = tiny_model.run_with_cache(**batch, names_filter=name)
    for b in range(2):
        first = int(batch.n_pad[b] + start[b])
        assert torch.allclose(got[b], cache[name][b, first:].mean(0), atol=1e-5)


def test_store_round_trip_is_identical(tiny_model, tiny_dataset, wide_acts, tmp_path):
    store = collect_to_store(
        tiny_model,
        tiny_dataset,
        tmp_path / "s",
        layers=[1, 3],
        hook_kinds=KINDS,
        shard_rows=7,
        progress=False,
    )
    assert store.feature_shapes == wide_acts.meta["feature_shapes"]
    loaded = store.load()
    for k in KINDS:
        assert torch.equal(loaded.acts[k], wide_acts.acts[k])
    part = store.load(layers=[3], kinds=["attn.hook_z"])
    assert torch.equal(part.at(3, "attn.hook_z"), wide_acts.at(3, "attn.hook_z"))
    assert part.acts["attn.hook_z"].shape[1:] == (1, 4, 16)
    # a store of an older ks-lens records no feature shapes: its kinds are d_model wide
    old = tmp_path / "old"
    collect_to_store(tiny_model, tiny_dataset, old, layers=[2], progress=False)
    meta = json.loads((old / "meta.json").read_text())
    del meta["feature_shapes"], meta["meta_sha256"]
    (old / "meta.json").write_text(json.dumps(with_meta_checksum(meta)))
    assert ActivationStore(old).load().at(2).shape[1:] == (64,)


def test_probes_train_on_flattened_features_and_steering_is_refused(wide_acts, tmp_path):
    probe = train_probe(wide_acts, 3, kind="attn.hook_z", config=ProbeConfig(epochs=3, hidden=16))
    assert probe.hook_name == "blocks.3.attn.hook_z" and probe.d_model == 4 * 16
    x = wide_acts.features(3, "attn.hook_z")
    assert probe.predict_proba(x).shape == (len(wide_acts), 3)
    again = Probe.load(probe.save(tmp_path / "p"))
    assert again.hook_name == probe.hook_name and torch.equal(again(x), probe(x))
    allowed = [f"blocks.3.hook_{k}" for k in STEERABLE_KINDS]
    with pytest.raises(HookPointError) as e:
        KSteering(probe)
    msg = str(e.value)
    assert "cannot steer at 'blocks.3.attn.hook_z'" in msg and "collected and probed" in msg
    assert all(a in msg for a in allowed) and "resid_mid" not in msg
    with pytest.raises(HookPointError, match=r"cannot steer at 'blocks.1.mlp.hook_post'"):
        SteeringVectors.fit(wide_acts, 1, kind="mlp.hook_post")


def test_steering_at_any_other_hook_is_refused_listing_what_is_allowed(tiny_model):
    for name in ("blocks.1.mlp.hook_post", "blocks.1.attn.hook_z", "blocks.1.ln1.hook_normalized"):
        with pytest.raises(HookPointError) as e:
            check_steerable(tiny_model, name)
        msg = str(e.value)
        listed = msg.split("one of ")[1]
        assert all(f"'blocks.1.hook_{k}'" in listed for k in STEERABLE_KINDS)
        assert "resid_mid" not in msg


def test_clear_errors_for_hooks_that_cannot_be_collected(tiny_model, tiny_dataset):
    with pytest.raises(ConfigError, match=r"'attn.hook_pattern' is \[batch, head, query, key\]"):
        CollectSpec(hook_kinds=("attn.hook_pattern",)).validate(tiny_model)
    with pytest.raises(ConfigError, match="unknown hook kind 'blocks.1.attn.hook_z'"):
        CollectSpec(hook_kinds=("blocks.1.attn.hook_z",)).validate(tiny_model)
    # listed in hook_dict but never called by this architecture, or gated off by TransformerLens
    assert "blocks.0.attn.hook_hidden_states" in tiny_model.hook_dict
    with pytest.raises(HookPointError, match="did not fire"):
        collect_activations(
            tiny_model, tiny_dataset, hook_kinds=("attn.hook_hidden_states",), progress=False
        )
    with pytest.raises(HookPointError, match="cannot collect at.*use_hook_mlp_in is False"):
        collect_activations(tiny_model, tiny_dataset, hook_kinds=("hook_mlp_in",), progress=False)
    # an alias and its canonical name are one kind
    spec = CollectSpec(hook_kinds=("attn.hook_z", "attn.o.hook_in", "hook_out")).validate(
        tiny_model
    )
    assert spec.hook_kinds == ("attn.hook_z", "resid_post")
    batch = ks.tokenize_chat(tiny_model, "Hi")
    with pytest.raises(ConfigError, match="Use capture_features"):
        capture_batch(tiny_model, batch, ["blocks.1.attn.hook_z", "blocks.1.hook_resid_post"])
