"""A text-level behaviour evaluator (tones, concepts, ...), independent of the steered model.

:class:`TextEvaluator` scores any text for each label (e.g. the six tones, or the six concepts) with
a linear model on surface features, so steered generations can be judged without asking the model
that produced them. Pipeline (scikit-learn):

1. word TF-IDF (uni- and bigrams) and ``char_wb`` TF-IDF (2-5 character n-grams inside word
   boundaries), sublinear TF, L2-normalised rows;
2. optionally the twelve :mod:`ks_lens.evaluation.style` meters, standardised (``StandardScaler``);
3. the blocks stacked side by side and one L2-regularised logistic regression per label
   (``OneVsRestClassifier(LogisticRegression)`` on multi-hot targets), so every label gets an
   independent probability: a text can be both casual and concise, or neither.

Saved evaluators are :mod:`ks_lens.io` artefacts and hold no pickle: ``tensors.safetensors``
(IDF weights, scaler mean/scale, coefficients ``[K, D]`` and intercepts ``[K]``, float64, and each
vectorizer's terms in column order as UTF-8 JSON bytes) and ``meta.json`` (format, labels, config,
training-data hash, versions, validity metrics, the tensor file's SHA-256 and a ``meta_sha256``
over all of it). Loading rebuilds the vectorizers from the vocabularies and computes
``sigmoid(X @ coef.T + intercept)`` itself. Evaluators saved by ks-lens 0.1 (with a
``vocabulary.json``) still load (:mod:`ks_lens.text_evaluator.v1`).

:func:`validate_text_evaluator` measures how well the recipe generalises: question-grouped
K-fold cross-validation (no question's texts on both sides) and leave-one-writer-out (texts by a
writer never seen in training). :func:`default_text_evaluator` trains on a family's shipped gold
texts (tones or concepts) once and caches the result.

Modules: :mod:`~ks_lens.text_evaluator.config` (:class:`TextEvaluatorConfig`, the constants),
:mod:`~ks_lens.text_evaluator.model` (:class:`TextEvaluator`, :func:`prefix_views`),
:mod:`~ks_lens.text_evaluator.validity` (:class:`HeldOutScores`, :class:`TextEvaluatorValidity`,
:func:`held_out_scores`), :mod:`~ks_lens.text_evaluator.crossval` (:func:`cross_val_proba`,
:func:`validate_text_evaluator`) and :mod:`~ks_lens.text_evaluator.default`
(:func:`default_text_evaluator`). Every public name is importable from ``ks_lens.text_evaluator``.
"""

from ks_lens.text_evaluator.config import (
    ARTEFACT,
    CACHE_SUBDIR,
    FORMAT,
    LONG_TEXT_FACTOR,
    LongTextWarning,
    TextEvaluatorConfig,
    n_words,
)
from ks_lens.text_evaluator.crossval import cross_val_proba, validate_text_evaluator
from ks_lens.text_evaluator.default import default_text_evaluator
from ks_lens.text_evaluator.model import TextEvaluator, prefix_views
from ks_lens.text_evaluator.validity import HeldOutScores, TextEvaluatorValidity, held_out_scores

__all__ = [
    "ARTEFACT",
    "CACHE_SUBDIR",
    "FORMAT",
    "LONG_TEXT_FACTOR",
    "HeldOutScores",
    "LongTextWarning",
    "TextEvaluator",
    "TextEvaluatorConfig",
    "TextEvaluatorValidity",
    "cross_val_proba",
    "default_text_evaluator",
    "held_out_scores",
    "n_words",
    "prefix_views",
    "validate_text_evaluator",
]
