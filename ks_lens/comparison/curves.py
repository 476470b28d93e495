"""Trade-off curves (target probability against measured KL) and the equal-KL comparison."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np

from ks_lens.comparison.config import ComparisonConfig
from ks_lens.comparison.records import CurvePoint, EqualKL, TextEvaluation
from ks_lens.comparison.summary import _per_question, _text_cells, curve_cells
from ks_lens.evaluation.instructed import INSTRUCTED, instructed_fraction
from ks_lens.evaluation.stats import bootstrap_mean, bootstrap_statistic, interpolate_at


def _at_level(
    per_method: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    keep: np.ndarray,
    method: str,
    idx: np.ndarray,
    level: float,
    *,
    degenerate: bool = False,
) -> float:
    """A method's curve, averaged over the questions ``keep[idx]``, read at KL ``level``."""
    kq, pq, dq = per_method[method]
    rows = keep[idx]
    return interpolate_at(kq[rows].mean(0), (dq if degenerate else pq)[rows].mean(0), level)


def _at_level_diff(
    per_method: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    keep: np.ndarray,
    method: str,
    baseline: str,
    idx: np.ndarray,
    level: float,
) -> float:
    """Paired difference of two methods' curves at KL ``level`` on the same questions."""
    return _at_level(per_method, keep, method, idx, level) - _at_level(
        per_method, keep, baseline, idx, level
    )


def _common_level(
    ranges: Mapping[str, Sequence[float]], methods: Sequence[str], level: float
) -> float:
    """``level`` if every method's measured curve (its points' mean KLs) spans it; otherwise a
    level inside the KL range all the curves share: the geometric middle of the last (or first)
    segment of the curve that limits it, so that bootstrap resamples of the curves still reach
    it. NaN if the curves' ranges do not overlap."""
    spans = [sorted(ranges[m]) for m in dict.fromkeys(methods) if m in ranges]
    if not spans:
        return float("nan")
    lo = max(p[0] for p in spans)
    hi = min(p[-1] for p in spans)
    if lo > hi:
        return float("nan")
    if lo <= level <= hi:
        return level
    if level > hi:
        p = min(spans, key=lambda p: p[-1])  # the curve that stops lowest
        inner = math.sqrt(p[-1] * p[-2]) if len(p) > 1 and p[-2] > 0 else p[-1]
        return max(inner, lo)
    p = max(spans, key=lambda p: p[0])  # the curve that starts highest
    inner = math.sqrt(p[0] * p[1]) if len(p) > 1 and p[0] > 0 else p[0]
    return min(inner, hi)


def trade_off(
    te: TextEvaluation, config: ComparisonConfig
) -> tuple[list[CurvePoint], list[EqualKL]]:
    """Each method's curve (target probability vs measured KL, one point per alpha factor, on
    the cells answered at every factor) and its value at equal KL, paired with the baseline's.

    The KL level is ``config.kl_budget`` when both the method's and the baseline's measured
    curves span it; otherwise the highest KL both curves reach (recorded in
    :attr:`EqualKL.kl`), so a method whose answers never get that far from the unsteered
    model is still compared at a level both methods were measured at.
    """
    n = len(te.questions)
    curves: list[CurvePoint] = []
    equal: list[EqualKL] = []
    level = config.kl_budget
    for lens in te.lenses:
        for k in config.sizes:
            per_method: _PerMethod = {}
            for m in te.alphas:
                points, arrays = _method_curve(te, lens, m, k, config)
                curves.extend(points)
                if arrays is not None:
                    per_method[m] = arrays
            keep_idx = _complete_questions(per_method, n)
            equal.extend(_equal_kl_rows(per_method, keep_idx, lens, k, level, config))
            ref = _instructed_point(te, lens, k, config)
            if ref is not None:
                point, row, pu, pi = ref
                curves.append(point)
                _add_equal_kl_fractions(equal, lens, k, per_method, keep_idx, pu, pi, config)
                equal.append(row)
    return curves, equal


#: method -> its per-question ``[n, n_factors]`` KL, target probability and degenerate share
_PerMethod = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def _method_curve(
    te: TextEvaluation, lens: str, m: str, k: int, config: ComparisonConfig
) -> tuple[list[CurvePoint], tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """One method's curve points at ``k`` targets (up to the first factor without measured KL)
    and, when every factor has one, its per-question ``[n, n_factors]`` arrays."""
    n = len(te.questions)
    points: list[CurvePoint] = []
    kls, ps, degs, only = [], [], [], curve_cells(te, m)
    for f in te.factors:
        cs = _text_cells(te, lens, m, f, k, only)
        if cs is None or cs.kl is None or cs.degenerate is None:
            break
        kq = _per_question(cs.kl, cs.question, n)
        pq = _per_question(cs.target.mean(1), cs.question, n)
        dq = _per_question(cs.degenerate.astype(float), cs.question, n)
        kls.append(kq)
        ps.append(pq)
        degs.append(dq)
        points.append(
            CurvePoint(
                lens,
                m,
                k,
                f,
                te.alphas[m][k] * f,
                bootstrap_mean(kq, seed=config.seed, n_resamples=config.n_resamples),
                bootstrap_mean(pq, seed=config.seed, n_resamples=config.n_resamples),
                float(cs.degenerate.mean()),
                len(cs.kl),
            )
        )
    if len(kls) == len(te.factors):
        return points, (np.stack(kls, 1), np.stack(ps, 1), np.stack(degs, 1))
    return points, None


def _complete_questions(per_method: _PerMethod, n: int) -> np.ndarray:
    """Indices of the questions with finite KL and target probability for every method."""
    keep = [
        q
        for q in range(n)
        if all(
            np.all(np.isfinite(v[0][q])) and np.all(np.isfinite(v[1][q]))
            for v in per_method.values()
        )
    ]
    return np.array(keep, dtype=int)


def _equal_kl_rows(
    per_method: _PerMethod,
    keep_idx: np.ndarray,
    lens: str,
    k: int,
    level: float,
    config: ComparisonConfig,
) -> list[EqualKL]:
    """Every method's value at equal KL (``level``, or the highest both it and the baseline
    reach) on the ``keep_idx`` questions, paired with the baseline's."""
    rows = []
    ranges = {
        m: [float(x) for x in v[0][keep_idx].mean(0)]
        for m, v in per_method.items()
        if len(keep_idx)
    }
    for m in per_method:
        lvl = _common_level(ranges, [m, config.baseline], level)
        est = bootstrap_statistic(
            len(keep_idx),
            partial(_at_level, per_method, keep_idx, m, level=lvl),
            seed=config.seed,
            n_resamples=config.n_resamples,
        )
        diff = None
        if m != config.baseline and config.baseline in per_method:
            diff = bootstrap_statistic(
                len(keep_idx),
                partial(_at_level_diff, per_method, keep_idx, m, config.baseline, level=lvl),
                seed=config.seed,
                n_resamples=config.n_resamples,
            )
        deg = (
            _at_level(per_method, keep_idx, m, np.arange(len(keep_idx)), lvl, degenerate=True)
            if len(keep_idx)
            else math.nan
        )
        rows.append(EqualKL(lens, m, k, lvl, est, deg, diff))
    return rows


def _instructed_point(
    te: TextEvaluation, lens: str, k: int, config: ComparisonConfig
) -> tuple[CurvePoint, EqualKL, np.ndarray, np.ndarray] | None:
    """The instructed row's single curve point and equal-KL row (at its own measured KL) under
    ``lens`` at ``k`` targets, and the per-question unsteered and instructed target probabilities
    on its cells (``None`` without instructed answers)."""
    ins = _text_cells(te, lens, INSTRUCTED, 0.0, k)
    un = _text_cells(te, lens, "unsteered", 1.0, k)
    if ins is None or un is None or ins.kl is None or ins.degenerate is None:
        return None
    n, seed, nr = len(te.questions), config.seed, config.n_resamples
    kq = _per_question(ins.kl, ins.question, n)
    pq = _per_question(ins.target.mean(1), ins.question, n)
    kl = bootstrap_mean(kq, seed=seed, n_resamples=nr)
    p = bootstrap_mean(pq, seed=seed, n_resamples=nr)
    deg = float(ins.degenerate.mean())
    point = CurvePoint(lens, INSTRUCTED, k, 0.0, 0.0, kl, p, deg, len(ins.kl))
    row = EqualKL(lens, INSTRUCTED, k, kl.estimate, p, deg)
    return point, row, _per_question(un.target.mean(1), un.question, n), pq


def _add_equal_kl_fractions(
    equal: list[EqualKL],
    lens: str,
    k: int,
    per_method: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    keep: np.ndarray,
    pu: np.ndarray,
    pi: np.ndarray,
    config: ComparisonConfig,
) -> None:
    """Each method's equal-KL value as a share of the instructed gain, on the questions that
    every curve and the instructed row cover (``pu``/``pi``: per question, all questions)."""
    both = keep[np.isfinite(pu[keep]) & np.isfinite(pi[keep])] if len(keep) else keep
    for e in equal:
        if e.lens != lens or e.k != k or e.method not in per_method:
            continue
        e.instructed_fraction, e.instructed_note = instructed_fraction(
            partial(_at_level, per_method, both, e.method, level=e.kl),
            pu[both],
            pi[both],
            seed=config.seed,
            n_resamples=config.n_resamples,
        )
