"""Stages 3 and 4: the held-out evaluator on steered activations, and scored greedy answers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ks_lens.comparison.calibration import alpha_of
from ks_lens.comparison.config import ComparisonConfig, TextScorer
from ks_lens.comparison.plan import ComparisonPlan
from ks_lens.comparison.records import ActivationEvaluation, Answer, TextEvaluation
from ks_lens.errors import ConfigError
from ks_lens.evaluation import GenerationScores, generate_and_score_rows, readout, readout_groups
from ks_lens.evaluation.instructed import (
    INSTRUCTED,
    check_instructions,
    instructed_readout,
    instructed_system,
)
from ks_lens.evaluation.style import style_meters
from ks_lens.probes import Probe
from ks_lens.steering import SteeringMethod, SteeringSpec
from ks_lens.steering.base import Steering
from ks_lens.types import Model


def evaluate_activations(
    model: Model,
    methods: dict[str, SteeringMethod],
    alphas: dict[str, dict[int, float]],
    plan: ComparisonPlan,
    questions: Sequence[str],
    evaluator: Probe,
    config: ComparisonConfig,
    *,
    progress: bool = True,
    instructions: Mapping[str, str] | None = None,
    combo_alphas: Mapping[str, Mapping[tuple[str, ...], float]] | None = None,
) -> ActivationEvaluation:
    """Steer every test question toward every planned combination (each method at its
    calibrated alpha: its combination's in ``combo_alphas`` where that has the method, else its
    size's in ``alphas``) and read the held-out evaluator in the same forward pass; with
    ``config.instructed``, also read it on every question asked for every combination by system
    prompt (``instructions``: label -> instruction, see :mod:`ks_lens.evaluation.instructed`)."""
    systems = _instructed_systems(config, instructions, plan, plan.act_combos)
    base = readout(model, questions, probe=evaluator, batch_size=config.batch_size).probs
    names = list(methods)
    # every (combination, method) at once: the unsteered layers below the steering run once
    groups: list[Steering | None] = [
        (methods[m], SteeringSpec(c, plan.avoid, alpha_of(alphas, combo_alphas, m, c)))
        for c in plan.act_combos
        for m in names
    ]
    outs = readout_groups(
        model,
        questions,
        groups,
        probe=evaluator,
        positions=config.positions,
        batch_size=config.batch_size,
        progress=progress,
        desc="activation eval",
    )
    probs: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for g, r in enumerate(outs):
        probs[names[g % len(names)]].append(r.probs.double().numpy())
    ins = (
        instructed_readout(model, questions, systems, evaluator, batch_size=config.batch_size)
        if systems is not None
        else None
    )
    return ActivationEvaluation(
        tuple(evaluator.label_names),
        list(plan.act_combos),
        {m: dict(v) for m, v in alphas.items()},
        base.double().numpy(),
        probs,
        ins,
    )


def _instructed_systems(
    config: ComparisonConfig,
    instructions: Mapping[str, str] | None,
    plan: ComparisonPlan,
    combos: Sequence[tuple[str, ...]],
) -> list[str] | None:
    """The instructed row's system prompt for each of ``combos`` (``None`` without the row)."""
    if not config.instructed:
        return None
    if instructions is None:
        raise ConfigError(
            "the instructed reference row (ComparisonConfig.instructed) needs the labels' "
            "instructions (instructions=, e.g. BehaviourDataset.instructions); or set instructed "
            "to false"
        )
    check_instructions(instructions, plan.labels)
    return [instructed_system(instructions, c) for c in combos]


def evaluate_text(
    model: Model,
    methods: dict[str, SteeringMethod],
    alphas: dict[str, dict[int, float]],
    plan: ComparisonPlan,
    questions: Sequence[str],
    text_evaluator: TextScorer,
    config: ComparisonConfig,
    *,
    response_evaluator: Probe | None = None,
    instructions: Mapping[str, str] | None = None,
    combo_alphas: Mapping[str, Mapping[tuple[str, ...], float]] | None = None,
) -> TextEvaluation:
    """Answer the questions unsteered, each cell with every method at its alpha (its
    combination's in ``combo_alphas`` where that has the method, else its size's; the curve cells,
    :meth:`ComparisonPlan.curve_cells`, times each of ``curve_factors``) and, with ``instructed``,
    under the targets' system prompt (``instructions``; :mod:`ks_lens.evaluation.instructed`).

    All rows share generation batches. Each answer (instructed ones too) is re-encoded after its
    question without instruction under the unsteered model (KL per token along the answer,
    perplexity, response-activation evaluator) and scored by the text evaluator and the style
    meters.
    """
    labels = tuple(text_evaluator.label_names)
    if list(labels) != list(plan.labels):
        raise ConfigError(
            f"the text evaluator's labels {list(labels)} differ from the comparison's {list(plan.labels)}"
        )
    tr = _text_rows(methods, alphas, plan, len(questions), config, instructions, combo_alphas)
    scores: GenerationScores = generate_and_score_rows(
        model,
        questions,
        tr.configs,
        tr.rows,
        response_probe=response_evaluator,
        positions=config.positions,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.gen_batch_size,
        seed=config.seed,
        systems=tr.systems,
    )
    text_p = np.asarray(text_evaluator.predict_proba(scores.texts), dtype=float)
    answers = _answers(tr, scores, text_p, config, with_response=response_evaluator is not None)
    lenses = ("text", "text_activation") if response_evaluator is not None else ("text",)
    return TextEvaluation(
        labels,
        list(questions),
        list(plan.gen_cells),
        {m: dict(v) for m, v in alphas.items()},
        tuple(config.curve_factors),
        answers,
        lenses,
    )


#: a generation row's method, alpha factor, alpha and targets
_RowMeta = tuple[str, float, float, tuple[str, ...]]


@dataclass
class _TextRows:
    """The text stage's generation rows: ``rows[r]`` is (configuration, question), answered
    under ``systems[r]``; ``meta[row_meta[r]]`` says what it is."""

    configs: list[Steering | None]
    meta: list[_RowMeta]
    rows: list[tuple[int, int]]
    row_meta: list[int]
    systems: list[str | None]


def _text_rows(
    methods: dict[str, SteeringMethod],
    alphas: dict[str, dict[int, float]],
    plan: ComparisonPlan,
    n_questions: int,
    config: ComparisonConfig,
    instructions: Mapping[str, str] | None,
    combo_alphas: Mapping[str, Mapping[tuple[str, ...], float]] | None = None,
) -> _TextRows:
    """Every answer to generate: each question unsteered, each (curve) cell with every method at
    each alpha factor, then (with ``instructed``) each cell unsteered under its system prompt."""
    configs: list[Steering | None] = [None]
    meta: list[_RowMeta] = [("unsteered", 0.0, 0.0, ())]
    rows: list[tuple[int, int]] = [(0, i) for i in range(n_questions)]
    curve = plan.curve_cells(config.curve_cells_per_question)
    for m, steerer in methods.items():
        for f in config.curve_factors:
            for c in plan.gen_cells if f == 1.0 else curve:
                a = alpha_of(alphas, combo_alphas, m, c.targets) * f
                configs.append((steerer, SteeringSpec(c.targets, plan.avoid, a)))
                meta.append((m, f, a, c.targets))
                rows.append((len(configs) - 1, c.question))
    systems: list[str | None] = [None] * len(rows)
    row_meta = [g for g, _ in rows]  # each row's entry of ``meta``
    cell_systems = _instructed_systems(
        config, instructions, plan, [c.targets for c in plan.gen_cells]
    )
    for c, system in zip(plan.gen_cells, cell_systems or [], strict=False):
        # unsteered (configuration 0), asked for the cell's targets by system prompt
        row_meta.append(len(meta))
        meta.append((INSTRUCTED, 0.0, 0.0, c.targets))
        rows.append((0, c.question))
        systems.append(system)
    return _TextRows(configs, meta, rows, row_meta, systems)


def _answers(
    tr: _TextRows,
    scores: GenerationScores,
    text_p: np.ndarray,
    config: ComparisonConfig,
    *,
    with_response: bool,
) -> list[Answer]:
    """Every generated row as an :class:`Answer` (the response evaluator's probabilities only
    ``with_response``)."""
    answers = []
    for r, (_, q) in enumerate(tr.rows):
        m, f, a, targets = tr.meta[tr.row_meta[r]]
        answers.append(
            Answer(
                m,
                q,
                targets,
                f,
                a,
                scores.texts[r],
                len(scores.answer_ids[r]),
                scores.kl[r],
                scores.nll[r],
                config.degenerate.reason(scores.texts[r]),
                text_p[r].tolist(),
                scores.probs[r].tolist() if with_response else None,
                style_meters(scores.texts[r]).to_json(),
            )
        )
    return answers
