"""Statistics for comparisons: bootstrap intervals, paired tests, curve interpolation.

Every comparison ks-lens states carries an interval. The unit of resampling is the **question**
(a cluster: all the combinations and answers of a question are resampled together), so
intervals account for question-to-question variation, the main source of noise here.

* :func:`bootstrap_mean` / :func:`paired_difference`: percentile bootstrap intervals of a mean
  and of a paired mean difference (:func:`scipy.stats.bootstrap`).
* :func:`bootstrap_statistic`: the interval of any statistic of resampled question indices
  (used for values read off interpolated curves).
* :func:`cluster_means` / :func:`cluster_bootstrap_mean`: per-question means of per-cell values,
  and the bootstrap interval that resamples whole questions (clusters) rather than cells.
* :func:`sign_flip_test`: paired permutation test over questions (each question's mean paired
  difference flips sign under the null; exact enumeration when ``2**n`` patterns fit in the
  resamples; :func:`scipy.stats.permutation_test`).
* :func:`clustered_paired_test`: both for paired per-cell outcomes clustered by question
  (:class:`ClusteredTest`): how ks-lens compares two methods' cells.
* :func:`mcnemar`: exact McNemar test of two paired binary outcomes (a binomial test on the
  discordant pairs, :func:`scipy.stats.binomtest`). It treats every pair as independent, so it
  overstates significance when pairs share a question; comparisons use
  :func:`clustered_paired_test` instead.
* :func:`interpolate_at`: a curve's value at a given x (linear in ``log x``), ``nan`` outside the
  measured range (no extrapolation).
* :func:`seed_summary`: mean and standard deviation over repeated runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from ks_lens.errors import ConfigError

#: confidence level of every interval ks-lens reports
LEVEL = 0.95
#: bootstrap resamples (percentile method)
N_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval over ``n`` units (questions)."""

    estimate: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def fmt(self, nd: int = 3) -> str:
        """``0.412 [0.371, 0.455]``."""
        if math.isnan(self.estimate):
            return "n/a"
        return f"{self.estimate:.{nd}f} [{self.low:.{nd}f}, {self.high:.{nd}f}]"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Interval:
        return cls(**d)


NAN_INTERVAL = Interval(float("nan"), float("nan"), float("nan"), 0)


def _finite(x: float) -> float:
    return float(x) if x is not None and np.isfinite(x) else float("nan")


def bootstrap_mean(
    values: Sequence[float] | np.ndarray, *, seed: int = 0, n_resamples: int = N_RESAMPLES
) -> Interval:
    """Mean of ``values`` (one per question) with a percentile bootstrap interval.

    NaNs are dropped. With fewer than two values the interval collapses to the estimate.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return NAN_INTERVAL
    est = float(v.mean())
    if len(v) < 2 or np.all(v == v[0]):
        return Interval(est, est, est, len(v))
    res = sps.bootstrap(
        (v,),
        np.mean,
        confidence_level=LEVEL,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
        vectorized=True,
    )
    ci = res.confidence_interval
    return Interval(est, _finite(ci.low), _finite(ci.high), len(v))


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
) -> Interval:
    """Mean of ``a - b`` over paired units (questions), with a bootstrap interval.

    Units where either value is NaN are dropped from both.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ConfigError(f"paired samples differ in shape: {x.shape} vs {y.shape}")
    return bootstrap_mean(x - y, seed=seed, n_resamples=n_resamples)


def bootstrap_statistic(
    n: int,
    statistic: Callable[[np.ndarray], float],
    *,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
) -> Interval:
    """Interval of ``statistic(idx)`` where ``idx`` resamples ``range(n)`` (questions) with
    replacement; the estimate is ``statistic(arange(n))``.

    Resamples where the statistic is NaN (e.g. a curve that no longer reaches the KL level) are
    dropped; if more than 5 % are, the interval is reported as NaN rather than biased.
    """
    if n < 1:
        return NAN_INTERVAL
    est = float(statistic(np.arange(n)))
    if n < 2 or not np.isfinite(est):
        return Interval(est, est, est, n) if np.isfinite(est) else NAN_INTERVAL
    rng = np.random.default_rng(seed)
    vals = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_resamples)], dtype=float)
    ok = vals[np.isfinite(vals)]
    if len(ok) < 0.95 * n_resamples:
        return Interval(est, float("nan"), float("nan"), n)
    lo, hi = np.quantile(ok, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return Interval(est, float(lo), float(hi), n)


def cluster_means(
    values: Sequence[float] | np.ndarray, clusters: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster means of ``values`` (one per cell) and the cluster ids, in sorted id order.

    NaN cells are dropped; a cluster with no finite cell is left out.
    """
    v = np.asarray(values, dtype=float)
    c = np.asarray(clusters)
    if v.shape != c.shape or v.ndim != 1:
        raise ConfigError(
            f"values and clusters must be 1-D of equal length: {v.shape} vs {c.shape}"
        )
    ok = np.isfinite(v)
    ids = np.unique(c[ok])
    return np.array([v[ok & (c == i)].mean() for i in ids], dtype=float), ids


def cluster_bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    clusters: Sequence[int] | np.ndarray,
    *,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
) -> Interval:
    """Mean of the per-cluster means of ``values`` (each question counts once, however many
    cells it has), with a percentile bootstrap interval that resamples whole clusters.

    Cells of one question are not independent (they share the question), so resampling cells
    gives intervals that are too narrow; ``n`` of the result is the number of clusters.
    """
    means, _ = cluster_means(values, clusters)
    return bootstrap_mean(means, seed=seed, n_resamples=n_resamples)


#: paired differences smaller than this fraction of the largest one are ties (float noise)
TIE_TOLERANCE = 1e-6


def sign_flip_test(
    units: Sequence[float] | np.ndarray, *, seed: int = 0, n_resamples: int = N_RESAMPLES
) -> tuple[float, bool]:
    """Two-sided paired permutation test that the mean of ``units`` (one paired difference per
    question) is zero: under the null each unit's sign is equally likely, so the p-value is the
    share of sign patterns whose mean is at least as extreme as the observed one.

    Returns ``(p_value, exact)``: all ``2**n`` patterns are enumerated when they fit in
    ``n_resamples`` (``exact``), otherwise ``n_resamples`` random patterns are drawn (the
    observed one counted on each side, so p >= 2 / (n_resamples + 1)). The two-sided p-value is
    twice the smaller one-sided one (the null is symmetric), at most 1. NaNs are dropped; no
    units: NaN. Units within :data:`TIE_TOLERANCE` of the largest one's size count as ties
    (zero): the float32 forward passes upstream leave differences of about 1e-8 where two
    methods give the same result, and the sign of such noise must not change the p-value.
    """
    d = np.asarray(units, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) == 0:
        return float("nan"), True
    d = np.where(np.abs(d) <= TIE_TOLERANCE * np.abs(d).max(), 0.0, d)
    exact = 2 ** len(d) <= n_resamples
    if np.all(d == 0):
        return 1.0, exact
    res = sps.permutation_test(
        (d,),
        np.mean,
        permutation_type="samples",
        n_resamples=n_resamples,
        alternative="two-sided",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return float(min(1.0, res.pvalue)), exact


@dataclass(frozen=True)
class ClusteredTest:
    """Paired comparison of per-cell outcomes ``a`` and ``b`` clustered by question.

    Each question is one unit: its mean of ``a - b`` over its cells. ``diff``: the mean over
    questions with a bootstrap interval resampling questions; ``p_value``: the sign-flip
    permutation test over questions (:func:`sign_flip_test`; ``exact`` when every sign pattern
    was enumerated; ``n_patterns`` sign patterns in all, so a random test's p-value is at least
    ``2 / (n_patterns + 1)``). ``mean_a`` / ``mean_b``: means over the same questions of each
    side's per-question means (for binary outcomes: rates).
    """

    n_questions: int
    n_cells: int
    mean_a: float
    mean_b: float
    diff: Interval
    p_value: float
    exact: bool
    n_patterns: int

    @property
    def p_floor(self) -> float:
        """The smallest p-value this test can give (0 when exact: ``2 / 2**n`` is reachable)."""
        return 0.0 if self.exact else 2 / (self.n_patterns + 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["diff"] = self.diff.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClusteredTest:
        return cls(**{**d, "diff": Interval.from_json(d["diff"])})


def clustered_paired_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    clusters: Sequence[int] | np.ndarray,
    *,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
) -> ClusteredTest:
    """:class:`ClusteredTest` of paired per-cell outcomes (floats or booleans) ``a`` and ``b``,
    cell ``i`` belonging to question ``clusters[i]``. Cells where either side is NaN are dropped.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    c = np.asarray(clusters)
    if not (x.shape == y.shape == c.shape) or x.ndim != 1:
        raise ConfigError(
            "paired outcomes and clusters must be 1-D of equal length: "
            f"{x.shape}, {y.shape}, {c.shape}"
        )
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, c = x[ok], y[ok], c[ok]
    units, _ = cluster_means(x - y, c)
    p, exact = sign_flip_test(units, seed=seed, n_resamples=n_resamples)
    return ClusteredTest(
        len(units),
        int(ok.sum()),
        float(cluster_means(x, c)[0].mean()) if len(units) else float("nan"),
        float(cluster_means(y, c)[0].mean()) if len(units) else float("nan"),
        bootstrap_mean(units, seed=seed, n_resamples=n_resamples),
        p,
        exact,
        2 ** len(units) if exact else n_resamples,
    )


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of paired binary outcomes ``a`` and ``b``.

    ``only_a``: units where ``a`` is true and ``b`` false; ``only_b`` the reverse. The p-value is
    two-sided, from a binomial test of ``only_a`` out of ``only_a + only_b`` at 1/2.
    """

    n: int
    rate_a: float
    rate_b: float
    only_a: int
    only_b: int
    p_value: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> McNemar:
    """Exact McNemar test (see :class:`McNemar`)."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape:
        raise ConfigError(f"paired outcomes differ in shape: {x.shape} vs {y.shape}")
    n = int(x.size)
    only_a, only_b = int((x & ~y).sum()), int((~x & y).sum())
    disc = only_a + only_b
    p = float(sps.binomtest(only_a, disc, 0.5).pvalue) if disc else 1.0
    return McNemar(
        n,
        float(x.mean()) if n else float("nan"),
        float(y.mean()) if n else float("nan"),
        only_a,
        only_b,
        p,
    )


def interpolate_at(
    xs: Sequence[float] | np.ndarray,
    ys: Sequence[float] | np.ndarray,
    x0: float,
    *,
    log_x: bool = True,
) -> float:
    """The value at ``x0`` of the curve through ``(xs, ys)`` (points in curve order).

    Walks the points in order and interpolates linearly (in ``log x`` by default) on the first
    segment whose ends bracket ``x0``; returns an exact point's ``y`` if ``x0`` is hit, and NaN
    if no segment brackets ``x0`` (no extrapolation) or the points are not finite.
    """
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ConfigError("xs and ys must be 1-D and of equal length")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return float("nan")
    if log_x:
        if x0 <= 0 or np.any(x <= 0):
            x = np.maximum(x, 1e-12)
            x0 = max(x0, 1e-12)
        x, x0 = np.log(x), math.log(x0)
    for i in range(len(x)):
        if x[i] == x0:
            return float(y[i])
    for i in range(len(x) - 1):
        lo, hi = x[i], x[i + 1]
        if min(lo, hi) < x0 < max(lo, hi):
            t = (x0 - lo) / (hi - lo)
            return float(y[i] + t * (y[i + 1] - y[i]))
    return float("nan")


def seed_summary(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1) over seeds; ``sd`` is NaN for one seed."""
    v = np.asarray([x for x in values if x == x], dtype=float)
    if len(v) == 0:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
        "n": len(v),
    }


__all__ = [
    "LEVEL",
    "NAN_INTERVAL",
    "N_RESAMPLES",
    "ClusteredTest",
    "Interval",
    "McNemar",
    "bootstrap_mean",
    "bootstrap_statistic",
    "cluster_bootstrap_mean",
    "cluster_means",
    "clustered_paired_test",
    "interpolate_at",
    "mcnemar",
    "paired_difference",
    "seed_summary",
    "sign_flip_test",
]
