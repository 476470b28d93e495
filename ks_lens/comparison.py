"""The reference comparison: unsteered vs CAA vs K-Steering over 1-, 2- and 3-label combinations.

Four stages, each a function, each returning typed records:

1. :func:`plan_comparison` -> :class:`ComparisonPlan`: which combinations are evaluated at the
   activation level, and which (question, combination) *cells* are calibrated on and answered
   in text. Every question gets combinations of every size, rotating so that each combination
   is used about equally often (``text_coverage="all-combinations"``: every combination on at
   least ``min_questions_per_combination`` questions, :mod:`ks_lens.coverage`).
2. :func:`calibrate` -> per method and number of targets, the largest alpha whose greedy answers
   to the **calibration** questions stay within a KL budget (nats per token) with at most
   ``max_degenerate_rate`` degenerate answers.
3. :func:`evaluate_activations` -> :class:`ActivationEvaluation`: a held-out (multi-label)
   evaluator probe reads the steered forward pass of the **test** questions, at the
   calibrated alpha, for every combination.
4. :func:`evaluate_text` -> :class:`TextEvaluation`: greedy answers to the test questions at
   several alphas per method (the calibrated one times ``curve_factors``), scored by the text
   evaluator (model-independent), by a response-activation evaluator (second lens), and by
   KL / perplexity / degenerate rate measured on those same answers. Each method gets a
   trade-off curve (target probability against measured KL), and the headline compares methods
   at **equal measured KL** (interpolated along the curves).

:func:`run_comparison` chains them into a :class:`ComparisonResult`. Every mean comes with a
bootstrap interval over questions (:mod:`ks_lens.stats`), every method is compared with the
baseline (``caa_mean``) by a paired interval, and target probabilities and vanishing by paired
tests clustered by question (a question's cells are one unit: bootstrap interval and sign-flip
permutation test over questions).

Methods are looked up by name in :data:`METHODS`; the reference set is ``caa_mean``,
``caa_sum``, ``ksteer``, ``ksteer_precond`` (the step in the probe's input geometry, chosen on
validation questions over the raw step) and ``ksteer_linear`` (K-Steering with a linear
probe). Beside them, ``ComparisonConfig.instructed`` adds the ``instructed`` reference row: the
model asked for the targets by system prompt, no steering (:mod:`ks_lens.instructed`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any, Literal, Protocol, get_args

import numpy as np

from ks_lens.capability_stage import (
    CapabilityEvaluation,
    CapabilityRow,
    check_capability,
    evaluate_capability_stage,
    merge_capability,
)
from ks_lens.coverage import label_combinations, plan_coverage
from ks_lens.errors import ConfigError, KsLensError, StoreError, WrongTypeError
from ks_lens.evaluation import (
    CALIBRATION_METRICS,
    Calibration,
    CalibrationMetric,
    DegenerateRule,
    GenerationScores,
    VanishRule,
    calibrate_alphas,
    first_token_kl,
    generate_and_score_rows,
    map_dct_labels,
    readout,
    readout_groups,
)
from ks_lens.instructed import (
    INSTRUCTED,
    INSTRUCTED_DESCRIPTION,
    INSTRUCTED_LABEL,
    check_instructions,
    instructed_fraction,
    instructed_readout,
    instructed_system,
)
from ks_lens.memory import record_memory
from ks_lens.probes import Probe
from ks_lens.stats import (
    ClusteredTest,
    Interval,
    McNemar,
    bootstrap_mean,
    bootstrap_statistic,
    clustered_paired_test,
    interpolate_at,
    mcnemar,
    paired_difference,
)
from ks_lens.steering import Steerer, SteeringSpec, SteeringVectors
from ks_lens.steering.base import Steering
from ks_lens.steering.dct import DCTSettings, DCTVectors
from ks_lens.steering.positions import Positions
from ks_lens.steering.registry import (
    LINEAR_PROBE_METHODS,
    METHODS,
    REFERENCE_METHODS,
    MethodDef,
    SteeringKit,
)
from ks_lens.style import style_meters
from ks_lens.types import Model

log = logging.getLogger(__name__)




def method_label(name: str) -> str:
    """The short display name of a method (``"unsteered"`` and unknown names as they are).

    A variant name ``"method@variant"`` (see :func:`merge_results`) reads ``"Label [variant]"``.
    """
    base, _, variant = name.partition("@")
    label = (
        METHODS[base].label
        if base in METHODS
        else INSTRUCTED_LABEL
        if base == INSTRUCTED
        else base
    )
    return f"{label} [{variant}]" if variant else label


def method_description(name: str) -> str:
    base, _, variant = name.partition("@")
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
TEXT_COVERAGES: tuple[TextCoverage, ...] = get_args(TextCoverage)
"""Which (question, combination) cells the text level answers:

``per-size``          ``gen_combos_per_question`` combinations of each size per test question,
                      rotating through the combinations (with few questions some combinations
                      are never answered);
``all-combinations``  every combination of each size on at least
                      ``min_questions_per_combination`` test questions, balanced over questions
                      and combinations (:func:`ks_lens.coverage.plan_coverage`), with a
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
    calib_combos_per_question: int = 1  # calibration cells per question and size
    calib_bisect_steps: int = 3  # final bracket within a factor 4 ** (1/8) = 1.19
    positions: Positions = "all"  # token positions steered
    act_combos_per_size: int | None = None  # combinations per size, activation level (None: all)
    gen_combos_per_question: int = 1  # text-level cells per test question and size (per-size)
    text_coverage: TextCoverage = "per-size"  # text-level cells: per-size or all-combinations
    min_questions_per_combination: int = 2  # all-combinations: test questions per combination
    curve_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # x calibrated alpha
    max_new_tokens: int = 32  # answer length of the text-level evaluation
    batch_size: int = 16  # rows per forward pass (activation level, calibration)
    gen_batch_size: int = 48  # generation rows per batch (several methods share a batch)
    vanish: VanishRule = field(default_factory=VanishRule)
    degenerate: DegenerateRule = field(default_factory=DegenerateRule)
    # how the dct method's vectors are learned (its source layer is the steering layer)
    dct: DCTSettings = field(default_factory=DCTSettings)
    n_resamples: int = 2000  # bootstrap resamples per interval
    seed: int = 0  # cell sampling and bootstrap (ks-lens demo sets it from --seed)
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
            if m.partition("@")[0] not in METHODS:
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
        if self.gen_combos_per_question < 1 or self.calib_combos_per_question < 1:
            raise ConfigError("combinations per question must be positive")
        if self.act_combos_per_size is not None and self.act_combos_per_size < 1:
            raise ConfigError(
                f"act_combos_per_size must be positive (or None for all), got {self.act_combos_per_size}"
            )
        if self.calib_bisect_steps < 0:
            raise ConfigError(f"calib_bisect_steps must be >= 0, got {self.calib_bisect_steps}")
        if self.n_resamples < 1:
            raise ConfigError(
                f"n_resamples must be a positive number of bootstrap resamples, got {self.n_resamples}"
            )
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

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["vanish"] = self.vanish.to_json()
        d["degenerate"] = self.degenerate.to_json()
        d["dct"] = asdict(self.dct)
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
        for name in ("baseline", "calibration_metric", "positions")
    },
    **{name: (_is_number, "a number") for name in ("kl_budget", "max_degenerate_rate")},
    **{
        name: (_is_int, "a whole number")
        for name in (
            "calib_tokens",
            "calib_combos_per_question",
            "calib_bisect_steps",
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


# ----------------------------------------------------------------------------- 1. plan


@dataclass(frozen=True)
class Cell:
    """One question (index into the question list) steered toward one combination."""

    question: int
    targets: tuple[str, ...]


@dataclass
class ComparisonPlan:
    labels: tuple[str, ...]
    avoid: tuple[str, ...]
    act_combos: list[tuple[str, ...]]
    calib_cells: list[Cell]
    gen_cells: list[Cell]

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "avoid": list(self.avoid),
            "act_combos": [list(c) for c in self.act_combos],
            "calib_cells": [[c.question, list(c.targets)] for c in self.calib_cells],
            "gen_cells": [[c.question, list(c.targets)] for c in self.gen_cells],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ComparisonPlan:
        return cls(
            tuple(d["labels"]),
            tuple(d["avoid"]),
            [tuple(c) for c in d["act_combos"]],
            [Cell(int(q), tuple(t)) for q, t in d["calib_cells"]],
            [Cell(int(q), tuple(t)) for q, t in d["gen_cells"]],
        )


def rotate_cells(
    n_questions: int, combos: Sequence[tuple[str, ...]], per_question: int, seed: int
) -> list[Cell]:
    """``per_question`` combinations for each question, rotating through a seeded shuffle of
    ``combos`` so that every combination is used about equally often."""
    order = list(combos)
    random.Random(seed).shuffle(order)
    m = min(per_question, len(order))
    return [Cell(i, order[(i * m + r) % len(order)]) for i in range(n_questions) for r in range(m)]


def plan_comparison(
    labels: Sequence[str], config: ComparisonConfig, *, n_calib: int, n_test: int
) -> ComparisonPlan:
    """Which combinations and cells each stage uses (see the module docstring)."""
    config.validate(labels)
    pool = [lab for lab in labels if lab not in config.avoid]
    by_k = {k: label_combinations(pool, (k,)) for k in config.sizes}
    act = [c for k in config.sizes for c in spread(by_k[k], config.act_combos_per_size)]
    calib = [
        c
        for k in config.sizes
        for c in rotate_cells(n_calib, by_k[k], config.calib_combos_per_question, config.seed + k)
    ]
    if config.text_coverage == "all-combinations":
        gen = [
            Cell(q, t)
            for q, t in plan_coverage(
                n_test,
                pool,
                config.sizes,
                min_questions=config.min_questions_per_combination,
                seed=config.seed,
            )
        ]
    else:
        gen = [
            c
            for k in config.sizes
            for c in rotate_cells(
                n_test, by_k[k], config.gen_combos_per_question, config.seed + 100 + k
            )
        ]
    return ComparisonPlan(tuple(labels), tuple(config.avoid), act, calib, gen)


# ----------------------------------------------------------------------------- 2. calibrate


def build_methods(config: ComparisonConfig, kit: SteeringKit) -> dict[str, Steerer]:
    """Every method of ``config.methods``, built from ``kit``."""
    return {m: METHODS[m].build(kit) for m in config.methods}


def _cell_rows(
    cells: Sequence[Cell], n_configs: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Rows ``(configuration, question)`` for every (configuration, cell), and their keys."""
    rows, keys = [], []
    for g in range(n_configs):
        for j, c in enumerate(cells):
            rows.append((g, c.question))
            keys.append((g, j))
    return rows, keys


def calibrate(
    model: Model,
    methods: dict[str, Steerer],
    plan: ComparisonPlan,
    questions: Sequence[str],
    config: ComparisonConfig,
) -> dict[str, dict[int, Calibration]]:
    """Per method and number of targets, the largest alpha within the coherence budget on the
    calibration ``questions`` (all methods searched in lockstep, sharing generation batches).

    With ``generation_kl``, an alpha also fails if more than ``max_degenerate_rate`` of its
    calibration answers are degenerate where the unsteered answer to the same question is not.
    """
    names = list(methods)
    calib: dict[str, dict[int, Calibration]] = {n: {} for n in names}
    base = (
        readout(model, questions, next_token=True, batch_size=config.batch_size)
        if config.calibration_metric == "first_token_kl"
        else None
    )
    base_bad: list[bool] = []
    if config.calibration_metric == "generation_kl":
        unsteered = generate_and_score_rows(
            model,
            questions,
            [None],
            [(0, i) for i in range(len(questions))],
            response_probe=None,
            max_new_tokens=config.calib_tokens,
            batch_size=config.gen_batch_size,
            seed=config.seed,
        )
        base_bad = [config.degenerate.is_degenerate(t) for t in unsteered.texts]
    for k in config.sizes:
        cells = [c for c in plan.calib_cells if len(c.targets) == k]

        def metrics(
            which: list[int], alphas: list[float], cells: list[Cell] = cells
        ) -> list[float]:
            configs = [
                (methods[names[i]], SteeringSpec(c.targets, plan.avoid, a))
                for i, a in zip(which, alphas, strict=True)
                for c in cells
            ]
            n = len(cells)
            if config.calibration_metric == "first_token_kl":
                # each combination of the cells, on every calibration question (forward only)
                combos = list(dict.fromkeys(c.targets for c in cells))
                out = []
                for i, a in zip(which, alphas, strict=True):
                    per = first_token_kl(
                        model,
                        questions,
                        [(methods[names[i]], SteeringSpec(t, plan.avoid, a)) for t in combos],
                        positions=config.positions,
                        batch_size=config.batch_size,
                        base=base,
                    )
                    out.append(sum(per) / len(per))
                return out
            rows = [(g, cells[g % n].question) for g in range(len(configs))]
            scores = generate_and_score_rows(
                model,
                questions,
                configs,
                rows,
                response_probe=None,
                positions=config.positions,
                max_new_tokens=config.calib_tokens,
                batch_size=config.gen_batch_size,
                seed=config.seed,
            )
            out = []
            for j in range(len(which)):
                sub = scores.select(range(j * n, (j + 1) * n))
                kl = sub.mean_kl if not math.isnan(sub.mean_kl) else 0.0
                # steering-induced degeneration: degenerate where the unsteered answer is not
                new_bad = np.mean(
                    [
                        config.degenerate.is_degenerate(t) and not base_bad[c.question]
                        for t, c in zip(sub.texts, cells, strict=True)
                    ]
                )
                out.append(kl if new_bad <= config.max_degenerate_rate else math.inf)
            return out

        starts = [
            calib[n][k - 1].alpha
            if calib[n].get(k - 1) and calib[n][k - 1].alpha > 0
            else METHODS[n].alpha0
            for n in names
        ]
        results = calibrate_alphas(
            metrics, config.kl_budget, starts, bisect_steps=config.calib_bisect_steps
        )
        for n, cal in zip(names, results, strict=True):
            calib[n][k] = cal
            log.info(
                f"  calibrated {n:18s} k={k}: alpha={cal.alpha:.4g} ({config.calibration_metric} "
                f"{cal.metric:.3f} <= {config.kl_budget}; {len(cal.evaluations)} evals)"
                f"{' ' + cal.note if cal.note else ''}"
            )
    return calib


# ----------------------------------------------------------------------------- records


@dataclass
class SummaryRow:
    """One method at one number of targets, under one evaluator (``lens``).

    Means are over question x combination cells; intervals resample questions (with all their
    cells). ``diff_vs_baseline`` is the paired difference of ``target_prob`` against the
    baseline method; ``diff_test`` and ``vanish_cluster_test`` compare the target probability
    and the vanished cells with the baseline's on the same cells, clustered by question
    (:func:`~ks_lens.stats.clustered_paired_test`: each question's mean paired difference is
    one unit; bootstrap interval and sign-flip permutation p-value). ``vanish_test`` is McNemar's
    test over the cells, kept for old reports: it treats a question's cells as independent and
    overstates significance; the report uses ``vanish_cluster_test``.

    ``instructed_fraction``: the method's gain over unsteered as a share of the ``instructed``
    row's gain on the same cells (:func:`~ks_lens.instructed.instructed_fraction`); ``None`` with
    ``instructed_note`` saying why when the instructed gain is not clearly positive.
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
class ComparisonResult:
    config: ComparisonConfig
    plan: ComparisonPlan
    calibration: dict[str, dict[int, Calibration]]
    activation: ActivationEvaluation | None
    text: TextEvaluation | None
    summaries: list[SummaryRow]
    curves: list[CurvePoint]
    equal_kl: list[EqualKL]
    n_calib_questions: int
    n_test_questions: int
    n_text_questions: int
    timings: dict[str, float] = field(default_factory=dict)
    capability: CapabilityEvaluation | None = None  # the capability stage (None: not run)

    def capability_rows(self) -> list[CapabilityRow]:
        """The capability stage's accuracies and paired differences vs unsteered (empty: none)."""
        if self.capability is None:
            return []
        return self.capability.rows(n_resamples=self.config.n_resamples)

    @property
    def alphas(self) -> dict[str, dict[int, float]]:
        return {m: {k: c.alpha for k, c in v.items()} for m, v in self.calibration.items()}

    def summary(self, lens: str) -> list[SummaryRow]:
        return [r for r in self.summaries if r.lens == lens]

    @property
    def reference_rows(self) -> tuple[str, ...]:
        """The rows beside the methods: ``unsteered``, and ``instructed`` when asked for."""
        return ("unsteered", INSTRUCTED) if self.config.instructed else ("unsteered",)

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": list(self.plan.labels),
            "methods": {m: method_description(m) for m in self.config.methods},
            "method_labels": {
                m: method_label(m) for m in (*self.reference_rows, *self.config.methods)
            },
            "comparison_config": self.config.to_json(),
            "plan": self.plan.to_json(),
            "alpha": {m: {str(k): a for k, a in v.items()} for m, v in self.alphas.items()},
            "calibration": {
                m: {str(k): c.to_json() for k, c in v.items()} for m, v in self.calibration.items()
            },
            "n_calib_questions": self.n_calib_questions,
            "n_test_questions": self.n_test_questions,
            "n_text_questions": self.n_text_questions,
            "summaries": [r.to_json() for r in self.summaries],
            "curves": [c.to_json() for c in self.curves],
            "equal_kl": [e.to_json() for e in self.equal_kl],
            "activation_eval": None if self.activation is None else self.activation.to_json(),
            "text_eval": None if self.text is None else self.text.to_json(),
            "timings": self.timings,
            "capability": [r.to_json() for r in self.capability_rows()],
            "capability_eval": None if self.capability is None else self.capability.to_json(),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ComparisonResult:
        """Rebuild a result from its JSON (e.g. ``report.json``), **recomputing** the summaries,
        curves and equal-KL rows from the stored per-question records with this version's code.

        Everything is checked first (:func:`check_records`): the settings by
        :meth:`ComparisonConfig.validate`, the label lists of every stage against the plan's, and
        the records' shapes, question indices and probabilities. A damaged or edited record
        raises :class:`~ks_lens.errors.StoreError` (or the settings' ``ConfigError``) naming it.
        """
        if not isinstance(d, Mapping):
            raise StoreError(f"a comparison result is a JSON object, got {type(d).__name__}")
        try:
            config = ComparisonConfig.from_json(d["comparison_config"])
            plan = ComparisonPlan.from_json(d["plan"])
            calibration = {
                m: {int(k): Calibration.from_json(c) for k, c in v.items()}
                for m, v in d["calibration"].items()
            }
            act = (
                None
                if d.get("activation_eval") is None
                else ActivationEvaluation.from_json(d["activation_eval"])
            )
            text = None if d.get("text_eval") is None else TextEvaluation.from_json(d["text_eval"])
            n_calib, n_test = int(d["n_calib_questions"]), int(d["n_test_questions"])
            n_text = int(d.get("n_text_questions", 0))
            timings = {str(k): float(v) for k, v in dict(d.get("timings", {})).items()}
            cap = d.get("capability_eval")
            capability = None if cap is None else CapabilityEvaluation.from_json(cap)
        except KsLensError:
            raise
        except KeyError as e:
            raise StoreError(f"the result has no field {e}; it is damaged or incomplete") from None
        except (TypeError, ValueError, AttributeError, IndexError) as e:
            raise StoreError(f"the result has a malformed record ({e})") from None
        if "labels" in d and list(d["labels"]) != list(plan.labels):
            raise StoreError(f"labels {d['labels']} differ from the plan's {list(plan.labels)}")
        check_records(config, plan, calibration, act, text, capability)
        summaries = summarise_activations(act, config) if act is not None else []
        curves: list[CurvePoint] = []
        equal: list[EqualKL] = []
        if text is not None:
            summaries += summarise_text(text, config)
            curves, equal = trade_off(text, config)
        return cls(
            config,
            plan,
            calibration,
            act,
            text,
            summaries,
            curves,
            equal,
            n_calib,
            n_test,
            n_text,
            timings,
            capability,
        )


def _check_probs(values: Any, k: int, what: str) -> None:
    p = np.asarray(values, dtype=float)
    if p.shape[-1:] != (k,):
        raise StoreError(f"{what} has {p.shape[-1:] or 'no'} values per row; expected {k} (labels)")
    bad = ~((p >= 0) & (p <= 1))
    if bad.any():
        raise StoreError(f"{what} holds {float(p[bad].flat[0])}, not a probability in [0, 1]")


def _check_alphas(
    alphas: Mapping[str, Mapping[int, Any]], config: ComparisonConfig, what: str
) -> None:
    if set(alphas) != set(config.methods):
        raise StoreError(
            f"{what} has methods {sorted(alphas)}; the settings name {list(config.methods)}"
        )
    for m, v in alphas.items():
        missing = set(config.sizes) - set(v)
        if missing:
            raise StoreError(f"{what} of {m!r} has no alpha for k={sorted(missing)}")


def _check_text_records(te: TextEvaluation, config: ComparisonConfig, plan: ComparisonPlan) -> None:
    if te.cells != plan.gen_cells:
        raise StoreError("text_eval.cells differ from the plan's gen_cells")
    _check_alphas(te.alphas, config, "text_eval.alphas")
    if 1.0 not in te.factors:
        raise StoreError(f"text_eval.factors {list(te.factors)} lack 1.0 (the calibrated alpha)")
    n, k = len(te.questions), len(te.labels)
    if n == 0:
        raise StoreError("text_eval has no questions")
    for i, a in enumerate(te.answers):
        where = f"text_eval.answers[{i}]"
        if not 0 <= a.question < n:
            raise StoreError(f"{where} refers to question {a.question}; there are {n} questions")
        if a.method not in ("unsteered", INSTRUCTED) and a.method not in te.alphas:
            raise StoreError(f"{where} has method {a.method!r}, not one of {list(te.alphas)}")
        if any(t not in te.labels for t in a.targets):
            raise StoreError(f"{where} has targets {list(a.targets)} outside {list(te.labels)}")
        _check_probs(a.text_probs, k, f"{where}.text_probs")
        if "text_activation" in te.lenses:
            if a.act_probs is None:
                raise StoreError(
                    f"{where} has no act_probs, but the lenses include text_activation"
                )
            _check_probs(a.act_probs, k, f"{where}.act_probs")
    unsteered = [a.question for a in te.answers if a.method == "unsteered"]
    if sorted(unsteered) != list(range(n)):
        missing = sorted(set(range(n)) - set(unsteered))
        raise StoreError(
            f"text_eval.answers need one unsteered answer per question (0..{n - 1}); found "
            f"{len(unsteered)} for {n} questions" + (f", none for {missing}" if missing else "")
        )
    asked = [(a.question, a.targets) for a in te.answers if a.method == INSTRUCTED]
    want = [(c.question, c.targets) for c in te.cells] if config.instructed else []
    if asked != want:
        raise StoreError(
            f"text_eval.answers hold {len(asked)} instructed answers; the settings "
            + (
                f"(instructed) need one per cell, in the plan's order ({len(want)})"
                if config.instructed
                else "(instructed false) allow none"
            )
        )


def _check_instructed_probs(act: ActivationEvaluation, config: ComparisonConfig) -> None:
    if (act.instructed is not None) != config.instructed:
        state = "missing; the settings ask for" if config.instructed else "present; the settings omit"
        raise StoreError(f"activation_eval.instructed is {state} the instructed reference row")
    if act.instructed is not None:
        ins = act.instructed
        if len(ins) != len(act.combos) or any(p.shape != act.base.shape for p in ins):
            raise StoreError(
                f"activation_eval.instructed must hold one {list(act.base.shape)} array per "
                "combination"
            )
        _check_probs(np.stack(ins), len(act.labels), "activation_eval.instructed")


def check_records(
    config: ComparisonConfig,
    plan: ComparisonPlan,
    calibration: Mapping[str, Mapping[int, Calibration]],
    act: ActivationEvaluation | None,
    text: TextEvaluation | None,
    capability: CapabilityEvaluation | None = None,
) -> None:
    """Refuse stored records that do not agree with each other or with the settings (an edited or
    damaged ``report.json``): the settings (:meth:`ComparisonConfig.validate` on the plan's
    labels), every stage's labels against the plan's (reordered labels would swap results),
    methods, alphas, question indices, shapes and probabilities."""
    labels = list(plan.labels)
    config.validate(labels)
    if tuple(plan.avoid) != tuple(config.avoid):
        raise StoreError(
            f"plan.avoid {list(plan.avoid)} differs from the settings' {list(config.avoid)}"
        )
    for c in [*plan.act_combos, *(cell.targets for cell in (*plan.calib_cells, *plan.gen_cells))]:
        if not c or any(t not in labels for t in c):
            raise StoreError(f"the plan has a combination {list(c)} outside the labels {labels}")
    _check_alphas(calibration, config, "calibration")
    for what, stage in (("activation_eval", act), ("text_eval", text)):
        if stage is not None and list(stage.labels) != labels:
            raise StoreError(
                f"{what}.labels {list(stage.labels)} differ from the plan's {labels} (the same "
                "labels in the same order are required: reordered labels swap the results)"
            )
    if act is not None:
        if act.combos != plan.act_combos:
            raise StoreError("activation_eval.combos differ from the plan's act_combos")
        _check_alphas(act.alphas, config, "activation_eval.alphas")
        if act.base.ndim != 2 or len(act.base) == 0:
            raise StoreError(
                f"activation_eval.base must be [questions, labels], got shape {act.base.shape}"
            )
        _check_probs(act.base, len(labels), "activation_eval.base")
        if set(act.probs) != set(config.methods):
            raise StoreError(
                f"activation_eval.probs has methods {sorted(act.probs)}; expected {list(config.methods)}"
            )
        for m, ps in act.probs.items():
            if len(ps) != len(act.combos) or any(p.shape != act.base.shape for p in ps):
                raise StoreError(
                    f"activation_eval.probs[{m!r}] must hold one {list(act.base.shape)} array per combination"
                )
            _check_probs(np.stack(ps), len(labels), f"activation_eval.probs[{m!r}]")
        _check_instructed_probs(act, config)
    if text is not None:
        _check_text_records(text, config, plan)
    if capability is not None:
        alphas = {m: {k: c.alpha for k, c in v.items()} for m, v in calibration.items()}
        check_capability(
            capability,
            methods=config.methods,
            sizes=config.sizes,
            labels=labels,
            avoid=config.avoid,
            alphas=alphas,
        )


# ----------------------------------------------------------------------------- 3. activations


def evaluate_activations(
    model: Model,
    methods: dict[str, Steerer],
    alphas: dict[str, dict[int, float]],
    plan: ComparisonPlan,
    questions: Sequence[str],
    evaluator: Probe,
    config: ComparisonConfig,
    *,
    progress: bool = True,
    instructions: Mapping[str, str] | None = None,
) -> ActivationEvaluation:
    """Steer every test question toward every planned combination (each method at its
    calibrated alpha) and read the held-out evaluator in the same forward pass; with
    ``config.instructed``, also read it on every question asked for every combination by system
    prompt (``instructions``: label -> instruction, see :mod:`ks_lens.instructed`)."""
    systems = _instructed_systems(config, instructions, plan, plan.act_combos)
    base = readout(model, questions, probe=evaluator, batch_size=config.batch_size).probs
    names = list(methods)
    # every (combination, method) at once: the unsteered layers below the steering run once
    groups: list[Steering | None] = [
        (methods[m], SteeringSpec(c, plan.avoid, alphas[m][len(c)]))
        for c in plan.act_combos
        for m in names
    ]
    outs = readout_groups(
        model,
        questions,
        groups,
        probe=evaluator,
        positions=config.positions,
        batch_size=config.batch_size,
        progress=progress,
        desc="activation eval",
    )
    probs: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    for g, r in enumerate(outs):
        probs[names[g % len(names)]].append(r.probs.double().numpy())
    ins = (
        instructed_readout(model, questions, systems, evaluator, batch_size=config.batch_size)
        if systems is not None
        else None
    )
    return ActivationEvaluation(
        tuple(evaluator.label_names),
        list(plan.act_combos),
        {m: dict(v) for m, v in alphas.items()},
        base.double().numpy(),
        probs,
        ins,
    )


def _instructed_systems(
    config: ComparisonConfig,
    instructions: Mapping[str, str] | None,
    plan: ComparisonPlan,
    combos: Sequence[tuple[str, ...]],
) -> list[str] | None:
    """The instructed row's system prompt for each of ``combos`` (``None`` without the row)."""
    if not config.instructed:
        return None
    if instructions is None:
        raise ConfigError(
            "the instructed reference row (ComparisonConfig.instructed) needs the labels' "
            "instructions (instructions=, e.g. BehaviourDataset.instructions); or set instructed "
            "to false"
        )
    check_instructions(instructions, plan.labels)
    return [instructed_system(instructions, c) for c in combos]


# ----------------------------------------------------------------------------- 4. text


def evaluate_text(
    model: Model,
    methods: dict[str, Steerer],
    alphas: dict[str, dict[int, float]],
    plan: ComparisonPlan,
    questions: Sequence[str],
    text_evaluator: TextScorer,
    config: ComparisonConfig,
    *,
    response_evaluator: Probe | None = None,
    instructions: Mapping[str, str] | None = None,
) -> TextEvaluation:
    """Answer the test questions unsteered and, for every planned cell, with every method at
    ``alpha * factor`` for each of ``curve_factors``; score every answer. With
    ``config.instructed``, every cell is also answered unsteered under the system prompt that
    asks for its targets (``instructions``: label -> instruction; :mod:`ks_lens.instructed`).

    All rows share generation batches. Each answer (instructed ones too) is re-encoded after its
    question without instruction under the unsteered model (KL per token along the answer,
    perplexity, response-activation evaluator) and scored by the text evaluator and the style
    meters.
    """
    labels = tuple(text_evaluator.label_names)
    if list(labels) != list(plan.labels):
        raise ConfigError(
            f"the text evaluator's labels {list(labels)} differ from the comparison's {list(plan.labels)}"
        )
    configs: list[Steering | None] = [None]
    meta: list[tuple[str, float, float, tuple[str, ...]]] = [("unsteered", 0.0, 0.0, ())]
    rows: list[tuple[int, int]] = [(0, i) for i in range(len(questions))]
    for m, steerer in methods.items():
        for f in config.curve_factors:
            for c in plan.gen_cells:
                a = alphas[m][len(c.targets)] * f
                configs.append((steerer, SteeringSpec(c.targets, plan.avoid, a)))
                meta.append((m, f, a, c.targets))
                rows.append((len(configs) - 1, c.question))
    systems: list[str | None] = [None] * len(rows)
    row_meta = [g for g, _ in rows]  # each row's entry of ``meta``
    cell_systems = _instructed_systems(
        config, instructions, plan, [c.targets for c in plan.gen_cells]
    )
    for c, system in zip(plan.gen_cells, cell_systems or [], strict=False):
        # unsteered (configuration 0), asked for the cell's targets by system prompt
        row_meta.append(len(meta))
        meta.append((INSTRUCTED, 0.0, 0.0, c.targets))
        rows.append((0, c.question))
        systems.append(system)
    scores: GenerationScores = generate_and_score_rows(
        model,
        questions,
        configs,
        rows,
        response_probe=response_evaluator,
        positions=config.positions,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.gen_batch_size,
        seed=config.seed,
        systems=systems,
    )
    text_p = np.asarray(text_evaluator.predict_proba(scores.texts), dtype=float)
    answers = []
    for r, (_, q) in enumerate(rows):
        m, f, a, targets = meta[row_meta[r]]
        answers.append(
            Answer(
                m,
                q,
                targets,
                f,
                a,
                scores.texts[r],
                len(scores.answer_ids[r]),
                scores.kl[r],
                scores.nll[r],
                config.degenerate.reason(scores.texts[r]),
                text_p[r].tolist(),
                scores.probs[r].tolist() if response_evaluator is not None else None,
                style_meters(scores.texts[r]).to_json(),
            )
        )
    lenses = ("text", "text_activation") if response_evaluator is not None else ("text",)
    return TextEvaluation(
        labels,
        list(questions),
        list(plan.gen_cells),
        {m: dict(v) for m, v in alphas.items()},
        tuple(config.curve_factors),
        answers,
        lenses,
    )


# ----------------------------------------------------------------------------- summaries


@dataclass
class _CellScores:
    """Per-cell arrays for one method (or unsteered) under one lens, aligned with a cell list."""

    question: np.ndarray  # [c] question index of each cell
    target: np.ndarray  # [c, k] target probabilities
    base: np.ndarray  # [c, k] unsteered target probabilities
    kl: np.ndarray | None = None  # [c]
    degenerate: np.ndarray | None = None  # [c] bool


def _per_question(values: np.ndarray, question: np.ndarray, n: int) -> np.ndarray:
    """Mean of ``values`` (one per cell) per question; NaN for questions without cells."""
    out = np.full(n, np.nan)
    for q in range(n):
        sel = question == q
        if sel.any():
            v = values[sel]
            v = v[np.isfinite(v)]
            out[q] = v.mean() if len(v) else np.nan
    return out


def normalised_gain(p: np.ndarray, p0: np.ndarray) -> np.ndarray:
    """Share of the available room moved: ``(p - p0) / (1 - p0)`` for a rise and
    ``(p - p0) / p0`` for a fall, so the gain lies in [-1, 1] (0 where ``p == p0``)."""
    p, p0 = np.asarray(p, dtype=float), np.asarray(p0, dtype=float)
    up = (p - p0) / np.clip(1 - p0, 1e-9, None)
    down = (p - p0) / np.clip(p0, 1e-9, None)
    return np.where(p >= p0, up, down)


def _summary_row(
    lens: str,
    method: str,
    k: int,
    alpha: float,
    cs: _CellScores,
    n: int,
    config: ComparisonConfig,
    baseline: _CellScores | None,
) -> SummaryRow:
    seed = config.seed
    nr = config.n_resamples
    mean_t = cs.target.mean(1)
    min_t = cs.target.min(1)
    gain = normalised_gain(cs.target, cs.base).mean(1)
    pq = _per_question(mean_t, cs.question, n)
    row = SummaryRow(
        lens,
        method,
        k,
        alpha,
        int(np.isfinite(pq).sum()),
        len(mean_t),
        bootstrap_mean(pq, seed=seed, n_resamples=nr),
        bootstrap_mean(_per_question(min_t, cs.question, n), seed=seed, n_resamples=nr),
        bootstrap_mean(_per_question(gain, cs.question, n), seed=seed, n_resamples=nr),
    )
    vanished: np.ndarray | None = (
        np.asarray(config.vanish.vanished(cs.target).any(1), dtype=bool) if k >= 2 else None
    )
    if vanished is not None and method != "unsteered":
        row.vanish_rate = bootstrap_mean(
            _per_question(vanished.astype(float), cs.question, n), seed=seed, n_resamples=nr
        )
        row.n_vanished = int(vanished.sum())
    if baseline is not None and method not in ("unsteered", config.baseline):
        row.diff_vs_baseline = paired_difference(
            pq,
            _per_question(baseline.target.mean(1), baseline.question, n),
            seed=seed,
            n_resamples=nr,
        )
        _check_paired(cs, baseline)
        row.diff_test = clustered_paired_test(
            mean_t, baseline.target.mean(1), cs.question, seed=seed, n_resamples=nr
        )
        if vanished is not None:
            base_gone = np.asarray(config.vanish.vanished(baseline.target).any(1), dtype=bool)
            row.vanish_test = mcnemar(vanished, base_gone)
            row.vanish_cluster_test = clustered_paired_test(
                vanished, base_gone, cs.question, seed=seed, n_resamples=nr
            )
    if cs.kl is not None:
        row.kl = bootstrap_mean(_per_question(cs.kl, cs.question, n), seed=seed, n_resamples=nr)
    if cs.degenerate is not None:
        row.n_degenerate = int(cs.degenerate.sum())
        row.degenerate_rate = float(cs.degenerate.mean()) if len(cs.degenerate) else float("nan")
    return row


def _check_paired(cs: _CellScores, baseline: _CellScores) -> None:
    """Paired tests need the method's and the baseline's cells in the same (question) order."""
    if cs.question.shape != baseline.question.shape or not np.array_equal(
        cs.question, baseline.question
    ):
        raise ConfigError(
            f"cannot pair {len(cs.question)} cells with the baseline's {len(baseline.question)}: "
            "they answer other questions or combinations"
        )


def _activation_cells(
    ev: ActivationEvaluation, idx: Sequence[int], probs: Sequence[np.ndarray] | None
) -> _CellScores:
    """Cells (question x combination ``idx``) of one method (``None``: unsteered)."""
    labels = list(ev.labels)
    n = ev.base.shape[0]
    q, t, b = [], [], []
    for j in idx:
        ti = [labels.index(x) for x in ev.combos[j]]
        p = ev.base if probs is None else probs[j]
        q.append(np.arange(n))
        t.append(p[:, ti])
        b.append(ev.base[:, ti])
    return _CellScores(np.concatenate(q), np.concatenate(t), np.concatenate(b))


def summarise_activations(ev: ActivationEvaluation, config: ComparisonConfig) -> list[SummaryRow]:
    """Summary rows of the activation-level evaluation (lens ``"activation"``)."""
    n = ev.base.shape[0]
    out: list[SummaryRow] = []
    for k in config.sizes:
        idx = [j for j, c in enumerate(ev.combos) if len(c) == k]
        if not idx:
            continue

        base_p = ev.probs.get(config.baseline)
        base_cs = _activation_cells(ev, idx, base_p) if base_p is not None else None
        out.append(
            _summary_row(
                "activation", "unsteered", k, 0.0, _activation_cells(ev, idx, None), n, config, None
            )
        )
        ins = _activation_cells(ev, idx, ev.instructed) if ev.instructed is not None else None
        if ins is not None:
            out.append(_summary_row("activation", INSTRUCTED, k, 0.0, ins, n, config, base_cs))
        for m in ev.probs:
            cs = _activation_cells(ev, idx, ev.probs[m])
            row = _summary_row("activation", m, k, ev.alphas[m][k], cs, n, config, base_cs)
            _add_instructed_fraction(row, cs, ins, n, config)
            out.append(row)
    return out


def _add_instructed_fraction(
    row: SummaryRow,
    cs: _CellScores,
    instructed: _CellScores | None,
    n: int,
    config: ComparisonConfig,
) -> None:
    """Set ``row``'s share of the instructed gain, on the questions both rows answered."""
    if instructed is None:
        return
    _check_paired(cs, instructed)
    pm = _per_question(cs.target.mean(1), cs.question, n)
    pu = _per_question(cs.base.mean(1), cs.question, n)
    pi = _per_question(instructed.target.mean(1), instructed.question, n)
    ok = np.isfinite(pm) & np.isfinite(pu) & np.isfinite(pi)
    pm_ok = pm[ok]
    row.instructed_fraction, row.instructed_note = instructed_fraction(
        lambda idx: float(pm_ok[idx].mean()),
        pu[ok],
        pi[ok],
        seed=config.seed,
        n_resamples=config.n_resamples,
    )


def _text_cells(
    te: TextEvaluation, lens: str, method: str, factor: float, k: int
) -> _CellScores | None:
    """The ``k``-target cells of one method at one alpha factor under one text lens; for
    ``"unsteered"``, each cell is scored on its question's unsteered answer."""
    labels = list(te.labels)
    key = "text_probs" if lens == "text" else "act_probs"
    unsteered = {a.question: a for a in te.answers if a.method == "unsteered"}
    if method == "unsteered":
        cells = [(unsteered[c.question], c.targets) for c in te.cells if len(c.targets) == k]
    else:
        cells = [
            (a, a.targets)
            for a in te.answers
            if a.method == method and a.factor == factor and len(a.targets) == k
        ]
        if not cells:
            return None

    def probs(a: Answer, targets: tuple[str, ...]) -> list[float]:
        p = getattr(a, key)
        return [p[labels.index(t)] for t in targets]

    return _CellScores(
        np.array([a.question for a, _ in cells], dtype=int),
        np.array([probs(a, t) for a, t in cells], dtype=float),
        np.array([probs(unsteered[a.question], t) for a, t in cells], dtype=float),
        np.array([a.kl for a, _ in cells], dtype=float),
        np.array([a.degenerate is not None for a, _ in cells]),
    )


def summarise_text(te: TextEvaluation, config: ComparisonConfig) -> list[SummaryRow]:
    """Summary rows at the calibrated alpha (factor 1) for each text lens."""
    n = len(te.questions)
    out: list[SummaryRow] = []
    for lens in te.lenses:
        for k in config.sizes:
            base_cs = _text_cells(te, lens, config.baseline, 1.0, k)
            un = _text_cells(te, lens, "unsteered", 1.0, k)
            if un is None or base_cs is None:
                continue
            out.append(_summary_row(lens, "unsteered", k, 0.0, un, n, config, None))
            ins = _text_cells(te, lens, INSTRUCTED, 0.0, k)
            if ins is not None:
                row = _summary_row(lens, INSTRUCTED, k, 0.0, ins, n, config, base_cs)
                row.perplexity = _perplexity(
                    [a for a in te.answers if a.method == INSTRUCTED and len(a.targets) == k]
                )
                out.append(row)
            for m in te.alphas:
                cs = _text_cells(te, lens, m, 1.0, k)
                if cs is None:
                    continue
                row = _summary_row(lens, m, k, te.alphas[m][k], cs, n, config, base_cs)
                row.perplexity = _perplexity(
                    [
                        a
                        for a in te.answers
                        if a.method == m and a.factor == 1.0 and len(a.targets) == k
                    ]
                )
                _add_instructed_fraction(row, cs, ins, n, config)
                out.append(row)
    return out


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


def summarise_combinations(
    te: TextEvaluation, config: ComparisonConfig, lens: str = "text"
) -> list[CombinationRow]:
    """:class:`CombinationRow` per method (unsteered first) and combination of ``te.cells``
    under one text lens, at the calibrated alpha (factor 1)."""
    labels = list(te.labels)
    key = "text_probs" if lens == "text" else "act_probs"
    unsteered = {a.question: a for a in te.answers if a.method == "unsteered"}
    groups: dict[tuple[str, tuple[str, ...]], list[Answer]] = {}
    for c in te.cells:
        groups.setdefault(("unsteered", c.targets), []).append(unsteered[c.question])
    for a in te.answers:
        if a.method == INSTRUCTED or (a.method != "unsteered" and a.factor == 1.0):
            groups.setdefault((a.method, a.targets), []).append(a)
    order = {m: i for i, m in enumerate(["unsteered", INSTRUCTED, *te.alphas])}

    def rank(g: tuple[tuple[str, tuple[str, ...]], list[Answer]]) -> tuple[int, int, list[int]]:
        m, t = g[0]
        return order[m], len(t), [labels.index(x) for x in t]

    rows = []
    for (m, t), answers in sorted(groups.items(), key=rank):
        p = np.array([[getattr(a, key)[labels.index(x)] for x in t] for a in answers], dtype=float)
        row = CombinationRow(
            lens,
            m,
            t,
            len({a.question for a in answers}),
            len(answers),
            float(p.mean(1).mean()),
            float(p.min(1).mean()),
        )
        if len(t) >= 2:
            gone = config.vanish.vanished(p).any(1)
            row.vanish_rate, row.n_vanished = float(gone.mean()), int(gone.sum())
        rows.append(row)
    return rows


def _perplexity(answers: Sequence[Answer]) -> float:
    tot = sum(a.nll * a.n_tokens for a in answers if a.n_tokens)
    cnt = sum(a.n_tokens for a in answers)
    return math.exp(tot / cnt) if cnt else float("nan")


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
    """Each method's curve (target probability vs measured KL, one point per alpha factor) and
    its value at equal KL, with the paired difference to the baseline at the same KL.

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
            per_method: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
            for m in te.alphas:
                kls, ps, degs = [], [], []
                for f in te.factors:
                    cs = _text_cells(te, lens, m, f, k)
                    if cs is None or cs.kl is None or cs.degenerate is None:
                        break
                    kq = _per_question(cs.kl, cs.question, n)
                    pq = _per_question(cs.target.mean(1), cs.question, n)
                    dq = _per_question(cs.degenerate.astype(float), cs.question, n)
                    kls.append(kq)
                    ps.append(pq)
                    degs.append(dq)
                    curves.append(
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
                    per_method[m] = (np.stack(kls, 1), np.stack(ps, 1), np.stack(degs, 1))
            keep = [
                q
                for q in range(n)
                if all(
                    np.all(np.isfinite(v[0][q])) and np.all(np.isfinite(v[1][q]))
                    for v in per_method.values()
                )
            ]
            keep_idx = np.array(keep, dtype=int)

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
                        partial(
                            _at_level_diff, per_method, keep_idx, m, config.baseline, level=lvl
                        ),
                        seed=config.seed,
                        n_resamples=config.n_resamples,
                    )
                deg = (
                    _at_level(
                        per_method, keep_idx, m, np.arange(len(keep_idx)), lvl, degenerate=True
                    )
                    if len(keep_idx)
                    else math.nan
                )
                equal.append(EqualKL(lens, m, k, lvl, est, deg, diff))
            ref = _instructed_point(te, lens, k, config)
            if ref is not None:
                point, row, pu, pi = ref
                curves.append(point)
                _add_equal_kl_fractions(equal, lens, k, per_method, keep_idx, pu, pi, config)
                equal.append(row)
    return curves, equal


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


# ----------------------------------------------------------------------------- merging runs


def _check_instructed_runs(runs: Mapping[str, ComparisonResult]) -> None:
    """Runs to merge share the instructed reference row (or all lack it): the model is
    deterministic, so equal settings give equal instructed answers and readouts."""
    names = list(runs)
    first = runs[names[0]]
    for n in names[1:]:
        r = runs[n]
        if r.config.instructed != first.config.instructed:
            raise ConfigError(
                f"run {n!r} and run {names[0]!r} differ in the instructed reference row "
                "(ComparisonConfig.instructed)"
            )
        a, b = first.activation, r.activation
        if a is not None and b is not None and a.instructed is not None:
            other = b.instructed or []
            same = len(other) == len(a.instructed) and all(
                np.allclose(x, y, atol=1e-6) for x, y in zip(a.instructed, other, strict=True)
            )
            if not same:
                raise ConfigError(f"run {n!r} has other instructed readouts than {names[0]!r}")
        if first.text is not None and r.text is not None:
            mine = [x.text for x in first.text.answers if x.method == INSTRUCTED]
            theirs = [x.text for x in r.text.answers if x.method == INSTRUCTED]
            if mine != theirs:
                raise ConfigError(
                    f"run {n!r} has other instructed answers than run {names[0]!r}; runs to merge "
                    "need the same model, instructions and generation settings"
                )


def merge_results(
    runs: Mapping[str, ComparisonResult], *, baseline: str, config: ComparisonConfig | None = None
) -> ComparisonResult:
    """Several comparisons of the same plan and questions as one result, each run's methods
    renamed ``"{method}@{run name}"`` (e.g. the same method with probes from two sources, or at
    other positions), so that every method is compared with ``baseline`` (a renamed method,
    e.g. ``"caa_mean@prompt"``) on paired questions.

    The runs must share the plan, the questions and the unsteered answers (the unsteered model
    is deterministic, so equal settings give equal answers; checked). Summaries, curves and the
    equal-KL rows are recomputed for the merged result under ``config`` (default: the first
    run's settings with the merged methods and ``baseline``).
    """
    if not runs:
        raise ConfigError("nothing to merge")
    names = list(runs)
    first = runs[names[0]]
    for n in names[1:]:
        r = runs[n]
        if r.plan.to_json() != first.plan.to_json():
            raise ConfigError(f"run {n!r} has another plan than run {names[0]!r}")
        for what in ("activation", "text"):
            a, b = getattr(first, what), getattr(r, what)
            if (a is None) != (b is None):
                raise ConfigError(f"run {n!r} and run {names[0]!r} differ in their {what} stage")
    methods = [f"{m}@{n}" for n in names for m in runs[n].config.methods]
    if baseline not in methods:
        raise ConfigError(f"the baseline {baseline!r} is not among the merged methods {methods}")
    _check_instructed_runs(runs)
    cfg = replace(
        config or first.config,
        methods=tuple(methods),
        baseline=baseline,
        instructed=first.config.instructed,
    )
    calibration = {f"{m}@{n}": c for n in names for m, c in runs[n].calibration.items()}
    act = None
    if first.activation is not None:
        base = first.activation.base
        probs: dict[str, list[np.ndarray]] = {}
        alphas: dict[str, dict[int, float]] = {}
        for n in names:
            a = runs[n].activation
            assert a is not None
            if a.combos != first.activation.combos or not np.allclose(a.base, base, atol=1e-6):
                raise ConfigError(f"run {n!r} evaluated other activations than {names[0]!r}")
            probs.update({f"{m}@{n}": p for m, p in a.probs.items()})
            alphas.update({f"{m}@{n}": v for m, v in a.alphas.items()})
        act = ActivationEvaluation(
            first.activation.labels,
            first.activation.combos,
            alphas,
            base,
            probs,
            first.activation.instructed,
        )
    text = None
    if first.text is not None:
        unsteered = [a for a in first.text.answers if a.method == "unsteered"]
        # the reference rows are the same in every run (checked): kept once, not renamed
        answers = unsteered + [a for a in first.text.answers if a.method == INSTRUCTED]
        t_alphas: dict[str, dict[int, float]] = {}
        for n in names:
            t = runs[n].text
            assert t is not None
            if t.questions != first.text.questions or t.factors != first.text.factors:
                raise ConfigError(f"run {n!r} answered other questions or alphas than {names[0]!r}")
            own = [a for a in t.answers if a.method == "unsteered"]
            if [a.text for a in own] != [a.text for a in unsteered]:
                raise ConfigError(
                    f"run {n!r} has other unsteered answers than run {names[0]!r}; runs to merge "
                    "need the same model and generation settings"
                )
            answers += [
                replace(a, method=f"{a.method}@{n}")
                for a in t.answers
                if a.method not in ("unsteered", INSTRUCTED)
            ]
            t_alphas.update({f"{m}@{n}": v for m, v in t.alphas.items()})
        text = replace(first.text, alphas=t_alphas, answers=answers)
    summaries = summarise_activations(act, cfg) if act is not None else []
    curves: list[CurvePoint] = []
    equal: list[EqualKL] = []
    if text is not None:
        summaries += summarise_text(text, cfg)
        curves, equal = trade_off(text, cfg)
    timings: dict[str, float] = {}
    for n in names:
        for k, v in runs[n].timings.items():
            # seconds add up; memory (``*_mb``, see ks_lens.memory) is the largest of the runs
            timings[k] = max(timings.get(k, 0.0), v) if k.endswith("_mb") else timings.get(k, 0.0) + v
    caps = {n: runs[n].capability for n in names}
    capability = merge_capability(caps) if all(c is not None for c in caps.values()) else None
    return ComparisonResult(
        cfg,
        first.plan,
        calibration,
        act,
        text,
        summaries,
        curves,
        equal,
        first.n_calib_questions,
        first.n_test_questions,
        first.n_text_questions,
        timings,
        capability,
    )


# ----------------------------------------------------------------------------- all stages


def _capability_systems(
    config: ComparisonConfig, instructions: Mapping[str, str] | None, labels: Sequence[str]
) -> dict[tuple[str, ...], str] | None:
    """The capability stage's instructed system prompt per combination (``None``: no row)."""
    if not config.capability_instructed or instructions is None:
        return None
    pool = [lab for lab in labels if lab not in config.avoid]
    return {c: instructed_system(instructions, c) for c in label_combinations(pool, config.sizes)}


def uses_dct(config: ComparisonConfig) -> bool:
    """Whether ``config`` compares the ``dct`` method (or a variant of it)."""
    return any(m.partition("@")[0] == "dct" for m in config.methods)


def fit_comparison_dct(
    model: Model,
    layer: int,
    calib_questions: Sequence[str],
    evaluator: Probe,
    config: ComparisonConfig,
    *,
    learned: DCTVectors | None = None,
) -> DCTVectors:
    """The ``dct`` method's vectors for a comparison steering at ``layer``: learned on the
    calibration questions with ``config.dct`` (the comparison's seed) and mapped to labels there
    by the held-out ``evaluator`` (:func:`~ks_lens.evaluation.map_dct_labels`); never on test
    questions. ``learned`` gives vectors already learned there (they know no labels, so another
    evaluator can map them again; e.g. a layer sweep's)."""
    if learned is None:
        learned = DCTVectors.fit(
            model, calib_questions, config.dct.config(model, layer, seed=config.seed)
        )
    elif learned.layer != layer:
        raise ConfigError(f"the DCT vectors given sit at layer {learned.layer}, not {layer}")
    mapping = map_dct_labels(
        model, learned, calib_questions, evaluator, batch_size=config.batch_size
    )
    dct = learned.mapped(mapping)
    log.info(f"  {dct!r}: {mapping.table()}")
    return dct


def run_comparison(
    model: Model,
    *,
    probe: Probe,
    vectors: SteeringVectors,
    evaluator: Probe,
    text_evaluator: TextScorer | None,
    layer_probes: Mapping[int, Probe] | None = None,
    response_evaluator: Probe | None = None,
    calib_questions: Sequence[str],
    test_questions: Sequence[str],
    text_questions: Sequence[str] | None = None,
    config: ComparisonConfig | None = None,
    progress: bool = True,
    dct: DCTVectors | None = None,
    linear_probe: Probe | None = None,
    instructions: Mapping[str, str] | None = None,
) -> ComparisonResult:
    """Plan, calibrate, evaluate (activations on ``test_questions``, then text on
    ``text_questions``, default the same), measure capability (``capability_questions`` > 0;
    with ``capability_instructed`` and ``instructions`` given, also under the system prompt that
    asks for each combination, :func:`~ks_lens.instructed.instructed_system`) and
    summarise.

    With the ``dct`` method and no mapped ``dct`` vectors given, they are learned and mapped by
    :func:`fit_comparison_dct`.
    ``linear_probe`` (same labels and hook point as ``probe``) serves ``ksteer_linear``;
    ``instructions`` (label -> instruction, e.g. ``BehaviourDataset.instructions``) the
    ``instructed`` reference row, which ``config.instructed`` asks for."""
    text_questions = list(test_questions if text_questions is None else text_questions)
    config = (config or ComparisonConfig()).validate(probe.label_names)
    labels = tuple(probe.label_names)
    others = {"vectors": vectors.label_names, "evaluator": evaluator.label_names}
    if linear_probe is not None:
        others["linear probe"] = linear_probe.label_names
        if linear_probe.hook_name != probe.hook_name:
            raise ConfigError(
                f"the linear probe reads {linear_probe.hook_name}, the steering probe "
                f"{probe.hook_name}: ksteer_linear steers beside ksteer, at the same hook point"
            )
    if text_evaluator is not None:
        others["text evaluator"] = text_evaluator.label_names
    if response_evaluator is not None:
        others["response evaluator"] = response_evaluator.label_names
    for what, names in others.items():
        if tuple(names) != labels:
            raise ConfigError(
                f"the {what} labels {list(names)} differ from the steering probe's {list(labels)} "
                "(same labels in the same order are required)"
            )
    if evaluator.layer < probe.layer:
        raise ConfigError(
            f"the evaluator (layer {evaluator.layer}) must read at or after the steering layer ({probe.layer})"
        )
    if not calib_questions or not test_questions:
        raise ConfigError("need calibration and test questions")
    plan = plan_comparison(labels, config, n_calib=len(calib_questions), n_test=len(text_questions))
    _instructed_systems(config, instructions, plan, [])  # refuse missing instructions early
    kit = SteeringKit(probe, vectors, dict(layer_probes or {}), linear_probe=linear_probe)
    if kit.layer_probes and max(kit.layer_probes) > evaluator.layer:
        raise ConfigError(
            f"the evaluator (layer {evaluator.layer}) must read at or after every steering layer "
            f"({sorted(kit.layer_probes)})"
        )
    timings: dict[str, float] = {}
    if uses_dct(config):
        t0 = time.perf_counter()
        if dct is None:
            dct = fit_comparison_dct(model, probe.layer, calib_questions, evaluator, config)
        kit = replace(kit, dct=dct)
        timings["dct_fit_s"] = time.perf_counter() - t0
    methods = build_methods(config, kit)

    t0 = time.perf_counter()
    calib = calibrate(model, methods, plan, calib_questions, config)
    timings["calibration_s"] = time.perf_counter() - t0
    record_memory(timings, "calibration")
    alphas = {m: {k: c.alpha for k, c in v.items()} for m, v in calib.items()}

    t0 = time.perf_counter()
    act = evaluate_activations(
        model,
        methods,
        alphas,
        plan,
        test_questions,
        evaluator,
        config,
        progress=progress,
        instructions=instructions,
    )
    summaries = summarise_activations(act, config)
    timings["activation_eval_s"] = time.perf_counter() - t0
    record_memory(timings, "activation_eval")

    text = None
    curves: list[CurvePoint] = []
    equal: list[EqualKL] = []
    if text_evaluator is not None:
        t0 = time.perf_counter()
        log.info(
            f"  text eval: {len(plan.gen_cells)} cells x {len(methods)} methods x "
            f"{len(config.curve_factors)} alphas + {len(text_questions)} unsteered answers"
            + (f" + {len(plan.gen_cells)} instructed answers" if config.instructed else "")
        )
        text = evaluate_text(
            model,
            methods,
            alphas,
            plan,
            text_questions,
            text_evaluator,
            config,
            response_evaluator=response_evaluator,
            instructions=instructions,
        )
        summaries += summarise_text(text, config)
        curves, equal = trade_off(text, config)
        timings["text_eval_s"] = time.perf_counter() - t0
        record_memory(timings, "text_eval")
    capability = None
    if config.capability_questions > 0:
        t0 = time.perf_counter()
        capability = evaluate_capability_stage(
            model,
            methods,
            alphas,
            labels=labels,
            avoid=config.avoid,
            sizes=config.sizes,
            n_questions=config.capability_questions,
            seed=config.seed,
            positions=config.positions,
            instructed=_capability_systems(config, instructions, labels),
        )
        if config.capability_instructed and instructions is None:
            log.info("  capability: no instructions given; no instructed row")
        timings["capability_s"] = time.perf_counter() - t0
        record_memory(timings, "capability")
    return ComparisonResult(
        config,
        plan,
        calib,
        act,
        text,
        summaries,
        curves,
        equal,
        len(calib_questions),
        len(test_questions),
        len(text_questions) if text is not None else 0,
        timings,
        capability,
    )


__all__ = [
    "INSTRUCTED",
    "LINEAR_PROBE_METHODS",
    "METHODS",
    "REFERENCE_METHODS",
    "TEXT_COVERAGES",
    "ActivationEvaluation",
    "Answer",
    "Cell",
    "CombinationRow",
    "ComparisonConfig",
    "ComparisonPlan",
    "ComparisonResult",
    "CurvePoint",
    "EqualKL",
    "MethodDef",
    "SteeringKit",
    "SummaryRow",
    "TextCoverage",
    "TextEvaluation",
    "TextScorer",
    "build_methods",
    "calibrate",
    "check_records",
    "evaluate_activations",
    "evaluate_text",
    "fit_comparison_dct",
    "label_combinations",
    "merge_results",
    "method_description",
    "method_label",
    "plan_comparison",
    "rotate_cells",
    "run_comparison",
    "spread",
    "summarise_activations",
    "summarise_combinations",
    "summarise_text",
    "trade_off",
    "uses_dct",
]
