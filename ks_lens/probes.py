"""Behaviour probes: MLP and linear classifiers on one layer's residual-stream activations.

A probe maps an activation ``x`` (``[..., d_model]``) to one raw logit per behaviour label
(``[..., K]``): ``standardise -> Linear -> ReLU -> ... -> Linear``. K-Steering differentiates
these logits with respect to ``x``; the standardisation (mean and std of the training
activations, fixed after training) is part of the function, so gradients are taken in raw
activation coordinates.

Three kinds (:class:`ProbeConfig` ``kind``): ``"mlp"`` and ``"linear"`` are trained in torch;
``"logistic"`` is a linear probe fitted by scikit-learn's ``LogisticRegression`` (one-vs-rest
over the labels), stored as the same one-layer :class:`Probe`, so steering, saving and loading
treat it like any other. Metrics (``probe.metrics``) include validation accuracy and, from
``sklearn.metrics``, per-label ROC AUC, Brier scores and the expected calibration error
(:func:`calibration_metrics`).

:func:`train_probes` fits one probe per layer for many layers at once: the per-layer weights are
stacked and trained in one batched loop (each layer's loss and Adam state are independent, so
this equals training them one by one, just faster). Validation rows are held out **by question**,
early stopping keeps each layer's best epoch, and everything is seeded.

Probes save as safetensors + JSON (never pickle) with the model, hook point, layer, label names,
training configuration, metrics and dataset hash; :meth:`Probe.load` refuses a probe made for
another model or hook point.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import nn
from tqdm.auto import tqdm

from ks_lens.activations import Activations
from ks_lens.errors import (
    ConfigError,
    DatasetError,
    LabelError,
    MetadataMismatchError,
    MissingKeyError,
    StoreError,
    TrainingError,
)
from ks_lens.hooks import ks_hook_name, parse_hook, resid_hook, same_hook_point
from ks_lens.io import (
    LEGACY_PROBE_SET_INDEX,
    META_CHECKSUM,
    META_FILE,
    artifact_format,
    check_artifact_target,
    load_artifact,
    load_meta,
    read_json,
    save_artifact,
    write_directory,
    write_meta,
)
from ks_lens.models import check_signature, model_device
from ks_lens.types import Model
from ks_lens.utils import check_int, check_seed

#: ``ProbeConfig.solver`` values: the scikit-learn ``LogisticRegression`` solvers that fit an
#: L2-penalised model with a multinomial (softmax) loss as well as a binary one
LOGISTIC_SOLVERS = ("lbfgs", "newton-cg", "newton-cholesky", "sag", "saga")


@dataclass(frozen=True)
class ProbeConfig:
    """How to train a probe.

    ``kind``: ``"mlp"`` (``depth`` hidden layers of width ``hidden``) and ``"linear"`` are trained
    with AdamW in torch (``epochs``, ``lr``, ``weight_decay``, ``batch_size``, ``patience``);
    ``"logistic"`` is a linear probe fitted by scikit-learn's ``LogisticRegression`` (``C``,
    ``solver``, ``max_iter``; the torch training fields are ignored): one binary L2-penalised
    logistic regression per label for ``loss="bce"`` (one-vs-rest), one multinomial regression
    for ``loss="ce"``. Every kind gives the same :class:`Probe` (logistic: one linear layer, like
    ``"linear"``).

    ``val_split``: how validation rows are held out, whole groups (questions) at a time:
    ``"group"`` (the default, :func:`split_by_group`: a seeded ``val_fraction`` of the groups) or
    ``"stratified_group"`` (:func:`split_stratified_by_group`: scikit-learn's
    ``StratifiedGroupKFold`` keeps each label set's share similar in train and validation).
    """

    kind: Literal["mlp", "linear", "logistic"] = "mlp"
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
        if self.kind not in ("mlp", "linear", "logistic"):
            raise ConfigError(
                f"probe kind must be 'mlp', 'linear' or 'logistic', got {self.kind!r}"
            )
        if self.loss not in ("bce", "ce"):
            raise ConfigError(f"probe loss must be 'bce' or 'ce', got {self.loss!r}")
        if self.kind == "mlp" and (self.hidden < 1 or self.depth < 1):
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
        if self.kind == "logistic" and self.weight_decay != 0:
            raise ConfigError(
                "a logistic probe is regularised by C (the inverse L2 strength, smaller is "
                f"stronger), not weight_decay; got weight_decay={self.weight_decay!r}"
            )

    def dims(self, d_model: int, n_labels: int) -> list[int]:
        if self.kind in ("linear", "logistic"):
            return [d_model, n_labels]
        return [d_model] + [self.hidden] * self.depth + [n_labels]


class Probe(nn.Module):
    """A trained probe for one hook point. ``probe(x)`` returns raw logits ``[..., K]``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        weights: Sequence[tuple[torch.Tensor, torch.Tensor]],
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        label_names: Sequence[str],
        hook_name: str,
        model: Mapping[str, Any],
        config: ProbeConfig,
        metrics: Mapping[str, Any] | None = None,
        source: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.linears = nn.ModuleList()
        for w, b in weights:
            lin = nn.Linear(w.shape[0], w.shape[1])
            with torch.no_grad():
                lin.weight.copy_(w.T)
                lin.bias.copy_(b)
            self.linears.append(lin)
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())
        self.label_names: tuple[str, ...] = tuple(label_names)
        # recorded in the HookedTransformer-style spelling; an alias and its canonical
        # TransformerLens name are the same hook point (see ks_lens.hooks)
        self.hook_name = ks_hook_name(hook_name)
        self.layer, self.hook_kind = parse_hook(self.hook_name)
        self.model_info: dict[str, Any] = dict(model)
        self.config = config
        self.metrics: dict[str, Any] = dict(metrics or {})
        self.source: dict[str, Any] = dict(source or {})
        self.requires_grad_(False)
        self.eval()

    @property
    def d_model(self) -> int:
        return int(self.mean.shape[-1])

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def forward(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... k"]:
        """Raw label logits ``[..., n_labels]`` for activations ``x`` ``[..., d_model]``."""
        if x.shape[-1] != self.d_model:
            from ks_lens.utils import check_d_model

            check_d_model(x, self.d_model, "x", f"the probe (trained at {self.hook_name})")
        h = (x - self.mean) / self.std
        # the MLP of training, on a stack of one probe (nn.Linear keeps its weight as [out, in])
        params = []
        for lin in self.linears:
            assert isinstance(lin, nn.Linear)
            params.append((lin.weight.t()[None], lin.bias[None]))
        out = _stack_forward(h.reshape(1, -1, h.shape[-1]), params)
        return out.reshape(*h.shape[:-1], out.shape[-1])

    def predict_proba(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... k"]:
        """Per-label probabilities: sigmoid for BCE probes, softmax for CE probes."""
        logits = self(x)
        return torch.softmax(logits, -1) if self.config.loss == "ce" else torch.sigmoid(logits)

    def label_indices(self, names: Sequence[str]) -> list[int]:
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in self.label_names]
        if unknown:
            raise LabelError(
                f"unknown label(s) {unknown}; this probe knows {list(self.label_names)}"
            )
        return [self.label_names.index(n) for n in names]

    def __repr__(self) -> str:
        acc = self.metrics.get("val_accuracy")
        acc_s = f", val_acc={acc:.3f}" if isinstance(acc, float) else ""
        return (
            f"Probe({self.config.kind}, hook={self.hook_name!r}, labels={list(self.label_names)}, "
            f"model={self.model_info.get('model')!r}{acc_s})"
        )

    # -- compatibility -----------------------------------------------------------------------
    def check_compatible(self, model: Model | None = None, hook_name: str | None = None) -> None:
        """Raise :class:`MetadataMismatchError` unless ``model``/``hook_name`` match the probe's."""
        if model is not None:
            check_signature(self.model_info, model, "probe")
        if hook_name is not None and not same_hook_point(hook_name, self.hook_name):
            raise MetadataMismatchError(
                f"probe was trained at {self.hook_name!r}, not {hook_name!r}; a probe is only valid at "
                "the hook point it was trained on"
            )

    # -- persistence -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {"mean": self.mean, "std": self.std}
        for i, lin in enumerate(self.linears):
            assert isinstance(lin, nn.Linear)
            t[f"linears.{i}.weight"] = lin.weight
            t[f"linears.{i}.bias"] = lin.bias
        return t

    def save(self, directory: str | Path) -> Path:
        meta = {
            "label_names": list(self.label_names),
            "hook_name": self.hook_name,
            "layer": self.layer,
            "model": self.model_info,
            "config": asdict(self.config),
            "metrics": self.metrics,
            "source": self.source,
            "n_linears": len(self.linears),
        }
        return save_artifact(directory, self.state_tensors(), meta, kind="probe")

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        model: Model | None = None,
        hook_name: str | None = None,
        device: torch.device | str | None = None,
    ) -> Probe:
        tensors, meta = load_artifact(directory, kind="probe")
        try:
            weights = [
                (tensors[f"linears.{i}.weight"].T, tensors[f"linears.{i}.bias"])
                for i in range(meta["n_linears"])
            ]
            probe = cls(
                weights,
                tensors["mean"],
                tensors["std"],
                label_names=meta["label_names"],
                hook_name=meta["hook_name"],
                model=meta["model"],
                config=ProbeConfig(**meta["config"]),
                metrics=meta.get("metrics"),
                source=meta.get("source"),
            )
        except (KeyError, TypeError) as e:
            raise StoreError(
                f"probe at {directory} is missing field {e}; it is corrupt or from another version"
            ) from e
        except ConfigError as e:
            raise StoreError(f"probe at {directory} has an invalid configuration ({e})") from e
        probe.check_compatible(model, hook_name)
        if device is not None:
            probe = probe.to(device)
        elif model is not None:
            probe = probe.to(model_device(model))
        return probe


# ----------------------------------------------------------------------------- batched training


class ProbeSet(dict[int, Probe]):
    """Probes keyed by MODEL layer index, as :func:`train_probes` / :func:`load_probes` return them.

    A plain ``dict`` (iterate, ``.items()``, ``len``) that also takes negative layers, counted
    from the model's last layer like ``acts[-1]``: ``probes[-1]`` is the probe at layer
    ``n_layers - 1``. A missing layer raises ``KeyError`` naming the layers that are there.
    """

    def _resolve(self, layer: Any) -> Any:
        if isinstance(layer, int) and not isinstance(layer, bool) and layer < 0 and self:
            n = next(iter(self.values())).model_info.get("n_layers")
            if isinstance(n, int):
                return n + layer
        return layer

    def __getitem__(self, layer: int) -> Probe:
        key = self._resolve(layer)
        if not dict.__contains__(self, key):
            shown = f"{layer} (= layer {key})" if key != layer else f"{layer}"
            raise MissingKeyError(
                f"no probe for layer {shown}; probes exist for layers {sorted(self)}"
            )
        return dict.__getitem__(self, key)

    def __contains__(self, layer: object) -> bool:
        return dict.__contains__(self, self._resolve(layer))

    def __repr__(self) -> str:
        if not self:
            return "ProbeSet({})"
        p = next(iter(self.values()))
        return (
            f"ProbeSet(layers={sorted(self)}, kind={p.hook_kind!r}, probe={p.config.kind!r}, "
            f"labels={list(p.label_names)}, model={p.model_info.get('model')!r})"
        )


def _init_stack(
    dims: Sequence[int], seeds: Sequence[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) init, each stacked probe from its own seed.

    Per-probe seeds make a probe's initial weights independent of which other probes are
    trained beside it, so batched training equals training each probe alone.
    """
    per_probe = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        layers = []
        for fan_in, fan_out in itertools.pairwise(dims):
            bound = 1.0 / math.sqrt(fan_in)
            w = (torch.rand(fan_in, fan_out, generator=gen) * 2 - 1) * bound
            b = (torch.rand(fan_out, generator=gen) * 2 - 1) * bound
            layers.append((w, b))
        per_probe.append(layers)
    return [
        (torch.stack([p[i][0] for p in per_probe]), torch.stack([p[i][1] for p in per_probe]))
        for i in range(len(dims) - 1)
    ]


def _stack_forward(
    x: Float[torch.Tensor, "probe n d_in"],
    params: Sequence[tuple[Float[torch.Tensor, "probe _ _"], Float[torch.Tensor, "probe _"]]],
) -> Float[torch.Tensor, "probe n k"]:
    """The probe MLP, for ``P`` probes at once: ``Linear -> ReLU -> ... -> Linear`` on
    (standardised) ``x`` ``[P, n, d]`` -> logits ``[P, n, K]``. ``params`` holds each linear
    layer's stacked ``(weight [P, in, out], bias [P, out])``. The one implementation of the
    probe function: training runs it on the stack, :meth:`Probe.forward` on a stack of one."""
    h = x
    for i, (w, b) in enumerate(params):
        h = torch.baddbmm(b.unsqueeze(1), h, w)
        if i < len(params) - 1:
            h = F.relu(h)
    return h


def _loss_per_stack(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean loss per stacked probe: [P]."""
    if kind == "ce":
        P = logits.shape[0]
        per_row = F.cross_entropy(
            rearrange(logits, "probe n k -> (probe n) k"),
            y.argmax(-1).repeat(P),
            reduction="none",
        )
        return rearrange(per_row, "(probe n) -> probe n", probe=P).mean(1)
    return F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none").mean(
        dim=(1, 2)
    )


def split_by_group(
    groups: Sequence[str], val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of a train/validation split that never splits a group (question)."""
    uniq = sorted(set(groups))
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(uniq), generator=gen).tolist()
    n_val = round(val_fraction * len(uniq))
    if val_fraction > 0 and len(uniq) >= 2:
        n_val = max(1, min(n_val, len(uniq) - 1))
    val_groups = {uniq[i] for i in perm[:n_val]}
    is_val = torch.tensor([g in val_groups for g in groups])
    return (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1)


def split_stratified_by_group(
    groups: Sequence[str], y: Float[torch.Tensor, "n k"], val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`split_by_group`, but stratified by label set (scikit-learn's
    ``StratifiedGroupKFold``): no group is split, and each label set (a row's true labels, e.g.
    ``casual`` or ``casual+concise``) keeps about the same share in train and validation.

    The validation rows are the first fold of ``StratifiedGroupKFold(n_splits, shuffle=True,
    random_state=seed)`` with ``n_splits = round(1 / val_fraction)`` (at least 2, at most the
    number of groups), so the validation share is ``1 / n_splits`` of the groups (20 % at the
    default ``val_fraction=0.2``). ``val_fraction=0`` or fewer than two groups: no validation
    rows. The assignment differs from :func:`split_by_group`'s at the same seed.
    """
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    n = len(groups)
    if y.shape[0] != n:
        raise ConfigError(f"y has {y.shape[0]} rows for {n} groups")
    n_groups = len(set(groups))
    if val_fraction <= 0 or n_groups < 2:
        return torch.arange(n), torch.zeros(0, dtype=torch.long)
    n_splits = min(n_groups, max(2, round(1 / val_fraction)))
    strata = ["+".join(str(k) for k in row.nonzero().squeeze(1).tolist()) for row in y]
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # rare label sets: stratified as far as they allow
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        _, val_rows = next(cv.split(np.zeros((n, 1)), strata, list(groups)))
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[torch.as_tensor(val_rows, dtype=torch.long)] = True
    return (~is_val).nonzero().squeeze(1), is_val.nonzero().squeeze(1)


def validation_split(
    groups: Sequence[str], y: Float[torch.Tensor, "n k"], config: ProbeConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation row indices as ``config.val_split`` says (whole groups)."""
    if config.val_split == "stratified_group":
        return split_stratified_by_group(groups, y, config.val_fraction, config.seed)
    return split_by_group(groups, config.val_fraction, config.seed)


@dataclass
class FitResult:
    params: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per stacked probe
    mean: torch.Tensor  # [P, d]
    std: torch.Tensor  # [P, d]
    metrics: list[dict[str, Any]] = field(default_factory=list)


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


def fit_probes(
    x: Float[torch.Tensor, "n probe d_model"],
    y: Float[torch.Tensor, "n k"],
    groups: Sequence[str],
    label_names: Sequence[str],
    config: ProbeConfig = ProbeConfig(),
    *,
    init_keys: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    progress: bool = False,
    desc: str = "training probes",
) -> FitResult:
    """Train ``x.shape[1]`` independent probes at once on targets ``y`` (one- or multi-hot).

    ``groups`` (one per row, e.g. question ids) keeps every group wholly in train or validation.
    ``init_keys`` (default ``0..P-1``; :func:`train_probes` passes the layer indices) seed each
    probe's initial weights, and each probe's early stopping is frozen once its own patience runs
    out, so a probe trained in a batch is the probe trained alone (up to float rounding).
    ``names`` (e.g. ``"layer 5"``) name the probes in errors. ``config.kind="logistic"`` fits each
    probe with scikit-learn instead (no epochs; see :class:`ProbeConfig`).

    Raises :class:`~ks_lens.errors.TrainingError` when a loss becomes NaN or infinite (say, with
    a learning rate far too large) instead of returning a broken probe, and
    :class:`~ks_lens.errors.DatasetError` when a logistic probe's training rows lack a label's
    positive or negative examples.
    """
    if x.ndim != 3:
        raise ConfigError(f"x must be [n, probes, d_model], got shape {tuple(x.shape)}")
    n, P, d = x.shape
    if y.shape != (n, len(label_names)):
        raise ConfigError(f"y must be [n, {len(label_names)}], got {tuple(y.shape)}")
    if len(groups) != n:
        raise ConfigError("groups must have one entry per row")
    if n < 2:
        raise DatasetError("need at least 2 labelled rows to train a probe")
    if not bool(torch.isfinite(x).all()):
        raise DatasetError("the activations contain NaN or infinite values; re-collect them")
    device = x.device
    gen = torch.Generator().manual_seed(config.seed)
    tr, va = validation_split(groups, y, config)
    if len(va) == 0:
        warnings.warn(
            "no validation rows (too few questions); early stopping and metrics use training rows",
            stacklevel=2,
        )
        va = tr
    xs = rearrange(x, "n probe d -> probe n d").float()
    if config.normalize:
        mean = xs[:, tr].mean(1)
        std = xs[:, tr].std(1).clamp(min=1e-6) if len(tr) > 1 else torch.ones(P, d, device=device)
    else:
        mean = torch.zeros(P, d, device=device)
        std = torch.ones(P, d, device=device)
    xn = (xs - mean[:, None]) / std[:, None]
    yf = y.float().to(device)
    keys = list(range(P)) if init_keys is None else list(init_keys)
    if len(keys) != P:
        raise ConfigError("init_keys must have one entry per stacked probe")

    fit_records: list[dict[str, Any]]
    if config.kind == "logistic":
        best, fit_records = _fit_logistic(xn, yf, tr, label_names, config, names)
        with torch.no_grad():
            best_loss = _loss_per_stack(
                _stack_forward(xn[:, va.to(device)], best), yf[va.to(device)], config.loss
            )
    else:
        best, best_loss, best_epoch, epochs_run = _fit_torch(
            xn, yf, tr, va, label_names, config, keys, names, gen, progress, desc
        )
        fit_records = [
            {"best_epoch": int(best_epoch[p]), "epochs_run": epochs_run} for p in range(P)
        ]
    with torch.no_grad():
        logits = _stack_forward(xn, best)
    metrics = []
    for p in range(P):
        m_val = _accuracy(logits[p, va.to(device)].cpu(), y[va].cpu(), label_names)
        m_tr = _accuracy(logits[p, tr.to(device)].cpu(), y[tr].cpu(), label_names)
        cal = calibration_metrics(
            _probabilities(logits[p, va.to(device)], config.loss), y[va], label_names
        )
        fit = fit_records[p]
        m: dict[str, Any] = {}
        if "multi_topk_rate" in m_val:
            m["val_multi_topk_rate"] = m_val["multi_topk_rate"]
            m["n_val_multi"] = m_val["n_multi"]
        m["val_accuracy"] = m_val["accuracy"]
        m["val_per_label_accuracy"] = m_val["per_label_accuracy"]
        m["train_accuracy"] = m_tr["accuracy"]
        m["val_loss"] = float(best_loss[p])
        m.update({k: fit[k] for k in ("best_epoch", "epochs_run") if k in fit})
        m["n_train"] = len(tr)
        m["n_val"] = len(va)
        # calibration and ranking (sklearn.metrics): new fields, after the ones above
        m["val_auc"] = cal["auc"]
        m["val_mean_auc"] = cal["mean_auc"]
        m["val_brier"] = cal["brier"]
        m["val_mean_brier"] = cal["mean_brier"]
        m["val_ece"] = cal["ece"]
        if "fit" in fit:  # logistic probes: how scikit-learn fitted them
            m["fit"] = fit["fit"]
        metrics.append(m)
    per_probe = [[(w[p].detach().cpu(), b[p].detach().cpu()) for w, b in best] for p in range(P)]
    return FitResult(per_probe, mean.cpu(), std.cpu(), metrics)


def _fit_torch(
    xn: torch.Tensor,
    yf: torch.Tensor,
    tr: torch.Tensor,
    va: torch.Tensor,
    label_names: Sequence[str],
    config: ProbeConfig,
    keys: Sequence[int],
    names: Sequence[str] | None,
    gen: torch.Generator,
    progress: bool,
    desc: str,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor, int]:
    """AdamW training of the stacked probes (``"mlp"``/``"linear"``) on standardised ``xn``
    ``[P, n, d]``, early stopping on the validation loss: the best weights, their validation
    losses ``[P]``, best epochs ``[P]`` and the number of epochs run."""
    P, _, d = xn.shape
    device = xn.device
    params = [
        (w.to(device).requires_grad_(True), b.to(device).requires_grad_(True))
        for w, b in _init_stack(
            config.dims(d, len(label_names)), [config.seed * 1_000_003 + k for k in keys]
        )
    ]
    flat = [t for pair in params for t in pair]
    opt = torch.optim.AdamW(flat, lr=config.lr, weight_decay=config.weight_decay)
    best_loss = torch.full((P,), float("inf"), device=device)
    best = [(w.detach().clone(), b.detach().clone()) for w, b in params]
    best_epoch = torch.zeros(P, dtype=torch.long)
    bad = torch.zeros(P, dtype=torch.long)
    active = torch.ones(P, dtype=torch.bool, device=device)
    bar = tqdm(range(config.epochs), desc=desc, disable=not progress, leave=False)
    epoch = 0
    for epoch in bar:
        perm = tr[torch.randperm(len(tr), generator=gen)]
        for s in range(0, len(perm), config.batch_size):
            idx = perm[s : s + config.batch_size].to(device)
            loss = _loss_per_stack(_stack_forward(xn[:, idx], params), yf[idx], config.loss).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            vloss = _loss_per_stack(
                _stack_forward(xn[:, va.to(device)], params), yf[va.to(device)], config.loss
            )
            diverged = (~torch.isfinite(vloss)).nonzero().squeeze(1).tolist()
            if diverged:
                who = [names[p] if names else f"probe {p}" for p in diverged]
                raise TrainingError(
                    f"probe training diverged at epoch {epoch + 1}: the loss became "
                    f"{float(vloss[diverged[0]])} ({', '.join(who)}). Lower the learning rate "
                    f"(lr={config.lr:g}) and train again; nothing was saved."
                )
            improved = (vloss < best_loss - 1e-6) & active
            for j, (w, b) in enumerate(params):
                best[j][0][improved] = w[improved]
                best[j][1][improved] = b[improved]
            best_loss = torch.where(improved, vloss, best_loss)
            best_epoch[improved.cpu()] = epoch
            bad = torch.where(improved.cpu(), torch.zeros_like(bad), bad + 1)
            if config.patience > 0:
                active &= (bad < config.patience).to(device)
        bar.set_postfix(val_loss=f"{float(vloss.mean()):.4f}")
        if not bool(active.any()):
            break
    return best, best_loss, best_epoch, epoch + 1


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
    import numpy as np
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    P = xn.shape[0]
    K = len(label_names)
    y_tr = (yf[tr.to(yf.device)].cpu().numpy() > 0.5).astype(np.int64)
    targets = y_tr.argmax(1)
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

    def estimator() -> LogisticRegression:
        return LogisticRegression(
            C=config.C, solver=config.solver, max_iter=config.max_iter, random_state=config.seed
        )

    weights, biases, records = [], [], []
    for p in range(P):
        x_tr = xn[p, tr.to(xn.device)].detach().cpu().double().numpy()
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
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if not converged:
            who = names[p] if names else f"probe {p}"
            warnings.warn(
                f"the logistic probe ({who}) did not converge in max_iter={config.max_iter} "
                f"iterations (solver {config.solver!r}); raise max_iter or lower C",
                stacklevel=4,
            )
        weights.append(torch.from_numpy(coef.T.copy()).float())
        biases.append(torch.from_numpy(icpt.copy()).float())
        records.append(
            {
                "fit": {
                    "library": "scikit-learn",
                    "version": sklearn.__version__,
                    "estimator": "LogisticRegression",
                    "scheme": scheme,
                    "penalty": "l2",
                    "C": config.C,
                    "solver": config.solver,
                    "max_iter": config.max_iter,
                    "n_iter": n_iter,
                    "converged": converged,
                }
            }
        )
    device = xn.device
    return [(torch.stack(weights).to(device), torch.stack(biases).to(device))], records


def _labelled(acts: Activations) -> Activations:
    keep = (acts.labels >= 0).nonzero().squeeze(1)
    if len(keep) == 0:
        raise DatasetError(
            "these activations have no labels (neutral mode?); probes need labelled rows"
        )
    return acts.select(keep) if len(keep) != len(acts) else acts


def train_probes(
    acts: Activations,
    *,
    layers: Sequence[int] | None = None,
    kind: str = "resid_post",
    config: ProbeConfig = ProbeConfig(),
    device: torch.device | str | None = None,
    groups: Sequence[str] | None = None,
    progress: bool = True,
) -> ProbeSet:
    """Train one probe per layer (all layers of ``acts`` by default) in one batched loop.

    Args:
        acts: labelled :class:`~ks_lens.activations.Activations` (``[n, layer, d_model]`` per
            kind); unlabelled rows (label ``-1``) are skipped.
        layers: model layer indices (negative count from the model's last layer); default all
            collected layers.
        kind: which collected hook kind to train on (``"resid_post"``, ``"resid_pre"``,
            ``"attn_out"``, ``"mlp_out"``, ``"resid_mid"``).
        config: :class:`ProbeConfig` (``kind="mlp"``/``"linear"``/``"logistic"``, ``hidden``,
            ``epochs``, ``C``, ...).
        device: where to train (default: where ``acts`` are).
        groups: one group id per row (default the question ids); a group is kept wholly in
            train or in validation, so validation questions are unseen.
        progress: show a progress bar.

    Returns:
        :class:`ProbeSet`: ``{layer: Probe}`` (a dict; ``probes[-1]`` works). Each probe maps
        ``[..., d_model]`` to label logits ``[..., n_labels]``; ``probe.metrics`` has the
        validation accuracy, per-label AUC, Brier scores and calibration error
        (:func:`calibration_metrics`).

    Examples:
        >>> probes = ks.train_probes(acts, config=ks.ProbeConfig(epochs=5), progress=False)
        >>> sorted(probes)                                  # one probe per collected layer
        [0, 1, 2, 3]
        >>> probes[2].hook_name, probes[2].label_names[:3]
        ('blocks.2.hook_resid_post', ('helpful', 'expert', 'casual'))
        >>> probes[2].predict_proba(acts[2]).shape == (len(acts), 6)      # [n, n_labels]
        True
    """
    if groups is not None and len(groups) != len(acts):
        raise ConfigError(f"groups has {len(groups)} entries for {len(acts)} rows")
    if groups is not None:
        keep = (acts.labels >= 0).nonzero().squeeze(1).tolist()
        groups = [groups[i] for i in keep]
    acts = _labelled(acts)
    layers = list(acts.layers if layers is None else layers)
    n_model = acts.meta.get("model", {}).get("n_layers")
    if isinstance(n_model, int):  # negative layers count from the model's last layer
        layers = [n_model + x if isinstance(x, int) and x < 0 else x for x in layers]
    if not layers:
        raise ConfigError("no layers to train on")
    # any hook kind: [n, *feature] flattened to [n, features] (d_model for the residual stream)
    x = torch.stack([acts.features(layer, kind) for layer in layers], dim=1)
    if device is not None:
        x = x.to(device)
    res = fit_probes(
        x,
        acts.one_hot(),
        acts.question_ids if groups is None else groups,
        acts.base_labels,
        config,
        init_keys=layers,
        names=[f"layer {layer}" for layer in layers],
        progress=progress,
        desc=f"training {len(layers)} {config.kind} probe(s)",
    )
    model_info = acts.meta.get("model", {})
    source = {
        "dataset": acts.meta.get("dataset"),
        "split": acts.meta.get("split"),
        "mode": acts.meta.get("collect", {}).get("mode"),
        "position": acts.meta.get("collect", {}).get("position"),
        "store": acts.meta.get("store"),
    }
    out = ProbeSet()
    for j, layer in enumerate(layers):
        out[layer] = Probe(
            res.params[j],
            res.mean[j],
            res.std[j],
            label_names=acts.base_labels,
            hook_name=resid_hook(layer, kind),
            model=model_info,
            config=config,
            metrics=res.metrics[j],
            source=source,
        )
    return out


def train_probe(
    acts: Activations,
    layer: int,
    *,
    kind: str = "resid_post",
    config: ProbeConfig = ProbeConfig(),
    device: torch.device | str | None = None,
    groups: Sequence[str] | None = None,
    progress: bool = False,
) -> Probe:
    """Train a single probe at ``layer`` (see :func:`train_probes`)."""
    return train_probes(
        acts,
        layers=[layer],
        kind=kind,
        config=config,
        device=device,
        groups=groups,
        progress=progress,
    )[layer]


def save_probes(probes: Mapping[int, Probe], directory: str | Path) -> Path:
    """Save a layer -> probe mapping as ``layer-XX/`` artefacts plus an index (``meta.json``,
    format ``ks_lens.probe_set``) recording each member's path, hook point, metrics and metadata
    checksum.

    An older probe set in ``directory`` is replaced as a whole; a directory holding anything
    else (a single probe, other files) is refused."""
    directory = Path(directory)
    check_artifact_target(directory, "probe_set")

    def write(d: Path) -> None:
        index = {}
        for layer, probe in sorted(probes.items()):
            sub = f"layer-{layer:02d}"
            probe.save(d / sub)
            index[str(layer)] = {
                "path": sub,
                "hook_name": probe.hook_name,
                "metrics": {k: probe.metrics.get(k) for k in _INDEX_METRICS},
                # the member's own metadata checksum (it covers its tensors' SHA-256 too)
                META_CHECKSUM: read_json(d / sub / META_FILE, what="probe metadata")[META_CHECKSUM],
            }
        write_meta(d, {"probes": index}, kind="probe_set")

    # a probe set replaces an older one as a whole: no stale layer-XX directories
    return write_directory(directory, write)


def load_probes(directory: str | Path, *, model: Model | None = None) -> ProbeSet:
    """Load a probe set saved by :func:`save_probes` (checked against ``model`` if given)."""
    directory = Path(directory)
    index = _read_index(directory)
    return ProbeSet(
        {int(k): _load_indexed(directory, index, int(k), model) for k in index["probes"]}
    )


def _read_index(directory: Path) -> dict[str, Any]:
    """A probe set's checked index: its ``meta.json``, or the ``probes.json`` of a set saved
    before 0.2.0 (read as it is: it had no checksum of its own)."""
    legacy = directory / LEGACY_PROBE_SET_INDEX
    if legacy.is_file() and not (directory / META_FILE).is_file():
        index = read_json(legacy, what="probe set index")
        if not isinstance(index, dict) or index.get("format") != "ks_lens.probe_set":
            raise StoreError(f"{directory} is not a ks-lens probe set")
    else:
        index = load_meta(directory, kind="probe_set")
    if not isinstance(index.get("probes"), dict):
        raise StoreError(f"probe set index of {directory} lists no probes. {_RECREATE}")
    return index


_INDEX_METRICS = ("val_accuracy", "train_accuracy", "val_loss", "best_epoch")


def _load_indexed(directory: Path, index: Any, layer: int, model: Model | None) -> Probe:
    """One probe of a probe set; the index must not point at another layer's probe, and the
    member must be the one the set was saved with (its metadata checksum, recorded in the index;
    sets saved before the checksum was recorded: the metrics the index lists)."""
    entry = index["probes"][str(layer)]
    path = directory / entry["path"]
    probe = Probe.load(path, model=model)
    if probe.layer != layer:
        raise StoreError(
            f"probe set {directory} is inconsistent: its index lists layer {layer} but that "
            f"probe was trained at {probe.hook_name}. Re-create the probe set."
        )
    recorded = entry.get(META_CHECKSUM)
    if recorded is None and int(index.get("format_version", 1)) >= 2:
        raise StoreError(
            f"probe set {directory}: its index has no checksum for layer {layer}; it was "
            f"edited after saving. {_RECREATE}"
        )
    if recorded is not None:
        same = read_json(path / META_FILE, what="probe metadata").get(META_CHECKSUM) == recorded
    else:  # a set saved before checksums were recorded
        same = all(entry.get("metrics", {}).get(k) == probe.metrics.get(k) for k in _INDEX_METRICS)
    if not same:
        raise StoreError(
            f"probe set {directory}: the probe of layer {layer} ({path.name}) is not the one this "
            "set was saved with (it was replaced, e.g. copied from another run, and the index's "
            f"record of it no longer matches). {_RECREATE}"
        )
    return probe


_RECREATE = (
    "Re-create the set: ks-lens train --acts STORE --layer all --out DIR --overwrite "
    "(or ks_lens.save_probes)"
)


def load_probe_any(
    path: str | Path, *, model: Model | None = None, layer: int | None = None
) -> Probe:
    """Load a single probe directory, or one layer of a probe set (``layer`` required if several)."""
    path = Path(path)
    if artifact_format(path) == "ks_lens.probe_set":
        index = _read_index(path)
        layers = sorted(int(k) for k in index["probes"])
        if layer is None:
            if len(layers) != 1:
                raise StoreError(f"{path} holds probes for layers {layers}; choose one with layer=")
            layer = layers[0]
        if str(layer) not in index["probes"]:
            raise StoreError(f"{path} has no probe for layer {layer}; it has {layers}")
        return _load_indexed(path, index, layer, model)
    probe = Probe.load(path, model=model)
    if layer is not None and probe.layer != layer:
        raise MetadataMismatchError(f"probe at {path} is for layer {probe.layer}, not {layer}")
    return probe
