"""The shipped gold tone texts and the labelled-text loader."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from ks_lens.datasets import load_dataset, make_splits
from ks_lens.datasets.gold_texts import (
    LabelledText,
    load_gold_texts,
    load_labelled_texts,
    load_texts,
    merge_writer_files,
    normalise_text,
    texts_hash,
    write_labelled_texts,
)
from ks_lens.errors import DatasetError

TONES = ("helpful", "expert", "casual", "cautious", "empathetic", "concise")


@pytest.fixture(scope="module")
def gold() -> tuple[LabelledText, ...]:
    return load_gold_texts()


# ----------------------------------------------------------------------------- shipped texts


def test_tone_labels_are_the_dataset_labels():
    assert load_dataset("tones").labels == TONES


def test_gold_single_tone_coverage(gold):
    singles: dict[str, set[str]] = defaultdict(set)
    for t in gold:
        if len(t.labels) == 1:
            singles[t.question_id or ""].add(t.labels[0])
    complete = [q for q, tones in singles.items() if tones == set(TONES)]
    assert len({t.question_id for t in gold}) >= 120
    assert len(complete) >= 120, "need >= 120 questions with all six single-tone texts"


def _balanced(counts: Counter, expected_keys: set) -> None:
    assert set(counts) == expected_keys, f"missing: {sorted(expected_keys - set(counts))}"
    mean = sum(counts.values()) / len(counts)
    for key, n in counts.items():
        assert 0.7 * mean <= n <= 1.3 * mean, f"{key}: {n} texts vs mean {mean:.1f}"


def test_gold_multi_tone_coverage_and_balance(gold):
    pairs = Counter(t.labels for t in gold if len(t.labels) == 2)
    triples = Counter(t.labels for t in gold if len(t.labels) == 3)
    assert sum(pairs.values()) >= 240
    assert sum(triples.values()) >= 60
    _balanced(pairs, set(itertools.combinations(TONES, 2)))
    _balanced(triples, set(itertools.combinations(TONES, 3)))
    assert all(1 <= len(t.labels) <= 3 for t in gold)


def test_gold_ids_texts_and_fields(gold):
    ids = [t.id for t in gold]
    assert ids == [f"gold-{i:04d}" for i in range(1, len(gold) + 1)]
    assert len({normalise_text(t.text) for t in gold}) == len(gold)
    questions = {q.id: q.text for q in load_dataset("tones").questions}
    for t in gold:
        assert set(t.labels) <= set(TONES)
        assert list(t.labels) == [x for x in TONES if x in t.labels], "canonical label order"
        assert t.question_id in questions, t.id
        assert t.question == questions[t.question_id], t.id
        assert t.source is not None and t.source.startswith("writer-")
        assert t.text == t.text.strip() and t.text
    sources = Counter(t.source for t in gold)
    assert len(sources) >= 5


def test_gold_file_is_sorted_deterministically(gold):
    order = {n: i for i, n in enumerate(TONES)}

    def key(t: LabelledText):
        return (t.question_id, len(t.labels), [order[x] for x in t.labels], t.source, t.text)

    assert list(gold) == sorted(gold, key=key)


def test_gold_questions_never_in_test_split(gold):
    """Gold questions are reserved from the test split, whatever the seed."""
    ds = load_dataset("tones")
    gold_q = {t.question_id for t in gold}
    for seed in range(5):
        leaked = gold_q & set(make_splits(ds, seed=seed).ids("test"))
        assert not leaked, f"seed {seed}: gold questions in the test split: {sorted(leaked)[:5]}"


def test_texts_hash_is_content_sensitive(gold):
    h = texts_hash(gold)
    assert h == texts_hash(list(gold)) and len(h) == 64
    changed = (LabelledText(gold[0].id, gold[0].text + " ", gold[0].labels), *gold[1:])
    assert texts_hash(changed) != h
    relabelled = (
        LabelledText(gold[0].id, gold[0].text, ("expert",), gold[0].question_id),
        *gold[1:],
    )
    assert texts_hash(relabelled) != h


# ----------------------------------------------------------------------------- loader


def _write(tmp_path: Path, lines: list[str] | bytes, name: str = "t.jsonl") -> Path:
    p = tmp_path / name
    if isinstance(lines, bytes):
        p.write_bytes(lines)
    else:
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def _row(**kw) -> str:
    return json.dumps(kw)


def test_loader_defaults_and_label_order(tmp_path):
    p = _write(
        tmp_path,
        [
            _row(text="Yep, just restart it.", labels="casual"),
            "",
            _row(
                text="Consult a doctor.",
                labels=["concise", "cautious"],
                id=7,
                question_id="q1",
                question="Is it safe?",
                source="me",
            ),
        ],
    )
    texts = load_labelled_texts(p, TONES)
    assert texts[0] == LabelledText("t00001", "Yep, just restart it.", ("casual",))
    assert texts[1].id == "7" and texts[1].labels == ("cautious", "concise")
    assert (texts[1].question_id, texts[1].question, texts[1].source) == ("q1", "Is it safe?", "me")
    # without a label list: labels kept as written, anything allowed
    free = load_labelled_texts(p)
    assert free[1].labels == ("concise", "cautious")
    # round trip through the writer
    out = tmp_path / "out.jsonl"
    write_labelled_texts(out, texts)
    assert load_labelled_texts(out, TONES) == texts


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([_row(text="ok", labels=["casual"]), "{not json"], ":2: malformed JSON"),
        ([_row(text=3, labels=["casual"])], ":1: 'text' must be a string"),
        ([_row(labels=["casual"])], ":1: missing field 'text'"),
        ([_row(text="   ", labels=["casual"])], ":1: empty text"),
        ([_row(text="hi there", labels=["sarcastic"])], ":1: unknown label 'sarcastic'"),
        ([_row(text="hi there", labels=[])], ":1: 'labels' must be a non-empty list"),
        ([_row(text="hi there")], ":1: missing field 'labels'"),
        ([_row(text="hi there", labels=["casual", "casual"])], ":1: label 'casual' is repeated"),
        ([_row(text="hi there", labels=[1])], ":1: every label must be a non-empty string"),
        (["[1, 2]"], ":1: expected a JSON object"),
        (
            [_row(text="a", labels="casual", id="x"), _row(text="b", labels="casual", id="x")],
            ":2: duplicate id 'x'",
        ),
        (
            [
                _row(text="Hello  there", labels="casual"),
                _row(text=" hello THERE ", labels="expert"),
            ],
            ":2: duplicate text",
        ),
        ([_row(text="hi", labels="casual", source=5)], ":1: 'source' must be a string"),
        ([_row(text="hi", labels="casual", id=[1])], ":1: 'id' must be a string or an integer"),
        ([""], "no labelled texts found"),
    ],
)
def test_loader_errors(tmp_path, lines, message):
    p = _write(tmp_path, lines)
    with pytest.raises(DatasetError) as err:
        load_labelled_texts(p, TONES)
    assert message in str(err.value)
    if message.startswith(":"):
        assert f"{p}{message.split(' ')[0]}" in str(err.value), "names file:line"


def test_loader_rejects_non_utf8_with_line(tmp_path):
    good = _row(text="fine", labels="casual").encode()
    p = _write(tmp_path, good + b"\n" + b'{"text": "caf\xe9", "labels": "casual"}\n')
    with pytest.raises(
        DatasetError, match=r"t\.jsonl:2: byte 0xe9 is not valid UTF-8.*expected UTF-8"
    ):
        load_labelled_texts(p)


def test_loader_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_labelled_texts(tmp_path / "nope.jsonl")


def test_load_texts_ignores_other_fields(tmp_path):
    p = _write(
        tmp_path,
        [
            _row(text="a", id="x1", labels=["whatever"], extra=1),
            _row(text=""),
            _row(text="b", id=4),
        ],
    )
    assert load_texts(p) == (("x1", "a"), (None, ""), ("4", "b"))
    bad = _write(tmp_path, [_row(text="a"), _row(txt="b")], "bad.jsonl")
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: missing field 'text'"):
        load_texts(bad)


# ----------------------------------------------------------------------------- merging


def test_merge_writer_files_is_deterministic(tmp_path):
    rows_a = [
        dict(question_id="q2", question="Q2?", labels=["concise"], text="Short."),
        dict(question_id="q1", question="Q1?", labels=["concise", "casual"], text="Yep, sure."),
    ]
    rows_b = [
        dict(question_id="q1", question="Q1?", labels=["expert"], text="Per the standard, X."),
        dict(question_id="q1", question="Q1?", labels=["helpful"], text="Do this, then that."),
    ]
    a = _write(tmp_path, [json.dumps(r) for r in rows_a], "a.jsonl")
    random.Random(0).shuffle(rows_b)
    b = _write(tmp_path, [json.dumps(r) for r in rows_b], "b.jsonl")
    merged = merge_writer_files({"writer-2": b, "writer-1": a}, TONES)
    assert [t.id for t in merged] == ["gold-0001", "gold-0002", "gold-0003", "gold-0004"]
    assert [(t.question_id, t.labels, t.source) for t in merged] == [
        ("q1", ("helpful",), "writer-2"),
        ("q1", ("expert",), "writer-2"),
        ("q1", ("casual", "concise"), "writer-1"),
        ("q2", ("concise",), "writer-1"),
    ]
    assert merge_writer_files({"writer-1": a, "writer-2": b}, TONES) == merged
    dup = _write(tmp_path, [json.dumps(rows_a[0])], "dup.jsonl")
    with pytest.raises(DatasetError, match="duplicates a text of writer-1"):
        merge_writer_files({"writer-1": a, "writer-3": dup}, TONES)
