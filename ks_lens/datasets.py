"""Behaviour datasets: labels with their instructions, tone-neutral questions, and splits.

A *behaviour dataset* is a list of behaviours (a label name and the instruction that elicits it,
given to the model as a system prompt) and a list of questions that can be answered in any of
those behaviours. The model's activations on "instruction + question" (or on its answer) are what
probes learn from.

Two *families* ship with ks-lens (:data:`SHIPPED`): ``load_dataset("tones")``, six tones
(helpful, expert, casual, cautious, empathetic, concise), and ``load_dataset("concepts")``, six
concepts woven into the answer (cooking, space, animals, sports, music, weather), both over the
same 600+ tone-neutral questions in 18 categories with the same splits. Users bring their own with
a behaviours JSON file and questions in JSONL or CSV (see ``docs/datasets.md`` and
``docs/tutorial-own-family.md``).

Splits are made **by question**: a question (with all its behaviour variants) belongs to exactly
one of ``train`` / ``evaluator`` / ``calibration`` / ``test``. The ``evaluator`` split trains the
held-out evaluation classifiers, which never see the steering probe's questions.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ks_lens.errors import DatasetError
from ks_lens.io import iter_jsonl, read_text_file

SPLITS: tuple[str, ...] = ("train", "evaluator", "calibration", "test")
DEFAULT_FRACTIONS: dict[str, float] = {
    "train": 0.4,
    "evaluator": 0.25,
    "calibration": 0.1,
    "test": 0.25,
}
#: the shipped behaviour families: name -> behaviours JSON file in ``ks_lens/data``
SHIPPED = {"tones": "tones.json", "concepts": "concepts.json", "debates": "debates.json"}


@dataclass(frozen=True)
class Behaviour:
    """A label and the instruction (system prompt) that elicits it."""

    name: str
    instruction: str


@dataclass(frozen=True)
class Question:
    """A tone-neutral question. ``label`` (optional) pins it to one behaviour only.

    ``answer`` (optional) is a fixed answer text: the response collection modes re-encode it
    instead of generating one (e.g. gold tone texts, see :mod:`ks_lens.gold_texts`).
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


# ----------------------------------------------------------------------------- loading questions


def _question_from_row(row: Mapping[str, Any], where: str, index: int) -> Question:
    if not isinstance(row, Mapping):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    field_name = "text" if "text" in row else "question"
    text = row.get(field_name)
    if text is None:
        raise DatasetError(f"{where}: missing field 'text'")
    if not isinstance(text, str):
        raise DatasetError(
            f"{where}: field {field_name!r} must be a string, got {type(text).__name__} {text!r}"
        )
    if not text.strip():
        raise DatasetError(f"{where}: empty question text")
    qid = row.get("id")
    qid = f"q{index:05d}" if qid is None or qid == "" else str(qid)
    category = row.get("category") or ""
    label = row.get("label") or None
    return Question(
        id=qid,
        text=text.strip(),
        category=str(category),
        label=None if label is None else str(label),
    )


def _check_unique(questions: Sequence[Question], where: Sequence[str]) -> None:
    seen_id: dict[str, str] = {}
    seen_text: dict[str, str] = {}
    for q, loc in zip(questions, where, strict=True):
        if q.id in seen_id:
            raise DatasetError(f"{loc}: duplicate id {q.id!r} (first at {seen_id[q.id]})")
        seen_id[q.id] = loc
        key = " ".join(q.text.lower().split())
        if key in seen_text:
            raise DatasetError(f"{loc}: duplicate question text (first at {seen_text[key]})")
        seen_text[key] = loc


def load_questions(source: str | Path) -> tuple[Question, ...]:
    """Read questions from a ``.jsonl``, ``.json`` (list), ``.csv`` file, or ``hf:NAME[:SPLIT[:COLUMN]]``.

    Each row needs ``text`` (or ``question``); ``id``, ``category`` and ``label`` are optional.
    Errors name the file and line.
    """
    src = str(source)
    if src.startswith("hf:"):
        return _load_hf_questions(src[3:])
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".json", ".csv", ".tsv") and not path.is_dir():
        raise DatasetError(
            f"{path}: unsupported question file type {suffix!r}; use .jsonl, .json or .csv"
        )
    text = read_text_file(path, "question file (.jsonl, .json or .csv)")
    questions: list[Question] = []
    where: list[str] = []
    if suffix in (".jsonl", ".ndjson"):
        for loc, row in iter_jsonl(path, "question file (.jsonl)"):
            questions.append(_question_from_row(row, loc, len(questions)))
            where.append(loc)
    elif suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
        if isinstance(rows, Mapping) and "questions" in rows:
            rows = rows["questions"]
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: expected a list of question objects")
        for i, row in enumerate(rows):
            loc = f"{path}[{i}]"
            questions.append(_question_from_row(row, loc, i))
            where.append(loc)
    else:
        reader = csv.DictReader(
            io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","
        )
        if reader.fieldnames is None or not ({"text", "question"} & set(reader.fieldnames)):
            raise DatasetError(f"{path}: needs a header row with a 'text' (or 'question') column")
        for i, row in enumerate(reader):
            loc = f"{path}:{reader.line_num}"
            questions.append(_question_from_row(row, loc, i))
            where.append(loc)
    if not questions:
        raise DatasetError(f"{path}: no questions found")
    _check_unique(questions, where)
    return tuple(questions)


def _load_hf_questions(spec: str) -> tuple[Question, ...]:
    parts = spec.split(":")
    name, split, column = (
        parts[0],
        (parts[1] if len(parts) > 1 else "train"),
        (parts[2] if len(parts) > 2 else "text"),
    )
    try:
        import datasets as hf_datasets
    except ImportError as e:
        raise DatasetError(
            "hf: question sources need the `datasets` package (pip install datasets)"
        ) from e
    try:
        ds = hf_datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DatasetError(
            f"could not load Hugging Face dataset {name!r} split {split!r}: {e}"
        ) from e
    if column not in ds.column_names:
        raise DatasetError(
            f"Hugging Face dataset {name!r} has no column {column!r}; columns: {ds.column_names}"
        )
    rows = [{"text": r[column], "id": r.get("id"), "category": r.get("category", "")} for r in ds]
    qs = [_question_from_row(r, f"hf:{name}[{i}]", i) for i, r in enumerate(rows)]
    _check_unique(qs, [f"hf:{name}[{i}]" for i in range(len(qs))])
    return tuple(qs)


def load_behaviours(path: str | Path) -> tuple[tuple[Behaviour, ...], dict[str, Any]]:
    """Read a behaviours JSON file: ``{"name", "behaviours": [{"name", "instruction"}], "questions"?}``."""
    path = Path(path)
    try:
        spec = json.loads(read_text_file(path, "behaviours file (.json)"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
    if not isinstance(spec, Mapping) or not isinstance(spec.get("behaviours"), list):
        raise DatasetError(f"{path}: expected an object with a 'behaviours' list")
    behaviours = []
    for i, b in enumerate(spec["behaviours"]):
        if (
            not isinstance(b, Mapping)
            or not isinstance(b.get("name"), str)
            or not isinstance(b.get("instruction"), str)
        ):
            raise DatasetError(
                f"{path}: behaviours[{i}] needs string fields 'name' and 'instruction'"
            )
        behaviours.append(Behaviour(b["name"].strip(), b["instruction"].strip()))
    return tuple(behaviours), dict(spec)


@contextlib.contextmanager
def family_file(spec: str | Path, key: str) -> Iterator[Path]:
    """The file that a behaviours JSON's field ``key`` names (e.g. ``"gold_texts"``), resolved
    next to that JSON; ``spec`` is a shipped family name (:data:`SHIPPED`) or a JSON path.

    Raises:
        DatasetError: an unknown family, a JSON without that field (or not a string), or a
            named file that does not exist.
    """
    spec_str = str(spec)
    with contextlib.ExitStack() as stack:
        if spec_str in SHIPPED:
            ref = resources.files("ks_lens.data").joinpath(SHIPPED[spec_str])
            path = stack.enter_context(resources.as_file(ref))
        else:
            path = Path(spec)
            if not path.exists():
                raise DatasetError(
                    f"unknown dataset {spec_str!r}: not a shipped dataset ({sorted(SHIPPED)}) "
                    "nor a file"
                )
        _, meta = load_behaviours(path)
        name = meta.get(key)
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{path}: no {key!r} file named (add \"{key}\": \"FILE\")")
        target = path.parent / name
        if not target.exists():
            raise DatasetError(f"{path}: its {key!r} file {target} does not exist")
        yield target


def load_dataset(
    spec: str | Path = "tones", *, questions: str | Path | None = None
) -> BehaviourDataset:
    """Load a behaviour dataset.

    Args:
        spec: a shipped dataset name (``"tones"``, ``"concepts"``) or a path to a behaviours
            JSON file.
        questions: replaces the dataset's questions (a ``.jsonl``/``.json``/``.csv`` file or
            ``hf:NAME``), e.g. an external evaluation set.

    Examples:
        >>> tones = ks.load_dataset("tones")
        >>> tones.labels
        ('helpful', 'expert', 'casual', 'cautious', 'empathetic', 'concise')
        >>> train = tones.split("train").head(4)           # questions never used for evaluation
        >>> len(train.questions), train.questions[0].id in {q.id for q in tones.questions}
        (4, True)
    """
    spec_str = str(spec)
    if spec_str in SHIPPED:
        ref = resources.files("ks_lens.data").joinpath(SHIPPED[spec_str])
        with resources.as_file(ref) as p:
            behaviours, meta = load_behaviours(p)
            base = p.parent
            q_default = base / meta["questions"]
            qs = load_questions(questions) if questions is not None else load_questions(q_default)
            reserved = _reserved_ids(meta, base)
        return BehaviourDataset(
            spec_str, behaviours, qs, str(meta.get("description", "")), reserved
        )
    path = Path(spec)
    if not path.exists():
        raise DatasetError(
            f"unknown dataset {spec_str!r}: not a shipped dataset ({sorted(SHIPPED)}) nor a file"
        )
    behaviours, meta = load_behaviours(path)
    if questions is not None:
        qs = load_questions(questions)
    elif isinstance(meta.get("questions"), str):
        qs = load_questions(path.parent / meta["questions"])
    elif isinstance(meta.get("questions"), list):
        rows = meta["questions"]
        qs_list = [_question_from_row(r, f"{path}: questions[{i}]", i) for i, r in enumerate(rows)]
        _check_unique(qs_list, [f"{path}: questions[{i}]" for i in range(len(rows))])
        qs = tuple(qs_list)
    else:
        raise DatasetError(
            f"{path}: no questions: add a 'questions' file name or list, or pass questions="
        )
    return BehaviourDataset(
        str(meta.get("name", path.stem)),
        behaviours,
        qs,
        str(meta.get("description", "")),
        _reserved_ids(meta, path.parent),
    )


def _reserved_ids(meta: Mapping[str, Any], base: Path) -> frozenset[str]:
    """Question ids named by the behaviours file's ``reserved_from_test``: a JSONL file of
    labelled texts (their ``question_id`` fields) or a list of ids."""
    spec = meta.get("reserved_from_test")
    if spec is None:
        return frozenset()
    if isinstance(spec, list):
        return frozenset(str(x) for x in spec)
    path = base / str(spec)
    out = set()
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        qid = json.loads(line).get("question_id")
                    except (json.JSONDecodeError, AttributeError) as e:
                        raise DatasetError(f"{path}:{lineno}: malformed JSON line") from e
                    if qid:
                        out.add(str(qid))
    except FileNotFoundError:
        raise DatasetError(f"reserved_from_test file not found: {path}") from None
    return frozenset(out)


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
