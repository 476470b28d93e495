"""The K-Steering paper's protocol (``ks-lens demo --preset paper``): a layer sweep per method, then every method compared at its own layer.

1. **Sweep.** At each swept layer ``L`` (:func:`sweep_layers`), the steering probe and CAA vectors
   of the run's probe source are trained at ``L`` and the DCT vectors learned there; every method
   is calibrated to the coherence budget and read by a held-out activation evaluator at
   ``L + EVAL_GAP`` (capped), at the activation level only
   (:func:`~ks_lens.analysis.sweep.layer_sweep`).
2. **Choice.** Each method's layer is the one with its largest mean normalised gain on the
   **calibration** questions (:func:`~ks_lens.analysis.sweep.recommend`); the test questions'
   figures are reported beside the choice, never used for it.
3. **Comparison.** Every method runs at its chosen layer on the same plan and questions, read by
   one activation evaluator above every chosen layer and by the text evaluators; the runs are
   merged (:func:`~ks_lens.comparison.merge_results`), methods named ``"method@L{layer}"``, and
   reported like any comparison (1, 2 and 3 labels, activation and text level, equal-KL
   headline). The DCT vectors of each method's layer are saved under ``vectors/``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ks_lens.analysis.sweep import (
    LayerAccuracy,
    LayerRecord,
    Recommendation,
    evaluator_placement,
    layer_sweep,
    recommend,
    train_evaluators,
)
from ks_lens.capability.stage import capability_table
from ks_lens.comparison import (
    ComparisonConfig,
    ComparisonResult,
    SteeringKit,
    merge_results,
    method_label,
    uses_dct,
)
from ks_lens.errors import ConfigError
from ks_lens.memory import RunShape, add_work, comparison_work
from ks_lens.pipeline import EVAL_GAP, PipelineConfig, Setup, steering_kit
from ks_lens.probes import ProbeConfig
from ks_lens.steering.dct import DCTVectors
from ks_lens.types import Model

log = logging.getLogger(__name__)


def sweep_layers(n_layers: int, points: int, gap: int = EVAL_GAP) -> list[int]:
    """``points`` layers evenly spread from a quarter of the depth to the last layer whose
    evaluator still reads ``gap`` layers later (to the last-but-one layer on a model too shallow
    for that)."""
    if points < 1:
        raise ConfigError(f"sweep_points must be at least 1, got {points}")
    if n_layers < 2:
        raise ConfigError("a layer sweep needs a model with at least 2 layers")
    lo = min(round(0.25 * n_layers), n_layers - 2)
    hi = n_layers - 1 - gap
    if hi < lo:
        hi = n_layers - 2
    if points == 1 or hi == lo:
        return [round((lo + hi) / 2)]
    return sorted({round(lo + i * (hi - lo) / (points - 1)) for i in range(points)})


def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Swept layers given by the user: each must leave a layer above it for the evaluator."""
    for layer in layers:
        if not 0 <= layer < n_layers - 1:
            raise ConfigError(
                f"sweep layer {layer} must be between 0 and {n_layers - 2} (the activation "
                f"evaluator reads above the steering layer; the model has {n_layers} layers)"
            )
    return sorted(set(layers))


def study_layers(layers: Sequence[int], points: int) -> Callable[[int], list[int]]:
    """The layers the stores must hold for a sweep (the swept layers and their evaluators'),
    as a function of the model's depth (:data:`~ks_lens.pipeline.StudyLayers`)."""

    def of(n_layers: int) -> list[int]:
        swept = check_layers(layers, n_layers) if layers else sweep_layers(n_layers, points)
        evals = [evaluator_placement(L, n_layers, EVAL_GAP).eval_layer for L in swept]
        return sorted({*swept, *evals})

    return of


def sweep_config(c: ComparisonConfig) -> ComparisonConfig:
    """The sweep's comparison: the run's methods and settings (activation level only)."""
    return replace(c, curve_factors=(1.0,))


def extra_work(
    cfg: PipelineConfig, labels: Sequence[str], layers: Sequence[int], points: int
) -> Callable[[Model, RunShape], RunShape]:
    """What the sweep adds to a run's shape (for :func:`~ks_lens.memory.estimate_run`): per
    swept layer, an activation-level comparison that also rereads the calibration questions,
    and the DCT vectors learned there; the final comparison is the run's own."""

    def add(model: Model, shape: RunShape) -> RunShape:
        n = int(model.cfg.n_layers)
        swept = check_layers(layers, n) if layers else sweep_layers(n, points)
        work = comparison_work(
            sweep_config(cfg.comparison),
            labels,
            n_calib=cfg.n_calib,
            n_eval=cfg.n_eval,
            n_gen=cfg.n_gen,
            text=False,
            reread_calib=True,
        )
        return add_work(shape, *[work] * len(swept))

    return add


def sweep_kits(setup: Setup, layers: Sequence[int]) -> dict[int, SteeringKit]:
    """The steering probe and CAA vectors of the run's probe source at each of ``layers``,
    trained as :func:`~ks_lens.pipeline.prepare` trains them at the steering layer."""
    cfg = setup.config
    if cfg.probe_source == "prompt":
        if setup.train_store is None:
            raise ConfigError("the prompt source's train store is missing from this setup")
        acts = setup.train_store.load(layers=list(layers))
        return {L: steering_kit(acts, L, [], cfg) for L in layers}
    if setup.steer_store is None:
        raise ConfigError("the text source's store is missing from this setup")
    steer_ids = sorted({t.id for t in setup.gold_steer})
    acts = setup.steer_store.load(layers=list(layers)).for_questions(steer_ids)
    groups = {t.id: t.question_id or t.id for t in setup.gold_texts}
    return {L: steering_kit(acts, L, [], cfg, groups=groups) for L in layers}


def capability_retention(result: ComparisonResult) -> list[dict[str, Any]] | None:
    """Capability retention of each method at its calibrated alpha (and of ``instructed``):
    the merged comparison's capability rows (accuracy vs unsteered with a paired interval),
    or ``None`` when the comparison ran without a capability stage
    (``capability_questions=0``)."""
    if result.capability is None:
        return None
    return [r.to_json() for r in result.capability_rows()]


@dataclass
class PaperResult:
    """The protocol's outcome: the sweep, each method's layer, and the merged comparison."""

    layers: list[int]  # swept layers
    sweep: list[LayerRecord]
    choices: dict[str, Recommendation]  # method -> its layer choice (calibration questions)
    eval_layer: int  # the final comparison's activation evaluator
    result: ComparisonResult
    dct_paths: dict[str, str]  # run name -> saved DCT vectors
    timings: dict[str, float] = field(default_factory=dict)  # sweep_s, paper_comparison_s

    def layer_of(self, method: str) -> int:
        return self.choices[method].layer

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": "paper",
            "swept_layers": self.layers,
            "layer_choice": {
                m: {"layer": r.layer, "chosen_on": "calibration questions", "reason": r.reason}
                for m, r in self.choices.items()
            },
            "choices": {m: r.to_json() for m, r in self.choices.items()},
            "final_eval_layer": self.eval_layer,
            "sweep": [r.to_json() for r in self.sweep],
            "dct_vectors": self.dct_paths,
            "capability": capability_retention(self.result),
        }


def _accuracy(kits: dict[int, SteeringKit]) -> list[LayerAccuracy]:
    """The steering probes' validation accuracy per layer (reported; any layer may be chosen)."""
    return [
        LayerAccuracy(L, float(k.probe.metrics.get("val_accuracy", math.nan)), math.nan, {})
        for L, k in sorted(kits.items())
    ]


def run_paper(
    setup: Setup, *, layers: Sequence[int] = (), points: int = 5, progress: bool = True
) -> PaperResult:
    """The protocol (module docstring) on ``setup`` (from :func:`~ks_lens.pipeline.prepare`
    with :func:`study_layers`); ``layers`` to sweep (empty: :func:`sweep_layers` of ``points``)."""
    cfg, model = setup.config, setup.model
    n = int(model.cfg.n_layers)
    swept = check_layers(layers, n) if layers else sweep_layers(n, points)
    methods = cfg.comparison.methods
    calib = setup.questions("calibration", cfg.n_calib)
    test = setup.eval_questions(max(cfg.n_eval, cfg.n_gen))[0]
    t0 = time.perf_counter()
    kits = sweep_kits(setup, swept)
    if uses_dct(cfg.comparison):  # learned once per layer; each evaluator maps them again
        c = cfg.comparison
        n_labels = len(setup.dataset.labels)  # one vector per label: no label set cancels
        for L in swept:
            dct_cfg = c.dct.config(model, L, seed=c.seed, min_vectors=n_labels)
            learned = DCTVectors.fit(model, calib, dct_cfg)
            kits[L] = replace(kits[L], dct=learned)
    placements = [evaluator_placement(L, n, EVAL_GAP) for L in swept]
    evaluators = train_evaluators(
        setup.evaluator_store.load(layers=sorted({p.eval_layer for p in placements})),
        placements,
        config=ProbeConfig(hidden=256, seed=cfg.seed + 1),
    )
    log.info(f"[ks-lens paper] layer sweep over layers {swept}, methods {list(methods)}")
    records = layer_sweep(
        model,
        None,
        evaluators=evaluators,
        layers=swept,
        calib_questions=calib,
        test_questions=test[: cfg.n_eval],
        config=sweep_config(cfg.comparison),
        eval_gap=EVAL_GAP,
        kits=kits,
        progress=progress,
    )
    timings = {"sweep_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    accuracy = _accuracy(kits)
    choices = {m: recommend(accuracy, records, method=m, min_accuracy=0.0) for m in methods}
    for m, r in choices.items():
        log.info(f"  {method_label(m)}: {r.reason}")
    eval_layer = evaluator_placement(max(r.layer for r in choices.values()), n, EVAL_GAP).eval_layer
    evaluator = evaluators[eval_layer]
    by_layer: dict[int, list[str]] = {}
    for m in methods:
        by_layer.setdefault(choices[m].layer, []).append(m)
    runs: dict[str, ComparisonResult] = {}
    dct_paths: dict[str, str] = {}
    for L, ms in sorted(by_layer.items()):
        config = replace(cfg.comparison, methods=tuple(ms), baseline=ms[0])
        if uses_dct(config) and setup.work_dir is not None:
            dct_paths[f"L{L}"] = str(setup.work_dir / "vectors" / f"dct-{cfg.probe_source}-L{L}")
        log.info(f"[ks-lens paper] comparison at layer {L}: {ms}")
        runs[f"L{L}"] = setup.compare(
            config,
            progress=progress,
            calib_questions=calib,
            test_questions=test,
            kit=kits[L],
            evaluator=evaluator,
        )
    baseline = cfg.comparison.baseline
    merged = merge_results(
        runs,
        baseline=f"{baseline}@L{choices[baseline].layer}",
        config=cfg.comparison,
    )
    timings["paper_comparison_s"] = time.perf_counter() - t0
    return PaperResult(swept, records, choices, eval_layer, merged, dct_paths, timings)


def render_markdown(paper: PaperResult) -> str:
    """``paper.md``: each method's layer and why, the sweep's calibration figures, capability."""
    lines = [
        "# The K-Steering paper's protocol",
        "",
        f"Swept layers: {', '.join(map(str, paper.layers))}. Each method's steering layer is the "
        "one with its largest mean normalised gain in the held-out activation evaluator's target "
        "probability on the **calibration** questions (test questions only reported beside it). "
        f"The final comparison reads every method with one activation evaluator at layer "
        f"{paper.eval_layer} (above every chosen layer) and with the text evaluators; its report "
        "is report.md.",
        "",
        "| method | layer | why |",
        "|---|---|---|",
    ]
    lines += [f"| {method_label(m)} | {r.layer} | {r.reason} |" for m, r in paper.choices.items()]
    lines += ["", "## Sweep (calibration questions: mean target probability per layer)", ""]
    methods = list(paper.choices)
    ks = sorted({row.k for rec in paper.sweep for row in rec.calibration})
    lines.append(
        "| layer | evaluator | "
        + " | ".join(f"{method_label(m)} k={k}" for m in methods for k in ks)
        + " |"
    )
    lines.append("|---|---|" + "---|" * (len(methods) * len(ks)))
    for rec in paper.sweep:
        cells = {(r.method, r.k): r.target_prob.estimate for r in rec.calibration}
        vals = [cells.get((m, k)) for m in methods for k in ks]
        flag = " (capped)" if rec.capped else ""
        lines.append(
            f"| {rec.layer} | {rec.eval_layer}{flag} | "
            + " | ".join("n/a" if v is None else f"{v:.3f}" for v in vals)
            + " |"
        )
    lines += ["", "## Capability retention", ""]
    if paper.result.capability is None:
        lines.append("not measured: the comparison ran with `--capability-questions 0`")
    else:
        lines.append(capability_table(paper.result.capability_rows(), method_label))
    if paper.dct_paths:
        lines += ["", "DCT vectors saved: " + ", ".join(paper.dct_paths.values())]
    return "\n".join(lines) + "\n"
