"""Behaviour probes: MLP and linear classifiers on one layer's residual-stream activations.

A probe maps an activation ``x`` (``[..., d_model]``) to one raw logit per behaviour label
(``[..., K]``): ``standardise -> Linear -> ReLU -> ... -> Linear``. K-Steering differentiates
these logits with respect to ``x``; the standardisation (mean and std of the training
activations, fixed after training) is part of the function, so gradients are taken in raw
activation coordinates.

Three architectures (:class:`ProbeConfig` ``architecture``): ``"mlp"`` and ``"linear"`` are
trained in torch; ``"logistic"`` is a linear probe fitted by scikit-learn's
``LogisticRegression`` (one-vs-rest over the labels), stored as the same one-layer
:class:`Probe`, so steering, saving and loading treat it like any other. Metrics
(``probe.metrics``) include validation accuracy and, from ``sklearn.metrics``, per-label ROC AUC,
Brier scores and the expected calibration error (:func:`calibration_metrics`).

:func:`train_probes` fits one probe per layer for many layers at once: the per-layer weights are
stacked and trained in one batched loop (each layer's loss and Adam state are independent, so
this equals training them one by one, just faster). Validation rows are held out **by question**,
early stopping keeps each layer's best epoch, and everything is seeded.

Probes save as safetensors + JSON (never pickle) with the model, hook point, layer, label names,
training configuration, metrics and dataset hash; :meth:`Probe.load` refuses a probe made for
another model or hook point.
"""

from ks_lens.probes.config import LOGISTIC_SOLVERS, ProbeConfig
from ks_lens.probes.metrics import ECE_BINS, calibration_metrics
from ks_lens.probes.probe import Probe, ProbeSet
from ks_lens.probes.saving import load_probe_any, load_probes, save_probes
from ks_lens.probes.training import (
    FitResult,
    fit_probes,
    split_by_group,
    split_stratified_by_group,
    train_probe,
    train_probes,
    train_token_probe,
    validation_split,
)

__all__ = [
    "ECE_BINS",
    "LOGISTIC_SOLVERS",
    "FitResult",
    "Probe",
    "ProbeConfig",
    "ProbeSet",
    "calibration_metrics",
    "fit_probes",
    "load_probe_any",
    "load_probes",
    "save_probes",
    "split_by_group",
    "split_stratified_by_group",
    "train_probe",
    "train_probes",
    "train_token_probe",
    "validation_split",
]
