"""A behaviour dataset (:class:`BehaviourDataset`): behaviours x questions, subsets,
combined behaviours."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ks_lens.datasets.labels import (
    COMBINE_SEP,
    INSTRUCTION_JOINER,
    Behaviour,
    Question,
    base_labels,
    case_twin,
    join_instructions,
    label_name_problem,
)

if TYPE_CHECKING:
    from ks_lens.datasets.splits import Splits
from ks_lens.errors import DatasetError


@dataclass(frozen=True)
class BehaviourDataset:
    name: str
    behaviours: tuple[Behaviour, ...]
    questions: tuple[Question, ...]
    description: str = ""
    #: question ids that :func:`make_splits` never puts in the ``test`` split (e.g. questions
    #: whose gold answers train the text evaluator)
    reserved_from_test: frozenset[str] = frozenset()
    #: with combined behaviours (:meth:`with_combinations`): how many of them each question is
    #: asked under (rotating through them so every combination gets the same number of rows);
    #: ``None`` asks every question under every combination
    combined_per_question: int | None = None

    def __post_init__(self) -> None:
        names = [b.name for b in self.behaviours]
        if not names:
            raise DatasetError(f"dataset {self.name!r} has no behaviours")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise DatasetError(f"dataset {self.name!r} repeats behaviour names {sorted(dup)}")
        for i, b in enumerate(self.behaviours):
            problem = label_name_problem(b.name, combined=True)
            if problem:
                raise DatasetError(f"dataset {self.name!r}: behaviour name {b.name!r} {problem}")
            twin = case_twin(b.name, names[:i])
            if twin:
                raise DatasetError(
                    f"dataset {self.name!r}: behaviour names {twin!r} and {b.name!r} differ only "
                    "in capitals; spell a label the same way everywhere"
                )
            if not b.instruction.strip():
                raise DatasetError(f"behaviour {b.name!r} has an empty instruction")
        ids = [q.id for q in self.questions]
        if len(set(ids)) != len(ids):
            dup_ids = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise DatasetError(f"dataset {self.name!r} repeats question ids {dup_ids}")
        for q in self.questions:
            if q.label is not None and q.label not in names:
                raise DatasetError(
                    f"question {q.id!r} has unknown label {q.label!r}; labels are {names}"
                )

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.behaviours)

    def label_index(self, name: str) -> int:
        try:
            return self.labels.index(name)
        except ValueError:
            raise DatasetError(f"unknown label {name!r}; labels are {list(self.labels)}") from None

    def instruction(self, label: str) -> str:
        return self.behaviours[self.label_index(label)].instruction

    @property
    def instructions(self) -> dict[str, str]:
        """Each single label's instruction, in label order (the comparison's ``instructed``
        reference row joins them with :func:`join_instructions` for several targets)."""
        return {b.name: b.instruction for b in self.behaviours if COMBINE_SEP not in b.name}

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(sorted({q.category for q in self.questions}))

    def content_hash(self) -> str:
        """SHA-256 of the behaviours and questions (recorded in every artefact's metadata)."""
        payload: dict[str, Any] = {
            "behaviours": [[b.name, b.instruction] for b in self.behaviours],
            "questions": [[q.id, q.text, q.category, q.label] for q in self.questions],
        }
        if any(q.answer is not None for q in self.questions):
            payload["answers"] = [q.answer for q in self.questions]
        if self.reserved_from_test:
            payload["reserved_from_test"] = sorted(self.reserved_from_test)
        if self.combined_per_question is not None:
            payload["combined_per_question"] = self.combined_per_question
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def with_questions(
        self, questions: Iterable[Question], name: str | None = None
    ) -> BehaviourDataset:
        return replace(self, questions=tuple(questions), name=name or self.name)

    @property
    def base_labels(self) -> tuple[str, ...]:
        """The single labels (behaviour names without ``+``), the label space of probes."""
        return base_labels(self.labels)

    def with_combinations(
        self,
        sizes: Sequence[int] = (2,),
        *,
        per_question: int | None = None,
        joiner: str = INSTRUCTION_JOINER,
    ) -> BehaviourDataset:
        """A copy with combined behaviours added: for every combination of ``sizes`` base labels,
        a behaviour named ``"a+b"`` whose instruction is the labels' instructions joined.

        Probes trained on such a dataset are multi-label (:func:`multi_hot`), so an evaluator can
        say "casual and concise" instead of splitting one unit of probability between them.
        """
        base = [b for b in self.behaviours if COMBINE_SEP not in b.name]
        extra = []
        for k in sizes:
            if not 2 <= k <= len(base):
                raise DatasetError(f"combination size {k} is impossible with {len(base)} labels")
            for combo in itertools.combinations(base, k):
                extra.append(
                    Behaviour(
                        COMBINE_SEP.join(b.name for b in combo),
                        join_instructions((b.instruction for b in combo), joiner),
                    )
                )
        if per_question is not None and per_question < 1:
            raise DatasetError("per_question must be a positive number of combinations")
        known = set(self.labels)
        return replace(
            self,
            behaviours=self.behaviours + tuple(b for b in extra if b.name not in known),
            combined_per_question=per_question,
        )

    def subset(self, ids: Iterable[str]) -> BehaviourDataset:
        keep = set(ids)
        unknown = keep - {q.id for q in self.questions}
        if unknown:
            raise DatasetError(f"unknown question ids {sorted(unknown)[:5]}")
        return self.with_questions(q for q in self.questions if q.id in keep)

    def split(self, name: str, splits: Splits | None = None, *, seed: int = 0) -> BehaviourDataset:
        """The questions of one split (made with ``make_splits(self, seed)`` unless given)."""
        from ks_lens.datasets.splits import make_splits  # splits.py reads datasets

        splits = splits or make_splits(self, seed=seed)
        ids = splits.ids(name)
        if not ids:
            sizes = ", ".join(f"{k}={v}" for k, v in splits.sizes().items())
            raise DatasetError(
                f"split {name!r} of dataset {self.name!r} has no questions: its "
                f"{len(self.questions)} questions split (seed {splits.seed}) into {sizes}. "
                "Add questions, or use another split (or all of them)."
            )
        return self.subset(ids)

    def head(self, n: int | None) -> BehaviourDataset:
        """The first ``n`` questions, spread over categories (round robin), for quick runs."""
        if n is None or n >= len(self.questions):
            return self
        if n <= 0:
            raise DatasetError("the number of questions must be positive")
        by_cat: dict[str, list[Question]] = defaultdict(list)
        for q in self.questions:
            by_cat[q.category].append(q)
        order: list[Question] = []
        queues = [list(v) for _, v in sorted(by_cat.items())]
        while len(order) < n:
            for qs in queues:
                if qs and len(order) < n:
                    order.append(qs.pop(0))
        keep = {q.id for q in order}
        return self.with_questions(q for q in self.questions if q.id in keep)

    def pairs(self) -> list[tuple[Question, int]]:
        """(question, label index) for every question asked under every allowed behaviour.

        A question pinned by ``label`` gets only that behaviour. With
        :attr:`combined_per_question` set, question ``j`` gets every single behaviour and
        ``combined_per_question`` of the combined ones, rotating with ``j``.
        """
        combined = [i for i, b in enumerate(self.behaviours) if COMBINE_SEP in b.name]
        m = self.combined_per_question
        out = []
        for j, q in enumerate(self.questions):
            chosen = (
                set(combined)
                if m is None or m >= len(combined)
                else {combined[(j * m + r) % len(combined)] for r in range(m)}
            )
            for i, b in enumerate(self.behaviours):
                if q.label is not None:
                    if q.label == b.name:
                        out.append((q, i))
                elif COMBINE_SEP not in b.name or i in chosen:
                    out.append((q, i))
        return out
