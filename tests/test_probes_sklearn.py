"""scikit-learn in the probes: the logistic probe kind, calibration metrics, stratified splits."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import sklearn
import torch
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score
from sklearn.multiclass import OneVsRestClassifier

import ks_lens as ks
from ks_lens.errors import ConfigError, DatasetError
from ks_lens.probes import (
    Probe,
    ProbeConfig,
    calibration_metrics,
    fit_probes,
    split_by_group,
    split_stratified_by_group,
    train_probe,
    train_probes,
)
from ks_lens.steering import KSteering

LOGISTIC = ProbeConfig(architecture="logistic", val_fraction=0.25)


def _blobs(n=240, d=12, k=3, sep=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    centers = torch.randn(k, d, generator=g)
    x = (torch.randn(n, d, generator=g) + sep * centers[y])[:, None]  # [n, 1 probe, d]
    return x, torch.nn.functional.one_hot(y, k).float(), [f"g{i // 4}" for i in range(n)]


def _train_rows(acts, cfg):
    """The standardised training rows the probe was fitted on, and their multi-hot targets."""
    tr, _ = split_by_group(acts.question_ids, cfg.val_fraction, cfg.seed)
    return tr, acts.one_hot()


@pytest.fixture(scope="module")
def logistic_probe(tiny_acts):
    return train_probe(tiny_acts, 2, config=LOGISTIC)


def test_logistic_probe_equals_sklearn_one_vs_rest(logistic_probe, tiny_acts):
    probe = logistic_probe
    assert len(probe.linears) == 1 and probe.config.architecture == "logistic"
    x = tiny_acts.at(2)
    tr, y = _train_rows(tiny_acts, LOGISTIC)
    # the probe's standardisation is the training rows' mean and std, as for torch probes
    torch.testing.assert_close(probe.mean, x[tr].mean(0))
    torch.testing.assert_close(probe.std, x[tr].std(0).clamp(min=1e-6))
    xn = ((x - probe.mean) / probe.std).double().numpy()
    ref = OneVsRestClassifier(LogisticRegression(C=1.0, max_iter=1000, random_state=0))
    ref.fit(xn[tr.numpy()], y[tr].numpy().astype(int))
    expected = torch.from_numpy(ref.predict_proba(xn)).float()
    torch.testing.assert_close(probe.predict_proba(x), expected, atol=1e-5, rtol=0)
    fit = probe.metrics["fit"]
    assert fit["library"] == "scikit-learn" and fit["version"] == sklearn.__version__
    assert fit["estimator"] == "LogisticRegression" and fit["scheme"] == "one-vs-rest"
    assert (fit["solver"], fit["C"], fit["penalty"], fit["converged"]) == ("lbfgs", 1.0, "l2", True)
    assert len(fit["n_iter"]) == 3
    assert "best_epoch" not in probe.metrics and "epochs_run" not in probe.metrics
    assert 0.0 <= probe.metrics["val_accuracy"] <= 1.0


def test_multinomial_logistic_probe_equals_sklearn(tiny_acts):
    cfg = ProbeConfig(architecture="logistic", loss="ce", C=0.5, solver="newton-cg", val_fraction=0.25)
    probe = train_probe(tiny_acts, 3, config=cfg)
    x = tiny_acts.at(3)
    tr, y = _train_rows(tiny_acts, cfg)
    xn = ((x - probe.mean) / probe.std).double().numpy()
    ref = LogisticRegression(C=0.5, solver="newton-cg", max_iter=1000, random_state=0)
    ref.fit(xn[tr.numpy()], y[tr].argmax(-1).numpy())
    expected = torch.from_numpy(ref.predict_proba(xn)).float()
    torch.testing.assert_close(probe.predict_proba(x), expected, atol=1e-5, rtol=0)
    assert probe.metrics["fit"]["scheme"] == "multinomial"


def test_two_label_multinomial_probe_keeps_a_gradient_for_both_labels():
    x, y, groups = _blobs(k=2)
    cfg = ProbeConfig(architecture="logistic", loss="ce")
    res = fit_probes(x, y, groups, ["a", "b"], cfg)
    ((w, b),) = res.params[0]
    torch.testing.assert_close(w[:, 0], -w[:, 1])  # logits (-z/2, z/2)
    torch.testing.assert_close(b[0], -b[1])
    tr, _ = split_by_group(groups, cfg.val_fraction, cfg.seed)
    xn = ((x[:, 0] - res.mean[0]) / res.std[0]).double().numpy()
    ref = LogisticRegression(max_iter=1000, random_state=0).fit(
        xn[tr.numpy()], y[tr].argmax(-1).numpy()
    )
    probs = torch.softmax(torch.from_numpy(xn).float() @ w + b, -1)
    torch.testing.assert_close(
        probs, torch.from_numpy(ref.predict_proba(xn)).float(), atol=1e-5, rtol=0
    )


def test_logistic_probe_round_trips_save_load(logistic_probe, tiny_model, tmp_path):
    logistic_probe.save(tmp_path / "p")
    back = Probe.load(tmp_path / "p", model=tiny_model, hook_name=logistic_probe.hook_name)
    for (k, v), (k2, v2) in zip(
        logistic_probe.state_tensors().items(), back.state_tensors().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    assert back.config == logistic_probe.config
    assert back.metrics == json.loads(json.dumps(logistic_probe.metrics))
    assert back.metrics["fit"]["version"] == sklearn.__version__
    x = torch.randn(5, 64)
    assert torch.equal(back(x), logistic_probe(x))
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["config"]["architecture"] == "logistic" and meta["config"]["C"] == 1.0


def test_logistic_probe_steers(logistic_probe, tiny_acts, tiny_model):
    probe = logistic_probe
    x = tiny_acts.at(2)[:6]
    (lin,) = probe.linears
    w = lin.weight  # [K, d]: sklearn's coef_ in standardised coordinates
    t, a = probe.label_indices(["alpha"]), probe.label_indices(["beta"])
    # a linear probe's K-Steering step is constant: -alpha * grad(f_avoid - f_target)
    grad = (w[a].mean(0) - w[t].mean(0)) / probe.std
    out = KSteering(probe).apply(x, target=["alpha"], avoid=["beta"], alpha=2.0)
    torch.testing.assert_close(out, x - 2.0 * grad, atol=1e-5, rtol=1e-5)
    before, after = probe(x), probe(out)
    assert bool((after[:, t[0]] > before[:, t[0]]).all())
    assert bool((after[:, a[0]] < before[:, a[0]]).all())
    toks = tiny_model.to_tokens("How do I boil an egg?")
    plain = tiny_model(toks)
    with KSteering(probe).steer(tiny_model, target=["alpha"], alpha=3.0):
        steered = tiny_model(toks)
    assert not torch.equal(plain, steered)
    torch.testing.assert_close(tiny_model(toks), plain)  # hooks removed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"C": 0.0}, "C must be a positive finite number"),
        ({"C": float("inf")}, "C must be a positive finite number"),
        ({"C": True}, "C must be a positive finite number"),
        ({"solver": "liblinear"}, "solver must be one of"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
        ({"max_iter": 2.5}, "max_iter must be an integer >= 1"),
        ({"weight_decay": 0.1}, "regularised by C"),
        ({"val_split": "random"}, "val_split must be 'group' or 'stratified_group'"),
    ],
)
def test_bad_logistic_configs_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ProbeConfig(architecture="logistic", **kwargs)


def test_logistic_probe_needs_both_classes_of_every_label():
    x, y, groups = _blobs()
    y = torch.cat([y, torch.zeros(len(y), 1)], dim=1)  # a label no row has
    with pytest.raises(DatasetError, match="label 'd' is on 0 of"):
        fit_probes(x, y, groups, ["a", "b", "c", "d"], ProbeConfig(architecture="logistic"))
    with pytest.raises(DatasetError, match=r"no training row has \['d'\]"):
        fit_probes(x, y, groups, ["a", "b", "c", "d"], ProbeConfig(architecture="logistic", loss="ce"))


def test_unconverged_logistic_fit_is_reported():
    x, y, groups = _blobs()
    with pytest.warns(UserWarning, match=r"did not converge in max_iter=1 .*raise max_iter"):
        res = fit_probes(x, y, groups, ["a", "b", "c"], ProbeConfig(architecture="logistic", max_iter=1))
    assert res.metrics[0]["fit"]["converged"] is False


def test_calibration_metrics_match_sklearn():
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(200, 3, generator=g) < 0.4).float()
    probs = (0.6 * y + 0.4 * torch.rand(200, 3, generator=g)).clamp(0, 1)
    y[:, 2] = 0  # no positives: AUC undefined for this label
    m = calibration_metrics(probs, y, ["a", "b", "c"])
    p, t = probs.double().numpy(), y.numpy().astype(int)
    for k, name in enumerate("ab"):
        assert m["auc"][name] == pytest.approx(roc_auc_score(t[:, k], p[:, k]), abs=1e-12)
    assert np.isnan(m["auc"]["c"]) and m["mean_auc"] == pytest.approx(
        (m["auc"]["a"] + m["auc"]["b"]) / 2
    )
    for k, name in enumerate("abc"):
        assert m["brier"][name] == pytest.approx(np.mean((p[:, k] - t[:, k]) ** 2), abs=1e-12)
        assert m["brier"][name] == pytest.approx(brier_score_loss(t[:, k], p[:, k], pos_label=1))
    # ECE by hand: equal-width bins (the last one closed), |rate - mean prob| weighted by count
    fp, ft = p.reshape(-1), t.reshape(-1)
    ece = 0.0
    for lo in np.arange(10) / 10:
        sel = (fp >= lo) & ((fp < lo + 0.1) if lo < 0.85 else (fp <= 1.0))
        if sel.any():
            ece += sel.mean() * abs(ft[sel].mean() - fp[sel].mean())
    assert m["ece"] == pytest.approx(ece, abs=1e-9)
    prob_true, prob_pred = calibration_curve(ft, fp, n_bins=10)
    assert m["ece"] <= float(np.max(np.abs(prob_true - prob_pred))) + 1e-12
    perfect = calibration_metrics(y, y, ["a", "b", "c"])
    assert perfect["mean_brier"] == 0.0 and perfect["ece"] == 0.0 and perfect["mean_auc"] == 1.0


def test_new_metrics_come_after_the_existing_ones(tiny_acts):
    probe = train_probe(tiny_acts, 1, config=ProbeConfig(epochs=3, hidden=8))
    keys = list(probe.metrics)
    old = [
        "val_accuracy",
        "val_per_label_accuracy",
        "train_accuracy",
        "val_loss",
        "best_epoch",
        "epochs_run",
        "n_train",
        "n_val",
    ]
    new = ["val_auc", "val_mean_auc", "val_brier", "val_mean_brier", "val_ece"]
    assert keys == old + new
    assert set(probe.metrics["val_auc"]) == set(probe.label_names)
    probs = probe.predict_proba(tiny_acts.at(1))
    _, va = split_by_group(tiny_acts.question_ids, 0.2, 0)
    expected = calibration_metrics(probs[va], tiny_acts.one_hot()[va], probe.label_names)
    assert probe.metrics["val_mean_brier"] == pytest.approx(expected["mean_brier"], abs=1e-6)


def test_stratified_group_split_keeps_groups_whole_and_label_shares():
    # 40 questions, each with rows of one label only (label = question % 4, 2-5 rows each): a
    # plain group split can leave a label out of validation; the stratified one keeps shares
    q, labels = [], []
    for i in range(40):
        q += [f"q{i:02d}"] * (2 + i % 7 % 4)
        labels += [i % 4] * (2 + i % 7 % 4)
    y = torch.nn.functional.one_hot(torch.tensor(labels), 4).float()
    share = y.mean(0)

    def error(va):
        return float((y[va].mean(0) - share).abs().sum())

    tr, va = split_stratified_by_group(q, y, 0.2, seed=0)
    assert sorted(tr.tolist() + va.tolist()) == list(range(len(q)))
    assert not {q[i] for i in tr.tolist()} & {q[i] for i in va.tolist()}
    assert len({q[i] for i in va.tolist()}) == 8  # 5 folds of 40 questions
    strat = [error(split_stratified_by_group(q, y, 0.2, seed=s)[1]) for s in range(10)]
    plain = [error(split_by_group(q, 0.2, seed=s)[1]) for s in range(10)]
    assert max(strat) < 0.2 and sum(strat) < sum(plain) / 3
    tr2, va2 = split_stratified_by_group(q, y, 0.2, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(va, split_stratified_by_group(q, y, 0.2, seed=1)[1])
    tr0, va0 = split_stratified_by_group(q, y, 0.0, seed=0)
    assert len(va0) == 0 and len(tr0) == len(q)
    _, va3 = split_stratified_by_group(q, y, 0.3, seed=0)  # round(1 / 0.3) = 3 folds
    assert len({q[i] for i in va3.tolist()}) in (13, 14)


def test_stratified_split_in_training(tiny_model, tiny_dataset):
    from ks_lens.activations import collect_activations

    acts = collect_activations(
        tiny_model, tiny_dataset.with_combinations((2,), per_question=1), layers=[3], progress=False
    )
    q, y = acts.question_ids, acts.one_hot()
    cfg = ProbeConfig(hidden=8, epochs=2, val_fraction=0.25, val_split="stratified_group")
    probe = train_probe(acts, 3, config=cfg)
    assert probe.metrics["n_val"] == len(split_stratified_by_group(q, y, 0.25, 0)[1])
    # the default is the plain group split, unchanged
    default = train_probe(acts, 3, config=ProbeConfig(hidden=8, epochs=2, val_fraction=0.25))
    assert default.config.val_split == "group"
    assert default.metrics["n_val"] == len(split_by_group(q, 0.25, 0)[1])


def test_logistic_probes_for_many_layers_and_in_the_package_root(tiny_acts):
    probes = train_probes(tiny_acts, config=LOGISTIC, progress=False)
    assert sorted(probes) == [0, 1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = ks.train_probe(tiny_acts, 2, config=LOGISTIC)
    for a, b in zip(one.state_tensors().values(), probes[2].state_tensors().values(), strict=True):
        torch.testing.assert_close(a, b)
