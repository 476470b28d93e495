"""The reference comparison: unsteered vs CAA vs K-Steering over 1-, 2- and 3-label combinations.

Four stages, each a function, each returning typed records:

1. :func:`plan_comparison` -> :class:`ComparisonPlan`: which combinations are evaluated at the
   activation level, and which (question, combination) *cells* are calibrated on and answered
   in text. Every question gets combinations of every size, rotating so that each combination
   is used about equally often (``text_coverage="all-combinations"``: every combination on at
   least ``min_questions_per_combination`` questions, :mod:`ks_lens.datasets.coverage`).
2. :func:`calibrate` -> per method and number of targets, the largest alpha whose greedy answers
   to the **calibration** questions stay within a KL budget (nats per token) with at most
   ``max_degenerate_rate`` degenerate answers; with ``alpha_per="combination"``
   (:func:`calibrate_combinations`), per method and target combination, each combination
   steered at its own alpha downstream (:func:`alpha_of`).
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
bootstrap interval over questions (:mod:`ks_lens.evaluation.stats`), every method is compared
with the baseline (``caa_mean``) by a paired interval, and target probabilities and vanishing by
paired tests clustered by question (a question's cells are one unit: bootstrap interval and
sign-flip permutation test over questions).

Methods are looked up by name in :data:`METHODS`; the reference set is ``caa_mean``,
``caa_sum``, ``ksteer``, ``ksteer_precond`` (the step in the probe's input geometry, chosen on
validation questions over the raw step) and ``ksteer_linear`` (K-Steering with a linear
probe). Beside them, ``ComparisonConfig.instructed`` adds the ``instructed`` reference row: the
model asked for the targets by system prompt, no steering (:mod:`ks_lens.evaluation.instructed`).
"""

from ks_lens.comparison.calibration import (
    alpha_of,
    build_methods,
    calibrate,
    calibrate_combinations,
)
from ks_lens.comparison.checks import check_records
from ks_lens.comparison.config import (
    ALPHA_PERS,
    TEXT_COVERAGES,
    AlphaPer,
    ComparisonConfig,
    TextCoverage,
    TextScorer,
    method_description,
    method_label,
    spread,
)
from ks_lens.comparison.curves import trade_off
from ks_lens.comparison.merge import merge_results
from ks_lens.comparison.plan import Cell, ComparisonPlan, plan_comparison, rotate_cells
from ks_lens.comparison.records import (
    ActivationEvaluation,
    Answer,
    CombinationRow,
    CurvePoint,
    EqualKL,
    SummaryRow,
    TextEvaluation,
)
from ks_lens.comparison.result import ComparisonResult
from ks_lens.comparison.run import fit_comparison_dct, run_comparison, uses_dct
from ks_lens.comparison.stages import evaluate_activations, evaluate_text
from ks_lens.comparison.summary import normalised_gain as normalised_gain  # public, not in __all__
from ks_lens.comparison.summary import summarise_activations, summarise_combinations, summarise_text
from ks_lens.datasets.coverage import label_combinations
from ks_lens.evaluation.instructed import INSTRUCTED
from ks_lens.steering.registry import (
    LINEAR_PROBE_METHODS,
    METHODS,
    REFERENCE_METHODS,
    TOKEN_PROBE_METHODS,
    MethodDef,
    SteeringKit,
)

__all__ = [
    "ALPHA_PERS",
    "INSTRUCTED",
    "LINEAR_PROBE_METHODS",
    "METHODS",
    "REFERENCE_METHODS",
    "TEXT_COVERAGES",
    "TOKEN_PROBE_METHODS",
    "ActivationEvaluation",
    "AlphaPer",
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
    "alpha_of",
    "build_methods",
    "calibrate",
    "calibrate_combinations",
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
