"""Splits by question (:func:`make_splits`): ``train``, ``evaluator``, ``calibration``, ``test``."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ks_lens.datasets.dataset import BehaviourDataset
from ks_lens.datasets.labels import Question
from ks_lens.errors import DatasetError

SPLITS: tuple[str, ...] = ("train", "evaluator", "calibration", "test")
DEFAULT_FRACTIONS: dict[str, float] = {
    "train": 0.4,
    "evaluator": 0.25,
    "calibration": 0.1,
    "test": 0.25,
}

# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Splits:
    """Which question ids belong to which split; reproducible from ``seed`` and ``fractions``."""

    seed: int
    fractions: dict[str, float]
    assignment: dict[str, tuple[str, ...]] = field(repr=False)

    def ids(self, name: str) -> tuple[str, ...]:
        if name not in self.assignment:
            raise DatasetError(f"unknown split {name!r}; splits are {list(self.assignment)}")
        return self.assignment[name]

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.assignment.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "fractions": self.fractions,
            "assignment": {k: list(v) for k, v in self.assignment.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Splits:
        return cls(
            int(d["seed"]), dict(d["fractions"]), {k: tuple(v) for k, v in d["assignment"].items()}
        )


def make_splits(
    dataset: BehaviourDataset | Sequence[Question],
    *,
    seed: int = 0,
    fractions: Mapping[str, float] | None = None,
) -> Splits:
    """Assign every question to one split, stratified by category, deterministically from ``seed``.

    Within each category the question ids are sorted, permuted with a seeded generator and cut
    by ``fractions`` (largest-remainder rounding), so the result depends only on the set of ids,
    their categories, the seed and the fractions, not on file order. Questions in the dataset's
    ``reserved_from_test`` (those with gold texts) never land in ``test``: the test slice is cut
    from the other questions of each category (an error if a category has too few).
    """
    qs = dataset.questions if isinstance(dataset, BehaviourDataset) else tuple(dataset)
    fr = dict(fractions or DEFAULT_FRACTIONS)
    if not fr or any(v < 0 for v in fr.values()) or abs(sum(fr.values()) - 1.0) > 1e-6:
        raise DatasetError(f"split fractions must be non-negative and sum to 1, got {fr}")
    by_cat: dict[str, list[str]] = defaultdict(list)
    for q in qs:
        by_cat[q.category].append(q.id)
    reserved = dataset.reserved_from_test if isinstance(dataset, BehaviourDataset) else frozenset()
    assignment: dict[str, list[str]] = {k: [] for k in fr}
    gen = torch.Generator().manual_seed(seed)
    names = [k for k in fr if k != "test"] + (["test"] if "test" in fr else [])  # test cut last
    for cat in sorted(by_cat):
        ids = sorted(by_cat[cat])
        perm = torch.randperm(len(ids), generator=gen).tolist()
        ids = [ids[i] for i in perm]
        if reserved and "test" in names:
            # reserved questions are moved to the front, so the test slice (the last one) is
            # cut from the others; their relative (seeded) order is kept
            ids = [i for i in ids if i in reserved] + [i for i in ids if i not in reserved]
        exact = [fr[k] * len(ids) for k in names]
        counts = [int(x) for x in exact]
        order = sorted(range(len(names)), key=lambda i: (exact[i] - counts[i], -i), reverse=True)
        for i in order[: len(ids) - sum(counts)]:
            counts[i] += 1
        start = 0
        for k, c in zip(names, counts, strict=True):
            assignment[k].extend(ids[start : start + c])
            start += c
        if reserved and "test" in fr:
            leaked = sorted(set(assignment["test"]) & reserved)
            if leaked:
                raise DatasetError(
                    f"category {cat!r}: too few unreserved questions for the test split "
                    f"(reserved questions {leaked[:3]} would be tested on)"
                )
    return Splits(seed, fr, {k: tuple(sorted(v)) for k, v in assignment.items()})
