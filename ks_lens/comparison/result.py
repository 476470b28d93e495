"""A whole comparison's outcome (:class:`ComparisonResult`) and its JSON round trip."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ks_lens.calibration import Calibration
from ks_lens.capability.stage import CapabilityEvaluation, CapabilityRow
from ks_lens.comparison.calibration import ComboCalibration, alpha_of, combo_alphas
from ks_lens.comparison.checks import check_records
from ks_lens.comparison.config import ComparisonConfig, method_description, method_label
from ks_lens.comparison.curves import trade_off
from ks_lens.comparison.plan import ComparisonPlan
from ks_lens.comparison.records import (
    ActivationEvaluation,
    CurvePoint,
    EqualKL,
    SummaryRow,
    TextEvaluation,
)
from ks_lens.comparison.summary import summarise_activations, summarise_text
from ks_lens.errors import KsLensError, StoreError
from ks_lens.evaluation.instructed import INSTRUCTED


def derived_rows(
    config: ComparisonConfig, act: ActivationEvaluation | None, text: TextEvaluation | None
) -> tuple[list[SummaryRow], list[CurvePoint], list[EqualKL]]:
    """What a result derives from its stored records: the summary rows of every lens, the
    trade-off curves and the equal-KL rows (the one place they are computed)."""
    summaries = summarise_activations(act, config) if act is not None else []
    curves: list[CurvePoint] = []
    equal: list[EqualKL] = []
    if text is not None:
        summaries += summarise_text(text, config)
        curves, equal = trade_off(text, config)
    return summaries, curves, equal


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
    # alpha_per "combination": per method, each target combination's calibration; the methods
    # here steer each combination at its own alpha (``calibration`` holds their sizes' medians)
    combo_calibration: ComboCalibration = field(default_factory=dict)

    def capability_rows(self) -> list[CapabilityRow]:
        """The capability stage's accuracies and paired differences vs unsteered (empty: none)."""
        if self.capability is None:
            return []
        return self.capability.rows(n_resamples=self.config.n_resamples)

    @property
    def alphas(self) -> dict[str, dict[int, float]]:
        return {m: {k: c.alpha for k, c in v.items()} for m, v in self.calibration.items()}

    @property
    def combo_alphas(self) -> dict[str, dict[tuple[str, ...], float]]:
        """Per method calibrated per combination, each combination's alpha (else empty)."""
        return combo_alphas(self.combo_calibration)

    def alpha(self, method: str, targets: tuple[str, ...]) -> float:
        """The calibrated alpha ``method`` steers ``targets`` with (its combination's, where the
        method was calibrated per combination; else its size's)."""
        return alpha_of(self.alphas, self.combo_alphas, method, targets)

    def summary(self, lens: str) -> list[SummaryRow]:
        return [r for r in self.summaries if r.lens == lens]

    @property
    def reference_rows(self) -> tuple[str, ...]:
        """The rows beside the methods: ``unsteered``, and ``instructed`` when asked for."""
        return ("unsteered", INSTRUCTED) if self.config.instructed else ("unsteered",)

    def to_json(self) -> dict[str, Any]:
        d = {
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
        if self.combo_calibration:  # only with per-combination alphas: per size reads as before
            d["combo_calibration"] = _combos_to_json(self.combo_calibration)
        return d

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
            combo = _combos_from_json(d.get("combo_calibration") or {})
        except KsLensError:
            raise
        except KeyError as e:
            raise StoreError(f"the result has no field {e}; it is damaged or incomplete") from None
        except (TypeError, ValueError, AttributeError, IndexError) as e:
            raise StoreError(f"the result has a malformed record ({e})") from None
        if "labels" in d and list(d["labels"]) != list(plan.labels):
            raise StoreError(f"labels {d['labels']} differ from the plan's {list(plan.labels)}")
        check_records(config, plan, calibration, act, text, capability, combo)
        summaries, curves, equal = derived_rows(config, act, text)
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
            combo,
        )


def _combos_to_json(combo: ComboCalibration) -> dict[str, list[dict[str, Any]]]:
    """Per method, one entry per combination: its ``targets`` and its calibration."""
    return {
        m: [{"targets": list(t), **c.to_json()} for t, c in v.items()] for m, v in combo.items()
    }


def _combos_from_json(d: Mapping[str, Any]) -> ComboCalibration:
    """Inverse of :func:`_combos_to_json`."""
    return {
        m: {tuple(str(x) for x in e["targets"]): Calibration.from_json(e) for e in v}
        for m, v in d.items()
    }
