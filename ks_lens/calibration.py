"""Calibrating a steering strength: the largest alpha whose coherence cost stays within a budget.

:func:`calibrate_alpha` searches one alpha for any metric that grows with alpha (usually
:func:`~ks_lens.evaluation.kl_metric`); :func:`calibrate_alphas` runs several searches in lockstep
so that their evaluations share batches (every method of a comparison at once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ks_lens.errors import ConfigError


@dataclass
class Calibration:
    """The calibrated alpha and every evaluation the search made (alpha, metric)."""

    alpha: float
    budget: float
    metric: float
    evaluations: list[tuple[float, float]] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "budget": self.budget,
            "metric_at_alpha": self.metric,
            "evaluations": [[a, m] for a, m in self.evaluations],
            "note": self.note,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Calibration:
        """Inverse of :meth:`to_json` (``null`` metrics, i.e. inf/NaN, come back as inf)."""

        def num(v: Any) -> float:
            return math.inf if v is None else float(v)

        return cls(
            float(d["alpha"]),
            float(d["budget"]),
            num(d["metric_at_alpha"]),
            [(float(a), num(m)) for a, m in d["evaluations"]],
            str(d.get("note", "")),
        )


def _search(
    budget: float,
    alpha0: float,
    factor: float,
    max_expand: int,
    bisect_steps: int,
    tolerance: float = 0.1,
) -> Generator[float, float, Calibration]:
    """The calibration search as a generator: yields alphas to evaluate, receives their metric,
    and returns the :class:`Calibration` (so several searches can share batched evaluations).

    Each next alpha is read off a power law ``metric ~ alpha ** p`` through the last two points
    (``p = 2`` from one point, the small-perturbation behaviour of a KL; steps of 1.25x to
    ``factor``x until the boundary is bracketed, then inside the bracket), aiming just below the
    budget; it falls back to factor steps and log-space bisection where a metric is 0 or inf.
    The search stops once an alpha's metric lies within ``tolerance`` below the budget, or the
    bracket is within ``factor ** (1 / 2 ** bisect_steps)``."""
    if not budget > 0:
        raise ConfigError("budget must be positive")
    if alpha0 <= 0 or factor <= 1:
        raise ConfigError("alpha0 must be positive and factor > 1")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance must be in [0, 1), got {tolerance}")
    evals: list[tuple[float, float]] = []
    precision = factor ** (1 / 2**bisect_steps)
    ok: tuple[float, float] | None = None  # largest alpha within the budget, and its metric
    bad: tuple[float, float] | None = None  # smallest alpha over it
    a = alpha0
    for _ in range(2 * max_expand + bisect_steps + 2):
        m = float((yield a))
        if math.isnan(m):
            raise ConfigError(f"the calibration metric is NaN at alpha={a}")
        evals.append((a, m))
        if m <= budget and (ok is None or a > ok[0]):
            ok = (a, m)
        elif m > budget and (bad is None or a < bad[0]):
            bad = (a, m)
        if ok is not None and (ok[1] >= (1 - tolerance) * budget if tolerance else False):
            break
        if ok is not None and bad is not None and bad[0] / ok[0] <= precision:
            break
        if bad is None and len(evals) > max_expand:
            assert ok is not None
            return Calibration(
                ok[0], budget, ok[1], evals, f"budget not reached by alpha={ok[0]:g}; search limit"
            )
        if ok is None and len(evals) > max_expand:
            return Calibration(
                0.0,
                budget,
                float("nan"),
                evals,
                f"budget exceeded even at alpha={a:g}; steering off",
            )
        a = _next_alpha(ok, bad, evals, budget * (1 - tolerance / 2), factor)
    assert ok is not None
    return Calibration(ok[0], budget, ok[1], evals)


def _power_step(
    a: float, m: float, evals: list[tuple[float, float]], target: float
) -> float | None:
    """The alpha where ``metric ~ alpha ** p`` through ``(a, m)`` reaches ``target``, ``p`` from
    the previous evaluation (clipped to [0.5, 4]; 2 without one); ``None`` for a metric of 0 or
    inf."""
    if not (0 < m < math.inf):
        return None
    p = 2.0
    if len(evals) > 1:
        (a1, m1), (a2, m2) = evals[-2], evals[-1]
        if a1 != a2 and 0 < m1 < math.inf and 0 < m2 < math.inf:
            p = min(max(math.log(m2 / m1) / math.log(a2 / a1), 0.5), 4.0)
    return a * (target / m) ** (1 / p)


def _next_alpha(
    ok: tuple[float, float] | None,
    bad: tuple[float, float] | None,
    evals: list[tuple[float, float]],
    target: float,
    factor: float,
) -> float:
    """The next alpha of :func:`_search`: outward from the one end found so far, or inside the
    bracket ``[ok, bad]`` (at least a tenth of its log-width from either end)."""
    if ok is None or bad is None:
        a, m = ok if ok is not None else bad  # type: ignore[misc]
        guess = _power_step(a, m, evals, target)
        up = ok is not None
        lo, hi = (a * 1.25, a * factor) if up else (a / factor, a / 1.25)
        if guess is None:
            return hi if up else lo
        return min(max(guess, lo), hi)
    (a_ok, m_ok), (a_bad, m_bad) = ok, bad
    margin = (a_bad / a_ok) ** 0.1
    if 0 < m_ok and m_bad < math.inf:
        p = max(math.log(m_bad / m_ok) / math.log(a_bad / a_ok), 0.5)
        guess = a_ok * (target / m_ok) ** (1 / p)
    else:
        guess = math.sqrt(a_ok * a_bad)
    return min(max(guess, a_ok * margin), a_bad / margin)


def calibrate_alpha(
    metric: Callable[[float], float],
    budget: float,
    *,
    alpha0: float = 1.0,
    factor: float = 4.0,
    max_expand: int = 8,
    bisect_steps: int = 5,
    tolerance: float = 0.1,
) -> Calibration:
    """Largest alpha with ``metric(alpha) <= budget``, for a metric increasing in alpha.

    From ``alpha0``, each next alpha is read off a power law through the last two evaluations,
    aiming just below the budget (steps of at most ``factor``, at most ``max_expand`` of them
    before the boundary is bracketed); where a metric is 0 or inf it steps by ``factor`` and
    bisects in log space. It stops at the first alpha whose metric lies within ``tolerance`` (a
    fraction) below the budget, or once the bracket is within ``factor ** (1 / 2**bisect_steps)``.
    The returned alpha always satisfies the budget (the largest evaluated alpha that does).

    Example:
        >>> cal = ks.calibrate_alpha(lambda alpha: 0.1 * alpha, budget=1.0)    # any metric
        >>> round(cal.alpha, 2), cal.metric <= 1.0, len(cal.evaluations)
        (9.5, True, 3)

    With a model, the metric is usually :func:`kl_metric` (``docs/steering.md``, "Picking alpha").
    """
    return calibrate_alphas(
        lambda which, alphas: [metric(a) for a in alphas],
        budget,
        [alpha0],
        factor=factor,
        max_expand=max_expand,
        bisect_steps=bisect_steps,
        tolerance=tolerance,
    )[0]


def calibrate_alphas(
    metrics: Callable[[list[int], list[float]], list[float]],
    budget: float,
    alpha0s: Sequence[float],
    *,
    factor: float = 4.0,
    max_expand: int = 8,
    bisect_steps: int = 5,
    tolerance: float = 0.1,
) -> list[Calibration]:
    """Run one :func:`calibrate_alpha` search per entry of ``alpha0s`` in lockstep.

    ``metrics(which, alphas)`` receives the indices (into ``alpha0s``) of the searches still
    running and one alpha for each, and returns their metrics, so all searches can be evaluated
    in one batch.
    """
    searches = [_search(budget, a0, factor, max_expand, bisect_steps, tolerance) for a0 in alpha0s]
    pending: dict[int, float] = {i: next(g) for i, g in enumerate(searches)}
    results: dict[int, Calibration] = {}
    while pending:
        keys = sorted(pending)
        values = metrics(keys, [pending[i] for i in keys])
        if len(values) != len(keys):
            raise ConfigError("metrics() must return one value per alpha")
        nxt: dict[int, float] = {}
        for i, v in zip(keys, values, strict=True):
            try:
                nxt[i] = searches[i].send(float(v))
            except StopIteration as stop:
                results[i] = stop.value
        pending = nxt
    return [results[i] for i in range(len(searches))]


__all__ = ["Calibration", "calibrate_alpha", "calibrate_alphas"]
