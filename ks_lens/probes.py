"""Behaviour probes: MLP and linear classifiers on one layer's residual-stream activations.

A probe maps an activation ``x`` (``[..., d_model]``) to one raw logit per behaviour label
(``[..., K]``): ``standardise -> Linear -> ReLU -> ... -> Linear``. K-Steering differentiates
these logits with respect to ``x``; the standardisation (mean and std of the training
activations, fixed after training) is part of the function, so gradients are taken in raw
activation coordinates.

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
from ks_lens.io import load_artifact, read_json, save_artifact
from ks_lens.models import check_signature
from ks_lens.types import Model


@dataclass(frozen=True)
class ProbeConfig:
    """How to train a probe. ``depth`` counts hidden layers (``kind="mlp"`` only)."""

    kind: Literal["mlp", "linear"] = "mlp"
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

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "linear"):
            raise ConfigError(f"probe kind must be 'mlp' or 'linear', got {self.kind!r}")
        if self.loss not in ("bce", "ce"):
            raise ConfigError(f"probe loss must be 'bce' or 'ce', got {self.loss!r}")
        if self.kind == "mlp" and (self.hidden < 1 or self.depth < 1):
            raise ConfigError("an MLP probe needs hidden >= 1 and depth >= 1")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be positive")
        for name, ok, rule in (
            ("lr", lambda v: v > 0, "a positive finite number"),
            ("weight_decay", lambda v: v >= 0, "a finite number >= 0"),
            ("val_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
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

    def dims(self, d_model: int, n_labels: int) -> list[int]:
        if self.kind == "linear":
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
        for i, lin in enumerate(self.linears):
            h = lin(h)
            if i < len(self.linears) - 1:
                h = F.relu(h)
        return h

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
            probe = probe.to(next(model.original_model.parameters()).device)
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
    x: torch.Tensor, params: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """``x``: [P, n, d] -> [P, n, K]."""
    h = x
    for i, (w, b) in enumerate(params):
        h = torch.baddbmm(b.unsqueeze(1), h, w)
        if i < len(params) - 1:
            h = F.relu(h)
    return h


def _loss_per_stack(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean loss per stacked probe: [P]."""
    if kind == "ce":
        P, n, K = logits.shape
        return (
            F.cross_entropy(logits.reshape(P * n, K), y.argmax(-1).repeat(P), reduction="none")
            .view(P, n)
            .mean(1)
        )
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
    ``names`` (e.g. ``"layer 5"``) name the probes in errors.

    Raises :class:`~ks_lens.errors.TrainingError` when a loss becomes NaN or infinite (say, with
    a learning rate far too large) instead of returning a broken probe.
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
    tr, va = split_by_group(groups, config.val_fraction, config.seed)
    if len(va) == 0:
        warnings.warn(
            "no validation rows (too few questions); early stopping and metrics use training rows",
            stacklevel=2,
        )
        va = tr
    xs = x.transpose(0, 1).float()  # [P, n, d]
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
    with torch.no_grad():
        logits = _stack_forward(xn, best)
    metrics = []
    for p in range(P):
        m_val = _accuracy(logits[p, va.to(device)].cpu(), y[va].cpu(), label_names)
        m_tr = _accuracy(logits[p, tr.to(device)].cpu(), y[tr].cpu(), label_names)
        metrics.append(
            {
                **(
                    {
                        "val_multi_topk_rate": m_val["multi_topk_rate"],
                        "n_val_multi": m_val["n_multi"],
                    }
                    if "multi_topk_rate" in m_val
                    else {}
                ),
                "val_accuracy": m_val["accuracy"],
                "val_per_label_accuracy": m_val["per_label_accuracy"],
                "train_accuracy": m_tr["accuracy"],
                "val_loss": float(best_loss[p]),
                "best_epoch": int(best_epoch[p]),
                "epochs_run": epoch + 1,
                "n_train": len(tr),
                "n_val": len(va),
            }
        )
    per_probe = [[(w[p].detach().cpu(), b[p].detach().cpu()) for w, b in best] for p in range(P)]
    return FitResult(per_probe, mean.cpu(), std.cpu(), metrics)


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
        config: :class:`ProbeConfig` (``kind="mlp"``/``"linear"``, ``hidden``, ``epochs``, ...).
        device: where to train (default: where ``acts`` are).
        groups: one group id per row (default the question ids); a group is kept wholly in
            train or in validation, so validation questions are unseen.
        progress: show a progress bar.

    Returns:
        :class:`ProbeSet`: ``{layer: Probe}`` (a dict; ``probes[-1]`` works). Each probe maps
        ``[..., d_model]`` to label logits ``[..., n_labels]``; ``probe.metrics`` has the
        validation accuracy.

    Example:
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
    """Save a layer -> probe mapping as ``layer-XX/`` artefacts plus a ``probes.json`` index.

    An older probe set in ``directory`` is replaced as a whole; a directory holding anything
    else (a single probe, other files) is refused."""
    from ks_lens.io import atomic_write_json, check_artifact_target, write_directory

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
                "metrics": {
                    k: probe.metrics.get(k)
                    for k in ("val_accuracy", "train_accuracy", "val_loss", "best_epoch")
                },
            }
        atomic_write_json(d / "probes.json", {"format": "ks_lens.probe_set", "probes": index})

    # a probe set replaces an older one as a whole: no stale layer-XX directories
    return write_directory(directory, write)


def load_probes(directory: str | Path, *, model: Model | None = None) -> ProbeSet:
    """Load a probe set saved by :func:`save_probes` (checked against ``model`` if given)."""
    directory = Path(directory)
    index = read_json(directory / "probes.json", what="probe set index")
    if index.get("format") != "ks_lens.probe_set":
        raise StoreError(f"{directory} is not a ks-lens probe set")
    return ProbeSet(
        {int(k): _load_indexed(directory, index, int(k), model) for k in index["probes"]}
    )


def _load_indexed(directory: Path, index: Any, layer: int, model: Model | None) -> Probe:
    """One probe of a probe set; the index must not point at another layer's probe."""
    probe = Probe.load(directory / index["probes"][str(layer)]["path"], model=model)
    if probe.layer != layer:
        raise StoreError(
            f"probe set {directory} is inconsistent: its index lists layer {layer} but that "
            f"probe was trained at {probe.hook_name}. Re-create the probe set."
        )
    return probe


def load_probe_any(
    path: str | Path, *, model: Model | None = None, layer: int | None = None
) -> Probe:
    """Load a single probe directory, or one layer of a probe set (``layer`` required if several)."""
    path = Path(path)
    if (path / "probes.json").is_file():
        index = read_json(path / "probes.json", what="probe set index")
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
