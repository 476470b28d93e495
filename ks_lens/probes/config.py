"""Probe training options: the architectures, losses, solvers and validation splits."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ks_lens.errors import ConfigError
from ks_lens.utils import check_int, check_seed, renamed_fields

#: ``ProbeConfig.solver`` values: the scikit-learn ``LogisticRegression`` solvers that fit an
#: L2-penalised model with a multinomial (softmax) loss as well as a binary one
LOGISTIC_SOLVERS = ("lbfgs", "newton-cg", "newton-cholesky", "sag", "saga")


@renamed_fields(kind="architecture")
@dataclass(frozen=True)
class ProbeConfig:
    """How to train a probe.

    ``architecture``: ``"mlp"`` (``depth`` hidden layers of width ``hidden``) and ``"linear"``
    are trained with AdamW in torch (``epochs``, ``lr``, ``weight_decay``, ``batch_size``,
    ``patience``); ``"logistic"`` is a linear probe fitted by scikit-learn's
    ``LogisticRegression`` (``C``, ``solver``, ``max_iter``; the torch training fields are
    ignored): one binary L2-penalised logistic regression per label for ``loss="bce"``
    (one-vs-rest), one multinomial regression for ``loss="ce"``. Every architecture gives the
    same :class:`Probe` (logistic: one linear layer, like ``"linear"``). Before 0.2.0 the field
    was ``kind`` (now refused, naming ``architecture``).

    ``val_split``: how validation rows are held out, whole groups (questions) at a time:
    ``"group"`` (the default, :func:`split_by_group`: a seeded ``val_fraction`` of the groups) or
    ``"stratified_group"`` (:func:`split_stratified_by_group`: scikit-learn's
    ``StratifiedGroupKFold`` keeps each label set's share similar in train and validation).
    """

    architecture: Literal["mlp", "linear", "logistic"] = "mlp"
    hidden: int = 128  # hidden width (mlp)
    depth: int = 2  # hidden layers (mlp)
    epochs: int = 30
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0
    batch_size: int = 64
    # bce: multi-label (sigmoid); ce: one label per row (softmax)
    loss: Literal["bce", "ce"] = "bce"
    val_fraction: float = 0.2  # share held out for validation (whole questions when grouped)
    patience: int = 5  # epochs without validation improvement before stopping (0: never stop early)
    normalize: bool = True  # standardise the activations with the training rows' mean and std
    seed: int = 0
    C: float = 1.0  # inverse L2 regularisation strength (logistic)
    # scikit-learn LogisticRegression solver (logistic)
    solver: Literal["lbfgs", "newton-cg", "newton-cholesky", "sag", "saga"] = "lbfgs"
    max_iter: int = 1000  # solver iterations (logistic)
    # validation rows: seeded share of the groups, or scikit-learn's StratifiedGroupKFold
    val_split: Literal["group", "stratified_group"] = "group"

    def __post_init__(self) -> None:
        if self.architecture not in ("mlp", "linear", "logistic"):
            raise ConfigError(
                "probe architecture must be 'mlp', 'linear' or 'logistic', got "
                f"{self.architecture!r}"
            )
        if self.loss not in ("bce", "ce"):
            raise ConfigError(f"probe loss must be 'bce' or 'ce', got {self.loss!r}")
        if self.architecture == "mlp" and (self.hidden < 1 or self.depth < 1):
            raise ConfigError("an MLP probe needs hidden >= 1 and depth >= 1")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be positive")
        for name, ok, rule in (
            ("lr", lambda v: v > 0, "a positive finite number"),
            ("weight_decay", lambda v: v >= 0, "a finite number >= 0"),
            # 0 would hold out nothing and report training accuracy as val_accuracy
            ("val_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
            ("C", lambda v: v > 0, "a positive finite number"),
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not ok(value)
            ):
                raise ConfigError(f"{name} must be {rule}, got {value!r}")
        if self.patience < 0:
            raise ConfigError(f"patience must be >= 0 (0: no early stopping), got {self.patience}")
        for name, least in (("epochs", 1), ("batch_size", 1), ("hidden", 0), ("depth", 0)):
            check_int(getattr(self, name), name, minimum=least)  # 2.5 or True: refused
        check_int(self.patience, "patience", minimum=0)
        check_seed(self.seed)
        if self.solver not in LOGISTIC_SOLVERS:
            raise ConfigError(
                f"solver must be one of {list(LOGISTIC_SOLVERS)}, got {self.solver!r}"
            )
        if (
            isinstance(self.max_iter, bool)
            or not isinstance(self.max_iter, int)
            or self.max_iter < 1
        ):
            raise ConfigError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if self.val_split not in ("group", "stratified_group"):
            raise ConfigError(
                f"val_split must be 'group' or 'stratified_group', got {self.val_split!r}"
            )
        if self.architecture == "logistic" and self.weight_decay != 0:
            raise ConfigError(
                "a logistic probe is regularised by C (the inverse L2 strength, smaller is "
                f"stronger), not weight_decay; got weight_decay={self.weight_decay!r}"
            )

    def dims(self, d_model: int, n_labels: int) -> list[int]:
        if self.architecture in ("linear", "logistic"):
            return [d_model, n_labels]
        return [d_model] + [self.hidden] * self.depth + [n_labels]


def probe_config_from_meta(saved: Mapping[str, Any]) -> ProbeConfig:
    """The :class:`ProbeConfig` a saved probe records (``meta.json``'s ``"config"``); probes saved
    before 0.2.0 name the architecture ``"kind"``."""
    d = dict(saved)
    if "kind" in d and "architecture" not in d:
        d["architecture"] = d.pop("kind")
    return ProbeConfig(**d)
