"""The comparison's settings (:class:`ComparisonConfig`) and the methods' display names."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, get_args

import numpy as np

from ks_lens.datasets.coverage import label_combinations
from ks_lens.errors import ConfigError, WrongTypeError
from ks_lens.evaluation import CALIBRATION_METRICS, CalibrationMetric, DegenerateRule, VanishRule
from ks_lens.evaluation.instructed import INSTRUCTED, INSTRUCTED_DESCRIPTION, INSTRUCTED_LABEL
from ks_lens.steering.dct import DCTSettings
from ks_lens.steering.positions import Positions
from ks_lens.steering.registry import METHODS, REFERENCE_METHODS


def split_method(name: str) -> tuple[str, str]:
    """``(method, variant)`` of a method name: ``"ksteer@run2"`` is ``("ksteer", "run2")`` (a
    variant is a merged run's tag, see :func:`merge_results`), ``"ksteer"`` is ``("ksteer", "")``."""
    base, _, variant = name.partition("@")
    return base, variant


def method_label(name: str) -> str:
    """The short display name of a method (``"unsteered"`` and unknown names as they are).

    A variant name ``"method@variant"`` (see :func:`merge_results`) reads ``"Label [variant]"``.
    """
    base, variant = split_method(name)
    label = (
        METHODS[base].label if base in METHODS else INSTRUCTED_LABEL if base == INSTRUCTED else base
    )
    return f"{label} [{variant}]" if variant else label


def method_description(name: str) -> str:
    base, variant = split_method(name)
    text = (
        METHODS[base].description
        if base in METHODS
        else INSTRUCTED_DESCRIPTION
        if base == INSTRUCTED
        else base
    )
    return f"{text} [{variant}]" if variant else text


def spread(items: Sequence[Any], n: int | None) -> list[Any]:
    """``n`` items evenly spread over ``items`` (all if ``n`` is None or large)."""
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        return []
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


class TextScorer(Protocol):
    """What the comparison needs from a text evaluator (:class:`~ks_lens.text_evaluator.TextEvaluator`)."""

    @property
    def label_names(self) -> tuple[str, ...]: ...

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray: ...


TextCoverage = Literal["per-size", "all-combinations"]

AlphaPer = Literal["size", "combination"]

ALPHA_PERS: tuple[AlphaPer, ...] = get_args(AlphaPer)
"""What one calibrated alpha serves (:func:`~ks_lens.comparison.calibrate`):

``size``         one alpha per method and number of targets, on all calibration cells of that
                 size (a hard combination and an easy one share it);
``combination``  one alpha per method and target combination (the reference implementation's
                 choice), each on ``calib_questions_per_combination`` or more calibration
                 questions; only the combinations the activation and text stages use.
"""

#: settings left out of :meth:`ComparisonConfig.to_json` at these values, so that a result of the
#: defaults reads as one written before the settings existed (and older code can load it)
_OMITTED_AT_DEFAULT: dict[str, Any] = {"alpha_per": "size", "calib_questions_per_combination": 1}


TEXT_COVERAGES: tuple[TextCoverage, ...] = get_args(TextCoverage)
"""Which (question, combination) cells the text level answers:

``per-size``          ``gen_combos_per_question`` combinations of each size per test question,
                      rotating through the combinations (with few questions some combinations
                      are never answered);
``all-combinations``  every combination of each size on at least
                      ``min_questions_per_combination`` test questions, balanced over questions
                      and combinations (:func:`ks_lens.datasets.coverage.plan_coverage`), with a
                      per-combination table and heatmap in the report.
"""


@dataclass
class ComparisonConfig:
    # names from METHODS (ks-lens demo --help lists them)
    methods: tuple[str, ...] = REFERENCE_METHODS
    baseline: str = "caa_mean"  # every other method is compared with this one
    sizes: tuple[int, ...] = (1, 2, 3)  # numbers of targets steered at once
    avoid: tuple[str, ...] = ()  # labels to avoid in every combination (never also targets)
    calibration_metric: CalibrationMetric = "generation_kl"  # coherence cost alpha is calibrated on
    kl_budget: float = 0.5  # nats per token; also the KL level of the equal-KL headline
    max_degenerate_rate: float = 0.02  # calibration: alphas with more degenerate answers fail
    calib_tokens: int = 16  # answer length for the generation_kl calibration metric
    calib_combos_per_question: int = 1  # calibration cells per question and size (alpha_per size)
    calib_bisect_steps: int = 3  # final bracket within a factor 4 ** (1/8) = 1.19
    alpha_per: AlphaPer = "size"  # one calibrated alpha per number of targets or per combination
    # alpha_per combination: calibration questions per combination (at least; each question is
    # used for every size)
    calib_questions_per_combination: int = 1
    positions: Positions = "all"  # token positions steered
    act_combos_per_size: int | None = None  # combinations per size, activation level (None: all)
    gen_combos_per_question: int = 1  # text-level cells per test question and size (per-size)
    text_coverage: TextCoverage = "per-size"  # text-level cells: per-size or all-combinations
    min_questions_per_combination: int = 2  # all-combinations: test questions per combination
    curve_factors: tuple[float, ...] = (0.5, 1.0, 2.0)  # x calibrated alpha
    # text cells per test question and size answered at the curve's other alphas (None: all);
    # every cell is answered at the calibrated alpha (factor 1.0)
    curve_cells_per_question: int | None = 1
    max_new_tokens: int = 32  # answer length of the text-level evaluation
    # rows per forward pass (activation level, calibration); in a PipelineConfig: its batch_size
    batch_size: int = 16
    gen_batch_size: int = 48  # generation rows per batch (several methods share a batch)
    vanish: VanishRule = field(default_factory=VanishRule)
    degenerate: DegenerateRule = field(default_factory=DegenerateRule)
    # how the dct method's vectors are learned (its source layer is the steering layer)
    dct: DCTSettings = field(default_factory=DCTSettings)
    n_resamples: int = 2000  # bootstrap resamples per interval
    seed: int = 0  # cell sampling and bootstrap; in a PipelineConfig: its seed (--seed)
    # reference row: the model asked for the targets by system prompt, no steering
    instructed: bool = True
    # capability stage: multiple-choice questions per run, stratified over subjects (0: none)
    capability_questions: int = 24
    # capability stage: also score with the targets' instructions as system prompt (instructed)
    capability_instructed: bool = True

    def validate(self, labels: Sequence[str] | None = None) -> ComparisonConfig:
        """Check every setting (before any compute); returns ``self``.

        The one place a comparison's settings are checked: ``ks-lens demo``'s options, the
        library and :meth:`ComparisonResult.from_json` (an edited ``report.json``) all call it.
        """
        _check_config_types(self)
        for m in self.methods:
            if split_method(m)[0] not in METHODS:
                raise ConfigError(f"unknown method {m!r}; known: {sorted(METHODS)}")
        if not self.methods:
            raise ConfigError("no methods to compare")
        if self.baseline not in self.methods:
            raise ConfigError(
                f"the baseline {self.baseline!r} is not among the methods {list(self.methods)}"
            )
        if self.calibration_metric not in CALIBRATION_METRICS:
            raise ConfigError(
                f"unknown calibration metric {self.calibration_metric!r}; use one of {CALIBRATION_METRICS}"
            )
        if not (self.kl_budget > 0 and math.isfinite(self.kl_budget)):
            raise ConfigError(f"kl_budget must be a positive number of nats, got {self.kl_budget}")
        if not 0 <= self.max_degenerate_rate <= 1:
            raise ConfigError("max_degenerate_rate must be between 0 and 1")
        if len(self.curve_factors) < 1 or any(
            not (f > 0 and math.isfinite(f)) for f in self.curve_factors
        ):
            raise ConfigError("curve_factors must be positive numbers")
        if 1.0 not in self.curve_factors:
            raise ConfigError("curve_factors must include 1.0 (the calibrated alpha)")
        if list(self.curve_factors) != sorted(self.curve_factors):
            raise ConfigError("curve_factors must be increasing")
        for name in ("calib_tokens", "max_new_tokens", "batch_size", "gen_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive")
        self._check_counts()
        if not self.sizes:
            raise ConfigError("sizes must name at least one number of targets (e.g. 1,2,3)")
        dup = sorted({k for k in self.sizes if self.sizes.count(k) > 1})
        if dup:
            raise ConfigError(
                f"sizes {list(self.sizes)} repeat {dup}: each number of targets is evaluated once"
            )
        if min(self.sizes) < 1:
            raise ConfigError(
                f"sizes must be at least 1 (targets per combination), got {list(self.sizes)}"
            )
        if self.text_coverage not in TEXT_COVERAGES:
            raise ConfigError(
                f"unknown text_coverage {self.text_coverage!r}; use one of {TEXT_COVERAGES}"
            )
        if self.alpha_per not in ALPHA_PERS:
            raise ConfigError(f"unknown alpha_per {self.alpha_per!r}; use one of {ALPHA_PERS}")
        if self.calib_questions_per_combination < 1:
            raise ConfigError(
                "calib_questions_per_combination must be at least 1, got "
                f"{self.calib_questions_per_combination}"
            )
        if self.min_questions_per_combination < 1:
            raise ConfigError(
                "min_questions_per_combination must be at least 1, got "
                f"{self.min_questions_per_combination}"
            )
        if self.capability_questions < 0:
            raise ConfigError(
                "capability_questions must be a number of questions (0: no capability stage), "
                f"got {self.capability_questions}"
            )
        if labels is not None:
            for a in self.avoid:
                if a not in labels:
                    raise ConfigError(f"unknown avoid label {a!r}; labels are {list(labels)}")
            pool = [lab for lab in labels if lab not in self.avoid]
            label_combinations(pool, self.sizes)
        return self

    def _check_counts(self) -> None:
        """The counts of :meth:`validate`: cells per question, resamples, bisection steps."""
        if self.gen_combos_per_question < 1 or self.calib_combos_per_question < 1:
            raise ConfigError("combinations per question must be positive")
        if self.act_combos_per_size is not None and self.act_combos_per_size < 1:
            raise ConfigError(
                f"act_combos_per_size must be positive (or None for all), got {self.act_combos_per_size}"
            )
        if self.curve_cells_per_question is not None and self.curve_cells_per_question < 1:
            raise ConfigError(
                "curve_cells_per_question must be positive (or None for every text cell), got "
                f"{self.curve_cells_per_question}"
            )
        if self.calib_bisect_steps < 0:
            raise ConfigError(f"calib_bisect_steps must be >= 0, got {self.calib_bisect_steps}")
        if self.n_resamples < 1:
            raise ConfigError(
                f"n_resamples must be a positive number of bootstrap resamples, got {self.n_resamples}"
            )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["vanish"] = self.vanish.to_json()
        d["degenerate"] = self.degenerate.to_json()
        d["dct"] = asdict(self.dct)
        for name, default in _OMITTED_AT_DEFAULT.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ComparisonConfig:
        """Inverse of :meth:`to_json` (unknown keys are refused), checked by :meth:`validate`."""
        if not isinstance(d, Mapping):
            raise WrongTypeError(f"comparison settings must be an object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown comparison settings {sorted(unknown)}")
        kw = dict(d)
        kw.setdefault("instructed", False)  # results written before the row existed have none
        kw.setdefault("curve_cells_per_question", None)  # before it: every cell at every alpha
        for name in ("methods", "sizes", "avoid", "curve_factors"):
            if name in kw:
                if not isinstance(kw[name], (list, tuple)):
                    raise WrongTypeError(
                        f"comparison setting {name} must be a list, got {kw[name]!r}"
                    )
                kw[name] = tuple(kw[name])
        rules: tuple[tuple[str, Any], ...] = (
            ("vanish", VanishRule),
            ("degenerate", DegenerateRule),
            ("dct", DCTSettings),
        )
        for name, rule in rules:
            if name in kw:
                if not isinstance(kw[name], Mapping):
                    raise WrongTypeError(
                        f"comparison setting {name} must be an object, got {kw[name]!r}"
                    )
                fields = rule.__dataclass_fields__
                kw[name] = rule(**{k: v for k, v in kw[name].items() if k in fields})
        return cls(**kw).validate()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{
        name: (lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v), "names")
        for name in ("methods", "avoid")
    },
    "sizes": (lambda v: isinstance(v, tuple) and all(_is_int(x) for x in v), "whole numbers"),
    "curve_factors": (lambda v: isinstance(v, tuple) and all(_is_number(x) for x in v), "numbers"),
    **{
        name: (lambda v: isinstance(v, str), "a name")
        for name in ("baseline", "calibration_metric", "positions", "alpha_per")
    },
    **{name: (_is_number, "a number") for name in ("kl_budget", "max_degenerate_rate")},
    **{
        name: (_is_int, "a whole number")
        for name in (
            "calib_tokens",
            "calib_combos_per_question",
            "calib_bisect_steps",
            "calib_questions_per_combination",
            "gen_combos_per_question",
            "max_new_tokens",
            "batch_size",
            "gen_batch_size",
            "n_resamples",
            "seed",
            "capability_questions",
        )
    },
    "capability_instructed": (lambda v: isinstance(v, bool), "true or false"),
    "act_combos_per_size": (lambda v: v is None or _is_int(v), "a whole number or null"),
    "curve_cells_per_question": (lambda v: v is None or _is_int(v), "a whole number or null"),
    "instructed": (lambda v: isinstance(v, bool), "true or false"),
    "vanish": (lambda v: isinstance(v, VanishRule), "a VanishRule"),
    "degenerate": (lambda v: isinstance(v, DegenerateRule), "a DegenerateRule"),
}


def _check_config_types(config: ComparisonConfig) -> None:
    """Every field of the type it is declared with (a JSON file or untyped code can put a string
    where a number belongs, which would fail later with a TypeError, or compare wrongly)."""
    for name, (ok, what) in _FIELD_CHECKS.items():
        v = getattr(config, name)
        if not ok(v):
            raise WrongTypeError(f"comparison setting {name} must be {what}, got {v!r}")
