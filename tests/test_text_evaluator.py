"""The text-level tone evaluator: fitting, exact save/load, tamper checks, validity, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.preprocessing import StandardScaler

from ks_lens import cli
from ks_lens.datasets.gold_texts import LabelledText, load_gold_texts
from ks_lens.errors import (
    ConfigError,
    DatasetError,
    LabelError,
    MetadataMismatchError,
    StoreError,
    WrongTypeError,
)
from ks_lens.evaluation.style import STYLE_METER_NAMES, STYLE_VERSION, style_matrix
from ks_lens.io import META_FILE, TENSORS_FILE, load_artifact, meta_checksum
from ks_lens.text_evaluator import (
    HeldOutScores,
    TextEvaluator,
    TextEvaluatorConfig,
    TextEvaluatorValidity,
    cross_val_proba,
    default_text_evaluator,
    held_out_scores,
    prefix_views,
    validate_text_evaluator,
)
from ks_lens.text_evaluator.v1 import V1_VOCAB_FILE, v1_checksum

TONES = ("helpful", "expert", "casual", "cautious", "empathetic", "concise")


@pytest.fixture(scope="module")
def gold() -> tuple[LabelledText, ...]:
    return load_gold_texts()


@pytest.fixture(scope="module")
def train_texts(gold) -> tuple[LabelledText, ...]:
    return gold[::3]


@pytest.fixture(scope="module")
def heldout_texts(gold) -> list[str]:
    return [t.text for t in gold[1::7]] + ["", "lol ok!!", "Please consult a doctor first."]


@pytest.fixture(scope="module")
def evaluator(train_texts) -> TextEvaluator:
    return TextEvaluator.fit(train_texts, TONES)


@pytest.fixture(scope="module")
def saved(evaluator, tmp_path_factory) -> Path:
    return evaluator.save(tmp_path_factory.mktemp("ev") / "evaluator")


def _copy(saved: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(saved, out)
    return out


# ----------------------------------------------------------------------------- fit / predict


def test_predict_proba_shape_and_independence(evaluator, heldout_texts):
    p = evaluator.predict_proba(heldout_texts)
    assert p.shape == (len(heldout_texts), 6) and p.dtype == np.float64
    assert np.all((p >= 0) & (p <= 1))
    assert not np.allclose(p.sum(axis=1), 1.0), "per-label sigmoids, not a softmax"
    assert evaluator.label_names == TONES
    assert evaluator.predict_proba([]).shape == (0, 6)
    with pytest.raises(WrongTypeError, match="not one string"):
        evaluator.predict_proba("just one text")  # type: ignore[arg-type]


def test_fit_is_deterministic(train_texts, evaluator):
    again = TextEvaluator.fit(train_texts, TONES)
    np.testing.assert_array_equal(again.coef, evaluator.coef)
    np.testing.assert_array_equal(again.intercept, evaluator.intercept)


def test_predictions_follow_tones(evaluator):
    texts = [
        "ngl that's kinda awesome lol, just chill and grab a snack!",
        "It may be risky; please consult a qualified professional before you try this.",
    ]
    top = evaluator.predict_proba(texts).argmax(axis=1)
    assert [TONES[i] for i in top] == ["casual", "cautious"]


def test_fit_errors(train_texts):
    with pytest.raises(LabelError, match="has unknown label"):
        TextEvaluator.fit(train_texts, ("helpful", "expert"))
    with pytest.raises(LabelError, match="distinct"):
        TextEvaluator.fit(train_texts, (*TONES, "casual"))
    only_casual = [t for t in train_texts if "casual" in t.labels]
    with pytest.raises(DatasetError, match="label 'casual' is on"):
        TextEvaluator.fit(only_casual, TONES)
    with pytest.raises(DatasetError, match="no texts"):
        TextEvaluator.fit([], TONES)
    with pytest.raises(ConfigError, match="C must be"):
        TextEvaluatorConfig(C=0)


# ----------------------------------------------------------------------------- save / load


def test_round_trip_equals_sklearn(evaluator, saved, train_texts, heldout_texts):
    loaded = TextEvaluator.load(saved, labels=TONES)
    assert loaded.estimator is None and loaded.config == evaluator.config
    assert loaded.training_hash == evaluator.training_hash
    assert loaded.n_training_texts == len(train_texts)
    # the reference: the fitted scikit-learn pipeline pieces, assembled independently
    cfg = evaluator.config
    seen = list(train_texts) + prefix_views(train_texts, cfg.prefix_words)  # what fit() trains on
    scaler = StandardScaler().fit(style_matrix([t.text for t in seen]))
    x = sp.hstack(
        [
            evaluator.word_vectorizer.transform(heldout_texts),
            evaluator.char_vectorizer.transform(heldout_texts),
            sp.csr_matrix(scaler.transform(style_matrix(heldout_texts)) * cfg.style_weight),
        ],
        format="csr",
    )
    reference = evaluator.estimator.predict_proba(x)
    np.testing.assert_allclose(loaded.predict_proba(heldout_texts), reference, rtol=0, atol=1e-10)
    np.testing.assert_allclose(
        evaluator.predict_proba(heldout_texts), reference, rtol=0, atol=1e-10
    )


def test_saved_files_hold_no_pickle(saved):
    """One artefact format (ks_lens.io): the same two files, the same checksum key."""
    assert sorted(p.name for p in saved.iterdir()) == sorted([META_FILE, TENSORS_FILE])
    meta = json.loads((saved / META_FILE).read_text())
    assert meta["format"] == "ks_lens.text_evaluator" and meta["format_version"] == 2
    assert meta["meta_sha256"] == meta_checksum(meta) and "checksum" not in meta
    assert meta["label_names"] == list(TONES)
    assert set(meta["versions"]) >= {"ks_lens", "scikit_learn", "numpy", "torch"}
    tensors, _ = load_artifact(saved, artefact="text_evaluator")
    for name in ("word", "char"):
        vocab = json.loads(tensors[f"{name}_vocabulary"].numpy().tobytes().decode("utf-8"))
        assert len(vocab) == meta["n_features"][name] == len(tensors[f"{name}_idf"])
    assert tensors["coef"].shape == (len(TONES), sum(meta["n_features"].values()))
    for p in saved.iterdir():
        assert b"\x80\x04\x95" not in p.read_bytes()[:64], f"{p.name} looks like a pickle"


def _write_v1(ev: TextEvaluator, directory: Path, *, max_words: bool = True) -> Path:
    """``ev`` saved by hand in the layout of ks-lens 0.1: ``vocabulary.json`` beside the tensor
    file, and a ``meta.json`` (format_version 1) recording both files' SHA-256 and a
    ``checksum`` over itself (``max_words=False``: as before the training length was recorded)."""
    from safetensors.numpy import save as st_save

    from ks_lens.compat import versions

    directory.mkdir(parents=True)
    arrays = {
        "word_idf": ev.word_vectorizer.idf_,
        "char_idf": ev.char_vectorizer.idf_,
        "coef": ev.coef,
        "intercept": ev.intercept,
        "style_mean": ev.style_mean,
        "style_scale": ev.style_scale,
    }
    terms = {}
    for name, vec in (("word", ev.word_vectorizer), ("char", ev.char_vectorizer)):
        terms[name] = sorted(vec.vocabulary_, key=vec.vocabulary_.get)
    blobs = {
        TENSORS_FILE: st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()}),
        V1_VOCAB_FILE: json.dumps(terms, ensure_ascii=False).encode("utf-8"),
    }
    for name, b in blobs.items():
        (directory / name).write_bytes(b)
    training = {"texts_hash": ev.training_hash, "n_texts": ev.n_training_texts}
    if max_words:
        training["max_words"] = ev.training_max_words
    meta = {
        "format": "ks_lens.text_evaluator",
        "format_version": 1,
        "label_names": list(ev.label_names),
        "config": ev.config.to_json(),
        "style_meters": list(STYLE_METER_NAMES),
        "style_version": STYLE_VERSION,
        "training": training,
        "versions": versions(),
        "validity": None if ev.validity is None else ev.validity.to_json(),
        "files": {
            n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in blobs.items()
        },
    }
    meta["checksum"] = v1_checksum(meta)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return directory


def test_evaluators_saved_in_the_old_layout_still_load(evaluator, heldout_texts, tmp_path):
    """0.1's layout (vocabulary.json, a "checksum" key) loads to the same predictions, with
    its old checks: a modified vocabulary or meta.json is refused, saying how to re-train."""
    old = _write_v1(evaluator, tmp_path / "old")
    back = TextEvaluator.load(old, labels=TONES)
    assert back.training_max_words == evaluator.training_max_words
    np.testing.assert_allclose(
        back.predict_proba(heldout_texts), evaluator.predict_proba(heldout_texts), atol=1e-12
    )
    # saving over it replaces it with the current layout
    back.save(old)
    assert sorted(p.name for p in old.iterdir()) == sorted([META_FILE, TENSORS_FILE])
    old = _write_v1(evaluator, tmp_path / "vocab")
    vocab = json.loads((old / V1_VOCAB_FILE).read_text())
    vocab["word"][0], vocab["word"][1] = vocab["word"][1], vocab["word"][0]
    (old / V1_VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False))
    with pytest.raises(StoreError, match="vocabulary.json does not match .*Re-train it"):
        TextEvaluator.load(old)
    (old / V1_VOCAB_FILE).unlink()
    with pytest.raises(StoreError, match="text evaluator file missing: .*vocabulary.json"):
        TextEvaluator.load(old)
    old = _write_v1(evaluator, tmp_path / "meta")
    meta = json.loads((old / META_FILE).read_text())
    meta["label_names"][0] = "useful"
    (old / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="does not match its checksum; .*Re-train it"):
        TextEvaluator.load(old)
    meta["format_version"] = 7
    meta["checksum"] = v1_checksum(meta)
    (old / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="version 7 is not supported. Re-train it"):
        TextEvaluator.load(old)


def test_label_mismatch_refused(saved):
    with pytest.raises(MetadataMismatchError, match="trained for labels"):
        TextEvaluator.load(saved, labels=("formal", "slangy"))
    with pytest.raises(MetadataMismatchError, match="different order"):
        TextEvaluator.load(saved, labels=tuple(reversed(TONES)))


def test_tampered_tensor_file_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    data = bytearray((d / TENSORS_FILE).read_bytes())
    data[-5] ^= 0xFF
    (d / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum"):
        TextEvaluator.load(d)


@pytest.mark.parametrize(
    ("path", "value"),
    [(("config", "C"), 1.0), (("label_names", 0), "useful"), (("training", "n_texts"), 1)],
)
def test_tampered_meta_fields_refused(saved, tmp_path, path, value):
    d = _copy(saved, tmp_path)
    meta = json.loads((d / META_FILE).read_text())
    meta[path[0]][path[1]] = value
    (d / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="was modified after saving.*meta_sha256"):
        TextEvaluator.load(d)


def test_missing_or_foreign_artefacts_refused(saved, tmp_path):
    with pytest.raises(StoreError, match="no text_evaluator found"):
        TextEvaluator.load(tmp_path / "nothing")
    d = _copy(saved, tmp_path)
    (d / TENSORS_FILE).unlink()
    with pytest.raises(StoreError, match="missing"):
        TextEvaluator.load(d)
    (d / META_FILE).write_text(json.dumps({"format": "ks_lens.probe"}))
    with pytest.raises(StoreError, match="not a ks_lens.text_evaluator"):
        TextEvaluator.load(d)
    (d / META_FILE).write_text("{truncated")
    with pytest.raises(StoreError, match="not valid JSON"):
        TextEvaluator.load(d)


# ----------------------------------------------------------------------------- validity


def test_held_out_scores_on_hand_made_probabilities():
    names = ("a", "b", "c")
    y = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]])
    p = np.array(
        [
            [0.9, 0.1, 0.2],  # correct
            [0.6, 0.5, 0.1],  # wrong (a > b)
            [0.1, 0.2, 0.7],  # correct
            [0.8, 0.7, 0.1],  # top-2 = {a, b}: hit
            [0.9, 0.8, 0.1],  # top-2 = {a, b}: miss
            [0.5, 0.5, 0.5],  # top-3 of 3 labels: hit
        ]
    )
    s = held_out_scores(y, p, names, scheme="question", n_folds=2, groups=list("xxyyyy"))
    assert s.n_single == 3 and s.single_accuracy == pytest.approx(2 / 3)
    assert s.single_recall == {"a": 1.0, "b": 0.0, "c": 1.0}
    assert (s.n_two, s.two_tone_top2) == (2, 0.5)
    assert (s.n_three, s.three_tone_top3) == (1, 1.0)
    assert s.by_group_single_accuracy == {"x": 0.5, "y": 1.0}
    # AUC of label c: positives {0.7, 0.1, 0.5} vs negatives {0.2, 0.1, 0.1}
    assert s.per_label_auc["c"] == pytest.approx((3 + 1 + 3) / 9)  # 0.1 ties two 0.1s: 2 x 1/2
    assert s.mean_auc == pytest.approx(np.mean(list(s.per_label_auc.values())))
    assert HeldOutScores.from_json(json.loads(json.dumps(s.to_json()))) == s


def _question_subset(gold, n_questions: int) -> list[LabelledText]:
    keep = sorted({t.question_id for t in gold})[:n_questions]
    return [t for t in gold if t.question_id in keep]


def test_validity_small_run(gold):
    texts = _question_subset(gold, 30)
    v = validate_text_evaluator(texts, TONES, n_folds=3)
    assert v.n_texts == len(texts) and v.label_names == TONES
    assert v.question_cv.n_folds == 3 and v.question_cv.n_texts == len(texts)
    assert v.writer_cv is not None and v.writer_cv.n_folds == 6
    assert set(v.writer_cv.by_group_single_accuracy or {}) == {f"writer-{i}" for i in range(1, 7)}
    for s in (v.question_cv, v.writer_cv):
        assert 0.6 <= s.single_accuracy <= 1.0
        assert all(0.5 <= a <= 1.0 for a in s.per_label_auc.values())
        assert s.n_two + s.n_three + s.n_single == len(texts)
    again = TextEvaluatorValidity.from_json(json.loads(json.dumps(v.to_json())))
    assert again == v
    assert "leave-one-writer-out" in v.summary()
    no_source = [dataclasses.replace(t, source=None) for t in texts]
    assert validate_text_evaluator(no_source, TONES, n_folds=2).writer_cv is None


def test_shipped_gold_meets_targets(gold):
    """Question-grouped 5-fold CV on the shipped gold texts: the documented targets hold."""
    from sklearn.preprocessing import MultiLabelBinarizer

    groups = [t.question_id or t.id for t in gold]
    probs = cross_val_proba(gold, TONES, TextEvaluatorConfig(), groups, 5)
    y = MultiLabelBinarizer(classes=list(TONES)).fit_transform([t.labels for t in gold])
    s = held_out_scores(y, probs, TONES, scheme="question", n_folds=5)
    assert s.single_accuracy >= 0.90
    assert s.two_tone_top2 is not None and s.two_tone_top2 >= 0.80
    assert min(s.per_label_auc.values()) >= 0.85


# ----------------------------------------------------------------------------- default evaluator


def test_default_evaluator_cache(gold, tmp_path, monkeypatch):
    import ks_lens.text_evaluator.default as te

    subset = tuple(_question_subset(gold, 8))
    monkeypatch.setattr(te, "load_gold_texts", lambda family="tones": subset)
    small = TextEvaluatorConfig(max_iter=500)
    ev = default_text_evaluator(tmp_path, config=small)
    assert ev.validity is not None and ev.validity.writer_cv is not None
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert folder.name.startswith("gold-") and "-sklearn-" in folder.name
    texts = [t.text for t in subset[:5]]
    again = default_text_evaluator(tmp_path, config=small)  # from the cache
    assert again.estimator is None and again.validity == ev.validity
    np.testing.assert_allclose(again.predict_proba(texts), ev.predict_proba(texts), atol=1e-10)
    (folder / TENSORS_FILE).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = default_text_evaluator(tmp_path, config=small)
    np.testing.assert_allclose(rebuilt.predict_proba(texts), ev.predict_proba(texts), atol=1e-10)
    assert TextEvaluator.load(folder, labels=TONES).training_hash == ev.training_hash
    # a cache written by ks-lens 0.1 (old layout) is used as it is, without a warning
    shutil.rmtree(folder)
    _write_v1(rebuilt, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached = default_text_evaluator(tmp_path, config=small)
    assert cached.validity == ev.validity and cached.training_hash == ev.training_hash
    np.testing.assert_allclose(cached.predict_proba(texts), ev.predict_proba(texts), atol=1e-10)
    # ... and one it cannot read (a damaged old layout) is rebuilt, never a crash
    (folder / V1_VOCAB_FILE).write_text("[]")
    with pytest.warns(UserWarning, match="unusable .*vocabulary.json does not match"):
        default_text_evaluator(tmp_path, config=small)
    assert sorted(p.name for p in folder.iterdir()) == sorted([META_FILE, TENSORS_FILE])
    other = default_text_evaluator(tmp_path, config=dataclasses.replace(small, C=1.0))
    assert other.config.C == 1.0
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2


# ----------------------------------------------------------------------------- CLI


def test_cli_evaluate_text(saved, tmp_path, capsys):
    f = tmp_path / "in.jsonl"
    f.write_text(
        json.dumps({"id": "a", "text": "lol yeah totally!!", "labels": "ignored"})
        + "\n\n"
        + json.dumps({"text": "It may be unsafe; consult an electrician."})
        + "\n"
    )
    assert cli.main(["evaluate-text", "--texts", str(f), "--evaluator", str(saved), "--style"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(x) for x in lines]
    assert len(rows) == 2
    assert rows[0]["id"] == "a" and "id" not in rows[1]
    for row in rows:
        assert list(row["probs"]) == list(TONES)
        assert all(0.0 <= v <= 1.0 for v in row["probs"].values())
        assert row["style"]["words"] > 0
    assert rows[0]["probs"]["casual"] > 0.5
    expected = TextEvaluator.load(saved).predict_proba(["lol yeah totally!!"])[0]
    assert [rows[0]["probs"][n] for n in TONES] == pytest.approx(expected.tolist(), abs=1e-6)
    assert cli.main(["evaluate-text", "--texts", str(f), "--evaluator", str(saved)]) == 0
    assert "style" not in json.loads(capsys.readouterr().out.splitlines()[0])


def test_cli_evaluate_text_errors(saved, tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 3}) + "\n")
    assert cli.main(["evaluate-text", "--texts", str(f), "--evaluator", str(saved)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{f}:2: 'text' must be a string" in err
    assert cli.main(["evaluate-text", "--texts", str(f), "--evaluator", str(tmp_path)]) == 2
    assert "ks-lens: error:" in capsys.readouterr().err


def test_cli_train_text_evaluator(gold, tmp_path, capsys):
    texts = _question_subset(gold, 12)
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(t.to_json()) + "\n" for t in texts))
    out = tmp_path / "ev"
    rc = cli.main(["train-text-evaluator", "--texts", str(f), "--out", str(out), "--folds", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "question-grouped CV" in printed and "leave-one-writer-out" in printed
    assert f"saved to {out}" in printed
    ev = TextEvaluator.load(out, labels=TONES)
    assert ev.validity is not None and ev.validity.question_cv.n_folds == 3
    assert ev.n_training_texts == len(texts)
    rc = cli.main(
        [
            "train-text-evaluator",
            *("--texts", str(f), "--out", str(tmp_path / "ev2"), "--labels", "casual,concise"),
        ]
    )
    assert rc == 2 and "unknown label" in capsys.readouterr().err
    assert math.isfinite(ev.validity.question_cv.mean_auc)


def test_prefix_views_keep_cut_answers_from_reading_as_concise(train_texts):
    """A long single-tone answer cut after 24 words is still that tone, not "concise"."""
    views = prefix_views(train_texts, 24)
    assert views and all(len(v.labels) == 1 and len(v.text.split()) == 24 for v in views)
    assert all(v.id.endswith("#prefix") for v in views)
    long_texts = [t for t in train_texts if len(t.labels) == 1 and len(t.text.split()) > 40]
    cut = [" ".join(t.text.split()[:20]) for t in long_texts]
    concise = TONES.index("concise")
    with_views = TextEvaluator.fit(train_texts, TONES)
    without = TextEvaluator.fit(train_texts, TONES, TextEvaluatorConfig(prefix_words=None))
    p_with = with_views.predict_proba(cut)[:, concise].mean()
    p_without = without.predict_proba(cut)[:, concise].mean()
    assert p_with < 0.2 and p_with < p_without
    with pytest.raises(ConfigError, match="prefix_words"):
        TextEvaluatorConfig(prefix_words=0)


# ----------------------------------------------------------------------------- issue 22


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _small_file(gold, tmp_path: Path, n_questions: int = 8) -> Path:
    f = tmp_path / "train.jsonl"
    texts = _question_subset(gold, n_questions)
    f.write_text("".join(json.dumps(t.to_json()) + "\n" for t in texts))
    return f


def test_train_text_evaluator_checks_out_first_and_needs_overwrite(gold, tmp_path, capsys):
    import torch

    from ks_lens.io import save_artifact

    f = _small_file(gold, tmp_path)
    probe = save_artifact(tmp_path / "probe", {"w": torch.ones(2)}, {"x": 1}, artefact="probe")
    store = tmp_path / "store"
    store.mkdir()
    (store / "meta.json").write_text(json.dumps({"format": "ks_lens.activation_store"}))
    (store / "shards").mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    before = {d: _tree(d) for d in (probe, store, other)}
    train = ["train-text-evaluator", "--texts", str(f), "--folds", "0", "--out"]
    for d, what in [
        (probe, "holds a probe, not a text evaluator"),
        (store, "holds an activation store, not a text evaluator"),
        (other, "is a non-empty directory that does not hold a text evaluator"),
    ]:
        assert cli.main([*train, str(d)]) == 2
        captured = capsys.readouterr()
        assert f"ks-lens: error: --out {d} {what}" in captured.err
        assert "trained on" not in captured.out  # refused before any training
        assert _tree(d) == before[d]
    out = tmp_path / "ev"
    assert cli.main([*train, str(out)]) == 0
    first = _tree(out)
    assert cli.main([*train, str(out), "--no-style"]) == 2
    assert "already holds a text evaluator; pass --overwrite" in capsys.readouterr().err
    assert _tree(out) == first
    assert cli.main([*train, str(out), "--no-style", "--overwrite"]) == 0
    assert TextEvaluator.load(out).config.use_style is False
    # the library refuses too (TextEvaluator.save): never a mixed directory
    with pytest.raises(StoreError, match="already holds a probe"):
        TextEvaluator.load(out).save(probe)
    assert _tree(probe) == before[probe]


def test_failed_save_keeps_the_old_evaluator_and_names_the_path(
    evaluator, gold, tmp_path, monkeypatch, capsys
):
    import ks_lens.io as kio

    out = evaluator.save(tmp_path / "ev")
    before = _tree(out)
    real = kio.atomic_write_bytes

    def disk_full(path, data):  # meta.json after the tensors: a save that fails midway
        if Path(path).name == META_FILE:
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(kio, "atomic_write_bytes", disk_full)
    with pytest.raises(OSError) as e:
        evaluator.save(out)
    assert e.value.filename == str(out) and e.value.errno == 28
    assert _tree(out) == before  # the old evaluator, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev"]  # no temporary left behind
    f = _small_file(gold, tmp_path)
    argv = ["train-text-evaluator", "--texts", str(f), "--folds", "0", "--overwrite"]
    assert cli.main([*argv, "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"ks-lens: error: {out}: No space left on device\n"
    assert _tree(out) == before
    TextEvaluator.load(out, labels=TONES)


def test_labels_with_commas_or_other_capitals_are_refused(gold, tmp_path, capsys):
    from ks_lens.datasets.gold_texts import load_labelled_texts

    rows = [t.to_json() for t in _question_subset(gold, 8)]
    first_casual = next(i for i, r in enumerate(rows) if "casual" in r["labels"]) + 1
    cases = [
        ("casual, concise", "label 'casual, concise' contains a comma"),
        (["casual,concise"], "label 'casual,concise' contains a comma"),
        (["casual+concise"], "label 'casual+concise' contains '+'"),
        (
            ["Casual"],
            f"label 'Casual' differs from 'casual' (first at {tmp_path / 'x.jsonl'}:"
            f"{first_casual}) only in capitals",
        ),
    ]
    for labels, message in cases:
        f = tmp_path / "x.jsonl"
        extra = {"id": "new", "labels": labels, "text": "A brand new text for this label."}
        f.write_text("".join(json.dumps(r) + "\n" for r in [*rows, extra]))
        with pytest.raises(DatasetError) as e:
            load_labelled_texts(f)
        assert str(e.value).startswith(f"{f}:{len(rows) + 1}: {message}")
        out = tmp_path / "ev"
        assert cli.main(["train-text-evaluator", "--texts", str(f), "--out", str(out)]) == 2
        assert f"{f}:{len(rows) + 1}: {message}" in capsys.readouterr().err
        assert not out.exists()
    # with the labels given, another spelling is an unknown label, with a hint
    with pytest.raises(DatasetError, match=r"unknown label 'Casual' \(labels are case-sensitive"):
        load_labelled_texts(f, TONES)
    # a repeated --labels names the repeat (it used to complain about 'helpful')
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train-text-evaluator", "--texts", str(f), "--out", str(tmp_path / "ev")]
    assert cli.main([*argv, "--labels", "casual,casual"]) == 2
    assert capsys.readouterr().err == (
        "ks-lens: error: --labels: label 'casual' is given twice; give each label once\n"
    )
    with pytest.raises(LabelError, match="labels 'casual' and 'Casual' differ only in capitals"):
        load_labelled_texts(f, ["casual", "Casual"])


def test_texts_far_longer_than_the_training_texts_warn(
    evaluator, saved, train_texts, tmp_path, capsys
):
    from ks_lens.text_evaluator import LONG_TEXT_FACTOR, LongTextWarning

    longest = max(len(t.text.split()) for t in train_texts)
    assert evaluator.training_max_words == longest
    assert TextEvaluator.load(saved).training_max_words == longest
    casual = [t.text for t in train_texts if "casual" in t.labels]
    joined = " ".join(casual)
    n = len(joined.split())
    assert n > LONG_TEXT_FACTOR * longest
    edge = " ".join(["word"] * (LONG_TEXT_FACTOR * longest))  # exactly at the limit: fine
    assert evaluator.long_texts([casual[0], joined, edge]) == [1]
    with pytest.warns(LongTextWarning) as w:
        p = evaluator.predict_proba([casual[0], joined])
    assert len(w) == 1
    assert str(w[0].message) == (
        f"1 of 2 texts (text 2) have up to {n} words, more than {LONG_TEXT_FACTOR} times the "
        f"longest training text of this evaluator ({longest} words); their scores are "
        "extrapolations and tend towards 0 or 1: score shorter parts instead"
    )
    assert p.shape == (2, len(TONES))  # scored all the same
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluator.predict_proba([*casual[:3], edge])
    # the command line warns once, naming the text by id, and still scores every text
    f = tmp_path / "in.jsonl"
    f.write_text(
        json.dumps({"id": "short", "text": casual[0]})
        + "\n"
        + json.dumps({"id": "all-casual", "text": joined})
        + "\n"
    )
    with pytest.warns(LongTextWarning) as w:
        assert cli.main(["evaluate-text", "--texts", str(f), "--evaluator", str(saved)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert len(w) == 1  # once, not again per chunk
    assert str(w[0].message).startswith(f"1 of 2 texts (id all-casual) have up to {n} words")
    assert cli._format_warning(w[0].message, LongTextWarning, "", 0).startswith(
        "ks-lens: warning: 1 of 2 texts (id all-casual)"
    )
    # evaluators saved before the length was recorded still load (and cannot warn)
    old = TextEvaluator.load(_write_v1(evaluator, tmp_path / "old", max_words=False))
    assert old.training_max_words is None and old.long_texts([joined]) == []
    np.testing.assert_array_equal(old.predict_proba([joined]), p[1:])


def test_evaluate_text_refuses_empty_files_and_odd_ids(saved, tmp_path, capsys):
    from ks_lens.datasets.gold_texts import load_texts

    for name, content in [("empty.jsonl", ""), ("blank.jsonl", "\n   \n\n")]:
        f = tmp_path / name
        f.write_text(content)
        assert cli.main(["evaluate-text", "--texts", str(f), "--evaluator", str(saved)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == (
            f"ks-lens: error: {f}: no texts found (the file is empty or holds only blank "
            'lines); expected one JSON object with a "text" field per line\n'
        )
    for rid, shown in [({"a": 1}, '{"a": 1}'), (True, "true"), (1.5, "1.5"), ([1], "[1]")]:
        f = tmp_path / "ids.jsonl"
        f.write_text(json.dumps({"id": 7, "text": "fine"}) + "\n")
        f.write_text(f.read_text() + json.dumps({"id": rid, "text": "hello"}) + "\n")
        with pytest.raises(DatasetError) as e:
            load_texts(f)
        assert str(e.value) == f"{f}:2: 'id' must be a string or an integer, got {shown}"
        assert cli.main(["evaluate-text", "--texts", str(f), "--evaluator", str(saved)]) == 2
        assert capsys.readouterr().out == ""
    f.write_text(json.dumps({"id": 7, "text": "fine"}) + "\n")
    assert load_texts(f) == (("7", "fine"),)
