"""The debates family (DebateMix-style argumentation styles): definition, questions, gold texts."""

from __future__ import annotations

import itertools
import re
from collections import Counter, defaultdict

import pytest

from ks_lens.datasets import load_dataset, make_splits
from ks_lens.datasets.gold_texts import load_gold_texts, normalise_text
from ks_lens.text_evaluator import TextEvaluatorConfig, validate_text_evaluator

STYLES = (
    "reductio_ad_absurdum",
    "appeal_to_precedent",
    "straw_man_reframing",
    "burden_of_proof_shift",
    "analogy_construction",
    "concession_and_pivot",
    "empirical_grounding",
    "moral_framing",
    "refutation_by_distinction",
    "circular_anticipation",
)


@pytest.fixture(scope="module")
def gold():
    return load_gold_texts("debates")


def test_debates_family_definition():
    ds = load_dataset("debates")
    assert ds.name == "debates" and ds.labels == STYLES
    for label in STYLES:
        text = ds.instruction(label)
        assert 100 <= len(text) <= 700 and text.startswith("You are"), label
    assert len({ds.instruction(label) for label in STYLES}) == len(STYLES)


def test_debate_questions_topics_and_splits():
    ds = load_dataset("debates")
    assert len(ds.questions) >= 300
    topics = Counter(q.category for q in ds.questions)
    assert len(topics) >= 10 and min(topics.values()) >= 25, topics
    assert len({normalise_text(q.text) for q in ds.questions}) == len(ds.questions)
    for q in ds.questions:
        assert re.fullmatch(r"[a-z]+-\d{3}", q.id) and q.id.startswith(q.category), q.id
    sizes = {s: len(ds.split(s).questions) for s in ("train", "evaluator", "calibration", "test")}
    assert sum(sizes.values()) == len(ds.questions) and min(sizes.values()) >= 25, sizes


def test_debate_gold_fields_labels_and_questions(gold):
    questions = {q.id: q.text for q in load_dataset("debates").questions}
    ids = [t.id for t in gold]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"gold-d-\d{4}", i) for i in ids)
    for t in gold:
        assert 1 <= len(t.labels) <= 2 and set(t.labels) <= set(STYLES), t.id
        assert list(t.labels) == [s for s in STYLES if s in t.labels], "canonical order"
        assert t.question_id in questions and t.question == questions[t.question_id], t.id
        assert t.source is not None and re.fullmatch(r"writer-d\d+", t.source), t.id
        assert 40 <= len(t.text.split()) <= 125, (t.id, len(t.text.split()))
    assert len({normalise_text(t.text) for t in gold}) == len(gold)
    assert len({t.source for t in gold}) >= 2


def test_debate_gold_coverage(gold):
    """>= 60 questions with all ten single-style texts; every pair of styles at least twice."""
    singles: dict[str, set[str]] = defaultdict(set)
    for t in gold:
        if len(t.labels) == 1:
            singles[t.question_id or ""].add(t.labels[0])
    complete = [q for q, styles in singles.items() if styles == set(STYLES)]
    assert len(complete) >= 60, f"{len(complete)} questions with all ten styles"
    pairs = Counter(t.labels for t in gold if len(t.labels) == 2)
    assert set(pairs) == set(itertools.combinations(STYLES, 2))
    assert min(pairs.values()) >= 2, pairs.most_common()[-1]


def test_debate_gold_questions_never_in_test_split(gold):
    ds = load_dataset("debates")
    gold_q = {t.question_id for t in gold}
    assert gold_q <= ds.reserved_from_test
    for seed in range(3):
        assert not gold_q & set(make_splits(ds, seed=seed).ids("test")), seed


def test_debate_evaluator_separates_the_styles(gold):
    """Question-grouped CV on the shipped debate texts: far above chance (1/10) per style."""
    v = validate_text_evaluator(gold, STYLES, TextEvaluatorConfig(max_iter=500), n_folds=5)
    assert v.n_texts == len(gold)
    assert v.question_cv.single_accuracy >= 0.5
    assert all(auc >= 0.75 for auc in v.question_cv.per_label_auc.values())
