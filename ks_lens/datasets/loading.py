"""Loading datasets: shipped families (:data:`SHIPPED`), behaviours JSON files and questions
in JSONL, JSON or CSV."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ks_lens.datasets.dataset import BehaviourDataset
from ks_lens.datasets.labels import Behaviour, Question
from ks_lens.errors import DatasetError
from ks_lens.io import iter_jsonl, read_text_file

#: the shipped behaviour families: name -> behaviours JSON file in ``ks_lens/data``
SHIPPED = {"tones": "tones.json", "concepts": "concepts.json", "debates": "debates.json"}


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
            raise DatasetError(f'{path}: no {key!r} file named (add "{key}": "FILE")')
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
