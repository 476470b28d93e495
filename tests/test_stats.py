"""Statistics: bootstrap intervals, McNemar, interpolation, seed summaries (hand-computed cases)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ks_lens.stats import (
    Interval,
    bootstrap_mean,
    bootstrap_statistic,
    interpolate_at,
    mcnemar,
    paired_difference,
    seed_summary,
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
