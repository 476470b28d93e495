"""The steering methods' settings, checked on construction: KSteeringConfig and CAAConfig.

``KSteering(probe, config=KSteeringConfig(steps=3))`` and ``KSteering(probe, steps=3)`` build the
same method (the keyword options build the config); the method registry
(:data:`~ks_lens.steering.registry.METHODS`) and the options of ``ks-lens steer`` are generated
from these dataclasses, so each default, choice and check lives here once. A bad value raises
:class:`~ks_lens.errors.ConfigError` naming the field. (DCT's steerer has no settings; how DCT
vectors are learned is :class:`~ks_lens.steering.dct.DCTSettings`.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from ks_lens.errors import ConfigError, WrongTypeError

Objective = Literal["logits", "logsigmoid", "softmin"]
Combine = Literal["sum", "balanced", "pcgrad"]
StepNorm = Literal["unit", "relative"]
Precondition = Literal["diag"]
CaaCombine = Literal["mean", "sum"]
AvoidMode = Literal["subtract", "ablate"]
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)
COMBINES: tuple[Combine, ...] = get_args(Combine)
STEP_NORMS: tuple[StepNorm | None, ...] = (None, *get_args(StepNorm))
PRECONDITIONS: tuple[Precondition | None, ...] = (None, *get_args(Precondition))
CAA_COMBINES: tuple[CaaCombine, ...] = get_args(CaaCombine)
AVOID_MODES: tuple[AvoidMode, ...] = get_args(AvoidMode)


def unknown_choice(name: str, value: Any, choices: tuple[Any, ...]) -> ConfigError:
    """The error for a ``value`` of the setting ``name`` that is not one of ``choices``."""
    return ConfigError(f"unknown {name} {value!r}; use one of {choices}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise :func:`unknown_choice` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise unknown_choice(name, value, choices)


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _positive_finite(value: Any) -> bool:
    return _is_real(value) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class KSteeringConfig:
    """The settings of :class:`~ks_lens.steering.KSteering` (``docs/steering.md`` has a table).

    Numbers are stored as floats (``decay=1`` is ``1.0``).
    """

    steps: int = 1  # gradient steps per token (>= 1), each with a fresh gradient
    decay: float = 0.95  # step k uses alpha * decay**k; in (0, 1]
    step_norm: StepNorm | None = None  # None: raw gradient; unit: length alpha; relative: alpha*|x|
    objective: Objective = "logits"  # the probe loss whose gradient is the step
    combine: Combine = "sum"  # how several labels' gradients combine
    temperature: float = 1.0  # the softmin objective's temperature (> 0)
    max_step: float | None = None  # clip each token's total change to max_step*|x| (None: off)
    precondition: Precondition | None = None  # diag: the gradient times the probe's input variances

    def __post_init__(self) -> None:
        check_choice("precondition", self.precondition, PRECONDITIONS)
        if not _is_real(self.steps) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be a positive int, got {self.steps!r}")
        if not _is_real(self.decay) or not 0 < self.decay <= 1:
            raise ConfigError(f"decay must be in (0, 1], got {self.decay!r}")
        check_choice("step_norm", self.step_norm, STEP_NORMS)
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("combine", self.combine, COMBINES)
        if not _positive_finite(self.temperature):
            raise ConfigError(
                f"temperature must be a positive finite number, got {self.temperature!r}"
            )
        if self.max_step is not None and not _positive_finite(self.max_step):
            raise ConfigError(
                f"max_step must be a positive finite fraction of |x| (or None), got {self.max_step!r}"
            )
        object.__setattr__(self, "decay", float(self.decay))
        object.__setattr__(self, "temperature", float(self.temperature))
        if self.max_step is not None:
            object.__setattr__(self, "max_step", float(self.max_step))


@dataclass(frozen=True)
class CAAConfig:
    """The settings of :class:`~ks_lens.steering.CAA`."""

    combine: CaaCombine = "mean"  # mean (reference baseline) or sum of the per-label vectors
    normalize: bool = False  # rescale the combined vector to unit L2 norm
    avoid_mode: AvoidMode = "subtract"  # subtract avoid vectors, or ablate: project them out of x

    def __post_init__(self) -> None:
        check_choice("combine", self.combine, CAA_COMBINES)
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize must be True or False, got {self.normalize!r}")
        check_choice("avoid_mode", self.avoid_mode, AVOID_MODES)


C = TypeVar("C", KSteeringConfig, CAAConfig)


def resolve_config(cls: type[C], config: C | None, options: Mapping[str, Any], owner: str) -> C:
    """``config``, or a ``cls`` built from the keyword ``options`` (not both): how a steerer
    takes its settings. ``owner`` names the steerer in the messages."""
    if config is None:
        return cls(**options)
    if not isinstance(config, cls):
        raise WrongTypeError(
            f"{owner} takes config={cls.__name__}(...), got {type(config).__name__}"
        )
    if options:
        raise ConfigError(
            f"{owner} got both config= and the options {sorted(options)}: give either a "
            f"{cls.__name__} or keyword options, not both (dataclasses.replace(config, ...) "
            "changes one field of a config)"
        )
    return config


__all__ = [
    "AVOID_MODES",
    "CAA_COMBINES",
    "COMBINES",
    "OBJECTIVES",
    "PRECONDITIONS",
    "STEP_NORMS",
    "AvoidMode",
    "CAAConfig",
    "CaaCombine",
    "Combine",
    "KSteeringConfig",
    "Objective",
    "Precondition",
    "StepNorm",
    "check_choice",
    "unknown_choice",
]
