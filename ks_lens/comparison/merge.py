"""Several comparisons of the same plan and questions merged into one result."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from ks_lens.capability.stage import merge_capability
from ks_lens.comparison.config import ComparisonConfig
from ks_lens.comparison.records import ActivationEvaluation, TextEvaluation
from ks_lens.comparison.result import ComparisonResult, derived_rows
from ks_lens.errors import ConfigError
from ks_lens.evaluation.instructed import INSTRUCTED


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

    The runs must share the plan (its evaluated cells: calibration cells may differ, e.g. a run
    with ``alpha_per="combination"`` beside one per size), the questions and the unsteered
    answers (the unsteered model is deterministic, so equal settings give equal answers;
    checked). Methods calibrated per combination keep their combinations' alphas. Summaries, curves and the
    equal-KL rows are recomputed for the merged result under ``config`` (default: the first
    run's settings with the merged methods and ``baseline``).
    """
    if not runs:
        raise ConfigError("nothing to merge")
    names = list(runs)
    first = runs[names[0]]
    _check_same_plan(runs)
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
    combo = {f"{m}@{n}": c for n in names for m, c in runs[n].combo_calibration.items()}
    act = _merge_activation(runs)
    text = _merge_text(runs)
    summaries, curves, equal = derived_rows(cfg, act, text)
    timings: dict[str, float] = {}
    for n in names:
        for k, v in runs[n].timings.items():
            # seconds add up; memory (``*_mb``, see ks_lens.memory) is the largest of the runs
            timings[k] = (
                max(timings.get(k, 0.0), v) if k.endswith("_mb") else timings.get(k, 0.0) + v
            )
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
        combo,
    )


def _evaluated(plan_json: Mapping[str, Any]) -> dict[str, Any]:
    """A plan's JSON without its calibration cells (what the evaluated records depend on)."""
    return {k: v for k, v in plan_json.items() if k != "calib_cells"}


def _check_same_plan(runs: Mapping[str, ComparisonResult]) -> None:
    """Runs to merge share the plan and have the same stages (activation, text)."""
    names = list(runs)
    first = runs[names[0]]
    for n in names[1:]:
        r = runs[n]
        if _evaluated(r.plan.to_json()) != _evaluated(first.plan.to_json()):
            raise ConfigError(f"run {n!r} has another plan than run {names[0]!r}")
        for what in ("activation", "text"):
            a, b = getattr(first, what), getattr(r, what)
            if (a is None) != (b is None):
                raise ConfigError(f"run {n!r} and run {names[0]!r} differ in their {what} stage")


def _merge_activation(runs: Mapping[str, ComparisonResult]) -> ActivationEvaluation | None:
    """The runs' activation evaluations as one, methods renamed (None without that stage)."""
    names = list(runs)
    first = runs[names[0]]
    if first.activation is None:
        return None
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
    return ActivationEvaluation(
        first.activation.labels,
        first.activation.combos,
        alphas,
        base,
        probs,
        first.activation.instructed,
    )


def _merge_text(runs: Mapping[str, ComparisonResult]) -> TextEvaluation | None:
    """The runs' text evaluations as one: the shared unsteered and instructed answers once,
    every steered answer with its method renamed (None without that stage)."""
    names = list(runs)
    first = runs[names[0]]
    if first.text is None:
        return None
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
    return replace(first.text, alphas=t_alphas, answers=answers)
