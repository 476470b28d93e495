"""The shipped "concepts" family: definition, gold texts, loaders, text evaluator, demo.

Two groups of data checks: those on the family and on the texts that exist now, and the coverage
and balance checks of the complete set (``test_concept_gold_*_coverage*``), which hold once every
writer's texts are in ``ks_lens/data/gold_concepts.jsonl`` (>= 120 questions x 6 single
concepts, >= 240 two-concept and >= 60 three-concept texts, balanced).
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from ks_lens.cli import main
from ks_lens.datasets import family_file, load_dataset, make_splits
from ks_lens.datasets.gold_texts import (
    LabelledText,
    load_gold_texts,
    normalise_text,
    split_by_question,
)
from ks_lens.errors import DatasetError
from ks_lens.text_evaluator import (
    TextEvaluator,
    TextEvaluatorConfig,
    default_text_evaluator,
    validate_text_evaluator,
)

CONCEPTS = ("cooking", "space", "animals", "sports", "music", "weather")


@pytest.fixture(scope="module")
def gold() -> tuple[LabelledText, ...]:
    return load_gold_texts("concepts")


# ----------------------------------------------------------------------------- the family


def test_concepts_family_definition():
    ds = load_dataset("concepts")
    tones = load_dataset("tones")
    assert ds.name == "concepts" and ds.labels == CONCEPTS
    for b in ds.behaviours:
        # each instruction asks to weave its own concept in, and names no other concept
        assert "weave" in b.instruction and b.name in b.instruction.lower()
        others = [c for c in CONCEPTS if c != b.name and c in b.instruction.lower()]
        assert not others, (b.name, others)
    assert ds.questions == tones.questions  # the tone-neutral questions, reused
    assert ds.reserved_from_test == tones.reserved_from_test
    assert ds.content_hash() != tones.content_hash()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_concepts_splits_are_the_tones_splits(seed):
    assert make_splits(load_dataset("concepts"), seed=seed) == make_splits(
        load_dataset("tones"), seed=seed
    )


def test_family_file_names_the_gold_texts():
    with family_file("concepts", "gold_texts") as p:
        assert p.name == "gold_concepts.jsonl" and p.exists()
    with family_file("tones", "gold_texts") as p:
        assert p.name == "gold_tones.jsonl"


def test_family_without_gold_texts_is_refused(tmp_path):
    spec = {"name": "mine", "questions": [{"text": "How do I start?"}]}
    spec["behaviours"] = [{"name": "a", "instruction": "Be a."}, {"name": "b", "instruction": "B"}]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(DatasetError, match=r"mine\.json: no 'gold_texts' file named"):
        load_gold_texts(str(path))
    path.write_text(json.dumps({**spec, "gold_texts": "absent.jsonl"}))
    with pytest.raises(DatasetError, match=r"its 'gold_texts' file .*absent\.jsonl does not exist"):
        load_gold_texts(str(path))
    with pytest.raises(DatasetError, match="unknown dataset 'nope'"):
        load_gold_texts("nope")


def test_own_family_gold_texts_load_from_its_json(tmp_path):
    """A user's family: the JSON names its gold texts; labels are checked and reordered."""
    rows = [
        {"question_id": "q1", "question": "How?", "labels": ["b", "a"], "text": "Both."},
        {"question_id": "q2", "question": "Why?", "labels": ["a"], "text": "Only a."},
    ]
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = {
        "name": "mine",
        "questions": [{"text": "How?"}],
        "gold_texts": "texts.jsonl",
        "behaviours": [{"name": "a", "instruction": "Be a."}, {"name": "b", "instruction": "B"}],
    }
    (tmp_path / "mine.json").write_text(json.dumps(spec))
    texts = load_gold_texts(str(tmp_path / "mine.json"))
    assert [(t.labels, t.text) for t in texts] == [(("a", "b"), "Both."), (("a",), "Only a.")]
    (tmp_path / "texts.jsonl").write_text(json.dumps(rows[0]) + "\n")  # edits show at once
    assert [t.text for t in load_gold_texts(str(tmp_path / "mine.json"))] == ["Both."]
    rows[1]["labels"] = ["c"]
    (tmp_path / "texts2.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "mine2.json").write_text(json.dumps({**spec, "gold_texts": "texts2.jsonl"}))
    with pytest.raises(DatasetError, match=r"texts2\.jsonl:2: unknown label 'c'"):
        load_gold_texts(str(tmp_path / "mine2.json"))


# ----------------------------------------------------------------------------- texts (now)


def test_concept_gold_fields_labels_and_questions(gold):
    questions = {q.id: q.text for q in load_dataset("concepts").questions}
    ids = [t.id for t in gold]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"gold-c-\d{4}", i) for i in ids), ids[:3]
    for t in gold:
        assert 1 <= len(t.labels) <= 3 and set(t.labels) <= set(CONCEPTS), t.id
        assert list(t.labels) == [c for c in CONCEPTS if c in t.labels], "canonical order"
        assert t.question_id in questions, t.id
        assert t.question == questions[t.question_id], t.id
        assert t.source is not None and re.fullmatch(r"writer-c\d+", t.source), t.id
        assert 35 <= len(t.text.split()) <= 110, (t.id, len(t.text.split()))


def test_concept_gold_has_no_duplicate_texts(gold):
    assert len({normalise_text(t.text) for t in gold}) == len(gold)


def test_concept_gold_questions_never_in_test_split(gold):
    ds = load_dataset("concepts")
    gold_q = {t.question_id for t in gold}
    assert gold_q <= ds.reserved_from_test  # so no seed can put them in the test split
    for seed in range(5):
        leaked = gold_q & set(make_splits(ds, seed=seed).ids("test"))
        assert not leaked, f"seed {seed}: {sorted(leaked)[:5]}"


def test_writer_c1_share(gold):
    """Texts by writer-c1: 20 questions, each with all six single-concept texts, ids 1..120."""
    mine = [t for t in gold if t.source == "writer-c1"]
    assert [t.id for t in mine] == [f"gold-c-{i:04d}" for i in range(1, 121)]
    per_q: dict[str, list[str]] = defaultdict(list)
    for t in mine:
        assert len(t.labels) == 1
        per_q[t.question_id or ""].append(t.labels[0])
    assert len(per_q) == 20 and all(v == list(CONCEPTS) for v in per_q.values())


# ----------------------------------------------------------------------------- texts (complete set)


def _balanced(counts: Counter, expected: set, tolerance: float = 0.3) -> None:
    assert set(counts) == expected, f"missing: {sorted(expected - set(counts))}"
    mean = sum(counts.values()) / len(counts)
    for key, n in counts.items():
        assert (1 - tolerance) * mean <= n <= (1 + tolerance) * mean, f"{key}: {n} vs {mean:.1f}"


def test_concept_gold_single_coverage(gold):
    """>= 120 questions with all six single-concept texts, singles balanced over concepts."""
    singles: dict[str, set[str]] = defaultdict(set)
    for t in gold:
        if len(t.labels) == 1:
            singles[t.question_id or ""].add(t.labels[0])
    complete = [q for q, cs in singles.items() if cs == set(CONCEPTS)]
    assert len(complete) >= 120, f"{len(complete)} questions with all six single concepts"
    _balanced(Counter(t.labels[0] for t in gold if len(t.labels) == 1), set(CONCEPTS), 0.1)


def test_concept_gold_multi_coverage_and_balance(gold):
    """>= 240 two-concept and >= 60 three-concept texts, every pair and triple, balanced."""
    pairs = Counter(t.labels for t in gold if len(t.labels) == 2)
    triples = Counter(t.labels for t in gold if len(t.labels) == 3)
    assert sum(pairs.values()) >= 240, f"{sum(pairs.values())} two-concept texts"
    assert sum(triples.values()) >= 60, f"{sum(triples.values())} three-concept texts"
    _balanced(pairs, set(itertools.combinations(CONCEPTS, 2)))
    _balanced(triples, set(itertools.combinations(CONCEPTS, 3)))
    # each label about equally often among the combined texts
    _balanced(Counter(x for t in gold if len(t.labels) > 1 for x in t.labels), set(CONCEPTS))


def test_concept_gold_writers_and_questions_spread(gold):
    """Several writers, and no question carries more than its share of combined texts."""
    assert len({t.source for t in gold}) >= 3
    combined = Counter(t.question_id for t in gold if len(t.labels) > 1)
    assert len(combined) >= 100 and max(combined.values()) <= 6


# ----------------------------------------------------------------------------- evaluator


def test_concept_evaluator_trains_and_separates_concepts(gold):
    """Question-grouped CV on the shipped concept texts: well above chance (1/6) per label."""
    cfg = TextEvaluatorConfig(max_iter=500)
    v = validate_text_evaluator(gold, CONCEPTS, cfg, n_folds=5)
    assert v.label_names == CONCEPTS and v.n_texts == len(gold)
    assert v.question_cv.single_accuracy >= 0.75
    assert all(auc >= 0.85 for auc in v.question_cv.per_label_auc.values())


def test_default_evaluator_of_the_concepts_family(gold, tmp_path):
    cfg = TextEvaluatorConfig(max_iter=500)
    ev = default_text_evaluator(tmp_path, config=cfg, family="concepts")
    assert ev.label_names == CONCEPTS and ev.validity is not None
    assert ev.validity.n_texts == len(gold)
    probs = ev.predict_proba(
        [
            "Preheat the oven, whisk the eggs with sugar and bake the cake for thirty minutes.",
            "The probe left orbit and flew past Jupiter toward the outer planets.",
        ]
    )
    assert probs.shape == (2, 6)
    assert [CONCEPTS[i] for i in np.argmax(probs, axis=1)] == ["cooking", "space"]
    again = default_text_evaluator(tmp_path, config=cfg, family="concepts")  # cached copy
    assert again.estimator is None and again.training_hash == ev.training_hash
    # another family: its own labels and cache entry (a quarter of its gold texts keeps it quick)
    few = split_by_question(load_gold_texts("tones"), 0.25, seed=0)[0]
    tones = default_text_evaluator(tmp_path, config=cfg, family="tones", texts=few)
    assert tones.label_names != CONCEPTS and tones.training_hash != ev.training_hash


def test_text_evaluator_cli_takes_the_dataset(tmp_path, capsys):
    out = tmp_path / "ev"
    code = main(["train-text-evaluator", "--dataset", "concepts", "--folds", "0", "--out", str(out)])
    assert code == 0
    assert TextEvaluator.load(out).label_names == CONCEPTS
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"id": "x", "text": "The band played a slow song."}) + "\n")
    capsys.readouterr()
    assert main(["evaluate-text", "--texts", str(texts), "--evaluator", str(out)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["id"] == "x" and list(row["probs"]) == list(CONCEPTS)
    assert max(row["probs"], key=row["probs"].get) == "music"


# ----------------------------------------------------------------------------- demo


def test_demo_on_the_concepts_family(tmp_path, capsys):
    """``ks-lens demo --dataset concepts --fast`` on the tiny model: the family's labels,
    instructions, gold texts and evaluator all the way through."""
    out = tmp_path / "demo"
    args = ["demo", "--fast", "--model", "tiny-random-llama", "--dataset", "concepts"]
    args += ["--n-gold", "96", "--methods", "caa_mean,ksteer", "--out", str(out)]
    assert main(["-q", *args]) == 0
    printed = capsys.readouterr().out
    assert "generated text at equal KL" in printed and "CAA (mean)" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == list(CONCEPTS)
    assert report["dataset"]["name"] == "concepts"
    assert report["dataset"]["n_gold_texts"] == len(load_gold_texts("concepts"))
    assert report["dataset"]["hash"] == load_dataset("concepts").content_hash()
    validity = report["text_evaluator_validity"]
    assert validity["label_names"] == list(CONCEPTS)
    answers = report["text_eval"]["answers"]
    assert answers and all(len(a["text_probs"]) == 6 for a in answers)
    targets = {x for a in answers for x in a.get("targets", [])}
    assert targets and targets <= set(CONCEPTS)

