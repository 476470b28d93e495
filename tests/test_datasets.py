from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
import torch

from ks_lens.datasets import BehaviourDataset, load_dataset, load_questions, make_splits
from ks_lens.errors import DatasetError


def test_shipped_tones_dataset():
    ds = load_dataset("tones")
    assert ds.labels == ("helpful", "expert", "casual", "cautious", "empathetic", "concise")
    assert len(ds.questions) >= 540
    cats = Counter(q.category for q in ds.questions)
    assert len(cats) == 18 and min(cats.values()) >= 30
    texts = [" ".join(q.text.lower().split()) for q in ds.questions]
    assert len(set(texts)) == len(texts)
    for b in ds.behaviours:
        assert b.instruction.count(". ") >= 2, f"{b.name}: instruction should be several sentences"
    assert len({b.instruction for b in ds.behaviours}) == 6
    assert len(ds.content_hash()) == 64


def test_splits_are_disjoint_complete_and_seeded():
    ds = load_dataset("tones")
    s = make_splits(ds, seed=0)
    sets = {k: set(v) for k, v in s.assignment.items()}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not sets[a] & sets[b], f"{a} and {b} share questions"
    assert set().union(*sets.values()) == {q.id for q in ds.questions}
    assert make_splits(ds, seed=0) == s
    assert make_splits(ds, seed=1).assignment != s.assignment
    # file order does not matter
    shuffled = ds.with_questions(reversed(ds.questions))
    assert make_splits(shuffled, seed=0).assignment == s.assignment
    sizes = s.sizes()
    assert sizes["train"] > sizes["evaluator"] > sizes["calibration"] > 0
    restored = type(s).from_json(json.loads(json.dumps(s.to_json())))
    assert restored == s
    with pytest.raises(DatasetError, match="sum to 1"):
        make_splits(ds, fractions={"train": 0.5, "test": 0.6})
    with pytest.raises(DatasetError, match="unknown split"):
        s.ids("validation")


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_question_file_errors_name_the_line(tmp_path):
    p = _write(tmp_path, "q.jsonl", '{"text": "ok?"}\n{"text": "fine?"}\n{"text": ""}\n')
    with pytest.raises(DatasetError, match=r"q\.jsonl:3: empty question text"):
        load_questions(p)
    p = _write(tmp_path, "q2.jsonl", '{"text": "ok?"}\n{"text": "broken?"\n')
    with pytest.raises(DatasetError, match=r"q2\.jsonl:2: malformed JSON line"):
        load_questions(p)
    p = _write(tmp_path, "q3.jsonl", '{"text": "a?", "id": "x"}\n{"text": "b?", "id": "x"}\n')
    with pytest.raises(
        DatasetError, match=r"q3\.jsonl:2: duplicate id 'x' \(first at .*q3\.jsonl:1\)"
    ):
        load_questions(p)
    p = _write(tmp_path, "q4.jsonl", '{"text": "Same?"}\n{"text": "same?"}\n')
    with pytest.raises(DatasetError, match="duplicate question text"):
        load_questions(p)
    p = _write(tmp_path, "q5.jsonl", '{"category": "x"}\n')
    with pytest.raises(DatasetError, match="missing field 'text'"):
        load_questions(p)
    p = _write(tmp_path, "q6.jsonl", "[1, 2]\n")
    with pytest.raises(DatasetError, match="expected a JSON object"):
        load_questions(p)
    with pytest.raises(DatasetError, match="not found"):
        load_questions(tmp_path / "missing.jsonl")
    p = _write(tmp_path, "q.csv", "question_text,category\nhello?,x\n")
    with pytest.raises(DatasetError, match="header row with a 'text'"):
        load_questions(p)
    p = _write(tmp_path, "q.txt", "hello?\n")
    with pytest.raises(DatasetError, match="unsupported question file type"):
        load_questions(p)
    p = _write(tmp_path, "empty.jsonl", "\n\n")
    with pytest.raises(DatasetError, match="no questions found"):
        load_questions(p)


def test_csv_and_jsonl_questions(tmp_path):
    p = _write(tmp_path, "q.csv", 'text,category,id\n"How, exactly?",cat1,a1\nWhy?,cat2,\n')
    qs = load_questions(p)
    assert [q.text for q in qs] == ["How, exactly?", "Why?"]
    assert qs[0].id == "a1" and qs[1].id == "q00001" and qs[1].category == "cat2"
    p = _write(
        tmp_path,
        "q.jsonl",
        '{"text": " spaced? ", "category": "c"}\n\n{"question": "alt field?"}\n',
    )
    qs = load_questions(p)
    assert [q.text for q in qs] == ["spaced?", "alt field?"]


def test_user_behaviour_dataset_and_unknown_label(tmp_path):
    spec = {
        "name": "mine",
        "behaviours": [
            {"name": "formal", "instruction": "Be formal."},
            {"name": "silly", "instruction": "Be silly."},
        ],
        "questions": "qs.jsonl",
    }
    _write(tmp_path, "qs.jsonl", '{"text": "Hello?"}\n{"text": "Why?", "label": "silly"}\n')
    path = _write(tmp_path, "beh.json", json.dumps(spec))
    ds = load_dataset(path)
    assert ds.name == "mine" and ds.labels == ("formal", "silly")
    assert [(q.id, i) for q, i in ds.pairs()] == [("q00000", 0), ("q00000", 1), ("q00001", 1)]
    _write(tmp_path, "bad.jsonl", '{"text": "Hello?", "label": "grumpy"}\n')
    with pytest.raises(DatasetError, match="unknown label 'grumpy'"):
        load_dataset(path, questions=tmp_path / "bad.jsonl")
    bad = _write(tmp_path, "beh2.json", json.dumps({"behaviours": [{"name": "x"}]}))
    with pytest.raises(DatasetError, match=r"behaviours\[0\] needs string fields"):
        load_dataset(bad)
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("nonexistent-dataset")


def test_external_questions_replace_shipped(tmp_path):
    p = _write(tmp_path, "ext.jsonl", '{"text": "What is love?"}\n')
    ds = load_dataset("tones", questions=p)
    assert len(ds.questions) == 1 and ds.labels[0] == "helpful"


def test_dataset_validation():
    from ks_lens.datasets import Behaviour, Question

    with pytest.raises(DatasetError, match="repeats behaviour names"):
        BehaviourDataset("x", (Behaviour("a", "A."), Behaviour("a", "B.")), ())
    with pytest.raises(DatasetError, match="behaviour name 'a,b' contains a comma"):
        BehaviourDataset("x", (Behaviour("a,b", "A."),), ())
    # one rule for labels everywhere (ks_lens.datasets.label_name_problem / case_twin)
    with pytest.raises(DatasetError, match="'casual' and 'Casual' differ only in capitals"):
        BehaviourDataset("x", (Behaviour("casual", "A."), Behaviour("Casual", "B.")), ())
    BehaviourDataset("x", (Behaviour("a", "A."), Behaviour("b", "B."), Behaviour("a+b", "AB.")), ())
    with pytest.raises(DatasetError, match="repeats question ids"):
        BehaviourDataset("x", (Behaviour("a", "A."),), (Question("1", "x?"), Question("1", "y?")))


def test_head_spreads_over_categories(tiny_dataset):
    h = tiny_dataset.head(5)
    assert len(h.questions) == 5
    assert len({q.category for q in h.questions}) == 5
    assert tiny_dataset.head(None) is tiny_dataset


def test_combined_behaviours_rotate_and_give_multi_hot_targets(tiny_dataset):
    from ks_lens.datasets import base_labels, multi_hot

    ds = tiny_dataset.with_combinations((2,), per_question=1)
    assert ds.labels == ("alpha", "beta", "gamma", "alpha+beta", "alpha+gamma", "beta+gamma")
    assert ds.base_labels == ("alpha", "beta", "gamma")
    assert ds.instruction("alpha+beta") == " ".join(
        [tiny_dataset.instruction("alpha"), tiny_dataset.instruction("beta")]
    )
    pairs = ds.pairs()
    # every question under the 3 single behaviours and exactly 1 combined one, rotating
    assert len(pairs) == len(ds.questions) * 4
    combined = [ds.labels[i] for _, i in pairs if "+" in ds.labels[i]]
    assert Counter(combined) == {"alpha+beta": 4, "alpha+gamma": 4, "beta+gamma": 4}
    assert len(ds.with_combinations((2,)).pairs()) == len(ds.questions) * 6  # all combinations
    y = multi_hot(torch.tensor([0, 3, 5, -1]), ds.labels)
    assert y.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 0]]
    assert ds.content_hash() != tiny_dataset.content_hash()
    with pytest.raises(DatasetError, match="unknown labels"):
        base_labels(["a", "a+zzz"])
    with pytest.raises(DatasetError, match="impossible"):
        tiny_dataset.with_combinations((4,))


def test_reserved_questions_never_land_in_test(tiny_dataset):
    reserved = frozenset({"q00", "q02", "q07"})
    ds = replace(tiny_dataset, reserved_from_test=reserved)
    for seed in range(10):
        sp = make_splits(ds, seed=seed)
        assert not set(sp.ids("test")) & reserved
        assert sum(sp.sizes().values()) == len(ds.questions)
    assert ds.content_hash() != tiny_dataset.content_hash()
    # a category made only of reserved questions cannot supply a test question
    food = frozenset(q.id for q in tiny_dataset.questions if q.category == "food")
    with pytest.raises(DatasetError, match="too few unreserved"):
        make_splits(replace(tiny_dataset, reserved_from_test=food), seed=0)


def test_shipped_tones_reserve_the_gold_questions():
    from ks_lens.datasets.gold_texts import load_gold_texts

    ds = load_dataset("tones")
    gold_q = {t.question_id for t in load_gold_texts()}
    assert ds.reserved_from_test == gold_q and len(gold_q) >= 120


def test_question_files_that_are_not_utf8_name_file_and_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes('{"text": "ok?"}\n{"text": "Où est la gare?"}\n'.encode("latin-1"))
    with pytest.raises(
        DatasetError, match=r"latin1\.jsonl:2: byte 0xf9 is not valid UTF-8; expected UTF-8"
    ):
        load_questions(p)
    p = tmp_path / "utf16.jsonl"
    p.write_bytes('{"text": "ok?"}\n'.encode("utf-16"))
    with pytest.raises(DatasetError, match=r"utf16\.jsonl:1: .*looks like UTF-16.*expected UTF-8"):
        load_questions(p)
    p = tmp_path / "latin1.csv"
    p.write_bytes("text\nfine?\ncafé?\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1\.csv:3: .*expected UTF-8"):
        load_questions(p)
    # a UTF-8 byte-order mark is fine
    p = tmp_path / "bom.json"
    p.write_bytes('[{"text": "Où?"}]'.encode("utf-8-sig"))
    assert load_questions(p)[0].text == "Où?"


def test_question_text_of_the_wrong_type_is_named(tmp_path):
    p = _write(tmp_path, "q.jsonl", '{"text": "ok?"}\n{"text": 123}\n')
    with pytest.raises(
        DatasetError, match=r"q\.jsonl:2: field 'text' must be a string, got int 123"
    ):
        load_questions(p)


def test_directories_given_as_files(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(DatasetError, match=r"d\.jsonl is a directory; expected a question file"):
        load_questions(tmp_path / "d.jsonl")
    with pytest.raises(DatasetError, match="is a directory; expected a behaviours file"):
        load_dataset(tmp_path)


def test_an_empty_split_is_named(tmp_path):
    p = _write(tmp_path, "two.jsonl", '{"text": "One?"}\n{"text": "Two?"}\n')
    ds = load_dataset("tones", questions=p)
    with pytest.raises(
        DatasetError,
        match=r"split 'calibration' of dataset 'tones' has no questions: its 2 questions .*calibration=0",
    ):
        ds.split("calibration")
    assert len(ds.split("train").questions) == 1
