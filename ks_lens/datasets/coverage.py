"""Which test questions answer which label combinations at the text level.

:func:`plan_coverage` assigns **every** combination of each size to at least
``min_questions`` distinct test questions, balanced both ways:

* every question gets ``floor`` or ``ceil`` of ``n_cells / n_questions`` combinations of each
  size (so every question still answers every size, as with one combination per size);
* every combination gets ``floor`` or ``ceil`` of ``n_cells / n_combinations`` questions;

where ``n_cells = max(n_combinations * min_questions, n_questions)`` per size. A combination is
therefore never tied to one question (it is answered on several), and a question never answers
the same combination twice. The assignment is deterministic given the seed.

Construction, per size: shuffle the combinations and the questions (seeded), lay the shuffled
combinations end to end until ``n_cells`` slots are filled, and deal consecutive blocks of
``floor`` or ``ceil`` of ``n_cells / n_questions`` slots to the questions in shuffled order. A
block is at most ``n_combinations`` long (since ``n_questions >= min_questions``), so its
combinations are distinct, and two slots of the same combination lie ``n_combinations`` apart,
so they fall in different blocks (distinct questions).

:func:`label_combinations` lists the combinations; :func:`coverage_counts` counts how often
each combination and each question is used.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Sequence

from ks_lens.errors import ConfigError

#: a (question index, target combination) pair of the text level
Assignment = tuple[int, tuple[str, ...]]


def label_combinations(
    labels: Sequence[str], sizes: Sequence[int] = (1, 2, 3)
) -> list[tuple[str, ...]]:
    """All combinations of ``labels`` of each size, in a fixed order."""
    out: list[tuple[str, ...]] = []
    for k in sizes:
        if k < 1 or k > len(labels):
            raise ConfigError(f"combination size {k} is impossible with {len(labels)} labels")
        out.extend(itertools.combinations(labels, k))
    return out


def _blocks(n_cells: int, n_questions: int) -> list[int]:
    """Start offsets of ``n_questions`` consecutive blocks covering ``n_cells`` slots, each
    ``floor`` or ``ceil`` of ``n_cells / n_questions`` long (plus the end offset)."""
    return [(i * n_cells) // n_questions for i in range(n_questions + 1)]


def plan_size(
    n_questions: int, combos: Sequence[tuple[str, ...]], min_questions: int, seed: int
) -> list[Assignment]:
    """Every combination of ``combos`` (one size) on at least ``min_questions`` of
    ``n_questions`` questions, balanced (see the module docstring); sorted by question."""
    n_combos = len(combos)
    if n_combos == 0:
        return []
    rng = random.Random(seed)
    order = list(combos)
    rng.shuffle(order)
    questions = list(range(n_questions))
    rng.shuffle(questions)
    n_cells = max(n_combos * min_questions, n_questions)
    starts = _blocks(n_cells, n_questions)
    out = [
        (q, order[s % n_combos])
        for q, lo, hi in zip(questions, starts, starts[1:], strict=False)
        for s in range(lo, hi)
    ]
    rank = {c: i for i, c in enumerate(combos)}
    return sorted(out, key=lambda a: (a[0], rank[a[1]]))


def plan_coverage(
    n_questions: int,
    labels: Sequence[str],
    sizes: Sequence[int] = (1, 2, 3),
    *,
    min_questions: int = 2,
    seed: int = 0,
) -> list[Assignment]:
    """``(question, combination)`` pairs covering every combination of ``labels`` of each size
    in ``sizes`` on at least ``min_questions`` distinct questions of ``range(n_questions)``,
    balanced over questions and combinations, ordered by size, then question.

    Raises :class:`~ks_lens.errors.ConfigError` when that is impossible (fewer questions than
    ``min_questions``, a size larger than the label set) or the arguments are malformed.
    """
    if min_questions < 1:
        raise ConfigError(f"min_questions must be at least 1, got {min_questions}")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"labels must be distinct, got {list(labels)}")
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"combination sizes must be distinct, got {list(sizes)}")
    if n_questions < min_questions:
        raise ConfigError(
            f"every combination must be answered on at least {min_questions} distinct test "
            f"questions, but there are only {n_questions}; give more questions or lower "
            "min_questions_per_combination"
        )
    out: list[Assignment] = []
    for k in sizes:
        combos = label_combinations(labels, (k,))
        out += plan_size(n_questions, combos, min_questions, seed * 1009 + k)
    return out


def coverage_counts(
    assignments: Sequence[Assignment],
) -> tuple[Counter[tuple[str, ...]], dict[int, Counter[int]]]:
    """How many questions answer each combination, and per size how many combinations each
    question answers."""
    per_combo: Counter[tuple[str, ...]] = Counter(c for _, c in assignments)
    per_question: dict[int, Counter[int]] = {}
    for q, c in assignments:
        per_question.setdefault(len(c), Counter())[q] += 1
    return per_combo, per_question


__all__ = [
    "Assignment",
    "coverage_counts",
    "label_combinations",
    "plan_coverage",
    "plan_size",
]
