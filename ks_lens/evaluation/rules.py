"""Judging rules: a target vanished (VanishRule), an answer is degenerate (DegenerateRule)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ks_lens.errors import ConfigError
from ks_lens.evaluation.scoring import distinct_n


def _check_fraction(name: str, value: Any) -> None:
    """Refuse a rule threshold that is not a number in [0, 1] (NaN would silently never fire)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 <= value <= 1:
        raise ConfigError(f"{name} must be a number between 0 and 1, got {value!r}")


@dataclass(frozen=True)
class VanishRule:
    """A target *vanished* on a question when its probability stays below ``floor`` while the
    combination's best target reaches at least ``reach`` (2+ targets only).

    Judged per question on levels, not on question-averaged changes: a target that starts high
    and stays high is not vanished, and a method that moves nothing never triggers the rule.
    """

    floor: float = 0.1  # a target below this probability may have vanished
    reach: float = 0.5  # ... if the combination's best target reaches this probability

    def __post_init__(self) -> None:
        for name in ("floor", "reach"):
            _check_fraction(f"vanish.{name}", getattr(self, name))
        if self.floor > self.reach:
            raise ConfigError(
                f"vanish.floor ({self.floor}) must not exceed vanish.reach ({self.reach}): the "
                "combination's best target would count as vanished itself"
            )

    def vanished(self, target_probs: np.ndarray) -> np.ndarray:
        """``[n, k]`` probabilities of the ``k`` targets -> ``[n, k]`` vanished flags."""
        p = np.asarray(target_probs, dtype=float)
        if p.ndim != 2:
            raise ConfigError(f"target_probs must be [n, k], got shape {p.shape}")
        if p.shape[1] < 2:
            return np.zeros(p.shape, dtype=bool)
        return (p < self.floor) & (p.max(1, keepdims=True) >= self.reach)

    def to_json(self) -> dict[str, Any]:
        return {
            "floor": self.floor,
            "reach": self.reach,
            "definition": f"a target vanished on a question if its probability stayed below {self.floor} "
            f"while the combination's best target reached at least {self.reach} (2+ targets only); "
            "the rate is over question x combination cells",
        }


@dataclass(frozen=True)
class DegenerateRule:
    """An answer is *degenerate* if it is empty, mostly not letters, or heavily repetitive.

    * empty: fewer than ``min_letters`` letters;
    * mostly non-letters: letters are less than ``min_letter_share`` of its non-space characters;
    * repetitive: with at least ``min_words`` words, distinct word bigrams / bigrams below
      ``min_distinct2``, or (at least ``min_chars`` characters) a zlib compression ratio below
      ``min_compression`` (a repeated phrase compresses far better than prose).
    """

    min_letters: int = 2
    min_letter_share: float = 0.5
    min_words: int = 8
    min_distinct2: float = 0.5
    min_chars: int = 60
    min_compression: float = 0.3

    def __post_init__(self) -> None:
        for name in ("min_letters", "min_words", "min_chars"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(
                    f"degenerate.{name} must be a non-negative whole number, got {v!r}"
                )
        for name in ("min_letter_share", "min_distinct2", "min_compression"):
            _check_fraction(f"degenerate.{name}", getattr(self, name))

    def reason(self, text: str) -> str | None:
        """Why ``text`` is degenerate (``"empty"``, ``"non-letters"``, ``"repetition"``), or None."""
        chars = [c for c in text if not c.isspace()]
        letters = sum(c.isalpha() for c in chars)
        if letters < self.min_letters:
            return "empty"
        if letters < self.min_letter_share * len(chars):
            return "non-letters"
        if len(text.split()) >= self.min_words and distinct_n(text) < self.min_distinct2:
            return "repetition"
        raw = text.encode()
        if (
            len(raw) >= self.min_chars
            and len(zlib.compress(raw, 9)) / len(raw) < self.min_compression
        ):
            return "repetition"
        return None

    def is_degenerate(self, text: str) -> bool:
        return self.reason(text) is not None

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: getattr(self, k) for k in self.__dataclass_fields__},
            "definition": f"empty (< {self.min_letters} letters), mostly non-letters (letters < "
            f"{self.min_letter_share:.0%} of non-space characters), or repetitive (distinct word bigrams < "
            f"{self.min_distinct2} with >= {self.min_words} words, or zlib compression ratio < "
            f"{self.min_compression} with >= {self.min_chars} characters)",
        }
