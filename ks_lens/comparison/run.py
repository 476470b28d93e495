"""All stages chained (:func:`run_comparison`), the ``dct`` method's vectors fitted first."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ks_lens.capability.stage import CapabilityEvaluation, evaluate_capability_stage
from ks_lens.comparison.calibration import build_methods, calibrate_combinations, combo_alphas
from ks_lens.comparison.config import ComparisonConfig, TextScorer, split_method
from ks_lens.comparison.plan import ComparisonPlan, plan_comparison
from ks_lens.comparison.records import ActivationEvaluation, TextEvaluation
from ks_lens.comparison.result import ComparisonResult, derived_rows
from ks_lens.comparison.stages import _instructed_systems, evaluate_activations, evaluate_text
from ks_lens.datasets.coverage import label_combinations
from ks_lens.errors import ConfigError
from ks_lens.evaluation import map_dct_labels
from ks_lens.evaluation.instructed import instructed_system
from ks_lens.memory import timed_stage
from ks_lens.probes import Probe
from ks_lens.steering import SteeringMethod, SteeringVectors
from ks_lens.steering.dct import DCTVectors
from ks_lens.steering.registry import SteeringKit
from ks_lens.types import Model

# the package's logger: records keep the name they had before the split (ks_lens.comparison)
log = logging.getLogger("ks_lens.comparison")


def _capability_systems(
    config: ComparisonConfig, instructions: Mapping[str, str] | None, labels: Sequence[str]
) -> dict[tuple[str, ...], str] | None:
    """The capability stage's instructed system prompt per combination (``None``: no row)."""
    if not config.capability_instructed or instructions is None:
        return None
    pool = [lab for lab in labels if lab not in config.avoid]
    return {c: instructed_system(instructions, c) for c in label_combinations(pool, config.sizes)}


def uses_dct(config: ComparisonConfig) -> bool:
    """Whether ``config`` compares the ``dct`` method (or a variant of it)."""
    return any(split_method(m)[0] == "dct" for m in config.methods)


def fit_comparison_dct(
    model: Model,
    layer: int,
    calib_questions: Sequence[str],
    evaluator: Probe,
    config: ComparisonConfig,
    *,
    learned: DCTVectors | None = None,
) -> DCTVectors:
    """The ``dct`` method's vectors for a comparison steering at ``layer``: learned on the
    calibration questions with ``config.dct`` (the comparison's seed) and mapped to labels there
    by the held-out ``evaluator`` (:func:`~ks_lens.evaluation.map_dct_labels`); never on test
    questions. ``learned`` gives vectors already learned there (they know no labels, so another
    evaluator can map them again; e.g. a layer sweep's)."""
    if learned is None:
        learned = DCTVectors.fit(
            model,
            calib_questions,
            config.dct.config(model, layer, seed=config.seed, min_vectors=evaluator.n_labels),
        )
    elif learned.layer != layer:
        raise ConfigError(f"the DCT vectors given sit at layer {learned.layer}, not {layer}")
    mapping = map_dct_labels(
        model, learned, calib_questions, evaluator, batch_size=config.batch_size
    )
    dct = learned.mapped(mapping)
    log.info(f"  {dct!r}: {mapping.table()}")
    return dct


def _text_plan(plan: ComparisonPlan, config: ComparisonConfig, methods: int, n_q: int) -> str:
    """The text level's answers, for the log."""
    n_curve = len(plan.curve_cells(config.curve_cells_per_question))
    ins = f" + {len(plan.gen_cells)} instructed answers" if config.instructed else ""
    return (
        f"  text eval: {methods} methods x ({len(plan.gen_cells)} cells + {n_curve} curve cells x "
        f"{len(config.curve_factors) - 1} other alphas) + {n_q} unsteered answers{ins}"
    )


def run_comparison(
    model: Model,
    *,
    probe: Probe,
    vectors: SteeringVectors,
    evaluator: Probe,
    text_evaluator: TextScorer | None,
    layer_probes: Mapping[int, Probe] | None = None,
    response_evaluator: Probe | None = None,
    calib_questions: Sequence[str],
    test_questions: Sequence[str],
    text_questions: Sequence[str] | None = None,
    config: ComparisonConfig | None = None,
    progress: bool = True,
    dct: DCTVectors | None = None,
    linear_probe: Probe | None = None,
    instructions: Mapping[str, str] | None = None,
    token_probe: Probe | None = None,
    likelihood_vectors: SteeringVectors | None = None,
) -> ComparisonResult:
    """Plan, calibrate, evaluate (activations on ``test_questions``, then text on
    ``text_questions``, default the same), measure capability (``capability_questions`` > 0;
    with ``capability_instructed`` and ``instructions`` given, also under the system prompt that
    asks for each combination, :func:`~ks_lens.evaluation.instructed.instructed_system`) and
    summarise.

    With the ``dct`` method and no mapped ``dct`` vectors given, :func:`fit_comparison_dct`
    learns them. ``linear_probe`` / ``token_probe`` / ``likelihood_vectors`` (same labels) serve
    ksteer_linear / ksteer_token / likelihood; ``instructions`` (label -> instruction, e.g.
    ``BehaviourDataset.instructions``) the ``instructed`` row, which ``config.instructed`` asks for."""
    text_questions = list(test_questions if text_questions is None else text_questions)
    config = (config or ComparisonConfig()).validate(probe.label_names)
    labels = tuple(probe.label_names)
    _check_readers(
        labels, probe, vectors, evaluator, text_evaluator, response_evaluator, linear_probe
    )
    if not calib_questions or not test_questions:
        raise ConfigError("need calibration and test questions")
    plan = plan_comparison(labels, config, n_calib=len(calib_questions), n_test=len(text_questions))
    _instructed_systems(config, instructions, plan, [])  # refuse missing instructions early
    kit = _kit(probe, vectors, layer_probes, linear_probe, token_probe, likelihood_vectors)
    if kit.layer_probes and max(kit.layer_probes) > evaluator.layer:
        raise ConfigError(
            f"the evaluator (layer {evaluator.layer}) must read at or after every steering layer "
            f"({sorted(kit.layer_probes)})"
        )
    timings: dict[str, float] = {}
    if uses_dct(config):
        kit = _with_dct(model, kit, dct, calib_questions, evaluator, config, timings)
    methods = build_methods(config, kit)

    with timed_stage(timings, "calibration"):
        calib, combo = calibrate_combinations(model, methods, plan, calib_questions, config)
    alphas = {m: {k: c.alpha for k, c in v.items()} for m, v in calib.items()}

    stage = _Stage(model, methods, alphas, config, instructions, timings, combo_alphas(combo))
    act = _activation_stage(stage, plan, test_questions, evaluator, progress)
    text = None
    if text_evaluator is not None:
        text = _text_stage(stage, plan, text_questions, text_evaluator, response_evaluator)
    summaries, curves, equal = derived_rows(config, act, text)
    capability = None
    if config.capability_questions > 0:
        capability = _capability_stage(stage, labels)
    return ComparisonResult(
        config,
        plan,
        calib,
        act,
        text,
        summaries,
        curves,
        equal,
        len(calib_questions),
        len(test_questions),
        len(text_questions) if text is not None else 0,
        timings,
        capability,
        combo,
    )


def _kit(
    probe: Probe,
    vectors: SteeringVectors,
    layer_probes: Mapping[int, Probe] | None,
    linear_probe: Probe | None,
    token_probe: Probe | None,
    likelihood_vectors: SteeringVectors | None = None,
) -> SteeringKit:
    """The comparison's :class:`SteeringKit`; ConfigError unless ``token_probe`` (the per-token
    probe of ``ksteer_token``) reads the steering probe's hook point with its labels, and
    ``likelihood_vectors`` have the probe's labels."""
    if token_probe is not None and (
        token_probe.hook_name != probe.hook_name
        or tuple(token_probe.label_names) != tuple(probe.label_names)
    ):
        raise ConfigError(
            f"the per-token probe reads {token_probe.hook_name} with labels "
            f"{list(token_probe.label_names)}, the steering probe {probe.hook_name} with "
            f"{list(probe.label_names)}: ksteer_token steers beside ksteer, at the same hook "
            "point with the same labels"
        )
    return SteeringKit(
        probe,
        vectors,
        dict(layer_probes or {}),
        linear_probe=linear_probe,
        token_probe=token_probe,
        likelihood_vectors=_checked(tuple(probe.label_names), "likelihood vectors", likelihood_vectors),
    )


def _check_readers(
    labels: tuple[str, ...],
    probe: Probe,
    vectors: SteeringVectors,
    evaluator: Probe,
    text_evaluator: TextScorer | None,
    response_evaluator: Probe | None,
    linear_probe: Probe | None,
) -> None:
    """ConfigError unless every vector set, probe and evaluator has the steering probe's labels
    in its order, the linear probe reads its hook point and the evaluator reads at or after it."""
    others = {"vectors": vectors.label_names, "evaluator": evaluator.label_names}
    if linear_probe is not None:
        others["linear probe"] = linear_probe.label_names
        if linear_probe.hook_name != probe.hook_name:
            raise ConfigError(
                f"the linear probe reads {linear_probe.hook_name}, the steering probe "
                f"{probe.hook_name}: ksteer_linear steers beside ksteer, at the same hook point"
            )
    if text_evaluator is not None:
        others["text evaluator"] = text_evaluator.label_names
    if response_evaluator is not None:
        others["response evaluator"] = response_evaluator.label_names
    for what, names in others.items():
        if tuple(names) != labels:
            raise ConfigError(
                f"the {what} labels {list(names)} differ from the steering probe's {list(labels)} "
                "(same labels in the same order are required)"
            )
    if evaluator.layer < probe.layer:
        raise ConfigError(
            f"the evaluator (layer {evaluator.layer}) must read at or after the steering layer ({probe.layer})"
        )


def _checked(
    labels: tuple[str, ...], what: str, vectors: SteeringVectors | None
) -> SteeringVectors | None:
    """``vectors``; ConfigError unless they (if given) have ``labels`` in their order."""
    if vectors is not None and vectors.label_names != labels:
        raise ConfigError(
            f"the {what} labels {list(vectors.label_names)} differ from the steering probe's "
            f"{list(labels)} (same labels in the same order are required)"
        )
    return vectors


@dataclass(frozen=True)
class _Stage:
    """What every stage after calibration shares; ``timings`` is filled in place."""

    model: Model
    methods: dict[str, SteeringMethod]
    alphas: dict[str, dict[int, float]]
    config: ComparisonConfig
    instructions: Mapping[str, str] | None
    timings: dict[str, float]
    # alpha_per combination: per method, each combination's alpha (else empty)
    combo_alphas: dict[str, dict[tuple[str, ...], float]]


def _with_dct(
    model: Model,
    kit: SteeringKit,
    dct: DCTVectors | None,
    calib_questions: Sequence[str],
    evaluator: Probe,
    config: ComparisonConfig,
    timings: dict[str, float],
) -> SteeringKit:
    """``kit`` with the ``dct`` method's vectors (``dct``, else fitted by
    :func:`fit_comparison_dct`), timed (``dct_fit_s``)."""
    t0 = time.perf_counter()
    if dct is None:
        dct = fit_comparison_dct(model, kit.probe.layer, calib_questions, evaluator, config)
    kit = replace(kit, dct=dct)
    timings["dct_fit_s"] = time.perf_counter() - t0
    return kit


def _activation_stage(
    stage: _Stage,
    plan: ComparisonPlan,
    test_questions: Sequence[str],
    evaluator: Probe,
    progress: bool,
) -> ActivationEvaluation:
    """The activation stage, timed (``activation_eval_s``) and its memory recorded."""
    with timed_stage(stage.timings, "activation_eval"):
        return evaluate_activations(
            stage.model,
            stage.methods,
            stage.alphas,
            plan,
            test_questions,
            evaluator,
            stage.config,
            progress=progress,
            instructions=stage.instructions,
            combo_alphas=stage.combo_alphas,
        )


def _text_stage(
    stage: _Stage,
    plan: ComparisonPlan,
    text_questions: Sequence[str],
    text_evaluator: TextScorer,
    response_evaluator: Probe | None,
) -> TextEvaluation:
    """The text stage, timed (``text_eval_s``) and its memory recorded."""
    with timed_stage(stage.timings, "text_eval"):
        log.info(_text_plan(plan, stage.config, len(stage.methods), len(text_questions)))
        return evaluate_text(
            stage.model,
            stage.methods,
            stage.alphas,
            plan,
            text_questions,
            text_evaluator,
            stage.config,
            response_evaluator=response_evaluator,
            instructions=stage.instructions,
            combo_alphas=stage.combo_alphas,
        )


def _capability_stage(stage: _Stage, labels: tuple[str, ...]) -> CapabilityEvaluation:
    """The capability stage, timed (``capability_s``) and its memory recorded."""
    config, instructions = stage.config, stage.instructions
    with timed_stage(stage.timings, "capability"):
        capability = evaluate_capability_stage(
            stage.model,
            stage.methods,
            stage.alphas,
            labels=labels,
            avoid=config.avoid,
            sizes=config.sizes,
            n_questions=config.capability_questions,
            seed=config.seed,
            positions=config.positions,
            instructed=_capability_systems(config, instructions, labels),
            combo_alphas=stage.combo_alphas,
        )
        if config.capability_instructed and instructions is None:
            log.info("  capability: no instructions given; no instructed row")
    return capability
