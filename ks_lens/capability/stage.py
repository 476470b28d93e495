"""The comparison's capability stage: multiple-choice accuracy under every method at its calibrated alpha.

Steering buys a behaviour; this stage measures what it costs in the comparison itself, with
the calibrated alphas the other stages report. For every method and number of targets ``k``
(and once unsteered, and optionally with the targets asked for in the system prompt,
``instructed``), a subset of the shipped multiple-choice set (:mod:`ks_lens.capability.scoring`) is
scored by option log-likelihood, and each run's accuracy is compared with the unsteered run
on the same questions by a paired bootstrap over questions
(:func:`~ks_lens.capability.scoring.paired_accuracy_difference`).

* **Subset** (:func:`stratified_subset`): ``n`` questions balanced over subjects (the counts per
  subject differ by at most one while every subject has questions left), chosen and ordered by
  a seeded shuffle, so the same seed gives the same questions in the same order.
* **Partition** (:func:`partition`): a steering configuration takes one target set, so the questions
  are shared out over the combinations of each size: question ``i`` (in the subset's order)
  is steered toward combination ``i mod C`` of the ``C`` combinations of that size (in
  :func:`~ks_lens.datasets.coverage.label_combinations` order). Each combination's group is
  scored under its own steering, and every run's rows share batches with the other runs' (one
  :func:`~ks_lens.capability.scoring.score_option_rows` call for the whole stage, each batch
  row steered by :func:`~ks_lens.steering.steer_groups`); each run is put back into the subset's
  order, so it is paired with the unsteered run question by question. Every combination steers some
  question when ``n >= C`` (20 for three of six labels); with fewer questions, only the first ``n``
  combinations are used (the stage logs a warning).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ks_lens.capability.scoring import (
    DEFAULT_RULE,
    CapabilityResult,
    MCQuestion,
    OptionScores,
    Rule,
    check_mc_questions,
    check_rule,
    load_mc_questions,
    paired_accuracy_difference,
    score_option_rows,
)
from ks_lens.datasets import COMBINE_SEP, BehaviourDataset
from ks_lens.datasets.coverage import label_combinations
from ks_lens.errors import ConfigError, StoreError
from ks_lens.evaluation.instructed import instructed_system
from ks_lens.evaluation.stats import N_RESAMPLES, Interval, bootstrap_mean
from ks_lens.steering import SteeringMethod
from ks_lens.steering.base import Steering, SteeringSpec
from ks_lens.steering.positions import Positions
from ks_lens.types import Model

log = logging.getLogger(__name__)

UNSTEERED = "unsteered"
INSTRUCTED = "instructed"


def stratified_subset(
    questions: Sequence[MCQuestion], n: int, *, seed: int = 0
) -> list[MCQuestion]:
    """``n`` of ``questions`` balanced over subjects, in a seeded order (all of them, shuffled,
    when ``n`` is at least their number).

    Each subject's questions are shuffled, then taken round by round (one per subject per
    round, subjects in a shuffled order, so which subjects get one question more is seeded too)
    until ``n`` are taken; the result is shuffled once more so that neighbouring questions
    (which :func:`partition` gives to different combinations) mix subjects.
    """
    qs = check_mc_questions(questions)
    if n < 1:
        raise ConfigError(f"a capability subset needs at least 1 question, got {n}")
    rng = random.Random(seed)
    by_subject: dict[str, list[MCQuestion]] = {}
    for q in qs:
        by_subject.setdefault(q.subject, []).append(q)
    pools = [by_subject[s] for s in sorted(by_subject)]
    for pool in pools:
        rng.shuffle(pool)
    rng.shuffle(pools)
    taken: list[MCQuestion] = []
    depth = 0
    while len(taken) < min(n, len(qs)):
        for pool in pools:
            if depth < len(pool) and len(taken) < n:
                taken.append(pool[depth])
        depth += 1
    rng.shuffle(taken)
    return taken


def partition(n_questions: int, combos: Sequence[tuple[str, ...]]) -> list[list[int]]:
    """Question indices per combination: question ``i`` goes to combination ``i mod C``."""
    if not combos:
        raise ConfigError("no combinations to share the questions out over")
    if n_questions < 0:
        raise ConfigError(f"the number of questions must be >= 0, got {n_questions}")
    return [list(range(j, n_questions, len(combos))) for j in range(len(combos))]


def instructed_prompts(
    dataset: BehaviourDataset, combos: Sequence[tuple[str, ...]]
) -> dict[tuple[str, ...], str]:
    """The system prompt that asks for each combination
    (:func:`~ks_lens.evaluation.instructed.instructed_system`, as the instructed reference row
    asks)."""
    return {c: instructed_system(dataset.instructions, c) for c in combos}


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CapabilityRun:
    """One pooled run over the subset: ``method`` (a comparison method, ``"unsteered"`` or
    ``"instructed"``) at ``k`` targets (0: unsteered) and ``alpha`` (0: no steering)."""

    method: str
    k: int
    alpha: float
    result: CapabilityResult

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "k": self.k, "alpha": self.alpha, **self.result.to_json()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CapabilityRun:
        return cls(str(d["method"]), int(d["k"]), float(d["alpha"]), CapabilityResult.from_json(d))


@dataclass(frozen=True)
class CapabilityRow:
    """A run's accuracy and its paired difference against unsteered (``None`` for unsteered),
    95 % bootstrap intervals over questions."""

    method: str
    k: int
    alpha: float
    accuracy: Interval
    diff_vs_unsteered: Interval | None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "k": self.k,
            "alpha": self.alpha,
            "accuracy": self.accuracy.to_json(),
            "diff_vs_unsteered": None
            if self.diff_vs_unsteered is None
            else self.diff_vs_unsteered.to_json(),
        }


@dataclass(frozen=True)
class CapabilityEvaluation:
    """Every run of the stage on the same subset (``question_ids``, in the subset's order);
    ``combos[k]`` are the combinations of ``k`` targets that :func:`partition` shares the
    questions out over; ``instructions`` the instructed run's system prompts (``"a+b"`` keys)."""

    question_ids: tuple[str, ...]
    combos: Mapping[int, tuple[tuple[str, ...], ...]]
    runs: tuple[CapabilityRun, ...]
    seed: int
    instructions: Mapping[str, str] = field(default_factory=dict)

    def run(self, method: str, k: int = 0) -> CapabilityRun:
        for r in self.runs:
            if r.method == method and r.k == k:
                return r
        raise ConfigError(f"no capability run of {method!r} at k={k}")

    def rows(
        self, *, n_resamples: int = N_RESAMPLES, seed: int | None = None
    ) -> list[CapabilityRow]:
        """Accuracy and paired difference vs unsteered of every run (unsteered first)."""
        s = self.seed if seed is None else seed
        base = self.run(UNSTEERED).result
        out = []
        for r in self.runs:
            acc = bootstrap_mean(r.result.correct(), seed=s, n_resamples=n_resamples)
            diff = (
                None
                if r.method == UNSTEERED
                else paired_accuracy_difference(r.result, base, seed=s, n_resamples=n_resamples)
            )
            out.append(CapabilityRow(r.method, r.k, r.alpha, acc, diff))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "question_ids": list(self.question_ids),
            "combos": {str(k): [list(c) for c in cs] for k, cs in self.combos.items()},
            "seed": self.seed,
            "instructions": dict(self.instructions),
            "runs": [r.to_json() for r in self.runs],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CapabilityEvaluation:
        return cls(
            tuple(str(i) for i in d["question_ids"]),
            {int(k): tuple(tuple(str(x) for x in c) for c in cs) for k, cs in d["combos"].items()},
            tuple(CapabilityRun.from_json(r) for r in d["runs"]),
            int(d["seed"]),
            {str(k): str(v) for k, v in dict(d.get("instructions", {})).items()},
        )


def check_capability(
    cap: CapabilityEvaluation,
    *,
    methods: Sequence[str],
    sizes: Sequence[int],
    labels: Sequence[str],
    avoid: Sequence[str],
    alphas: Mapping[str, Mapping[int, float]],
) -> None:
    """Refuse stored capability records that disagree with the comparison (an edited or damaged
    ``report.json``): one unsteered run, one per method and size at its calibrated alpha
    (optionally one instructed run per size), the same questions in every run, and the
    combinations of each size as the labels give them."""
    pool = [lab for lab in labels if lab not in avoid]
    if sorted(cap.combos) != sorted(sizes):
        raise StoreError(
            f"capability_eval.combos has sizes {sorted(cap.combos)}; expected {list(sizes)}"
        )
    for k, cs in cap.combos.items():
        if list(cs) != label_combinations(pool, (k,)):
            raise StoreError(
                f"capability_eval.combos[{k}] are not the combinations of {k} of {pool}"
            )
    want = {(UNSTEERED, 0)} | {(m, k) for m in methods for k in sizes}
    have = [(r.method, r.k) for r in cap.runs]
    if len(set(have)) != len(have):
        raise StoreError("capability_eval.runs repeat a method and size")
    extra = set(have) - want - {(INSTRUCTED, k) for k in sizes}
    if not want <= set(have) or extra:
        missing = sorted(want - set(have), key=str)
        raise StoreError(
            f"capability_eval.runs lack {missing} or have unknown runs {sorted(extra, key=str)}"
        )
    for r in cap.runs:
        where = f"capability_eval run {r.method!r} k={r.k}"
        if tuple(r.result.ids) != cap.question_ids:
            raise StoreError(f"{where} scored other questions than the subset")
        expected = alphas[r.method][r.k] if r.method in alphas else 0.0
        if not np.isclose(r.alpha, expected):
            raise StoreError(f"{where} has alpha {r.alpha}; the calibrated alpha is {expected}")
        for j, (lp, a) in enumerate(zip(r.result.logprob, r.result.answers, strict=True)):
            if not 0 <= a < len(lp) or not all(np.isfinite(lp)):
                raise StoreError(f"{where}: question {j} has a bad answer key or log-probability")


def merge_capability(runs: Mapping[str, CapabilityEvaluation | None]) -> CapabilityEvaluation:
    """Several comparisons' capability stages as one (:func:`~ks_lens.comparison.merge_results`):
    each run's methods renamed ``"{method}@{run name}"``; the unsteered and instructed runs of
    the first, which every run must share (same subset and unsteered scores; checked)."""
    names = list(runs)
    if not names:
        raise ConfigError("nothing to merge")
    evals = [runs[n] for n in names]
    first = evals[0]
    if first is None or any(e is None for e in evals):
        raise ConfigError("every run to merge needs a capability stage")
    base = first.run(UNSTEERED).result
    merged = [r for r in first.runs if r.method == UNSTEERED]
    for n, e in zip(names, evals, strict=True):
        assert e is not None
        if e.question_ids != first.question_ids or e.combos != first.combos:
            raise ConfigError(f"run {n!r} scored capability on other questions than {names[0]!r}")
        own = e.run(UNSTEERED).result.logprob
        if any(not np.allclose(x, y, atol=1e-5) for x, y in zip(own, base.logprob, strict=True)):
            raise ConfigError(f"run {n!r} has other unsteered capability scores than {names[0]!r}")
        merged += [
            CapabilityRun(f"{r.method}@{n}", r.k, r.alpha, r.result)
            for r in e.runs
            if r.method not in (UNSTEERED, INSTRUCTED)
        ]
    merged += [r for r in first.runs if r.method == INSTRUCTED]
    return CapabilityEvaluation(
        first.question_ids, first.combos, tuple(merged), first.seed, first.instructions
    )


def capability_table(rows: Sequence[CapabilityRow], label: Any = str) -> str:
    """Markdown: one line per run (unsteered first), accuracy and the paired difference vs
    unsteered with their intervals; ``label`` names a method."""
    lines = [
        "| method | targets | alpha | accuracy [95 % CI] | vs unsteered [95 % CI] |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        steered = r.method not in (UNSTEERED, INSTRUCTED)
        diff = "" if r.diff_vs_unsteered is None else _signed(r.diff_vs_unsteered)
        lines.append(
            f"| {label(r.method)} | {r.k or '-'} | {f'{r.alpha:.4g}' if steered else '-'} | "
            f"{r.accuracy.fmt()} | {diff} |"
        )
    return "\n".join(lines)


def _signed(iv: Interval) -> str:
    """``-0.031 [-0.094, +0.031]``, in bold when the interval excludes zero."""
    text = f"{iv.estimate:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]"
    return f"**{text}**" if iv.excludes_zero else text


# ----------------------------------------------------------------------------- the stage


@dataclass
class _RunRows:
    """One run of the stage while its rows wait to be scored: entry ``j`` is row ``rows[j]`` of
    the shared scoring call, subset question ``question[j]``."""

    method: str
    k: int
    alpha: float
    label: str
    settings: dict[str, Any]
    rows: list[int] = field(default_factory=list)
    question: list[int] = field(default_factory=list)


class _StageRows:
    """Every run's (steering, question, system prompt) rows, scored in shared batches."""

    def __init__(self) -> None:
        self.steerings: list[Steering | None] = [None]
        self.rows: list[tuple[int, int]] = []
        self.systems: list[str | None] = []
        self.runs: list[_RunRows] = []

    def add(
        self, run: _RunRows, questions: Sequence[int], steering: Steering | None, system: str | None
    ) -> None:
        g = 0
        if steering is not None:
            self.steerings.append(steering)
            g = len(self.steerings) - 1
        for i in questions:
            run.rows.append(len(self.rows))
            run.question.append(i)
            self.rows.append((g, i))
            self.systems.append(system)

    def results(
        self, scores: OptionScores, qs: Sequence[MCQuestion], rule: Rule, model_name: str
    ) -> list[CapabilityRun]:
        """Each run's :class:`CapabilityRun`, its rows put back into the subset's order."""
        out = []
        for run in self.runs:
            if sorted(run.question) != list(range(len(qs))):
                raise ConfigError("internal: a run does not cover the subset once each")
            order = [run.rows[j] for j in np.argsort(run.question)]
            res = CapabilityResult(
                [q.id for q in qs],
                [q.subject for q in qs],
                [q.answer for q in qs],
                [scores.logprob[r] for r in order],
                [scores.n_tokens[r] for r in order],
                [scores.n_chars[r] for r in order],
                rule,
                run.label,
                {"model": model_name, **run.settings},
            )
            out.append(CapabilityRun(run.method, run.k, run.alpha, res))
        return out


def evaluate_capability_stage(
    model: Model,
    methods: Mapping[str, SteeringMethod],
    alphas: Mapping[str, Mapping[int, float]],
    *,
    labels: Sequence[str],
    avoid: Sequence[str] = (),
    sizes: Sequence[int],
    n_questions: int,
    seed: int = 0,
    positions: Positions = "all",
    instructed: Mapping[tuple[str, ...], str] | None = None,
    questions: Sequence[MCQuestion] | None = None,
    rule: Rule = DEFAULT_RULE,
    batch_size: int = 64,
    combo_alphas: Mapping[str, Mapping[tuple[str, ...], float]] | None = None,
) -> CapabilityEvaluation:
    """Score the :func:`stratified_subset` of ``questions`` (default: the shipped set) unsteered,
    under every method at ``alphas[method][k]`` for every size ``k`` (questions shared out over
    the combinations by :func:`partition`; a combination in ``combo_alphas[method]`` is steered
    at its own alpha, the run records the size's), and, given ``instructed`` (a system prompt per
    combination, e.g. :func:`instructed_prompts`), under each combination's system prompt."""
    check_rule(rule)
    qs = stratified_subset(
        load_mc_questions() if questions is None else questions, n_questions, seed=seed
    )
    pool = [lab for lab in labels if lab not in avoid]
    combos = {k: tuple(label_combinations(pool, (k,))) for k in sizes}
    short = [k for k, cs in combos.items() if len(cs) > len(qs)]
    if short:
        log.warning(
            f"  capability: {len(qs)} questions for {max(len(combos[k]) for k in short)} "
            f"combinations (k={short}): only the first {len(qs)} combinations steer a question"
        )
    if instructed is not None:
        missing = [c for cs in combos.values() for c in cs if c not in instructed]
        if missing:
            raise ConfigError(f"no instructed system prompt for the combination(s) {missing[:3]}")
    stage = _StageRows()
    stage.runs.append(_RunRows(UNSTEERED, 0, 0.0, UNSTEERED, {"system": None}))
    stage.add(stage.runs[-1], range(len(qs)), None, None)
    for m, method in methods.items():
        for k in sizes:
            a = float(alphas[m][k])
            settings = {"method": m, "k": k, "alpha": a, "positions": positions}
            stage.runs.append(_RunRows(m, k, a, f"{m} k={k}", settings))
            own = (combo_alphas or {}).get(m, {})
            for combo, idx in zip(combos[k], partition(len(qs), combos[k]), strict=True):
                spec = SteeringSpec(combo, tuple(avoid), float(own.get(combo, a)))
                stage.add(stage.runs[-1], idx, (method, spec), None)
    if instructed is not None:
        for k in sizes:
            settings = {"k": k, "system": "each combination's instructions (instructions)"}
            stage.runs.append(_RunRows(INSTRUCTED, k, 0.0, f"{INSTRUCTED} k={k}", settings))
            for combo, idx in zip(combos[k], partition(len(qs), combos[k]), strict=True):
                stage.add(stage.runs[-1], idx, None, instructed[combo])
    scores = score_option_rows(
        model,
        qs,
        stage.steerings,
        stage.rows,
        systems=stage.systems,
        positions=positions,
        batch_size=batch_size,
    )
    runs = stage.results(scores, qs, rule, str(getattr(model.cfg, "model_name", "")))
    texts = (
        {COMBINE_SEP.join(c): instructed[c] for cs in combos.values() for c in cs}
        if instructed
        else {}
    )
    return CapabilityEvaluation(tuple(q.id for q in qs), combos, tuple(runs), seed, texts)


__all__ = [
    "INSTRUCTED",
    "UNSTEERED",
    "CapabilityEvaluation",
    "CapabilityRow",
    "CapabilityRun",
    "capability_table",
    "check_capability",
    "evaluate_capability_stage",
    "instructed_prompts",
    "merge_capability",
    "partition",
    "stratified_subset",
]
