"""Probe metrics: accuracy on single- and multi-label rows, ranking and calibration."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float

from ks_lens.errors import ConfigError


def _accuracy(logits: torch.Tensor, y: torch.Tensor, label_names: Sequence[str]) -> dict[str, Any]:
    """Top-1 accuracy and per-label accuracy (recall) on single-label rows; on multi-label rows
    (multi-hot ``y``), the rate at which all true labels are the top-``m`` (``m`` true labels)."""
    n_true = y.sum(-1)
    single = n_true == 1
    pred = logits.argmax(-1)
    true = y.argmax(-1)
    ps, ts = pred[single], true[single]
    out: dict[str, Any] = {
        "accuracy": float((ps == ts).float().mean()) if len(ts) else float("nan")
    }
    per = {}
    for k, name in enumerate(label_names):
        sel = ts == k
        per[name] = float((ps[sel] == k).float().mean()) if sel.any() else float("nan")
    out["per_label_accuracy"] = per
    multi = n_true >= 2
    if multi.any():
        hits = []
        for row_logits, row_y in zip(logits[multi], y[multi], strict=True):
            m = int(row_y.sum())
            top = set(row_logits.topk(m).indices.tolist())
            hits.append(top == set(row_y.nonzero().squeeze(1).tolist()))
        out["multi_topk_rate"] = sum(hits) / len(hits)
        out["n_multi"] = len(hits)
    return out


#: bins of the expected calibration error (``val_ece``): equal-width on [0, 1]
ECE_BINS = 10


def calibration_metrics(
    probs: Float[torch.Tensor, "n k"],
    y: Float[torch.Tensor, "n k"],
    label_names: Sequence[str],
    *,
    n_bins: int = ECE_BINS,
) -> dict[str, Any]:
    """Ranking and calibration of per-label probabilities against multi-hot targets (sklearn).

    Every (row, label) pair is a binary prediction ``probs[i, k]`` of ``y[i, k]``:

    * ``auc``: per-label ROC AUC (``sklearn.metrics.roc_auc_score``; NaN for a label that is on
      all or none of the rows) and ``mean_auc`` over the labels that have one;
    * ``brier``: per-label Brier score, the mean squared error of the probability
      (``sklearn.metrics.brier_score_loss``; 0 is perfect, 0.25 a constant 0.5), and
      ``mean_brier``;
    * ``ece``: expected calibration error over all pairs: the pairs binned by probability into
      ``n_bins`` equal-width bins (the bins of ``sklearn.calibration.calibration_curve``), and
      the bins' ``|observed rate - mean probability|`` averaged, weighted by their pair counts.
    """
    import numpy as np
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss, roc_auc_score

    p = probs.detach().double().cpu().numpy()
    t = (y.detach().cpu().numpy() > 0.5).astype(np.int64)
    if p.shape != t.shape or p.shape[1] != len(label_names):
        raise ConfigError(f"probs {p.shape} and y {t.shape} must both be [n, {len(label_names)}]")
    auc: dict[str, float] = {}
    brier: dict[str, float] = {}
    for k, name in enumerate(label_names):
        n_pos = int(t[:, k].sum())
        auc[name] = float(roc_auc_score(t[:, k], p[:, k])) if 0 < n_pos < len(t) else float("nan")
        brier[name] = (
            float(brier_score_loss(t[:, k], p[:, k], pos_label=1)) if len(t) else float("nan")
        )
    finite = [v for v in auc.values() if math.isfinite(v)]
    flat_p, flat_t = p.reshape(-1), t.reshape(-1)
    ece = float("nan")
    if flat_p.size:
        prob_true, prob_pred = calibration_curve(flat_t, flat_p, n_bins=n_bins, strategy="uniform")
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        counts = np.bincount(np.searchsorted(edges[1:-1], flat_p), minlength=n_bins)
        weights = counts[counts > 0] / flat_p.size
        ece = float(np.sum(weights * np.abs(prob_true - prob_pred)))
    return {
        "auc": auc,
        "mean_auc": float(np.mean(finite)) if finite else float("nan"),
        "brier": brier,
        "mean_brier": float(np.mean(list(brier.values()))) if brier else float("nan"),
        "ece": ece,
    }


def _probabilities(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """What :meth:`Probe.predict_proba` returns for these logits."""
    return torch.softmax(logits, -1) if loss == "ce" else torch.sigmoid(logits)
