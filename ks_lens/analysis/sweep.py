"""Layer sweeps: probe accuracy and steering effect at every layer.

:func:`probe_accuracy_by_layer` trains MLP and linear probes for every collected layer in one
batched call each. :func:`layer_sweep` adds, per steering layer, CAA and K-Steering at alphas
calibrated to the same coherence budget, evaluated by one fixed held-out evaluator placed at or
after every swept layer (activation level), and on generated text for a small subset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from ks_lens.activations import Activations
from ks_lens.comparison import ComparisonConfig, TextScorer, run_comparison
from ks_lens.errors import ConfigError
from ks_lens.probes import Probe, ProbeConfig, train_probes
from ks_lens.steering import SteeringVectors


def probe_accuracy_by_layer(
    acts: Activations,
    *,
    mlp: ProbeConfig | None = None,
    linear: ProbeConfig | None = None,
    progress: bool = False,
) -> tuple[dict[int, Probe], dict[int, Probe], list[dict[str, Any]]]:
    """MLP and linear probes at every layer of ``acts``, and a record per layer of their accuracy."""
    mlp = mlp or ProbeConfig()
    linear = linear or replace(mlp, kind="linear")
    mlps = train_probes(acts, config=mlp, progress=progress)
    lins = train_probes(acts, config=linear, progress=progress)
    rows = [
        {
            "layer": layer,
            "mlp_val_accuracy": mlps[layer].metrics["val_accuracy"],
            "linear_val_accuracy": lins[layer].metrics["val_accuracy"],
            "mlp_val_per_label": mlps[layer].metrics["val_per_label_accuracy"],
        }
        for layer in sorted(mlps)
    ]
    return mlps, lins, rows


def layer_sweep(
    model: Any,
    train_acts: Activations,
    *,
    evaluator: Probe,
    text_evaluator: TextScorer | None = None,
    response_evaluator: Probe | None = None,
    layers: Sequence[int],
    calib_questions: Sequence[str],
    test_questions: Sequence[str],
    text_questions: Sequence[str] | None = None,
    config: ComparisonConfig,
    probes: dict[int, Probe] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Steering effect per layer; each record holds the comparison summaries for that layer
    (``"activation"``, and ``"text"`` with a text evaluator: :class:`SummaryRow` JSON)."""
    bad = [layer for layer in layers if layer > evaluator.layer]
    if bad:
        raise ConfigError(
            f"the evaluator (layer {evaluator.layer}) must read at or after every swept layer; {bad} are later"
        )
    if probes is None:
        probes = train_probes(train_acts, layers=list(layers), progress=False)
    out = []
    for layer in tqdm(list(layers), desc="layer sweep", disable=not progress):
        vectors = SteeringVectors.fit(train_acts, layer)
        res = run_comparison(
            model,
            probe=probes[layer],
            vectors=vectors,
            evaluator=evaluator,
            text_evaluator=text_evaluator,
            response_evaluator=response_evaluator,
            calib_questions=calib_questions,
            test_questions=test_questions,
            text_questions=text_questions,
            config=config,
            progress=False,
            log=lambda s: None,
        )
        rec = {
            "layer": layer,
            "alpha": {m: {str(k): a for k, a in v.items()} for m, v in res.alphas.items()},
            "activation": [r.to_json() for r in res.summary("activation")],
            "text": [r.to_json() for r in res.summary("text")],
            "equal_kl": [e.to_json() for e in res.equal_kl if e.lens == "text"],
            "timings": res.timings,
        }
        out.append(rec)
        best = max(
            (r for r in res.summary("activation") if r.method != "unsteered"),
            key=lambda r: r.target_prob.estimate,
        )
        log(f"  layer {layer:2d}: best {best.method} k={best.k} p={best.target_prob.fmt()}")
    return out


def recommend_layer(
    accuracy: list[dict[str, Any]],
    sweep: list[dict[str, Any]],
    *,
    method: str = "ksteer",
    min_accuracy: float = 0.9,
) -> tuple[int, str]:
    """The swept layer where ``method`` gives the largest normalised gain of the held-out target
    probability (mean over numbers of targets), among layers whose MLP probe reaches
    ``min_accuracy``; with the reason."""
    acc = {r["layer"]: r["mlp_val_accuracy"] for r in accuracy}
    scored = []
    for rec in sweep:
        rows = [r for r in rec["activation"] if r["method"] == method]
        if not rows or acc.get(rec["layer"], 0.0) < min_accuracy:
            continue
        scored.append((sum(r["gain"]["estimate"] for r in rows) / len(rows), rec["layer"]))
    if not scored:
        raise ConfigError(
            f"no swept layer has {method} results with probe accuracy >= {min_accuracy}"
        )
    gain, layer = max(scored)
    runner = sorted(scored, reverse=True)[1] if len(scored) > 1 else None
    reason = (
        f"layer {layer}: {method} gives a normalised gain of {gain:+.3f} in the held-out evaluator's "
        f"target probability on average "
        f"at matched coherence (probe accuracy {acc[layer]:.2f})"
    )
    if runner:
        reason += f"; next best layer {runner[1]} ({runner[0]:+.3f})"
    return layer, reason
