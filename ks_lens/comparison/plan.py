"""Stage 1: which combinations and (question, combination) cells each stage uses."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ks_lens.comparison.config import ComparisonConfig, spread
from ks_lens.datasets.coverage import label_combinations, plan_coverage, plan_size
from ks_lens.errors import ConfigError


@dataclass(frozen=True)
class Cell:
    """One question (index into the question list) steered toward one combination."""

    question: int
    targets: tuple[str, ...]


@dataclass
class ComparisonPlan:
    labels: tuple[str, ...]
    avoid: tuple[str, ...]
    act_combos: list[tuple[str, ...]]
    calib_cells: list[Cell]
    gen_cells: list[Cell]

    def curve_cells(self, per_question: int | None) -> list[Cell]:
        """The text cells answered at every alpha of the trade-off curve: each question's first
        ``per_question`` cells of each size, in plan order (``None``: every text cell)."""
        if per_question is None:
            return list(self.gen_cells)
        taken: dict[tuple[int, int], int] = {}
        out = []
        for c in self.gen_cells:
            key = (c.question, len(c.targets))
            if taken.get(key, 0) < per_question:
                out.append(c)
                taken[key] = taken.get(key, 0) + 1
        return out

    def evaluated_combos(self, k: int | None = None) -> list[tuple[str, ...]]:
        """The combinations the activation and text stages steer toward (of ``k`` targets, or
        all), each once, in the order of :attr:`act_combos` then of the text cells."""
        combos = [*self.act_combos, *(c.targets for c in self.gen_cells)]
        return [c for c in dict.fromkeys(combos) if k is None or len(c) == k]

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "avoid": list(self.avoid),
            "act_combos": [list(c) for c in self.act_combos],
            "calib_cells": [[c.question, list(c.targets)] for c in self.calib_cells],
            "gen_cells": [[c.question, list(c.targets)] for c in self.gen_cells],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ComparisonPlan:
        return cls(
            tuple(d["labels"]),
            tuple(d["avoid"]),
            [tuple(c) for c in d["act_combos"]],
            [Cell(int(q), tuple(t)) for q, t in d["calib_cells"]],
            [Cell(int(q), tuple(t)) for q, t in d["gen_cells"]],
        )


def rotate_cells(
    n_questions: int, combos: Sequence[tuple[str, ...]], per_question: int, seed: int
) -> list[Cell]:
    """``per_question`` combinations for each question, rotating through a seeded shuffle of
    ``combos`` so that every combination is used about equally often."""
    order = list(combos)
    random.Random(seed).shuffle(order)
    m = min(per_question, len(order))
    return [Cell(i, order[(i * m + r) % len(order)]) for i in range(n_questions) for r in range(m)]


def plan_comparison(
    labels: Sequence[str], config: ComparisonConfig, *, n_calib: int, n_test: int
) -> ComparisonPlan:
    """Which combinations and cells each stage uses (see :mod:`ks_lens.comparison`)."""
    config.validate(labels)
    pool = [lab for lab in labels if lab not in config.avoid]
    by_k = {k: label_combinations(pool, (k,)) for k in config.sizes}
    act = [c for k in config.sizes for c in spread(by_k[k], config.act_combos_per_size)]
    if config.text_coverage == "all-combinations":
        gen = [
            Cell(q, t)
            for q, t in plan_coverage(
                n_test,
                pool,
                config.sizes,
                min_questions=config.min_questions_per_combination,
                seed=config.seed,
            )
        ]
    else:
        gen = [
            c
            for k in config.sizes
            for c in rotate_cells(
                n_test, by_k[k], config.gen_combos_per_question, config.seed + 100 + k
            )
        ]
    plan = ComparisonPlan(tuple(labels), tuple(config.avoid), act, [], gen)
    if config.alpha_per == "combination":
        plan.calib_cells = combination_calib_cells(plan, config, n_calib)
    else:
        plan.calib_cells = [
            c
            for k in config.sizes
            for c in rotate_cells(
                n_calib, by_k[k], config.calib_combos_per_question, config.seed + k
            )
        ]
    return plan


def combination_calib_cells(
    plan: ComparisonPlan, config: ComparisonConfig, n_calib: int
) -> list[Cell]:
    """``alpha_per="combination"``: the calibration cells of every combination the activation
    and text stages use (:meth:`ComparisonPlan.evaluated_combos`), each on at least
    ``calib_questions_per_combination`` distinct calibration questions, every calibration
    question used for every size, balanced (:func:`~ks_lens.datasets.coverage.plan_size`);
    ordered by size, then question."""
    q = config.calib_questions_per_combination
    if n_calib < q:
        raise ConfigError(
            f"alpha_per 'combination' calibrates every combination on at least {q} calibration "
            f"questions, but there are only {n_calib}; give more calibration questions or lower "
            "calib_questions_per_combination"
        )
    return [
        Cell(i, t)
        for k in config.sizes
        for i, t in plan_size(n_calib, plan.evaluated_combos(k), q, config.seed * 1009 + 500 + k)
    ]
