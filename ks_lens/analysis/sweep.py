"""Layer sweeps: probe accuracy and steering effect at every layer.

:func:`probe_accuracy_by_layer` trains MLP and linear probes for every collected layer in one
batched call each. :func:`layer_sweep` adds, per steering layer ``L``, CAA and K-Steering at
alphas calibrated to the same coherence budget, read by a held-out activation evaluator placed
``eval_gap`` layers later (:func:`evaluator_placement`), on the **calibration** questions (the
figures the layer is chosen on) and on the **test** questions (reported beside them), and on
generated text for a small test subset.

Evaluator placement. A probe that reads the steered layer itself (or one just after it) measures
the push, not its effect on the computation that follows; a single evaluator at the last layer
reads early layers from far away and late layers from right next to them, which favours late
layers. So each steering layer ``L`` is read at layer ``L + eval_gap``. When that is past the
last layer, the evaluator reads the last layer and the record is flagged ``capped`` (its gap is
shorter than requested); :func:`recommend` leaves capped layers out unless no uncapped layer
qualifies (and says so).

Selection. :func:`recommend_layer` only receives calibration-question summaries; the test
questions' figures at the chosen layer are attached afterwards by :func:`recommend`, never used to
choose.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tqdm.auto import tqdm

from ks_lens.activations import Activations
from ks_lens.comparison import (
    ComparisonConfig,
    EqualKL,
    SteeringKit,
    SummaryRow,
    TextScorer,
    build_methods,
    evaluate_activations,
    fit_comparison_dct,
    run_comparison,
    summarise_activations,
    uses_dct,
)
from ks_lens.errors import ConfigError
from ks_lens.evaluation.stats import Interval
from ks_lens.logs import quieted
from ks_lens.probes import Probe, ProbeConfig, train_probes
from ks_lens.steering import SteeringVectors
from ks_lens.types import Model

log = logging.getLogger(__name__)

#: evaluator layer = steering layer + this many layers (capped at the last layer)
DEFAULT_EVAL_GAP = 4


@dataclass(frozen=True)
class LayerAccuracy:
    """Validation accuracy of the MLP and linear probes trained at one layer."""

    layer: int
    mlp_val_accuracy: float
    linear_val_accuracy: float
    mlp_val_per_label: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "mlp_val_accuracy": self.mlp_val_accuracy,
            "linear_val_accuracy": self.linear_val_accuracy,
            "mlp_val_per_label": dict(self.mlp_val_per_label),
        }


@dataclass(frozen=True)
class EvalPlacement:
    """Where the activation evaluator reads for one steering layer.

    ``eval_layer = min(layer + gap, last layer)``; ``capped`` when the cap made the gap shorter
    than requested (``eval_layer - layer < gap``).
    """

    layer: int
    eval_layer: int
    gap: int  # the requested gap

    @property
    def actual_gap(self) -> int:
        return self.eval_layer - self.layer

    @property
    def capped(self) -> bool:
        return self.actual_gap < self.gap

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "eval_layer": self.eval_layer,
            "gap": self.gap,
            "actual_gap": self.actual_gap,
            "capped": self.capped,
        }


def evaluator_placement(layer: int, n_layers: int, gap: int = DEFAULT_EVAL_GAP) -> EvalPlacement:
    """The evaluator layer for steering ``layer``: ``layer + gap``, capped at ``n_layers - 1``."""
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer {layer} is out of range for a model with {n_layers} layers")
    if gap < 0:
        raise ConfigError(f"eval_gap must be >= 0, got {gap}")
    return EvalPlacement(layer, min(layer + gap, n_layers - 1), gap)


@dataclass
class LayerRecord:
    """The comparison at one steering layer.

    ``calibration``: activation-level summaries on the calibration questions (the questions the
    alphas were calibrated on; the layer is chosen on these). ``test``: the same on the test
    questions; ``text`` and ``equal_kl``: generated answers to test questions (text lens).
    """

    placement: EvalPlacement
    evaluator_val_accuracy: float
    alphas: dict[str, dict[int, float]]
    calibration: list[SummaryRow]
    test: list[SummaryRow]
    text: list[SummaryRow] = field(default_factory=list)
    equal_kl: list[EqualKL] = field(default_factory=list)
    n_calib_questions: int = 0
    n_test_questions: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def layer(self) -> int:
        return self.placement.layer

    @property
    def eval_layer(self) -> int:
        return self.placement.eval_layer

    @property
    def capped(self) -> bool:
        return self.placement.capped

    def to_json(self) -> dict[str, Any]:
        return {
            **self.placement.to_json(),
            "evaluator_val_accuracy": self.evaluator_val_accuracy,
            "alpha": {m: {str(k): a for k, a in v.items()} for m, v in self.alphas.items()},
            "n_calib_questions": self.n_calib_questions,
            "n_test_questions": self.n_test_questions,
            "calibration": [r.to_json() for r in self.calibration],
            "test": [r.to_json() for r in self.test],
            "text": [r.to_json() for r in self.text],
            "equal_kl": [e.to_json() for e in self.equal_kl],
            "timings": dict(self.timings),
        }


def probe_accuracy_by_layer(
    acts: Activations,
    *,
    mlp: ProbeConfig | None = None,
    linear: ProbeConfig | None = None,
    progress: bool = False,
) -> tuple[dict[int, Probe], dict[int, Probe], list[LayerAccuracy]]:
    """MLP and linear probes at every layer of ``acts``, and a record per layer of their accuracy."""
    mlp = mlp or ProbeConfig()
    linear = linear or replace(mlp, architecture="linear")
    mlps = train_probes(acts, config=mlp, progress=progress)
    lins = train_probes(acts, config=linear, progress=progress)
    rows = [
        LayerAccuracy(
            layer,
            float(mlps[layer].metrics["val_accuracy"]),
            float(lins[layer].metrics["val_accuracy"]),
            dict(mlps[layer].metrics.get("val_per_label_accuracy", {})),
        )
        for layer in sorted(mlps)
    ]
    return mlps, lins, rows


def train_evaluators(
    evaluator_acts: Activations,
    placements: Sequence[EvalPlacement],
    *,
    config: ProbeConfig | None = None,
    progress: bool = False,
) -> dict[int, Probe]:
    """One held-out activation evaluator per distinct evaluator layer (one batched call)."""
    layers = sorted({p.eval_layer for p in placements})
    return dict(
        train_probes(
            evaluator_acts,
            layers=layers,
            config=config or ProbeConfig(hidden=256, seed=1),
            progress=progress,
        )
    )


def layer_sweep(
    model: Model,
    train_acts: Activations | None,
    *,
    evaluators: Mapping[int, Probe],
    layers: Sequence[int],
    calib_questions: Sequence[str],
    test_questions: Sequence[str],
    text_questions: Sequence[str] | None = None,
    text_evaluator: TextScorer | None = None,
    config: ComparisonConfig,
    eval_gap: int = DEFAULT_EVAL_GAP,
    probes: Mapping[int, Probe] | None = None,
    kits: Mapping[int, SteeringKit] | None = None,
    progress: bool = True,
) -> list[LayerRecord]:
    """Steering effect per layer (see the module docstring).

    ``evaluators`` maps an evaluator layer to its held-out probe; it must hold the layer of
    :func:`evaluator_placement` for every swept layer (:func:`train_evaluators` makes them).
    Alphas are calibrated on ``calib_questions``; the activation evaluator then reads both the
    calibration questions (``LayerRecord.calibration``: what the layer is chosen on) and the
    ``test_questions`` (``LayerRecord.test``: reported only).

    ``kits`` gives each layer's steering probe and vectors (``train_acts`` and ``probes`` are
    then unused); without it they are trained on ``train_acts``. With the ``dct`` method, each
    layer's DCT vectors (a kit's ``dct``, else learned there on the calibration questions) are
    mapped by that layer's evaluator (:func:`~ks_lens.comparison.fit_comparison_dct`).
    """
    n_layers = int(model.cfg.n_layers)
    # per-layer steering effects: no instructed reference row (it does not depend on the layer)
    config = replace(config, instructed=False)
    questions = _SweepQuestions(calib_questions, test_questions, text_questions)
    placements = _check_sweep(questions, evaluators, layers, n_layers, eval_gap)
    kits = dict(kits) if kits is not None else _kits(train_acts, layers, probes)
    missing = sorted(set(layers) - set(kits))
    if missing:
        raise ConfigError(f"no steering kit for swept layer(s) {missing}")
    out = []
    for place in tqdm(placements, desc="layer sweep", disable=not progress):
        evaluator = evaluators[place.eval_layer]
        kit = kits[place.layer]
        out.append(_sweep_layer(model, place, evaluator, kit, questions, text_evaluator, config))
    return out


@dataclass(frozen=True)
class _SweepQuestions:
    """A sweep's calibration, test and (optional) generated-text questions."""

    calib: Sequence[str]
    test: Sequence[str]
    text: Sequence[str] | None


def _check_sweep(
    questions: _SweepQuestions,
    evaluators: Mapping[int, Probe],
    layers: Sequence[int],
    n_layers: int,
    eval_gap: int,
) -> list[EvalPlacement]:
    """Every swept layer's evaluator placement; ConfigError when a calibration question is also
    a test (or text) question, or an evaluator layer has no (or the wrong) evaluator."""
    shared = set(questions.calib) & set(questions.test)
    if questions.text is not None:
        shared |= set(questions.calib) & set(questions.text)
    if shared:
        raise ConfigError(
            f"{len(shared)} question(s) are both calibration and test questions; "
            "the layer must be chosen on questions the test never sees"
        )
    placements = [evaluator_placement(layer, n_layers, eval_gap) for layer in layers]
    missing = sorted({p.eval_layer for p in placements} - set(evaluators))
    if missing:
        raise ConfigError(f"no evaluator for evaluator layer(s) {missing} (see train_evaluators)")
    for p in placements:
        if evaluators[p.eval_layer].layer != p.eval_layer:
            raise ConfigError(
                f"the evaluator given for layer {p.eval_layer} reads layer {evaluators[p.eval_layer].layer}"
            )
    return placements


def _sweep_layer(
    model: Model,
    place: EvalPlacement,
    evaluator: Probe,
    kit: SteeringKit,
    questions: _SweepQuestions,
    text_evaluator: TextScorer | None,
    config: ComparisonConfig,
) -> LayerRecord:
    """One swept layer: the comparison at it, read again on the calibration questions (logs a
    summary line)."""
    layer = place.layer
    with quieted("ks_lens.comparison"):  # one summary line per layer, below
        if uses_dct(config):  # mapped by this layer's evaluator (learned here if not given)
            kit = replace(
                kit,
                dct=fit_comparison_dct(
                    model, layer, questions.calib, evaluator, config, learned=kit.dct
                ),
            )
        res = run_comparison(
            model,
            probe=kit.probe,
            vectors=kit.vectors,
            layer_probes=kit.layer_probes,
            dct=kit.dct,
            evaluator=evaluator,
            text_evaluator=text_evaluator,
            calib_questions=questions.calib,
            test_questions=questions.test,
            text_questions=questions.text,
            config=config,
            progress=False,
        )
    # the same methods, alphas and combinations, read on the calibration questions
    cal_ev = evaluate_activations(
        model,
        build_methods(res.config, kit),
        res.alphas,
        res.plan,
        questions.calib,
        evaluator,
        res.config,
        progress=False,
        combo_alphas=res.combo_alphas,
    )
    rec = LayerRecord(
        place,
        float(evaluator.metrics.get("val_accuracy", float("nan"))),
        res.alphas,
        summarise_activations(cal_ev, res.config),
        res.summary("activation"),
        res.summary("text"),
        [e for e in res.equal_kl if e.lens == "text"],
        len(questions.calib),
        len(questions.test),
        dict(res.timings),
    )
    best = max(
        (r for r in rec.calibration if r.method != "unsteered"),
        key=lambda r: r.target_prob.estimate,
    )
    log.info(
        f"  layer {layer:2d} (evaluator {place.eval_layer}{', capped' if place.capped else ''}): "
        f"best on calibration questions {best.method} k={best.k} p={best.target_prob.fmt()}"
    )
    return rec


def _kits(
    train_acts: Activations | None,
    layers: Sequence[int],
    probes: Mapping[int, Probe] | None,
) -> dict[int, SteeringKit]:
    """A steering probe and CAA vectors per layer, from ``train_acts``."""
    if train_acts is None:
        raise ConfigError("layer_sweep needs train_acts or kits")
    if probes is None:
        probes = train_probes(train_acts, layers=list(layers), progress=False)
    return {
        layer: SteeringKit(probes[layer], SteeringVectors.fit(train_acts, layer))
        for layer in layers
    }


@dataclass
class LayerChoice:
    """The layer :func:`recommend_layer` picked, from calibration-question summaries only."""

    layer: int
    method: str
    score: float  # mean over numbers of targets of the normalised gain (calibration questions)
    gain: dict[int, Interval]  # per number of targets, calibration questions
    scores: dict[int, float]  # every eligible layer's score
    excluded: dict[int, str]  # layer -> why it was not eligible
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "method": self.method,
            "score": self.score,
            "gain": {str(k): v.to_json() for k, v in self.gain.items()},
            "scores": {str(k): v for k, v in self.scores.items()},
            "excluded": {str(k): v for k, v in self.excluded.items()},
            "reason": self.reason,
        }


def recommend_layer(
    accuracy: Sequence[LayerAccuracy],
    calibration: Mapping[int, Sequence[SummaryRow]],
    *,
    method: str = "ksteer",
    min_accuracy: float = 0.9,
) -> LayerChoice:
    """The layer where ``method`` gives the largest normalised gain of the evaluator's target
    probability (mean over numbers of targets) on the **calibration** questions, among layers
    whose MLP probe reaches ``min_accuracy``.

    ``calibration`` maps a steering layer to its calibration-question summary rows
    (:attr:`LayerRecord.calibration`); nothing measured on test questions reaches this function.
    """
    acc = {r.layer: r.mlp_val_accuracy for r in accuracy}
    scores: dict[int, float] = {}
    gains: dict[int, dict[int, Interval]] = {}
    excluded: dict[int, str] = {}
    for layer, rows in calibration.items():
        mine = [r for r in rows if r.method == method]
        if not mine:
            excluded[layer] = f"no {method} results"
            continue
        if acc.get(layer, 0.0) < min_accuracy:
            excluded[layer] = f"probe accuracy {acc.get(layer, float('nan')):.2f} < {min_accuracy}"
            continue
        scores[layer] = sum(r.gain.estimate for r in mine) / len(mine)
        gains[layer] = {r.k: r.gain for r in mine}
    if not scores:
        raise ConfigError(
            f"no swept layer has {method} results with probe accuracy >= {min_accuracy}"
        )
    ranked = sorted(scores, key=lambda lay: scores[lay], reverse=True)
    layer = ranked[0]
    reason = (
        f"layer {layer}: {method} gives a normalised gain of {scores[layer]:+.3f} in the held-out "
        f"evaluator's target probability on the calibration questions, on average over numbers "
        f"of targets, at matched coherence (probe accuracy {acc[layer]:.2f})"
    )
    if len(ranked) > 1:
        reason += f"; next best layer {ranked[1]} ({scores[ranked[1]]:+.3f})"
    return LayerChoice(layer, method, scores[layer], gains[layer], scores, excluded, reason)


@dataclass
class Recommendation:
    """A layer choice (calibration questions) with the test questions' figures beside it.

    ``test_gain``/``test_score`` are the chosen layer's figures on the test questions;
    ``test_best_layer`` is the layer the test figures would have picked (among the same
    eligible layers), reported to show how stable the choice is, never used to make it.
    """

    choice: LayerChoice
    capped_used: bool  # no uncapped layer qualified, so capped layers were considered
    test_gain: dict[int, Interval]
    test_score: float
    test_scores: dict[int, float]
    test_best_layer: int | None

    @property
    def layer(self) -> int:
        return self.choice.layer

    @property
    def reason(self) -> str:
        r = self.choice.reason
        if self.capped_used:
            r += " (no layer with the full evaluator gap qualified: capped layers were considered)"
        r += f"; on test questions the same layer scores {self.test_score:+.3f}"
        if self.test_best_layer is not None and self.test_best_layer != self.choice.layer:
            r += f" (test questions alone would favour layer {self.test_best_layer})"
        return r

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "reason": self.reason,
            "chosen_on": "calibration questions",
            "choice": self.choice.to_json(),
            "capped_used": self.capped_used,
            "test_gain": {str(k): v.to_json() for k, v in self.test_gain.items()},
            "test_score": self.test_score,
            "test_scores": {str(k): v for k, v in self.test_scores.items()},
            "test_best_layer": self.test_best_layer,
        }


def recommend(
    accuracy: Sequence[LayerAccuracy],
    records: Sequence[LayerRecord],
    *,
    method: str = "ksteer",
    min_accuracy: float = 0.9,
) -> Recommendation:
    """:func:`recommend_layer` on the records' calibration summaries (uncapped layers only, unless
    none qualifies), then the test-question figures of the chosen layer beside it."""
    uncapped = {r.layer: r.calibration for r in records if not r.capped}
    capped_used = False
    try:
        if not uncapped:
            raise ConfigError("no uncapped layer")
        choice = recommend_layer(accuracy, uncapped, method=method, min_accuracy=min_accuracy)
    except ConfigError:
        capped_used = True
        choice = recommend_layer(
            accuracy,
            {r.layer: r.calibration for r in records},
            method=method,
            min_accuracy=min_accuracy,
        )
    for r in records:
        if r.capped and r.layer not in choice.scores and r.layer not in choice.excluded:
            choice.excluded[r.layer] = (
                f"evaluator gap {r.placement.actual_gap} < {r.placement.gap} (capped)"
            )

    def test_rows(rec: LayerRecord) -> list[SummaryRow]:
        return [r for r in rec.test if r.method == method]

    by_layer = {r.layer: r for r in records}
    test_scores = {
        lay: sum(r.gain.estimate for r in test_rows(by_layer[lay])) / len(test_rows(by_layer[lay]))
        for lay in choice.scores
        if test_rows(by_layer[lay])
    }
    chosen = test_rows(by_layer[choice.layer])
    return Recommendation(
        choice,
        capped_used,
        {r.k: r.gain for r in chosen},
        test_scores.get(choice.layer, float("nan")),
        test_scores,
        max(test_scores, key=lambda lay: test_scores[lay]) if test_scores else None,
    )
