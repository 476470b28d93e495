"""Stage 2: per method and number of targets (or target combination), the largest alpha within
the coherence budget."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

from ks_lens.calibration import Calibration, calibrate_alphas
from ks_lens.comparison.config import ComparisonConfig
from ks_lens.comparison.plan import Cell, ComparisonPlan
from ks_lens.errors import ConfigError
from ks_lens.evaluation import (
    GenerationScores,
    QuestionPasses,
    first_token_kl,
    generate_and_score_rows,
    readout,
)
from ks_lens.evaluation.readouts import Readout
from ks_lens.steering import SteeringMethod, SteeringSpec
from ks_lens.steering.base import Steering
from ks_lens.steering.registry import METHODS, SteeringKit
from ks_lens.types import Model

# the package's logger: records keep the name they had before the split (ks_lens.comparison)
log = logging.getLogger("ks_lens.comparison")


def build_methods(config: ComparisonConfig, kit: SteeringKit) -> dict[str, SteeringMethod]:
    """Every method of ``config.methods``, built from ``kit``."""
    return {m: METHODS[m].build(kit) for m in config.methods}


#: per method, the calibration of each target combination (``alpha_per="combination"``)
ComboCalibration = dict[str, dict[tuple[str, ...], Calibration]]


def calibrate(
    model: Model,
    methods: dict[str, SteeringMethod],
    plan: ComparisonPlan,
    questions: Sequence[str],
    config: ComparisonConfig,
) -> dict[str, dict[int, Calibration]]:
    """Per method and number of targets, the largest alpha within the coherence budget on the
    calibration ``questions`` (all methods searched in lockstep, sharing generation batches).

    With ``generation_kl``, an alpha also fails if more than ``max_degenerate_rate`` of its
    calibration answers are degenerate where the unsteered answer to the same question is not.
    With ``alpha_per="combination"`` use :func:`calibrate_combinations`.
    """
    return calibrate_combinations(model, methods, plan, questions, config)[0]


def calibrate_combinations(
    model: Model,
    methods: dict[str, SteeringMethod],
    plan: ComparisonPlan,
    questions: Sequence[str],
    config: ComparisonConfig,
) -> tuple[dict[str, dict[int, Calibration]], ComboCalibration]:
    """:func:`calibrate` per ``config.alpha_per``: the calibration per method and number of
    targets, and (``alpha_per="combination"``, else empty) per method and target combination.

    Per combination, one search per (method, combination) runs on that combination's
    calibration cells (:func:`~ks_lens.comparison.plan.combination_calib_cells`; with
    ``first_token_kl``, on every calibration question), all searches of
    one size in lockstep (one generation batch per round), by the same budget and degenerate
    rule. A size's entry then summarises its combinations (:func:`size_summary`: their median
    alpha), and the next size's searches start from it.
    """
    names = list(methods)
    calib: dict[str, dict[int, Calibration]] = {n: {} for n in names}
    combo: ComboCalibration = {}
    rounds = _Rounds(model, methods, plan, questions, config)
    per_combo = config.alpha_per == "combination"
    for k in config.sizes:
        cells = [c for c in plan.calib_cells if len(c.targets) == k]
        combos = list(dict.fromkeys(c.targets for c in cells)) if per_combo else [None]
        searches = [
            (n, [c for c in cells if t is None or c.targets == t]) for n in names for t in combos
        ]
        starts = [
            calib[n][k - 1].alpha
            if calib[n].get(k - 1) and calib[n][k - 1].alpha > 0
            else METHODS[n].alpha0
            for n, _ in searches
        ]
        results = calibrate_alphas(
            functools.partial(rounds.metrics, searches=searches),
            config.kl_budget,
            starts,
            bisect_steps=config.calib_bisect_steps,
        )
        for (n, sc), cal in zip(searches, results, strict=True):
            what = f"k={k}" if not per_combo else "+".join(sc[0].targets)
            _log_calibration(n, what, cal, config)
            if per_combo:
                combo.setdefault(n, {})[sc[0].targets] = cal
            else:
                calib[n][k] = cal
        if per_combo:
            for n in names:
                calib[n][k] = size_summary([combo[n][t] for t in combos if t is not None])
                _log_calibration(n, f"k={k}", calib[n][k], config)
    return calib, combo


def alpha_of(
    alphas: Mapping[str, Mapping[int, float]],
    combo_alphas: Mapping[str, Mapping[tuple[str, ...], float]] | None,
    method: str,
    targets: Sequence[str],
) -> float:
    """The calibrated alpha of ``method`` steering toward ``targets``: its combination's alpha
    where ``combo_alphas`` has the method (``alpha_per="combination"``), else its size's."""
    per = None if combo_alphas is None else combo_alphas.get(method)
    if per is None:
        return float(alphas[method][len(targets)])
    if tuple(targets) not in per:
        raise ConfigError(
            f"{method!r} has no alpha calibrated for the combination {list(targets)} "
            f"(alpha_per 'combination' calibrates {len(per)} combinations)"
        )
    return float(per[tuple(targets)])


def combo_alphas(combo: ComboCalibration) -> dict[str, dict[tuple[str, ...], float]]:
    """The alphas of a per-combination calibration (empty for ``alpha_per="size"``)."""
    return {m: {t: c.alpha for t, c in v.items()} for m, v in combo.items()}


def size_summary(cals: Sequence[Calibration]) -> Calibration:
    """One size's entry under ``alpha_per="combination"``: the (lower) median of its
    combinations' calibrations by alpha (its alpha and metric; no evaluations of its own), the
    range in the note. It is what per-size readers show (summaries, curves, the report's alpha
    table) and where the next size's searches start; steering uses each combination's alpha."""
    if not cals:
        raise ConfigError("no combination calibrated for this size")
    ranked = sorted(cals, key=lambda c: c.alpha)
    mid = ranked[(len(ranked) - 1) // 2]
    return Calibration(
        mid.alpha,
        mid.budget,
        mid.metric,
        [],
        f"median of {len(cals)} combinations' alphas ({ranked[0].alpha:.4g} to "
        f"{ranked[-1].alpha:.4g})",
    )


def _log_calibration(n: str, what: str, cal: Calibration, config: ComparisonConfig) -> None:
    log.info(
        f"  calibrated {n:18s} {what}: alpha={cal.alpha:.4g} ({config.calibration_metric} "
        f"{cal.metric:.3f} <= {config.kl_budget}; {len(cal.evaluations)} evals)"
        f"{' ' + cal.note if cal.note else ''}"
    )


class _Rounds:
    """One round of the lockstep alpha search: the calibration metric of several searches (a
    method and its calibration cells: all of one number of targets, or of one combination),
    each at its own alpha. The unsteered references (the
    next-token readout, or the unsteered answers' degeneration) are computed once, and each
    calibration question's scoring pass is run once for every round (:class:`QuestionPasses`)."""

    def __init__(
        self,
        model: Model,
        methods: dict[str, SteeringMethod],
        plan: ComparisonPlan,
        questions: Sequence[str],
        config: ComparisonConfig,
    ) -> None:
        self.model, self.methods, self.names = model, methods, list(methods)
        self.plan, self.questions, self.config = plan, questions, config
        self.passes = QuestionPasses()
        self.base: Readout | None = None
        self.base_bad: list[bool] = []
        if config.calibration_metric == "first_token_kl":
            self.base = readout(model, questions, next_token=True, batch_size=config.batch_size)
        elif config.calibration_metric == "generation_kl":
            unsteered = self._answers([None], [(0, i) for i in range(len(questions))])
            self.base_bad = [config.degenerate.is_degenerate(t) for t in unsteered.texts]

    def metrics(
        self, which: list[int], alphas: list[float], *, searches: list[tuple[str, list[Cell]]]
    ) -> list[float]:
        """The metric of search ``searches[which[j]]`` (a method and its calibration cells) at
        ``alphas[j]``, for every ``j``."""
        chosen = [searches[i] for i in which]
        if self.config.calibration_metric == "first_token_kl":
            return self._first_token(chosen, alphas)
        return self._generation(chosen, alphas)

    def _answers(
        self, configs: Sequence[Steering | None], rows: list[tuple[int, int]]
    ) -> GenerationScores:
        config = self.config
        return generate_and_score_rows(
            self.model,
            self.questions,
            configs,
            rows,
            response_probe=None,
            positions=config.positions,
            max_new_tokens=config.calib_tokens,
            batch_size=config.gen_batch_size,
            seed=config.seed,
            passes=self.passes,
        )

    def _first_token(
        self, searches: list[tuple[str, list[Cell]]], alphas: list[float]
    ) -> list[float]:
        # each combination of a search's cells, on every calibration question (forward only)
        out = []
        for (name, cells), a in zip(searches, alphas, strict=True):
            combos = list(dict.fromkeys(c.targets for c in cells))
            method = self.methods[name]
            per = first_token_kl(
                self.model,
                self.questions,
                [(method, SteeringSpec(t, self.plan.avoid, a)) for t in combos],
                positions=self.config.positions,
                batch_size=self.config.batch_size,
                base=self.base,
            )
            out.append(sum(per) / len(per))
        return out

    def _generation(
        self, searches: list[tuple[str, list[Cell]]], alphas: list[float]
    ) -> list[float]:
        config = self.config
        configs: list[Steering | None] = []
        rows: list[tuple[int, int]] = []
        for (name, cells), a in zip(searches, alphas, strict=True):
            for c in cells:
                configs.append((self.methods[name], SteeringSpec(c.targets, self.plan.avoid, a)))
                rows.append((len(configs) - 1, c.question))
        scores = self._answers(configs, rows)
        out, start = [], 0
        for _, cells in searches:
            sub = scores.select(range(start, start + len(cells)))
            start += len(cells)
            kl = sub.mean_kl if not math.isnan(sub.mean_kl) else 0.0
            # steering-induced degeneration: degenerate where the unsteered answer is not
            new_bad = np.mean(
                [
                    config.degenerate.is_degenerate(t) and not self.base_bad[c.question]
                    for t, c in zip(sub.texts, cells, strict=True)
                ]
            )
            out.append(kl if new_bad <= config.max_degenerate_rate else math.inf)
        return out
