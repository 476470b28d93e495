from __future__ import annotations

import json

import pytest
import torch
from _shapecheck import shapes_unchecked

import ks_lens as ks
from ks_lens.errors import ConfigError, LabelError, MetadataMismatchError, StoreError
from ks_lens.io import meta_checksum, with_meta_checksum
from ks_lens.probes import (
    Probe,
    ProbeConfig,
    fit_probes,
    load_probe_any,
    load_probes,
    save_probes,
    train_probe,
    train_probes,
)


def _blobs(n=300, d=16, k=3, sep=(0.0, 3.0), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    centers = torch.randn(k, d, generator=g)
    x = torch.stack([torch.randn(n, d, generator=g) + s * centers[y] for s in sep], dim=1)
    return x, torch.nn.functional.one_hot(y, k).float(), [f"g{i // 3}" for i in range(n)]


def test_fit_separates_blobs_and_reports_per_label_accuracy():
    x, y, groups = _blobs()
    res = fit_probes(x, y, groups, ["a", "b", "c"], ProbeConfig(epochs=15))
    assert res.metrics[1]["val_accuracy"] > 0.95
    assert res.metrics[0]["val_accuracy"] < 0.7  # no signal at separation 0
    assert set(res.metrics[1]["val_per_label_accuracy"]) == {"a", "b", "c"}
    assert res.metrics[1]["n_val"] + res.metrics[1]["n_train"] == 300


def test_training_is_deterministic_and_batched_equals_single():
    x, y, groups = _blobs()
    cfg = ProbeConfig(epochs=6, patience=2)
    a = fit_probes(x, y, groups, ["a", "b", "c"], cfg, init_keys=[5, 7])
    b = fit_probes(x, y, groups, ["a", "b", "c"], cfg, init_keys=[5, 7])
    single = fit_probes(x[:, 1:2], y, groups, ["a", "b", "c"], cfg, init_keys=[7])
    for (wa, ba), (wb, bb) in zip(a.params[1], b.params[1], strict=True):
        assert torch.equal(wa, wb) and torch.equal(ba, bb)
    for (wa, _), (ws, _) in zip(a.params[1], single.params[0], strict=True):
        torch.testing.assert_close(wa, ws, atol=1e-5, rtol=1e-4)
    assert a.metrics[1]["best_epoch"] == single.metrics[0]["best_epoch"]


def test_probe_forward_is_the_stacked_forward_of_training():
    """One probe MLP: ``Probe.forward`` runs training's stacked forward on a stack of one, so a
    probe built from stacked weights gives the stacked logits (and the nn.Linear reading of the
    same weights) within float rounding, for any leading shape, with the same gradients."""
    from ks_lens.probes.probe import _stack_forward

    x, y, groups = _blobs(n=120, d=16)
    cfg = ProbeConfig(epochs=3, hidden=12, depth=2)
    res = fit_probes(x, y, groups, ["a", "b", "c"], cfg, init_keys=[3, 4])
    stacked_params = [
        (
            torch.stack([res.params[p][i][0] for p in range(2)]),
            torch.stack([res.params[p][i][1] for p in range(2)]),
        )
        for i in range(len(res.params[0]))
    ]
    xn = (x.transpose(0, 1) - res.mean[:, None]) / res.std[:, None]
    stacked = _stack_forward(xn, stacked_params)  # [P, n, K], as in training
    for p in range(2):
        probe = Probe(
            res.params[p],
            res.mean[p],
            res.std[p],
            label_names=["a", "b", "c"],
            hook_name=f"blocks.{p}.hook_resid_post",
            model={"model": "m", "d_model": 16, "n_layers": 4},
            config=cfg,
        )
        torch.testing.assert_close(probe(x[:, p]), stacked[p], atol=1e-6, rtol=1e-5)
        # the nn.Linear layout reads the same function
        h = (x[:, p] - probe.mean) / probe.std
        for i, lin in enumerate(probe.linears):
            h = lin(h) if i == len(probe.linears) - 1 else torch.relu(lin(h))
        torch.testing.assert_close(probe(x[:, p]), h, atol=1e-6, rtol=1e-5)
        # any leading shape, and gradients with respect to the input
        xs = x[:12, p].reshape(3, 4, 16).clone().requires_grad_(True)
        out = probe(xs)
        assert out.shape == (3, 4, 3)
        torch.testing.assert_close(out.reshape(12, 3), probe(x[:12, p]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(probe(x[0, p]), probe(x[:1, p])[0], atol=1e-6, rtol=1e-5)
        assert probe(x[:0, p]).shape == (0, 3)
        (g,) = torch.autograd.grad(out[..., 1].sum(), xs)
        xr = x[:12, p].clone().requires_grad_(True)
        h = (xr - probe.mean) / probe.std
        for i, lin in enumerate(probe.linears):
            h = lin(h) if i == len(probe.linears) - 1 else torch.relu(lin(h))
        (gr,) = torch.autograd.grad(h[:, 1].sum(), xr)
        torch.testing.assert_close(g.reshape(12, 16), gr, atol=1e-6, rtol=1e-5)


def test_validation_split_keeps_questions_whole(tiny_acts):
    from ks_lens.probes import split_by_group

    tr, va = split_by_group(tiny_acts.question_ids, 0.25, 0)
    qt = {tiny_acts.question_ids[i] for i in tr.tolist()}
    qv = {tiny_acts.question_ids[i] for i in va.tolist()}
    assert qt and qv and not qt & qv


def test_linear_and_ce_probes(tiny_acts):
    lin = train_probe(tiny_acts, 3, config=ProbeConfig(architecture="linear", loss="ce", epochs=5))
    assert len(lin.linears) == 1
    p = lin.predict_proba(tiny_acts.at(3)[:4])
    torch.testing.assert_close(p.sum(-1), torch.ones(4))
    mlp = train_probe(tiny_acts, 3, config=ProbeConfig(depth=3, hidden=8, epochs=2))
    assert [lin_.out_features for lin_ in mlp.linears] == [8, 8, 8, 3]


def test_train_all_layers_at_once(tiny_acts):
    probes = train_probes(tiny_acts, config=ProbeConfig(epochs=3), progress=False)
    assert sorted(probes) == [0, 1, 2, 3]
    assert probes[1].hook_name == "blocks.1.hook_resid_post"
    assert probes[1].model_info["model"] == "tiny-random-llama"
    assert probes[1].source["dataset"]["hash"] == tiny_acts.meta["dataset"]["hash"]


def test_save_load_round_trip_is_identical(tiny_probe, tiny_model, tmp_path):
    tiny_probe.save(tmp_path / "p")
    back = Probe.load(tmp_path / "p", model=tiny_model, hook_name=tiny_probe.hook_name)
    for (k, v), (k2, v2) in zip(
        tiny_probe.state_tensors().items(), back.state_tensors().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    assert back.label_names == tiny_probe.label_names
    assert back.config == tiny_probe.config
    assert back.metrics == json.loads(json.dumps(tiny_probe.metrics))
    x = torch.randn(5, 64)
    assert torch.equal(back(x), tiny_probe(x))
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    for key in (
        "model",
        "hook_name",
        "layer",
        "label_names",
        "config",
        "metrics",
        "source",
        "versions",
    ):
        assert key in meta
    assert not list(tmp_path.glob("**/*.pkl")) and not list(tmp_path.glob("**/*.pt"))


def test_load_refuses_mismatch_and_corruption(tiny_probe, tmp_path):
    tiny_probe.save(tmp_path / "p")
    with pytest.raises(MetadataMismatchError, match="another model"):
        Probe.load(tmp_path / "p", model=ks.load_model("tiny-random-llama", seed=3))
    with pytest.raises(MetadataMismatchError, match="only valid at the hook point"):
        Probe.load(tmp_path / "p", hook_name="blocks.1.hook_resid_post")
    f = tmp_path / "p" / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum"):
        Probe.load(tmp_path / "p")
    with pytest.raises(StoreError, match="no probe found"):
        Probe.load(tmp_path / "absent")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "meta.json").write_text(json.dumps({"format": "ks_lens.steering_vectors"}))
    with pytest.raises(StoreError, match="not a ks_lens.probe"):
        Probe.load(tmp_path / "q")


def test_probe_sets(tiny_acts, tiny_model, tmp_path):
    probes = train_probes(tiny_acts, layers=[1, 2], config=ProbeConfig(epochs=2), progress=False)
    save_probes(probes, tmp_path / "set")
    back = load_probes(tmp_path / "set", model=tiny_model)
    assert sorted(back) == [1, 2]
    assert load_probe_any(tmp_path / "set", layer=2).hook_name == "blocks.2.hook_resid_post"
    with pytest.raises(StoreError, match="choose one with layer="):
        load_probe_any(tmp_path / "set")
    with pytest.raises(StoreError, match="no probe for layer 3"):
        load_probe_any(tmp_path / "set", layer=3)


def test_probe_input_errors(tiny_probe, tiny_acts):
    with pytest.raises(LabelError, match="unknown label"):
        tiny_probe.label_indices(["delta"])
    with pytest.raises(ValueError, match="architecture"):
        ProbeConfig(architecture="tree")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="val_fraction"):
        ProbeConfig(val_fraction=1.5)
    with pytest.raises(ValueError, match="no labels"):
        train_probe(tiny_acts.select((tiny_acts.labels < 0).nonzero().squeeze(1)), 2)
    with shapes_unchecked(), pytest.raises(ValueError, match=r"x must be \[n, probes, d_model\]"):
        fit_probes(torch.zeros(4, 3), torch.zeros(4, 2), ["a"] * 4, ["x", "y"])


def test_multi_label_metrics_and_group_override(tiny_model, tiny_dataset):
    """Probes on combined-instruction rows learn multi-hot targets; validation reports the
    all-true-labels-in-top-k rate, and ``groups`` keeps whole groups out of training."""
    from ks_lens.activations import collect_activations
    from ks_lens.probes import ProbeConfig, train_probe

    ds = tiny_dataset.with_combinations((2,), per_question=1)
    acts = collect_activations(tiny_model, ds, layers=[3], progress=False)
    probe = train_probe(acts, 3, config=ProbeConfig(hidden=16, epochs=30, val_fraction=0.34))
    assert probe.label_names == ("alpha", "beta", "gamma")
    assert 0.0 <= probe.metrics["val_multi_topk_rate"] <= 1.0 and probe.metrics["n_val_multi"] >= 1
    # grouping by category instead of question: validation holds out whole categories
    cats = {q.id: q.category for q in ds.questions}
    grouped = train_probe(
        acts,
        3,
        config=ProbeConfig(hidden=16, epochs=3, val_fraction=0.34),
        groups=[cats[q] for q in acts.question_ids],
    )
    n_val = grouped.metrics["n_val"]
    assert n_val % 4 == 0 and n_val > 0  # 4 rows per question, 3 questions per category -> 12s
    with pytest.raises(ConfigError, match="groups has"):
        train_probe(acts, 3, groups=["x"])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", float("inf"), "lr must be a positive finite number, got inf"),
        ("lr", float("nan"), "lr must be a positive finite number, got nan"),
        ("lr", 0.0, "lr must be a positive finite number"),
        ("weight_decay", float("inf"), "weight_decay must be a finite number >= 0"),
        ("weight_decay", -1.0, "weight_decay must be a finite number >= 0"),
        ("val_fraction", float("nan"), r"val_fraction must be in \(0, 1\)"),
        # 0 held out nothing and reported training accuracy as val_accuracy (issue 22)
        ("val_fraction", 0.0, r"val_fraction must be in \(0, 1\), got 0.0"),
        ("val_fraction", 0, r"val_fraction must be in \(0, 1\), got 0"),
        ("patience", -1, "patience must be >= 0"),
        ("seed", 2**64, "seed must be an integer from 0 to 4294967295"),
        ("seed", -1, "seed must be at least 0, got -1"),
        ("seed", 1.5, "seed must be an integer, got 1.5"),
        ("epochs", 2.5, "epochs must be an integer, got 2.5"),
        ("batch_size", True, "batch_size must be an integer, got True"),
        ("patience", 1.5, "patience must be an integer, got 1.5"),
    ],
)
def test_non_finite_hyperparameters_are_refused(field, value, message):
    with pytest.raises(ks.ConfigError, match=message):
        ProbeConfig(**{field: value})


def test_diverging_training_stops_with_a_clear_error():
    x, y, groups = _blobs()
    with pytest.raises(
        ks.TrainingError, match=r"diverged at epoch 1: the loss became nan \(layer 3, layer 7\)"
    ):
        fit_probes(
            x, y, groups, ["a", "b", "c"], ProbeConfig(lr=1e30), names=["layer 3", "layer 7"]
        )
    x[5, 0, 3] = float("nan")
    with pytest.raises(ks.DatasetError, match="contain NaN or infinite values"):
        fit_probes(x, y, groups, ["a", "b", "c"])


def test_edited_probe_metadata_is_refused(tiny_probe, tmp_path):
    tiny_probe.save(tmp_path / "p")
    path = tmp_path / "p" / "meta.json"
    meta = json.loads(path.read_text())
    assert meta["format_version"] == 2 and len(meta["meta_sha256"]) == 64
    meta["label_names"] = ["beta", "alpha", "gamma"]  # reordered: would silently swap labels
    path.write_text(json.dumps(meta, indent=2))
    with pytest.raises(StoreError, match="modified after saving"):
        Probe.load(tmp_path / "p")
    del meta["meta_sha256"]
    path.write_text(json.dumps(meta, indent=2))
    with pytest.raises(StoreError, match="no metadata checksum"):
        Probe.load(tmp_path / "p")


def test_probe_and_probe_set_never_share_a_directory(tiny_acts, tiny_probe, tmp_path):
    probes = train_probes(tiny_acts, layers=[1, 2, 3], config=ProbeConfig(epochs=1), progress=False)
    save_probes(probes, tmp_path / "set")
    with pytest.raises(StoreError, match="already holds a probe_set; saving a probe there"):
        tiny_probe.save(tmp_path / "set")
    tiny_probe.save(tmp_path / "single")
    with pytest.raises(StoreError, match="already holds a probe; saving a probe_set there"):
        save_probes(probes, tmp_path / "single")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="already holds other files"):
        tiny_probe.save(tmp_path / "junk")
    # a probe set replaces an older one whole: no stale layer directories remain
    save_probes({2: probes[2]}, tmp_path / "set")
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["layer-02", "meta.json"]
    # an index edited by hand is refused by its own checksum ...
    path = tmp_path / "set" / "meta.json"
    index = json.loads(path.read_text())
    index["probes"]["3"] = index["probes"]["2"]
    path.write_text(json.dumps(index))
    with pytest.raises(StoreError, match="probe_set metadata .* was modified after saving"):
        load_probe_any(tmp_path / "set", layer=3)
    # ... and one that points at another layer's probe, even with a valid checksum
    path.write_text(json.dumps(with_meta_checksum(index)))
    with pytest.raises(StoreError, match="lists layer 3 but that probe was trained at blocks.2"):
        load_probe_any(tmp_path / "set", layer=3)


def test_probe_set_members_are_checksummed_in_the_index(tiny_acts, tiny_model, tmp_path):
    """A layer swapped in from another run loaded silently, and probes.json's metrics then
    disagreed with the probe's own: each member's metadata checksum is in the index."""
    import shutil

    def train(seed):
        cfg = ProbeConfig(epochs=2, seed=seed)
        return train_probes(tiny_acts, layers=[1, 2], config=cfg, progress=False)

    save_probes(train(0), tmp_path / "set")
    save_probes(train(1), tmp_path / "other")
    index = json.loads((tmp_path / "set" / "meta.json").read_text())
    assert index["format"] == "ks_lens.probe_set" and index["format_version"] == 2
    assert index["meta_sha256"] == meta_checksum(index)
    assert len(index["probes"]["2"]["meta_sha256"]) == 64
    assert sorted(load_probes(tmp_path / "set", model=tiny_model)) == [1, 2]
    shutil.rmtree(tmp_path / "set" / "layer-02")
    shutil.copytree(tmp_path / "other" / "layer-02", tmp_path / "set" / "layer-02")
    swapped = "the probe of layer 2 \\(layer-02\\) is not the one this set was saved with"
    with pytest.raises(StoreError, match=swapped + ".*ks-lens train --acts STORE --layer all"):
        load_probes(tmp_path / "set")
    with pytest.raises(StoreError, match=swapped):
        load_probe_any(tmp_path / "set", layer=2)
    assert load_probe_any(tmp_path / "set", layer=1).layer == 1  # the untouched member loads
    # an index entry stripped of its checksum (and the index re-checksummed) is refused
    del index["probes"]["1"]["meta_sha256"]
    (tmp_path / "set" / "meta.json").write_text(json.dumps(with_meta_checksum(index)))
    with pytest.raises(StoreError, match="its index has no checksum for layer 1"):
        load_probe_any(tmp_path / "set", layer=1)


def _legacy_index(directory, *, member_checksums):
    """Rewrite a probe set in the layout of ks-lens 0.1 by hand: its index in ``probes.json``
    (format_version 2 with member checksums, or 1 without), no checksum of its own, and no
    ``meta.json``."""
    index = json.loads((directory / "meta.json").read_text())
    entries = index["probes"]
    if not member_checksums:
        for entry in entries.values():
            del entry["meta_sha256"]
    legacy = {"format": "ks_lens.probe_set", "probes": entries}
    if member_checksums:
        legacy["format_version"] = 2
    (directory / "meta.json").unlink()
    (directory / "probes.json").write_text(json.dumps(legacy))


def test_probe_sets_in_the_old_layout_still_load(tiny_acts, tiny_model, tmp_path):
    """Probe sets saved by 0.1 (index in probes.json) load, singly or whole, and saving over
    one replaces it with the current layout."""
    probes = train_probes(tiny_acts, layers=[1, 2], config=ProbeConfig(epochs=2), progress=False)
    save_probes(probes, tmp_path / "set")
    _legacy_index(tmp_path / "set", member_checksums=True)
    back = load_probes(tmp_path / "set", model=tiny_model)
    assert sorted(back) == [1, 2]
    assert torch.equal(back[2].mean, probes[2].mean)
    assert load_probe_any(tmp_path / "set", layer=1).layer == 1
    with pytest.raises(StoreError, match="already holds a probe_set"):
        probes[1].save(tmp_path / "set")
    save_probes({1: probes[1]}, tmp_path / "set")
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["layer-01", "meta.json"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "probes.json").write_text(json.dumps({"format": "ks_lens.probe"}))
    with pytest.raises(StoreError, match="is not a ks-lens probe set"):
        load_probes(tmp_path / "bad")


def test_probe_sets_saved_before_member_checksums_still_load(tiny_acts, tiny_model, tmp_path):
    """Sets written before this version (no checksums in probes.json) load while the probes
    agree with the metrics the index lists; a swapped member is refused there too."""
    import shutil

    probes = train_probes(tiny_acts, layers=[1, 2], config=ProbeConfig(epochs=2), progress=False)
    save_probes(probes, tmp_path / "set")
    _legacy_index(tmp_path / "set", member_checksums=False)
    back = load_probes(tmp_path / "set", model=tiny_model)
    assert back[2].metrics["val_loss"] == probes[2].metrics["val_loss"]
    other = train_probes(
        tiny_acts, layers=[2], config=ProbeConfig(epochs=3, seed=5), progress=False
    )
    save_probes(other, tmp_path / "other")
    shutil.rmtree(tmp_path / "set" / "layer-02")
    shutil.copytree(tmp_path / "other" / "layer-02", tmp_path / "set" / "layer-02")
    with pytest.raises(StoreError, match="the probe of layer 2 .* is not the one"):
        load_probes(tmp_path / "set")
