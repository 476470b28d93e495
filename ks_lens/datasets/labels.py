"""Behaviours, questions and label names: the records a dataset is made of, and multi-hot
label sets (``"casual+concise"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ks_lens.errors import DatasetError


@dataclass(frozen=True)
class Behaviour:
    """A label and the instruction (system prompt) that elicits it."""

    name: str
    instruction: str


@dataclass(frozen=True)
class Question:
    """A tone-neutral question. ``label`` (optional) pins it to one behaviour only.

    ``answer`` (optional) is a fixed answer text: the response collection modes re-encode it
    instead of generating one (e.g. gold tone texts, see :mod:`ks_lens.datasets.gold_texts`).
    """

    id: str
    text: str
    category: str = ""
    label: str | None = None
    answer: str | None = None


#: separator of combined behaviour names: ``"casual+concise"`` is both casual and concise
COMBINE_SEP = "+"
#: how the instructions of combined behaviours are joined
#: (:meth:`BehaviourDataset.with_combinations`, the ``instructed`` row of a comparison)
INSTRUCTION_JOINER = " "


def join_instructions(instructions: Iterable[str], joiner: str = INSTRUCTION_JOINER) -> str:
    """One instruction asking for several behaviours: their instructions joined, in order."""
    return joiner.join(instructions)


def label_set(name: str) -> tuple[str, ...]:
    """The base labels of a (possibly combined) behaviour name: ``"a+b"`` -> ``("a", "b")``."""
    return tuple(name.split(COMBINE_SEP))


def label_name_problem(name: str, *, combined: bool = False) -> str | None:
    """What is wrong with ``name`` as a label, or ``None``: the one rule for dataset behaviours,
    labelled texts and label options. A label is a non-empty string without a comma (label
    options are comma-separated, so ``"casual, concise"`` would silently become one new label)
    and, unless ``combined``, without :data:`COMBINE_SEP` (which joins labels)."""
    if not name.strip():
        return "is empty"
    if "," in name:
        return 'contains a comma; several labels are a list, e.g. ["casual", "concise"]'
    if not combined and COMBINE_SEP in name:
        return f"contains {COMBINE_SEP!r}, which joins labels; give a list of labels instead"
    return None


def case_twin(name: str, names: Iterable[str]) -> str | None:
    """The label among ``names`` that differs from ``name`` only in capitals (``"Casual"`` and
    ``"casual"``), if any: labels are case-sensitive, so the two would silently be two labels."""
    folded = name.casefold()
    return next((n for n in names if n != name and n.casefold() == folded), None)


def base_labels(names: Sequence[str]) -> tuple[str, ...]:
    """The base (single) labels among ``names``, in order; combined names must be made of them."""
    base = tuple(n for n in names if COMBINE_SEP not in n)
    for n in names:
        missing = [b for b in label_set(n) if b not in base]
        if missing:
            raise DatasetError(f"combined behaviour {n!r} uses unknown labels {missing}")
    return base


def multi_hot(
    label_index: torch.Tensor, names: Sequence[str], base: Sequence[str] | None = None
) -> torch.Tensor:
    """``[n, len(base)]`` multi-hot targets for rows labelled by index into ``names``.

    A combined name (``"a+b"``) sets every one of its labels; ``-1`` (unlabelled) rows are all
    zero. ``base`` defaults to :func:`base_labels` of ``names``.
    """
    base = tuple(base) if base is not None else base_labels(names)
    table = torch.zeros(len(names) + 1, len(base))
    for i, n in enumerate(names):
        for b in label_set(n):
            table[i, base.index(b)] = 1.0
    idx = label_index.clone().long().cpu()
    idx[idx < 0] = len(names)  # the all-zero row
    return table[idx]
