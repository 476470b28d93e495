"""Logistic probes: the stacked probes fitted by scikit-learn's ``LogisticRegression``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ks_lens.errors import DatasetError
from ks_lens.probes.config import ProbeConfig


def _fit_logistic(
    xn: torch.Tensor,
    yf: torch.Tensor,
    tr: torch.Tensor,
    label_names: Sequence[str],
    config: ProbeConfig,
    names: Sequence[str] | None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[dict[str, Any]]]:
    """scikit-learn ``LogisticRegression`` fits of the stacked probes on the training rows of
    standardised ``xn`` ``[P, n, d]``: stacked weights ``[(W [P, d, K], b [P, K])]`` (float32)
    and, per probe, a ``{"fit": {...}}`` record (library and version, solver, C, iterations).

    ``loss="bce"``: one binary regression per label on that label's 0/1 column (one-vs-rest, as
    ``OneVsRestClassifier`` does on multi-hot targets), so ``sigmoid(logit_k)`` is sklearn's
    ``predict_proba`` for label ``k``. ``loss="ce"``: one multinomial regression on each row's
    first true label (as the torch CE loss uses ``argmax``); ``softmax(logits)`` is sklearn's
    ``predict_proba``. With two labels sklearn fits one binary model, ``z``; its logits are stored
    as ``(-z/2, z/2)`` so that both labels have a gradient to steer along.
    """
    from sklearn.exceptions import ConvergenceWarning

    P = xn.shape[0]
    K = len(label_names)
    y_tr = (yf[tr.to(yf.device)].cpu().numpy() > 0.5).astype(np.int64)
    targets = y_tr.argmax(1)
    _check_training_labels(y_tr, targets, label_names, config)
    weights, biases, records = [], [], []
    for p in range(P):
        x_tr = xn[p, tr.to(xn.device)].detach().cpu().double().numpy()
        fit = _fit_one(x_tr, y_tr, targets, K, config)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in fit.caught)
        for w in fit.caught:
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if not converged:
            who = names[p] if names else f"probe {p}"
            warnings.warn(
                f"the logistic probe ({who}) did not converge in max_iter={config.max_iter} "
                f"iterations (solver {config.solver!r}); raise max_iter or lower C",
                stacklevel=4,
            )
        weights.append(torch.from_numpy(fit.coef.T.copy()).float())
        biases.append(torch.from_numpy(fit.icpt.copy()).float())
        records.append(_fit_record(fit, converged, config))
    device = xn.device
    return [(torch.stack(weights).to(device), torch.stack(biases).to(device))], records


def _check_training_labels(
    y_tr: np.ndarray, targets: np.ndarray, label_names: Sequence[str], config: ProbeConfig
) -> None:
    """DatasetError unless the training rows allow the fit: every label as some row's first
    label (``loss="ce"``, two labels at least), else every label both on and off some row."""
    K = len(label_names)
    if config.loss == "ce":
        missing = [label_names[k] for k in range(K) if not (targets == k).any()]
        if K < 2 or missing:
            raise DatasetError(
                "a multinomial (loss='ce') logistic probe needs training rows of every label and "
                f"at least two labels; no training row has {missing or list(label_names)}"
            )
    else:
        for k, name in enumerate(label_names):
            n_pos = int(y_tr[:, k].sum())
            if n_pos in (0, len(y_tr)):
                raise DatasetError(
                    f"label {name!r} is on {n_pos} of {len(y_tr)} training rows; a logistic "
                    "probe needs positive and negative training rows of every label"
                )


class _Fit(NamedTuple):
    """One probe's fit: logits ``x @ coef.T + icpt`` (``[K, d]``, ``[K]``), as sklearn ran it."""

    coef: np.ndarray
    icpt: np.ndarray
    n_iter: int | list[int]
    scheme: str  # "multinomial" or "one-vs-rest"
    caught: list[warnings.WarningMessage]  # the warnings the fit raised


def _fit_one(
    x_tr: np.ndarray, y_tr: np.ndarray, targets: np.ndarray, K: int, config: ProbeConfig
) -> _Fit:
    """Fit one probe on its training rows ``x_tr`` (single-threaded, its warnings caught)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    def estimator() -> LogisticRegression:
        return LogisticRegression(
            C=config.C, solver=config.solver, max_iter=config.max_iter, random_state=config.seed
        )

    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1):
        warnings.simplefilter("always", ConvergenceWarning)
        if config.loss == "ce":
            est = estimator().fit(x_tr, targets)
            coef = np.asarray(est.coef_, dtype=np.float64)
            icpt = np.asarray(est.intercept_, dtype=np.float64)
            if K == 2:  # one binary model z: softmax((-z/2, z/2)) = (1 - sigmoid z, sigmoid z)
                coef, icpt = (
                    np.concatenate([-coef / 2, coef / 2]),
                    np.array([-icpt[0] / 2, icpt[0] / 2]),
                )
            n_iter: int | list[int] = int(np.max(est.n_iter_))
            scheme = "multinomial"
        else:
            ests = [estimator().fit(x_tr, y_tr[:, k]) for k in range(K)]
            coef = np.stack([np.asarray(e.coef_, dtype=np.float64)[0] for e in ests])
            icpt = np.array([float(e.intercept_[0]) for e in ests])
            n_iter = [int(np.max(e.n_iter_)) for e in ests]
            scheme = "one-vs-rest"
    return _Fit(coef, icpt, n_iter, scheme, list(caught))


def _fit_record(fit: _Fit, converged: bool, config: ProbeConfig) -> dict[str, Any]:
    """The probe's ``{"fit": {...}}`` record."""
    import sklearn

    return {
        "fit": {
            "library": "scikit-learn",
            "version": sklearn.__version__,
            "estimator": "LogisticRegression",
            "scheme": fit.scheme,
            "penalty": "l2",
            "C": config.C,
            "solver": config.solver,
            "max_iter": config.max_iter,
            "n_iter": fit.n_iter,
            "converged": converged,
        }
    }
