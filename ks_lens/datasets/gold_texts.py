"""Labelled texts: texts written in known behaviours, for evaluating steered generations at text level.

The **gold texts** shipped with ks-lens are answers to the tone-neutral questions, each written by
hand in one, two or three labels of a family: ``ks_lens/data/gold_tones.jsonl`` (tones) and
``ks_lens/data/gold_concepts.jsonl`` (concepts); see ``docs/datasets.md``. They train and validate :class:`ks_lens.text_evaluator.TextEvaluator`,
which scores any text without looking at the steered model.

File format (JSONL, one object per line, blank lines ignored)::

    {"id": "gold-0001", "question_id": "career-003", "question": "...",
     "labels": ["casual", "concise"], "text": "...", "source": "writer-2"}

``text`` (non-empty string) and ``labels`` (non-empty list of distinct strings, or one string)
are required; ``id`` (a string or an integer; default ``t00001``, ``t00002``, ... by position),
``question_id``, ``question`` and ``source`` are optional. A label holds no comma and no ``+``
(``"casual, concise"`` is refused: write ``["casual", "concise"]``), and is spelled with the same
capitals on every line (``"Casual"`` after ``"casual"`` is refused rather than made a new label).
Errors name the file and line.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ks_lens.errors import ConfigError, DatasetError, LabelError
from ks_lens.io import iter_jsonl

_OPTIONAL_STR_FIELDS = ("question_id", "question", "source")


@dataclass(frozen=True)
class LabelledText:
    """A text and the labels (tones) it is written in.

    Attributes:
        id: unique id of the text.
        text: the text itself.
        labels: its labels, one or more, distinct.
        question_id: id of the question it answers (used to group cross-validation folds).
        question: the question's text.
        source: who or what wrote it (e.g. ``"writer-3"``; used for leave-one-writer-out checks).
    """

    id: str
    text: str
    labels: tuple[str, ...]
    question_id: str | None = None
    question: str | None = None
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The text as a JSON object in the file format (optional fields left out when None)."""
        out: dict[str, Any] = {"id": self.id}
        if self.question_id is not None:
            out["question_id"] = self.question_id
        if self.question is not None:
            out["question"] = self.question
        out["labels"] = list(self.labels)
        out["text"] = self.text
        if self.source is not None:
            out["source"] = self.source
        return out


def normalise_text(text: str) -> str:
    """Lower-cased text with runs of white space collapsed (the key for duplicate detection)."""
    return " ".join(text.lower().split())


def _parse_labels(value: Any, loc: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{loc}: 'labels' must be a non-empty list of strings (or one string)")
    from ks_lens.datasets import label_name_problem

    out: list[str] = []
    for v in value:
        if not isinstance(v, str) or not v.strip():
            raise DatasetError(f"{loc}: every label must be a non-empty string, got {v!r}")
        problem = label_name_problem(v)
        if problem:
            raise DatasetError(f"{loc}: label {v.strip()!r} {problem}")
        if v.strip() in out:
            raise DatasetError(f"{loc}: label {v.strip()!r} is repeated")
        out.append(v.strip())
    return tuple(out)


def _parse_id(raw: Any, loc: str) -> str | None:
    """A text's ``id`` as a string (``None`` when absent or empty); a string or an integer only,
    so ``{"a": 1}`` or ``true`` are not silently turned into ids."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, (str, int)) and not isinstance(raw, bool):
        return str(raw)
    raise DatasetError(f"{loc}: 'id' must be a string or an integer, got {json.dumps(raw)}")


def _check_spelling(labs: Sequence[str], loc: str, seen: dict[str, str]) -> None:
    """Refuse a label spelled with other capitals than on an earlier line (``seen``: label ->
    where it first appeared; updated)."""
    from ks_lens.datasets import case_twin

    for x in labs:
        twin = case_twin(x, seen)
        if twin:
            raise DatasetError(
                f"{loc}: label {x!r} differs from {twin!r} (first at {seen[twin]}) only in "
                "capitals; labels are case-sensitive, so it would become a new label: spell it "
                "the same way"
            )
        seen.setdefault(x, loc)


def check_label_options(labels: Sequence[str]) -> tuple[str, ...]:
    """The allowed label names a caller gives (e.g. ``--labels``): distinct, each a valid
    label (:func:`ks_lens.datasets.label_name_problem`), no two differing only in capitals."""
    from ks_lens.datasets import case_twin, label_name_problem

    if isinstance(labels, str):
        labels = [labels]
    out: list[str] = []
    for x in labels:
        # combined names ("casual+concise", as datasets may have) are allowed, as never a text's
        problem = label_name_problem(x, combined=True) if isinstance(x, str) else "is no string"
        if problem:
            raise LabelError(f"label {x!r} {problem}")
        if x in out:
            raise LabelError(f"label {x!r} is given twice; give each label once")
        twin = case_twin(x, out)
        if twin:
            raise LabelError(f"labels {twin!r} and {x!r} differ only in capitals")
        out.append(x)
    if not out:
        raise LabelError("no labels given")
    return tuple(out)


def _parse_row(row: Any, loc: str, index: int, labels: Sequence[str] | None) -> LabelledText:
    if not isinstance(row, Mapping):
        raise DatasetError(f"{loc}: expected a JSON object, got {type(row).__name__}")
    if "text" not in row:
        raise DatasetError(f"{loc}: missing field 'text'")
    text = row["text"]
    if not isinstance(text, str):
        raise DatasetError(f"{loc}: 'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DatasetError(f"{loc}: empty text")
    if "labels" not in row:
        raise DatasetError(f"{loc}: missing field 'labels'")
    labs = _parse_labels(row["labels"], loc)
    if labels is not None:
        unknown = [x for x in labs if x not in labels]
        if unknown:
            from ks_lens.datasets import case_twin

            twin = case_twin(unknown[0], labels)
            hint = f" (labels are case-sensitive: {twin!r}?)" if twin else ""
            raise DatasetError(
                f"{loc}: unknown label {unknown[0]!r}{hint}; labels are {list(labels)}"
            )
        labs = tuple(x for x in labels if x in labs)  # canonical order
    tid = _parse_id(row.get("id"), loc) or f"t{index:05d}"
    extra: dict[str, str | None] = {}
    for name in _OPTIONAL_STR_FIELDS:
        v = row.get(name)
        if v is not None and not isinstance(v, str):
            raise DatasetError(f"{loc}: {name!r} must be a string, got {type(v).__name__}")
        extra[name] = v if v else None
    return LabelledText(
        id=tid,
        text=text.strip(),
        labels=labs,
        question_id=extra["question_id"],
        question=extra["question"],
        source=extra["source"],
    )


def load_labelled_texts(
    path: str | Path, labels: Sequence[str] | None = None
) -> tuple[LabelledText, ...]:
    """Read labelled texts from a JSONL file.

    Args:
        path: the ``.jsonl`` file (format in this module's docstring).
        labels: the allowed label names (distinct; :func:`check_label_options`); when given, an
            unknown label is an error and each text's labels are put in this order.

    Returns:
        The texts in file order.

    Raises:
        DatasetError: naming ``file:line``: not UTF-8, malformed JSON, a line that is not an
            object, missing/non-string/empty ``text``, bad ``labels`` (a comma or ``+`` in one,
            other capitals than on an earlier line), an unknown label, an ``id`` that is not a
            string or an integer, a duplicate id, or a duplicate text (compared lower-cased with
            white space collapsed).
        LabelError: ``labels`` repeat a name or hold an invalid one.
    """
    path = Path(path)
    allowed = check_label_options(labels) if labels is not None else None
    texts: list[LabelledText] = []
    seen_id: dict[str, str] = {}
    seen_text: dict[str, str] = {}
    seen_label: dict[str, str] = {}
    for loc, row in iter_jsonl(path, "labelled-text file (.jsonl)"):
        t = _parse_row(row, loc, len(texts) + 1, allowed)
        _check_spelling(t.labels, loc, seen_label)
        if t.id in seen_id:
            raise DatasetError(f"{loc}: duplicate id {t.id!r} (first at {seen_id[t.id]})")
        key = normalise_text(t.text)
        if key in seen_text:
            raise DatasetError(f"{loc}: duplicate text (first at {seen_text[key]})")
        seen_id[t.id] = loc
        seen_text[key] = loc
        texts.append(t)
    if not texts:
        raise DatasetError(f"{path}: no labelled texts found")
    return tuple(texts)


def load_texts(path: str | Path) -> tuple[tuple[str | None, str], ...]:
    """Read texts to score from a JSONL file: each line an object with a string ``text``.

    Other fields are ignored except ``id`` (a string or an integer, as in
    :func:`load_labelled_texts`), which is passed through. Empty texts are allowed (a model can
    answer with nothing), but a file without any text is an error, not an empty result.

    Returns:
        ``(id or None, text)`` per non-blank line, in file order.

    Raises:
        DatasetError: naming ``file:line`` for undecodable bytes, malformed JSON, a line that is
            not an object, a missing / non-string ``text`` or an ``id`` that is not a string or
            an integer; naming the file when it is empty or holds only blank lines.
    """
    path = Path(path)
    out: list[tuple[str | None, str]] = []
    for loc, row in iter_jsonl(path, "text file (.jsonl)"):
        if not isinstance(row, Mapping):
            raise DatasetError(f"{loc}: expected a JSON object, got {type(row).__name__}")
        if "text" not in row:
            raise DatasetError(f"{loc}: missing field 'text'")
        if not isinstance(row["text"], str):
            raise DatasetError(f"{loc}: 'text' must be a string, got {type(row['text']).__name__}")
        out.append((_parse_id(row.get("id"), loc), row["text"]))
    if not out:
        raise DatasetError(
            f"{path}: no texts found (the file is empty or holds only blank lines); expected one "
            'JSON object with a "text" field per line'
        )
    return tuple(out)


def load_gold_texts(family: str = "tones") -> tuple[LabelledText, ...]:
    """The gold texts of a behaviour family, labels checked against its dataset.

    Args:
        family: a shipped family (``"tones"``: ``gold_tones.jsonl``, ``"concepts"``:
            ``gold_concepts.jsonl``; read once per process) or a behaviours JSON file whose
            ``"gold_texts"`` field names its labelled-text file (relative to the JSON; read on
            every call, so edits show).

    Returns:
        The texts, each with ``question_id``, ``question`` and ``source``; labels in the
        family's order (e.g. helpful, expert, casual, cautious, empathetic, concise).

    Raises:
        DatasetError: an unknown family, no ``"gold_texts"`` field, or a bad line in the file.
    """
    from ks_lens.datasets import SHIPPED

    return _shipped_gold_texts(family) if family in SHIPPED else _read_gold_texts(family)


@lru_cache(maxsize=4)
def _shipped_gold_texts(family: str) -> tuple[LabelledText, ...]:
    return _read_gold_texts(family)


def _read_gold_texts(family: str) -> tuple[LabelledText, ...]:
    from ks_lens.datasets import family_file, load_dataset

    labels = load_dataset(family).labels
    with family_file(family, "gold_texts") as p:
        return load_labelled_texts(p, labels)


def split_by_question(
    texts: Sequence[LabelledText], fraction: float = 0.5, seed: int = 0
) -> tuple[tuple[LabelledText, ...], tuple[LabelledText, ...]]:
    """Two disjoint parts of ``texts``, whole questions at a time: ``(first, rest)``.

    About ``fraction`` of the questions (``question_id``; a text without one is its own question)
    go to ``first``, stratified by category (the question id up to its last ``-``, e.g.
    ``career`` in ``career-003``), chosen by a seeded shuffle of the sorted ids, so the split
    depends only on the ids, the fraction and the seed. ks-lens trains text-grounded steering
    probes on one part and the evaluators that judge them on the other.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction must be strictly between 0 and 1, got {fraction}")
    qid = [t.question_id or t.id for t in texts]
    by_cat: dict[str, list[str]] = {}
    for q in sorted(set(qid)):
        by_cat.setdefault(q.rsplit("-", 1)[0], []).append(q)
    if len(by_cat) and sum(len(v) for v in by_cat.values()) < 2:
        raise ConfigError("need texts on at least two questions to split them by question")
    rng = random.Random(seed)
    first: set[str] = set()
    carry = 0.0  # keeps the overall share close to fraction when categories are small
    for cat in sorted(by_cat):
        ids = by_cat[cat]
        rng.shuffle(ids)
        exact = fraction * len(ids) + carry
        n = round(exact)
        carry = exact - n
        first.update(ids[:n])
    a = tuple(t for t, q in zip(texts, qid, strict=True) if q in first)
    b = tuple(t for t, q in zip(texts, qid, strict=True) if q not in first)
    if not a or not b:
        raise ConfigError(
            f"splitting {len(set(qid))} questions at fraction {fraction} leaves one part empty"
        )
    return a, b


def texts_hash(texts: Iterable[LabelledText]) -> str:
    """SHA-256 of the texts' content (ids, texts, labels, question ids/texts, sources, in order)."""
    payload = [[t.id, t.text, list(t.labels), t.question_id, t.question, t.source] for t in texts]
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def merge_writer_files(
    files: Mapping[str, str | Path],
    labels: Sequence[str],
    *,
    id_prefix: str = "gold-",
) -> tuple[LabelledText, ...]:
    """Merge per-writer JSONL files into one deterministic, re-numbered set of labelled texts.

    Args:
        files: ``{source name: path}``; each file's lines need ``text`` and ``labels`` and
            should have ``question_id`` and ``question``.
        labels: the label names, in canonical order (labels are reordered to it).
        id_prefix: ids become ``{id_prefix}0001``, ``{id_prefix}0002``, ...

    Returns:
        The texts sorted by (question id, number of labels, label positions, source, text) and
        numbered in that order.

    Raises:
        DatasetError: a bad line in any file, or a text that appears twice across files.
    """
    rows: list[LabelledText] = []
    where: dict[str, str] = {}
    for source in sorted(files):
        for t in load_labelled_texts(files[source], labels):
            key = normalise_text(t.text)
            if key in where:
                raise DatasetError(
                    f"{files[source]}: text {t.id!r} duplicates a text of {where[key]}"
                )
            where[key] = source
            rows.append(
                LabelledText(
                    id="",
                    text=t.text,
                    labels=t.labels,
                    question_id=t.question_id,
                    question=t.question,
                    source=source,
                )
            )
    order = {name: i for i, name in enumerate(labels)}
    rows.sort(
        key=lambda t: (
            t.question_id or "",
            len(t.labels),
            [order[x] for x in t.labels],
            t.source or "",
            t.text,
        )
    )
    width = max(4, len(str(len(rows))))
    return tuple(
        LabelledText(
            id=f"{id_prefix}{i:0{width}d}",
            text=t.text,
            labels=t.labels,
            question_id=t.question_id,
            question=t.question,
            source=t.source,
        )
        for i, t in enumerate(rows, start=1)
    )


def write_labelled_texts(path: str | Path, texts: Iterable[LabelledText]) -> None:
    """Write texts as JSONL (UTF-8, one object per line, atomically)."""
    from ks_lens.io import atomic_write_bytes

    lines = [json.dumps(t.to_json(), ensure_ascii=False) for t in texts]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
