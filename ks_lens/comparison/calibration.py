"""Stage 2: per method and number of targets, the largest alpha within the coherence budget."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from ks_lens.calibration import Calibration, calibrate_alphas
from ks_lens.comparison.config import ComparisonConfig
from ks_lens.comparison.plan import Cell, ComparisonPlan
from ks_lens.evaluation import (
    QuestionPasses,
    first_token_kl,
    generate_and_score_rows,
    readout,
)
from ks_lens.steering import SteeringMethod, SteeringSpec
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
    base = (
        readout(model, questions, next_token=True, batch_size=config.batch_size)
        if config.calibration_metric == "first_token_kl"
        else None
    )
    base_bad: list[bool] = []
    passes = QuestionPasses()  # each calibration question's scoring pass, run once in all
    if config.calibration_metric == "generation_kl":
        unsteered = generate_and_score_rows(
            model,
            questions,
            [None],
            [(0, i) for i in range(len(questions))],
            response_probe=None,
            max_new_tokens=config.calib_tokens,
            batch_size=config.gen_batch_size,
            seed=config.seed,
            passes=passes,
        )
        base_bad = [config.degenerate.is_degenerate(t) for t in unsteered.texts]
    for k in config.sizes:
        cells = [c for c in plan.calib_cells if len(c.targets) == k]

        def metrics(
            which: list[int], alphas: list[float], cells: list[Cell] = cells
        ) -> list[float]:
            configs = [
                (methods[names[i]], SteeringSpec(c.targets, plan.avoid, a))
                for i, a in zip(which, alphas, strict=True)
                for c in cells
            ]
            n = len(cells)
            if config.calibration_metric == "first_token_kl":
                # each combination of the cells, on every calibration question (forward only)
                combos = list(dict.fromkeys(c.targets for c in cells))
                out = []
                for i, a in zip(which, alphas, strict=True):
                    per = first_token_kl(
                        model,
                        questions,
                        [(methods[names[i]], SteeringSpec(t, plan.avoid, a)) for t in combos],
                        positions=config.positions,
                        batch_size=config.batch_size,
                        base=base,
                    )
                    out.append(sum(per) / len(per))
                return out
            rows = [(g, cells[g % n].question) for g in range(len(configs))]
            scores = generate_and_score_rows(
                model,
                questions,
                configs,
                rows,
                response_probe=None,
                positions=config.positions,
                max_new_tokens=config.calib_tokens,
                batch_size=config.gen_batch_size,
                seed=config.seed,
                passes=passes,
            )
            out = []
            for j in range(len(which)):
                sub = scores.select(range(j * n, (j + 1) * n))
                kl = sub.mean_kl if not math.isnan(sub.mean_kl) else 0.0
                # steering-induced degeneration: degenerate where the unsteered answer is not
                new_bad = np.mean(
                    [
                        config.degenerate.is_degenerate(t) and not base_bad[c.question]
                        for t, c in zip(sub.texts, cells, strict=True)
                    ]
                )
                out.append(kl if new_bad <= config.max_degenerate_rate else math.inf)
            return out

        starts = [
            calib[n][k - 1].alpha
            if calib[n].get(k - 1) and calib[n][k - 1].alpha > 0
            else METHODS[n].alpha0
            for n in names
        ]
        results = calibrate_alphas(
            metrics, config.kl_budget, starts, bisect_steps=config.calib_bisect_steps
        )
        for n, cal in zip(names, results, strict=True):
            calib[n][k] = cal
            log.info(
                f"  calibrated {n:18s} k={k}: alpha={cal.alpha:.4g} ({config.calibration_metric} "
                f"{cal.metric:.3f} <= {config.kl_budget}; {len(cal.evaluations)} evals)"
                f"{' ' + cal.note if cal.note else ''}"
            )
    return calib
