"""Evaluator options: :class:`TextEvaluatorConfig`, the artefact constants and the word count."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ks_lens.errors import ConfigError
from ks_lens.utils import check_seed

#: the artefact name (:mod:`ks_lens.io`): ``meta.json`` says ``"format": "ks_lens.text_evaluator"``
ARTEFACT = "text_evaluator"
FORMAT = f"ks_lens.{ARTEFACT}"
CACHE_SUBDIR = "text_evaluators"
#: a text with more than this many times the words of the longest training text is "far longer"
LONG_TEXT_FACTOR = 2


class LongTextWarning(UserWarning):
    """Texts far longer than any the evaluator was trained on: its scores on them are
    extrapolations (long texts pile up n-gram evidence, so they tend towards 0 or 1)."""


def n_words(text: str) -> int:
    """Words in ``text`` (white-space separated), the unit of the evaluator's length checks."""
    return len(text.split())


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TextEvaluatorConfig:
    """Hyper-parameters of :class:`TextEvaluator` (defaults chosen by grouped CV on gold texts).

    Attributes:
        word_ngram_range: ``(min_n, max_n)`` of the word TF-IDF n-grams.
        char_ngram_range: ``(min_n, max_n)`` of the ``char_wb`` TF-IDF n-grams.
        min_df: drop n-grams seen in fewer training texts than this.
        sublinear_tf: use ``1 + log(tf)`` instead of raw counts.
        max_features: keep at most this many n-grams per vectorizer (most frequent first);
            ``None`` keeps all.
        C: inverse L2-regularisation strength of each per-label logistic regression.
        use_style: append the standardised :mod:`ks_lens.evaluation.style` meters to the features.
        style_weight: factor on the standardised style meters (their scale relative to the
            L2-normalised TF-IDF blocks).
        class_weight: ``"balanced"`` (re-weight positives and negatives per label) or ``None``.
        prefix_words: also train on the first ``prefix_words`` words of every longer
            single-label training text, with its label (``None``: off; :func:`prefix_views`). Generated answers are often cut at a
            token limit; without these views a cut-off answer reads as "short" and so as
            concise. Held-out validity is always measured on the complete texts.
        max_iter: L-BFGS iteration limit.
        seed: ``random_state`` of the solver (L-BFGS is deterministic; recorded for provenance).
    """

    word_ngram_range: tuple[int, int] = (1, 2)
    char_ngram_range: tuple[int, int] = (2, 5)
    min_df: int = 2
    sublinear_tf: bool = True
    max_features: int | None = 50_000
    C: float = 16.0
    use_style: bool = True
    style_weight: float = 0.05
    class_weight: str | None = "balanced"
    prefix_words: int | None = 24
    max_iter: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("word_ngram_range", "char_ngram_range"):
            lo, hi = getattr(self, name)
            if not (1 <= int(lo) <= int(hi)):
                raise ConfigError(f"{name} must be (min_n, max_n) with 1 <= min_n <= max_n")
            object.__setattr__(self, name, (int(lo), int(hi)))
        if self.min_df < 1:
            raise ConfigError("min_df must be >= 1")
        if self.max_features is not None and self.max_features < 1:
            raise ConfigError("max_features must be positive or None")
        if not (self.C > 0 and math.isfinite(self.C)):
            raise ConfigError(f"C must be a positive number, got {self.C}")
        if not (self.style_weight >= 0 and math.isfinite(self.style_weight)):
            raise ConfigError(f"style_weight must be >= 0, got {self.style_weight}")
        check_seed(self.seed)
        if self.class_weight not in ("balanced", None):
            raise ConfigError(f"class_weight must be 'balanced' or None, got {self.class_weight!r}")
        if self.max_iter < 1:
            raise ConfigError("max_iter must be positive")
        if self.prefix_words is not None and self.prefix_words < 1:
            raise ConfigError("prefix_words must be positive or None")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["word_ngram_range"] = list(self.word_ngram_range)
        d["char_ngram_range"] = list(self.char_ngram_range)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TextEvaluatorConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown text-evaluator config fields {sorted(unknown)}")
        kw = dict(d)
        for name in ("word_ngram_range", "char_ngram_range"):
            if name in kw:
                kw[name] = tuple(kw[name])
        return cls(**kw)

    def config_hash(self) -> str:
        """SHA-256 of the config (part of the default evaluator's cache key)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()
