"""Stored records checked against each other and the settings (an edited ``report.json``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ks_lens.calibration import Calibration
from ks_lens.capability.stage import CapabilityEvaluation, check_capability
from ks_lens.comparison.config import ComparisonConfig
from ks_lens.comparison.plan import ComparisonPlan
from ks_lens.comparison.records import ActivationEvaluation, TextEvaluation
from ks_lens.errors import StoreError
from ks_lens.evaluation.instructed import INSTRUCTED


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


def _check_combo_calibration(
    combo: Mapping[str, Mapping[tuple[str, ...], Calibration]],
    config: ComparisonConfig,
    plan: ComparisonPlan,
) -> None:
    """Per-combination alphas: for every method with ``alpha_per="combination"`` (for some
    methods of a merged result), an alpha for every combination the stages steer toward."""
    unknown = set(combo) - set(config.methods)
    if unknown:
        raise StoreError(
            f"combo_calibration has methods {sorted(unknown)} the settings do not name"
        )
    if config.alpha_per == "combination" and set(combo) != set(config.methods):
        raise StoreError(
            f"combo_calibration has methods {sorted(combo)}; alpha_per 'combination' needs "
            f"every method of {list(config.methods)}"
        )
    needed = set(plan.evaluated_combos())
    for m, per in combo.items():
        missing = needed - set(per)
        if missing:
            raise StoreError(
                f"combo_calibration of {m!r} has no alpha for the combination(s) "
                f"{sorted(list(c) for c in missing)[:3]}"
            )


def _check_steered_cells(
    te: TextEvaluation, config: ComparisonConfig, plan: ComparisonPlan
) -> None:
    """Each method answers every planned cell at its calibrated alpha (factor 1) and the curve
    cells (:meth:`ComparisonPlan.curve_cells`) at each other factor, each once, in plan order."""
    curve = plan.curve_cells(config.curve_cells_per_question)
    for m in te.alphas:
        for f in te.factors:
            want = [(c.question, c.targets) for c in (plan.gen_cells if f == 1.0 else curve)]
            got = [(a.question, a.targets) for a in te.answers if a.method == m and a.factor == f]
            if got != want:
                raise StoreError(
                    f"text_eval.answers hold {len(got)} answers of {m!r} at alpha factor {f:g}; "
                    f"the plan needs {len(want)}, one per "
                    + ("cell" if f == 1.0 else "curve cell (curve_cells_per_question)")
                )


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
    _check_steered_cells(te, config, plan)


def _check_instructed_probs(act: ActivationEvaluation, config: ComparisonConfig) -> None:
    if (act.instructed is not None) != config.instructed:
        state = (
            "missing; the settings ask for" if config.instructed else "present; the settings omit"
        )
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
    combo_calibration: Mapping[str, Mapping[tuple[str, ...], Calibration]] | None = None,
) -> None:
    """Refuse stored records that do not agree with each other or with the settings (an edited or
    damaged ``report.json``): the settings (:meth:`ComparisonConfig.validate` on the plan's
    labels), every stage's labels against the plan's (reordered labels would swap results),
    methods, alphas (per combination too), question indices, shapes and probabilities."""
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
    _check_combo_calibration(combo_calibration or {}, config, plan)
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
