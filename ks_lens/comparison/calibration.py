"""Stage 2: per method and number of targets, the largest alpha within the coherence budget."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import numpy as np

from ks_lens.calibration import Calibration, calibrate_alphas
from ks_lens.comparison.config import ComparisonConfig
from ks_lens.comparison.plan import Cell, ComparisonPlan
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
    """
    names = list(methods)
    calib: dict[str, dict[int, Calibration]] = {n: {} for n in names}
    rounds = _Rounds(model, methods, plan, questions, config)
    for k in config.sizes:
        cells = [c for c in plan.calib_cells if len(c.targets) == k]
        starts = [
            calib[n][k - 1].alpha
            if calib[n].get(k - 1) and calib[n][k - 1].alpha > 0
            else METHODS[n].alpha0
            for n in names
        ]
        results = calibrate_alphas(
            functools.partial(rounds.metrics, cells=cells),
            config.kl_budget,
            starts,
            bisect_steps=config.calib_bisect_steps,
        )
        for n, cal in zip(names, results, strict=True):
            calib[n][k] = cal
            log.info(
                f"  calibrated {n:18s} k={k}: alpha={cal.alpha:.4g} ({config.calibration_metric} "
                f"{cal.metric:.3f} <= {config.kl_budget}; {len(cal.evaluations)} evals)"
                f"{' ' + cal.note if cal.note else ''}"
            )
    return calib


class _Rounds:
    """One round of the lockstep alpha search: the calibration metric of several methods, each
    at its own alpha, on the cells of one number of targets. The unsteered references (the
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

    def metrics(self, which: list[int], alphas: list[float], *, cells: list[Cell]) -> list[float]:
        """The metric of method ``names[which[j]]`` at ``alphas[j]``, for every ``j``."""
        if self.config.calibration_metric == "first_token_kl":
            return self._first_token(which, alphas, cells)
        return self._generation(which, alphas, cells)

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

    def _first_token(self, which: list[int], alphas: list[float], cells: list[Cell]) -> list[float]:
        # each combination of the cells, on every calibration question (forward only)
        combos = list(dict.fromkeys(c.targets for c in cells))
        out = []
        for i, a in zip(which, alphas, strict=True):
            method = self.methods[self.names[i]]
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

    def _generation(self, which: list[int], alphas: list[float], cells: list[Cell]) -> list[float]:
        config, n = self.config, len(cells)
        configs: list[Steering | None] = [
            (self.methods[self.names[i]], SteeringSpec(c.targets, self.plan.avoid, a))
            for i, a in zip(which, alphas, strict=True)
            for c in cells
        ]
        scores = self._answers(configs, [(g, cells[g % n].question) for g in range(len(configs))])
        out = []
        for j in range(len(which)):
            sub = scores.select(range(j * n, (j + 1) * n))
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
