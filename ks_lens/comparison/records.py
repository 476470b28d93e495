"""The comparison's typed records: the stages' evaluations and the summary rows."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ks_lens.comparison.plan import Cell
from ks_lens.evaluation.stats import ClusteredTest, Interval, McNemar


@dataclass
class SummaryRow:
    """One method at one number of targets, under one evaluator (``lens``).

    Means are over question x combination cells; intervals resample questions (with all their
    cells). ``diff_vs_baseline`` is the paired difference of ``target_prob`` against the
    baseline method; ``diff_test`` and ``vanish_cluster_test`` compare the target probability
    and the vanished cells with the baseline's on the same cells, clustered by question
    (:func:`~ks_lens.evaluation.stats.clustered_paired_test`: each question's mean paired
    difference is one unit; bootstrap interval and sign-flip permutation p-value). ``vanish_test``
    is McNemar's test over the cells, kept for old reports: it treats a question's cells as
    independent and overstates significance; the report uses ``vanish_cluster_test``.

    ``instructed_fraction``: the method's gain over unsteered as a share of the ``instructed``
    row's gain on the same cells (:func:`~ks_lens.evaluation.instructed.instructed_fraction`);
    ``None`` with ``instructed_note`` saying why when the instructed gain is not clearly positive.
    """

    lens: str
    method: str
    k: int
    alpha: float
    n_questions: int
    n_cells: int
    target_prob: Interval
    min_target_prob: Interval
    gain: Interval  # normalised gain (:func:`normalised_gain`), mean over targets
    vanish_rate: Interval | None = None  # 2+ targets only
    n_vanished: int | None = None
    diff_vs_baseline: Interval | None = None
    vanish_test: McNemar | None = None
    diff_test: ClusteredTest | None = None
    vanish_cluster_test: ClusteredTest | None = None
    kl: Interval | None = None  # text lenses: per-token KL of the answers themselves
    perplexity: float | None = None
    degenerate_rate: float | None = None
    n_degenerate: int | None = None
    instructed_fraction: Interval | None = None
    instructed_note: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            d[k] = v.to_json() if hasattr(v, "to_json") else v
        return d


@dataclass
class CurvePoint:
    """One method at one alpha: target probability against the KL measured on the same answers."""

    lens: str
    method: str
    k: int
    factor: float
    alpha: float
    kl: Interval
    target_prob: Interval
    degenerate_rate: float
    n_answers: int

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in self.__dict__.items() if not isinstance(v, Interval)},
            "kl": self.kl.to_json(),
            "target_prob": self.target_prob.to_json(),
        }


@dataclass
class EqualKL:
    """A method's target probability read off its trade-off curve at the KL level ``kl``
    (the budget, or the highest KL that it and the baseline both reach; see :func:`trade_off`).

    ``diff_vs_baseline`` is the paired difference with the baseline's curve at the same level
    (both read from the same bootstrap resample of questions). NaN when the curves do not
    overlap (no extrapolation).

    The ``instructed`` row has no curve: it is its one point, at its own measured KL (``kl``),
    without a difference. ``instructed_fraction`` / ``instructed_note``: as in
    :class:`SummaryRow`, the method's value here against the instructed gain.
    """

    lens: str
    method: str
    k: int
    kl: float
    target_prob: Interval
    degenerate_rate: float
    diff_vs_baseline: Interval | None = None
    instructed_fraction: Interval | None = None
    instructed_note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "lens": self.lens,
            "method": self.method,
            "k": self.k,
            "kl": self.kl,
            "target_prob": self.target_prob.to_json(),
            "degenerate_rate": self.degenerate_rate,
            "diff_vs_baseline": None
            if self.diff_vs_baseline is None
            else self.diff_vs_baseline.to_json(),
            "instructed_fraction": None
            if self.instructed_fraction is None
            else self.instructed_fraction.to_json(),
            "instructed_note": self.instructed_note,
        }


@dataclass
class ActivationEvaluation:
    """Held-out evaluator probabilities ``[n_questions, K]`` per (method, combination), and of
    the ``instructed`` reference row (one per combination; ``None`` without it)."""

    labels: tuple[str, ...]
    combos: list[tuple[str, ...]]
    alphas: dict[str, dict[int, float]]
    base: np.ndarray  # unsteered [n, K]
    probs: dict[str, list[np.ndarray]]  # method -> one [n, K] per combo (order of ``combos``)
    instructed: list[np.ndarray] | None = None  # one [n, K] per combo: asked by system prompt

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "combos": [list(c) for c in self.combos],
            "alphas": {m: {str(k): a for k, a in v.items()} for m, v in self.alphas.items()},
            "base": self.base.tolist(),
            "probs": {m: [p.tolist() for p in ps] for m, ps in self.probs.items()},
            "instructed": None
            if self.instructed is None
            else [p.tolist() for p in self.instructed],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ActivationEvaluation:
        ins = d.get("instructed")
        return cls(
            tuple(d["labels"]),
            [tuple(c) for c in d["combos"]],
            {m: {int(k): float(a) for k, a in v.items()} for m, v in d["alphas"].items()},
            np.asarray(d["base"], dtype=float),
            {m: [np.asarray(p, dtype=float) for p in ps] for m, ps in d["probs"].items()},
            None if ins is None else [np.asarray(p, dtype=float) for p in ins],
        )


@dataclass
class Answer:
    """One generated answer: a test question, steered (or not) toward a combination, or asked
    for it by system prompt (``method="instructed"``, factor and alpha 0)."""

    method: str  # "unsteered", "instructed" or a method name
    question: int
    targets: tuple[str, ...]  # () for unsteered answers
    factor: float  # x calibrated alpha (0 for unsteered and instructed)
    alpha: float
    text: str
    n_tokens: int
    # mean per-token KL(steered or instructed || unsteered) along the answer (nan if no step)
    kl: float
    nll: float  # mean per-token NLL under the unsteered model (nan if empty)
    degenerate: str | None  # the DegenerateRule reason, or None
    text_probs: list[float]  # text evaluator, per label
    act_probs: list[float] | None  # response-activation evaluator, per label
    style: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["targets"] = list(self.targets)
        return d


@dataclass
class TextEvaluation:
    labels: tuple[str, ...]
    questions: list[str]
    cells: list[Cell]
    alphas: dict[str, dict[int, float]]  # calibrated
    factors: tuple[float, ...]
    answers: list[Answer]
    lenses: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "questions": list(self.questions),
            "cells": [[c.question, list(c.targets)] for c in self.cells],
            "alphas": {m: {str(k): a for k, a in v.items()} for m, v in self.alphas.items()},
            "factors": list(self.factors),
            "lenses": list(self.lenses),
            "answers": [a.to_json() for a in self.answers],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TextEvaluation:
        def num(v: Any) -> float:
            return math.nan if v is None else float(v)

        answers = [
            Answer(
                a["method"],
                int(a["question"]),
                tuple(a["targets"]),
                float(a["factor"]),
                float(a["alpha"]),
                a["text"],
                int(a["n_tokens"]),
                num(a["kl"]),
                num(a["nll"]),
                a["degenerate"],
                [num(x) for x in a["text_probs"]],
                None if a["act_probs"] is None else [num(x) for x in a["act_probs"]],
                dict(a["style"]),
            )
            for a in d["answers"]
        ]
        return cls(
            tuple(d["labels"]),
            list(d["questions"]),
            [Cell(int(q), tuple(t)) for q, t in d["cells"]],
            {m: {int(k): float(a) for k, a in v.items()} for m, v in d["alphas"].items()},
            tuple(float(f) for f in d["factors"]),
            answers,
            tuple(d["lenses"]),
        )


@dataclass
class CombinationRow:
    """One method on one target combination at the calibrated alpha (text level), averaged over
    the combination's cells (question answers): mean target probability, the weakest target's
    probability, and (2+ targets) the vanished cells. Few questions per combination: no
    intervals; read these rows for which combinations conflict, not for method verdicts."""

    lens: str
    method: str
    targets: tuple[str, ...]
    n_questions: int
    n_cells: int
    target_prob: float
    min_target_prob: float
    vanish_rate: float | None = None
    n_vanished: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "targets": list(self.targets)}
