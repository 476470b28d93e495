"""Coherence costs KL(steered || unsteered): first token, along a generation, alpha -> KL metric."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

from ks_lens.evaluation.readouts import Readout, kl_divergence, readout, readout_groups
from ks_lens.evaluation.scoring import generate_and_score_groups
from ks_lens.models.chat import ChatPrompt
from ks_lens.steering.base import Steering, SteeringMethod, SteeringSpec
from ks_lens.steering.positions import Positions
from ks_lens.types import Model


def first_token_kl(
    model: Model,
    prompts: Sequence[ChatPrompt | str],
    steerings: Sequence[Steering | None],
    *,
    positions: Positions = "all",
    batch_size: int = 16,
    base: Readout | None = None,
) -> list[float]:
    """Mean KL(steered || unsteered) of the next-token distribution at the last prompt token."""
    base = base or readout(model, prompts, next_token=True, batch_size=batch_size)
    assert base.next_logprobs is not None
    outs = readout_groups(
        model, prompts, steerings, next_token=True, positions=positions, batch_size=batch_size
    )
    res = []
    for r in outs:
        assert r.next_logprobs is not None
        res.append(float(kl_divergence(r.next_logprobs, base.next_logprobs).mean()))
    return res


def generation_kl(
    model: Model,
    questions: Sequence[str],
    steerings: Sequence[Steering | None],
    *,
    positions: Positions = "all",
    max_new_tokens: int = 12,
    batch_size: int = 48,
) -> list[float]:
    """Mean per-token KL(steered || unsteered) along each configuration's greedy continuation.

    The unsteered model's distributions are computed on the steered text itself, so this measures
    how far the steered model's next-token choices stray from what the unmodified model would
    predict in the same context: a coherence cost for generated text.
    """
    scores = generate_and_score_groups(
        model,
        questions,
        steerings,
        response_probe=None,
        positions=positions,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    return [s.mean_kl if not math.isnan(s.mean_kl) else 0.0 for s in scores]


CalibrationMetric = Literal["generation_kl", "first_token_kl"]
CALIBRATION_METRICS: tuple[CalibrationMetric, ...] = get_args(CalibrationMetric)


def kl_metric(
    model: Model,
    method: SteeringMethod,
    specs: Sequence[SteeringSpec],
    prompts: Sequence[ChatPrompt | str],
    *,
    positions: Positions = "all",
    batch_size: int = 16,
    base: Readout | None = None,
) -> Callable[[float], float]:
    """``alpha -> mean first-token KL(steered || unsteered)`` over prompts and specs (one method).

    Example:
        >>> k_steer = ks.KSteering(probe)
        >>> kl = ks.kl_metric(model, k_steer, [k_steer.spec(target="casual")], ["Why is the sky blue?"])
        >>> kl(0.0) < 1e-6 < kl(0.01)                   # nats; feed it to calibrate_alpha
        True
    """
    base = base or readout(model, prompts, next_token=True, batch_size=batch_size)

    def metric(alpha: float) -> float:
        vals = first_token_kl(
            model,
            prompts,
            [(method, SteeringSpec(s.target, s.avoid, alpha)) for s in specs],
            positions=positions,
            batch_size=batch_size,
            base=base,
        )
        return sum(vals) / len(vals)

    return metric
