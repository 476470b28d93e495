"""Statistics: bootstrap intervals, clustered paired tests, McNemar, interpolation, seed
summaries (hand-computed cases)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ks_lens.evaluation.stats import (
    ClusteredTest,
    Interval,
    bootstrap_mean,
    bootstrap_statistic,
    cluster_bootstrap_mean,
    cluster_means,
    clustered_paired_test,
    interpolate_at,
    mcnemar,
    paired_difference,
    seed_summary,
    sign_flip_test,
)


def test_bootstrap_mean_two_points_hand_computed():
    # resampled means of {0, 1} are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5 % and
    # 97.5 % percentiles are exactly 0 and 1
    iv = bootstrap_mean([0.0, 1.0], seed=3)
    assert iv.estimate == 0.5 and iv.low == 0.0 and iv.high == 1.0 and iv.n == 2
    assert not iv.excludes_zero


def test_bootstrap_mean_properties():
    v = np.linspace(0.2, 0.6, 40)
    iv = bootstrap_mean(v, seed=0)
    assert iv.estimate == pytest.approx(0.4)
    assert iv.low < 0.4 < iv.high
    # half-width close to the normal approximation 1.96 * sd / sqrt(n)
    half = 1.96 * v.std() / math.sqrt(len(v))
    assert (iv.high - iv.low) / 2 == pytest.approx(half, rel=0.2)
    assert bootstrap_mean(v, seed=0) == iv  # deterministic given the seed
    const = bootstrap_mean([0.3, 0.3, 0.3])
    assert (const.low, const.high) == (0.3, 0.3)
    nan = bootstrap_mean([float("nan"), 1.0, 3.0])
    assert nan.n == 2 and nan.estimate == 2.0
    assert math.isnan(bootstrap_mean([]).estimate)


def test_paired_difference_uses_pairs():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    b = a - 0.5  # every pair differs by exactly 0.5: a zero-width interval
    d = paired_difference(a, b)
    assert (d.estimate, d.low, d.high) == (0.5, 0.5, 0.5) and d.excludes_zero
    with pytest.raises(ValueError, match="shape"):
        paired_difference([1.0], [1.0, 2.0])


def test_bootstrap_statistic_estimate_and_nan_guard():
    x = np.arange(10.0)
    iv = bootstrap_statistic(10, lambda idx: float(x[idx].mean()), seed=1, n_resamples=500)
    assert iv.estimate == 4.5 and iv.low < 4.5 < iv.high
    never = bootstrap_statistic(10, lambda idx: float("nan") if 0 not in idx else 1.0, seed=1)
    assert never.estimate == 1.0 and math.isnan(never.low)  # too many undefined resamples


def test_mcnemar_exact_hand_computed():
    a = [True] * 5 + [False] * 3 + [True] * 2
    b = [False] * 5 + [False] * 3 + [True] * 2
    m = mcnemar(a, b)
    assert (m.only_a, m.only_b, m.n) == (5, 0, 10)
    assert m.p_value == pytest.approx(2 * 0.5**5)  # two-sided binomial, 5 of 5 discordant
    assert m.rate_a == 0.7 and m.rate_b == 0.2
    assert mcnemar([True, False], [True, False]).p_value == 1.0  # no discordant pair


def test_interpolate_at_log_linear_and_no_extrapolation():
    xs, ys = [0.1, 0.4], [0.2, 0.6]
    # log-linear: 0.2 is halfway between 0.1 and 0.4 in log space
    assert interpolate_at(xs, ys, 0.2) == pytest.approx(0.4)
    assert interpolate_at(xs, ys, 0.2, log_x=False) == pytest.approx(0.2 + 0.4 * (0.1 / 0.3))
    assert interpolate_at(xs, ys, 0.1) == 0.2
    assert math.isnan(interpolate_at(xs, ys, 0.5))
    assert math.isnan(interpolate_at(xs, ys, 0.05))
    # non-monotone curve: the first bracketing segment in curve order is used
    assert interpolate_at([0.1, 0.3, 0.2, 0.5], [0.0, 1.0, 2.0, 3.0], 0.25) == pytest.approx(
        0.0 + (math.log(0.25) - math.log(0.1)) / (math.log(0.3) - math.log(0.1))
    )
    assert math.isnan(interpolate_at([0.1, float("nan")], [0.0, 1.0], 0.2))


def test_seed_summary_and_interval_json():
    s = seed_summary([1.0, 2.0, 3.0])
    assert s == {"mean": 2.0, "sd": 1.0, "n": 3}
    assert math.isnan(seed_summary([1.0])["sd"])
    iv = Interval(0.5, 0.25, 0.75, 10)
    assert Interval.from_json(iv.to_json()) == iv
    assert iv.fmt(2) == "0.50 [0.25, 0.75]"


def test_sign_flip_test_enumerated_by_hand():
    # units 1, 2, 3: the 8 sign patterns give sums 6, 4, 2, 0, 0, -2, -4, -6; the observed sum 6
    # is reached by 1 pattern on each side: p = 2/8
    assert sign_flip_test([1.0, 2.0, 3.0]) == (0.25, True)
    # units 1, -2, 3, 4 (sum 6): sums of +-1 +-2 +-3 +-4 >= 6 need the flipped units to sum to
    # <= 2: {}, {1}, {2}: 3 of 16 patterns per side, p = 6/16
    assert sign_flip_test([1.0, -2.0, 3.0, 4.0]) == (0.375, True)
    # the sign of the observed mean does not matter; zeros and NaNs
    assert sign_flip_test([-1.0, -2.0, -3.0, float("nan")]) == (0.25, True)
    assert sign_flip_test([0.0, 0.0, 0.0]) == (1.0, True)
    assert math.isnan(sign_flip_test([])[0])
    # a unit that is float noise (1e-8 beside 0.1-0.3) is a tie, whatever its sign: units 1, 2,
    # 3, 0 give sums 6 on 2 patterns per side of 16, p = 4/16 (with +-1e-8 one side of the
    # noise unit would fall short of the observed sum and halve the p-value)
    tie = sign_flip_test([0.1, 0.2, 0.3, 0.0])
    assert tie == (0.25, True)
    assert sign_flip_test([0.1, 0.2, 0.3, 1e-8]) == tie == sign_flip_test([0.1, 0.2, 0.3, -1e-8])
    # 2**12 = 4096 patterns > 2000 resamples: random patterns, the observed one counted on each
    # side (p >= 2/2001); the all-plus pattern turns up about 2000/4096 times per side
    p, exact = sign_flip_test(np.ones(12), seed=0, n_resamples=2000)
    assert not exact and 2 / 2001 <= p <= 8 / 2001
    assert sign_flip_test(np.ones(12), seed=0, n_resamples=2000) == (p, exact)  # seeded
    # all 2**12 patterns fit in 5000 resamples: exact, only the two all-equal-sign patterns
    assert sign_flip_test(np.ones(12), n_resamples=5000) == (pytest.approx(2 / 4096), True)


def test_cluster_means_and_bootstrap_count_questions_once():
    v = [0.0, 0.0, 0.0, 1.0, float("nan")]
    q = [0, 0, 0, 1, 2]  # question 2 has no finite cell
    means, ids = cluster_means(v, q)
    assert means.tolist() == [0.0, 1.0] and ids.tolist() == [0, 1]
    # two questions with means 0 and 1: resampled means 0, 0.5, 1 (the two-point case above),
    # whereas the cell mean (3 cells of 0, one of 1) is 0.25
    iv = cluster_bootstrap_mean(v, q, seed=3)
    assert (iv.estimate, iv.low, iv.high, iv.n) == (0.5, 0.0, 1.0, 2)
    assert bootstrap_mean(v).estimate == 0.25
    with pytest.raises(ValueError, match="equal length"):
        cluster_means([1.0, 2.0], [0])


def test_cluster_bootstrap_is_wider_than_the_cell_bootstrap_under_question_effects():
    # 8 questions x 10 combinations; the combinations of a question share its effect
    rng = np.random.default_rng(0)
    effect = np.repeat(rng.normal(0.0, 0.2, 8), 10)
    values = 0.4 + effect + rng.normal(0.0, 0.02, 80)
    q = np.repeat(np.arange(8), 10)
    cells = bootstrap_mean(values, seed=1)
    clustered = cluster_bootstrap_mean(values, q, seed=1)
    assert clustered.estimate == pytest.approx(cells.estimate)  # balanced: same mean
    assert clustered.n == 8 and cells.n == 80
    # the cell bootstrap's width shrinks like 1/sqrt(80), the question bootstrap's like 1/sqrt(8)
    assert (clustered.high - clustered.low) > 2.5 * (cells.high - cells.low)
    # with independent cells (no question effect) the two agree roughly
    flat = 0.4 + rng.normal(0.0, 0.2, 80)
    c1, c2 = bootstrap_mean(flat, seed=1), cluster_bootstrap_mean(flat, q, seed=1)
    assert 0.5 < (c2.high - c2.low) / (c1.high - c1.low) < 2.0


def test_clustered_paired_test_hand_computed():
    # 3 questions x 2 cells; per-question mean differences 1, 2, 3
    q = [0, 0, 1, 1, 2, 2]
    a = [1.0, 3.0, 2.0, 4.0, 3.0, 5.0]
    b = [0.0, 2.0, 0.0, 2.0, 0.0, 2.0]
    t = clustered_paired_test(a, b, q, seed=0)
    assert (t.n_questions, t.n_cells, t.p_value, t.exact) == (3, 6, 0.25, True)
    assert (t.n_patterns, t.p_floor) == (8, 0.0)
    assert t.mean_a == pytest.approx(3.0) and t.mean_b == pytest.approx(1.0)
    assert t.diff.estimate == pytest.approx(2.0) and t.diff.n == 3
    assert t.diff == bootstrap_mean([1.0, 2.0, 3.0], seed=0)  # the interval resamples questions
    assert ClusteredTest.from_json(t.to_json()) == t
    # a NaN cell is dropped from both sides; a question left with no cell is dropped
    t2 = clustered_paired_test([1.0, float("nan"), 2.0], [0.0, 0.0, 0.0], [0, 1, 2])
    assert (t2.n_questions, t2.n_cells) == (2, 2)
    with pytest.raises(ValueError, match="equal length"):
        clustered_paired_test([1.0], [1.0, 2.0], [0, 1])


def test_clustered_vanish_test_is_not_fooled_by_dependent_cells():
    # 3 questions x 10 combinations: method a vanishes on every cell of every question, b never.
    # McNemar counts 30 independent discordant pairs (p = 2 / 2**30); over questions there are
    # only 3 units, all positive: the exact sign-flip p-value is 2 / 8
    q = np.repeat(np.arange(3), 10)
    a, b = np.ones(30, dtype=bool), np.zeros(30, dtype=bool)
    assert mcnemar(a, b).p_value == pytest.approx(2 / 2**30)
    t = clustered_paired_test(a, b, q)
    assert t.p_value == 0.25 and t.exact and (t.mean_a, t.mean_b) == (1.0, 0.0)
    # 3 of 10 cells differ on each of 12 questions: McNemar p ~ 1e-11; over questions the exact
    # two-sided p-value is 2 / 2**12
    q12 = np.repeat(np.arange(12), 10)
    a12 = np.tile(np.arange(10) < 3, 12)
    t12 = clustered_paired_test(a12, np.zeros(120, dtype=bool), q12, n_resamples=5000)
    assert t12.p_value == pytest.approx(2 / 4096) and t12.diff.estimate == pytest.approx(0.3)
    # 40 such questions: 2**40 patterns do not fit, p sits at the floor of 2000 random patterns
    q40 = np.repeat(np.arange(40), 10)
    t40 = clustered_paired_test(np.tile(np.arange(10) < 3, 40), np.zeros(400), q40)
    assert (t40.exact, t40.n_patterns) == (False, 2000)
    assert t40.p_value == pytest.approx(t40.p_floor) == pytest.approx(2 / 2001)
    assert mcnemar(a12, np.zeros(120, dtype=bool)).p_value < 1e-10
