"""Batched probe training: validation splits by group, the torch loop, one probe per layer."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from tqdm.auto import tqdm

from ks_lens.activations import TOKEN_POSITION, Activations
from ks_lens.errors import ConfigError, DatasetError, TrainingError
from ks_lens.hooks import resid_hook
from ks_lens.probes.config import ProbeConfig
from ks_lens.probes.logistic import _fit_logistic
from ks_lens.probes.metrics import _accuracy, _probabilities, calibration_metrics
from ks_lens.probes.probe import Probe, ProbeSet, _stack_forward


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


def _loss_per_stack(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss per stacked probe: [P]."""
    if loss == "ce":
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
    ``names`` (e.g. ``"layer 5"``) name the probes in errors. ``config.architecture="logistic"``
    fits each probe with scikit-learn instead (no epochs; see :class:`ProbeConfig`).

    Raises :class:`~ks_lens.errors.TrainingError` when a loss becomes NaN or infinite (say, with
    a learning rate far too large) instead of returning a broken probe, and
    :class:`~ks_lens.errors.DatasetError` when a logistic probe's training rows lack a label's
    positive or negative examples.
    """
    _check_fit_inputs(x, y, groups, label_names)
    P = x.shape[1]
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
    mean, std = _standardisation(xs, tr, config)
    xn = (xs - mean[:, None]) / std[:, None]
    yf = y.float().to(device)
    keys = list(range(P)) if init_keys is None else list(init_keys)
    if len(keys) != P:
        raise ConfigError("init_keys must have one entry per stacked probe")

    fit_records: list[dict[str, Any]]
    if config.architecture == "logistic":
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
    metrics = [
        _probe_metrics(
            logits, p, y, tr, va, float(best_loss[p]), fit_records[p], label_names, config
        )
        for p in range(P)
    ]
    per_probe = [[(w[p].detach().cpu(), b[p].detach().cpu()) for w, b in best] for p in range(P)]
    return FitResult(per_probe, mean.cpu(), std.cpu(), metrics)


def _check_fit_inputs(
    x: torch.Tensor, y: torch.Tensor, groups: Sequence[str], label_names: Sequence[str]
) -> None:
    """ConfigError for mismatched shapes, DatasetError for too few rows or non-finite values."""
    if x.ndim != 3:
        raise ConfigError(f"x must be [n, probes, d_model], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if y.shape != (n, len(label_names)):
        raise ConfigError(f"y must be [n, {len(label_names)}], got {tuple(y.shape)}")
    if len(groups) != n:
        raise ConfigError("groups must have one entry per row")
    if n < 2:
        raise DatasetError("need at least 2 labelled rows to train a probe")
    if not bool(torch.isfinite(x).all()):
        raise DatasetError("the activations contain NaN or infinite values; re-collect them")


def _standardisation(
    xs: Float[torch.Tensor, "probe n d"], tr: torch.Tensor, config: ProbeConfig
) -> tuple[Float[torch.Tensor, "probe d"], Float[torch.Tensor, "probe d"]]:
    """Each probe's input mean and std over the training rows (0 and 1 without
    ``config.normalize``; std 1 with a single training row)."""
    P, _, d = xs.shape
    device = xs.device
    if config.normalize:
        mean = xs[:, tr].mean(1)
        std = xs[:, tr].std(1).clamp(min=1e-6) if len(tr) > 1 else torch.ones(P, d, device=device)
    else:
        mean = torch.zeros(P, d, device=device)
        std = torch.ones(P, d, device=device)
    return mean, std


def _probe_metrics(
    logits: torch.Tensor,
    p: int,
    y: torch.Tensor,
    tr: torch.Tensor,
    va: torch.Tensor,
    val_loss: float,
    fit: dict[str, Any],
    label_names: Sequence[str],
    config: ProbeConfig,
) -> dict[str, Any]:
    """Probe ``p``'s metrics from its ``logits[p]`` on every row (in this key order)."""
    device = logits.device
    m_val = _accuracy(logits[p, va.to(device)].cpu(), y[va].cpu(), label_names)
    m_tr = _accuracy(logits[p, tr.to(device)].cpu(), y[tr].cpu(), label_names)
    cal = calibration_metrics(
        _probabilities(logits[p, va.to(device)], config.loss), y[va], label_names
    )
    m: dict[str, Any] = {}
    if "multi_topk_rate" in m_val:
        m["val_multi_topk_rate"] = m_val["multi_topk_rate"]
        m["n_val_multi"] = m_val["n_multi"]
    m["val_accuracy"] = m_val["accuracy"]
    m["val_per_label_accuracy"] = m_val["per_label_accuracy"]
    m["train_accuracy"] = m_tr["accuracy"]
    m["val_loss"] = val_loss
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
    return m


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


def _labelled(acts: Activations) -> Activations:
    keep = (acts.labels >= 0).nonzero().squeeze(1)
    if len(keep) == 0:
        raise DatasetError(
            "these activations have no labels (neutral mode?); probes need labelled rows"
        )
    return acts.select(keep) if len(keep) != len(acts) else acts


def _labelled_rows(
    acts: Activations, groups: Sequence[str] | None
) -> tuple[Activations, Sequence[str] | None]:
    """``acts`` and ``groups`` (one per row, checked) without the unlabelled rows."""
    if groups is not None and len(groups) != len(acts):
        raise ConfigError(f"groups has {len(groups)} entries for {len(acts)} rows")
    if groups is not None:
        keep = (acts.labels >= 0).nonzero().squeeze(1).tolist()
        groups = [groups[i] for i in keep]
    return _labelled(acts), groups


def _model_layers(acts: Activations, layers: Sequence[int] | None) -> list[int]:
    """The layers to train on (default every collected one), negative ones counted from the
    model's last layer; ConfigError when there are none."""
    layers = list(acts.layers if layers is None else layers)
    n_model = acts.meta.get("model", {}).get("n_layers")
    if isinstance(n_model, int):  # negative layers count from the model's last layer
        layers = [n_model + x if isinstance(x, int) and x < 0 else x for x in layers]
    if not layers:
        raise ConfigError("no layers to train on")
    return layers


def _probe_source(acts: Activations) -> dict[str, Any]:
    """Where the probes' training activations came from (for :attr:`Probe.source`)."""
    return {
        "dataset": acts.meta.get("dataset"),
        "split": acts.meta.get("split"),
        "mode": acts.meta.get("collect", {}).get("mode"),
        "position": acts.meta.get("collect", {}).get("position"),
        "store": acts.meta.get("store"),
    }


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
        config: :class:`ProbeConfig` (``architecture="mlp"``/``"linear"``/``"logistic"``,
            ``hidden``, ``epochs``, ``C``, ...).
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
    acts, groups = _labelled_rows(acts, groups)
    layers = _model_layers(acts, layers)
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
        desc=f"training {len(layers)} {config.architecture} probe(s)",
    )
    model_info = acts.meta.get("model", {})
    source = _probe_source(acts)
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


def train_token_probe(
    acts: Activations,
    *,
    kind: str = "resid_post",
    config: ProbeConfig = ProbeConfig(),
    device: torch.device | str | None = None,
    groups: Sequence[str] | None = None,
    progress: bool = False,
) -> Probe:
    """Train a per-token steering probe on the rows of
    :func:`~ks_lens.activations.collect_token_activations` (every answer token of labelled
    texts, one layer): :func:`train_probe`'s probe, trainer and question-grouped validation
    split (``groups``: one id per row, e.g. each text's question; default the text ids), so
    saving and K-Steering treat it like any other probe. Its :attr:`Probe.source` records
    ``per_token=True`` and ``max_tokens`` (the N answer tokens per text).

    Raises :class:`~ks_lens.errors.ConfigError` for activations that are not per-token rows.
    """
    collect = acts.meta.get("collect", {})
    if collect.get("position") != TOKEN_POSITION or len(acts.layers) != 1:
        raise ConfigError(
            "train_token_probe needs the per-token rows of collect_token_activations (one layer, "
            f"collect position {TOKEN_POSITION!r}); these are {collect.get('position')!r} rows "
            f"at layers {list(acts.layers)}: use train_probe for pooled activations"
        )
    probe = train_probe(
        acts,
        acts.layers[0],
        kind=kind,
        config=config,
        device=device,
        groups=groups,
        progress=progress,
    )
    probe.source["per_token"] = True
    probe.source["max_tokens"] = int(collect["max_tokens"])
    probe.source["n_texts"] = acts.meta.get("n_texts")
    return probe
