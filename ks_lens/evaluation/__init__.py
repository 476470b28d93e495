"""Honest evaluation of steering: held-out evaluators, coherence, vanished targets, alpha calibration.

Principles (see ``docs/evaluation.md``):

* **Evaluators are never optimised against.** They are probes trained on the ``evaluator``
  split (questions the steering probe never saw), with another seed and width than the steering
  probe, at a layer at or after the steering layer.
* **Real forward passes.** The activation-level metric steers neutral prompts with hooks and
  reads the evaluator's layer in the same pass (no feeding the steering layer's vector to a
  classifier trained elsewhere).
* **Generated text.** Steered greedy answers are re-encoded (question + answer, no instruction)
  under the *unsteered* model; a response-level evaluator reads the text's behaviour, and the
  same pass gives perplexity and the per-token KL divergence steered vs unsteered.
* **Matched coherence.** Each method's alpha is the largest whose next-token KL divergence stays
  within a budget on the calibration split (:func:`~ks_lens.calibration.calibrate_alpha`); results are reported on the
  test split.

Modules: :mod:`~ks_lens.evaluation.readouts` (activation level: :func:`readout`,
:func:`readout_groups`, :func:`kl_divergence`), :mod:`~ks_lens.evaluation.scoring` (generation
level: :func:`generate_and_score_rows`, :class:`GenerationScores`),
:mod:`~ks_lens.evaluation.answers` (answers scored after their questions' cached passes:
:class:`QuestionPasses`), :mod:`~ks_lens.evaluation.kl`
(coherence costs: :func:`first_token_kl`, :func:`generation_kl`, :func:`kl_metric`),
:mod:`~ks_lens.evaluation.rules` (:class:`VanishRule`, :class:`DegenerateRule`) and
:mod:`~ks_lens.evaluation.dct` (:func:`map_dct_labels`, :func:`fit_dct`). Every public name of
these is importable from ``ks_lens.evaluation``. Imported from their own modules:
:mod:`~ks_lens.evaluation.stats` (bootstrap intervals and paired tests),
:mod:`~ks_lens.evaluation.style` (the style meters of a text) and
:mod:`~ks_lens.evaluation.instructed` (the ``instructed`` reference row: the targets asked for by
system prompt).
"""

from ks_lens.evaluation.answers import QuestionPasses
from ks_lens.evaluation.dct import fit_dct, map_dct_labels
from ks_lens.evaluation.kl import (
    CALIBRATION_METRICS,
    CalibrationMetric,
    first_token_kl,
    generation_kl,
    kl_metric,
)
from ks_lens.evaluation.readouts import Readout, kl_divergence, readout, readout_groups
from ks_lens.evaluation.rules import DegenerateRule, VanishRule
from ks_lens.evaluation.scoring import (
    GenerationScores,
    distinct_n,
    generate_and_score_groups,
    generate_and_score_rows,
)

__all__ = [
    "CALIBRATION_METRICS",
    "CalibrationMetric",
    "DegenerateRule",
    "GenerationScores",
    "QuestionPasses",
    "Readout",
    "VanishRule",
    "distinct_n",
    "first_token_kl",
    "fit_dct",
    "generate_and_score_groups",
    "generate_and_score_rows",
    "generation_kl",
    "kl_divergence",
    "kl_metric",
    "map_dct_labels",
    "readout",
    "readout_groups",
]
