"""Capability retention: the shipped multiple-choice set, option log-likelihood scoring, the
paired comparison and the ``ks-lens capability`` command."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources

import numpy as np
import pytest
import torch

from ks_lens.capability.scoring import (
    CapabilityResult,
    MCQuestion,
    check_mc_questions,
    evaluate_capability,
    load_mc_questions,
    paired_accuracy_difference,
    score_option_rows,
    score_options,
)
from ks_lens.cli import main
from ks_lens.errors import ConfigError, DatasetError, WrongTypeError
from ks_lens.models import model_signature
from ks_lens.models.chat import ChatPrompt, encode_chat
from ks_lens.steering import CAA, SteeringVectors
from ks_lens.steering.base import SteeringSpec

QS = [
    MCQuestion("a", "math", "What is 2 + 2?", ("4", "five", "3", "22"), 0),
    MCQuestion("b", "geo", "What is the capital of France?", ("Rome", "Paris"), 1),
    MCQuestion("c", "bio", "What do cows eat?", ("grass", "fish", "rocks", "meat pies"), 0),
]


def _raw_lines() -> list[dict]:
    text = resources.files("ks_lens.data").joinpath("capability_mc.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the shipped set


def test_shipped_set_counts_subjects_and_format():
    rows = _raw_lines()
    assert len(rows) >= 300
    for r in rows:
        assert set(r) == {"id", "subject", "question", "options", "answer"}, r
        assert len(r["options"]) == 4 and isinstance(r["answer"], int), r
    qs = load_mc_questions()
    assert len(qs) == len(rows)
    subjects = Counter(q.subject for q in qs)
    assert len(subjects) >= 10
    assert min(subjects.values()) >= 20, subjects
    # ids are unique and name their subject's prefix consistently
    assert len({q.id for q in qs}) == len(qs)
    prefix = {q.subject: q.id.split("-")[0] for q in qs}
    assert all(q.id.split("-")[0] == prefix[q.subject] for q in qs)


def test_shipped_set_answer_positions_are_balanced():
    counts = Counter(q.answer for q in load_mc_questions())
    n = sum(counts.values())
    assert set(counts) == {0, 1, 2, 3}
    assert all(abs(c / n - 0.25) <= 0.02 for c in counts.values()), counts


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def test_shipped_set_has_no_duplicates():
    qs = load_mc_questions()
    texts = [_norm(q.question) for q in qs]
    dup = [t for t, c in Counter(texts).items() if c > 1]
    assert not dup, dup
    for q in qs:
        opts = [_norm(o) for o in q.options]
        assert len(set(opts)) == 4, q
        # the question does not refer to options the cloze formulation never shows
        assert "of these" not in q.question.lower() and "above" not in q.question.lower(), q


# ----------------------------------------------------------------------------- bad input


def _write(tmp_path, rows):
    p = tmp_path / "mc.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


GOOD = {"id": "x1", "subject": "s", "question": "Q?", "options": ["a", "b", "c", "d"], "answer": 2}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"answer": 4}, r"mc.jsonl:2: 'answer' must be an option index from 0 to 3, got 4"),
        ({"answer": -1}, r"mc.jsonl:2: 'answer' must be an option index"),
        ({"answer": True}, r"mc.jsonl:2: 'answer' must be an option index"),
        (
            {"options": ["only"], "answer": 0},
            r"mc.jsonl:2: a question needs at least 2 options, got 1",
        ),
        ({"options": ["a", "a", "b"]}, r"mc.jsonl:2: the options repeat one another"),
        ({"options": "abcd"}, r"mc.jsonl:2: 'options' must be a list of non-empty strings"),
        ({"question": " "}, r"mc.jsonl:2: 'question' must be a non-empty string"),
        ({"id": "x1"}, r"question id 'x1' occurs twice"),
    ],
)
def test_bad_questions_file_is_refused_naming_the_line(tmp_path, change, message):
    p = _write(tmp_path, [GOOD, {**GOOD, "id": "x2", **change}])
    with pytest.raises(DatasetError, match=message):
        load_mc_questions(p)


def test_missing_field_and_empty_set_are_refused(tmp_path):
    bad = dict(GOOD)
    del bad["answer"]
    with pytest.raises(DatasetError, match=r"mc.jsonl:1: missing field\(s\) answer"):
        load_mc_questions(_write(tmp_path, [bad]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match=r"empty.jsonl: no questions in the file"):
        load_mc_questions(tmp_path / "empty.jsonl")
    with pytest.raises(DatasetError, match="the multiple-choice set is empty"):
        check_mc_questions([])
    with pytest.raises(WrongTypeError, match="question 0 is a dict, not an MCQuestion"):
        check_mc_questions([GOOD])  # type: ignore[list-item]


def test_bad_in_memory_question_is_refused_by_the_scorer(tiny_model):
    wrong = MCQuestion("w", "s", "Q?", ("a", "b", "c", "d"), 4)
    with pytest.raises(DatasetError, match=r"question 'w': 'answer' must be an option index"):
        score_options(tiny_model, [wrong])
    with pytest.raises(DatasetError, match="at least 2 options, got 1"):
        evaluate_capability(tiny_model, [MCQuestion("w", "s", "Q?", ("a",), 0)])
    with pytest.raises(DatasetError, match="empty"):
        evaluate_capability(tiny_model, [])


# ----------------------------------------------------------------------------- scoring


def _by_hand(model, q: MCQuestion, system: str | None = None) -> list[float]:
    """Each option's summed log-probability from one plain forward pass of its whole row."""
    tok = model.tokenizer
    head = encode_chat(tok, ChatPrompt(q.question, system=system))
    out = []
    for o in q.options:
        ids = encode_chat(tok, ChatPrompt(q.question, system=system, assistant=o))
        assert ids[: len(head)] == head
        with torch.no_grad():
            logits = model.original_model(input_ids=torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        out.append(sum(float(logp[p - 1, ids[p]]) for p in range(len(head), len(ids))))
    return out


def test_scores_equal_a_hand_computed_log_likelihood(tiny_model):
    sc = score_options(tiny_model, QS, batch_size=1)
    for q, got, n_tok, n_chr in zip(QS, sc.logprob, sc.n_tokens, sc.n_chars, strict=True):
        np.testing.assert_allclose(got, _by_hand(tiny_model, q), rtol=0, atol=1e-5)
        assert n_chr == [len(o) for o in q.options]
        assert n_tok == [len(o.encode()) for o in q.options]  # the tiny tokenizer is byte-level
    # with a system prompt, the same by hand
    sc_sys = score_options(tiny_model, QS[:1], system="Be brief.", batch_size=1)
    np.testing.assert_allclose(
        sc_sys.logprob[0], _by_hand(tiny_model, QS[0], "Be brief."), rtol=0, atol=1e-5
    )
    assert sc_sys.logprob[0] != sc.logprob[0]


def test_rules_predictions_and_accuracy_follow_the_scores():
    res = CapabilityResult(
        ids=["a", "b"],
        subjects=["x", "y"],
        answers=[0, 1],
        logprob=[[-2.0, -3.0], [-1.0, -4.0]],
        n_tokens=[[1, 4], [1, 8]],
        n_chars=[[1, 10], [2, 40]],
    )
    # sum: [-2, -3] -> 0 (right), [-1, -4] -> 0 (wrong)
    assert res.predictions("sum") == [0, 0] and res.accuracy("sum") == 0.5
    # per token: [-2, -0.75] -> 1, [-1, -0.5] -> 1
    assert res.predictions("token") == [1, 1] and res.accuracy("token") == 0.5
    # per character: [-2, -0.3] -> 1, [-0.5, -0.1] -> 1
    assert res.predictions("char") == [1, 1]
    assert res.correct().tolist() == [0.0, 1.0] and res.chance == 0.5
    assert res.by_subject() == {"x": 0.0, "y": 1.0}
    with pytest.raises(ConfigError, match="unknown rule 'bytes'"):
        res.accuracy("bytes")  # type: ignore[arg-type]
    back = CapabilityResult.from_json(json.loads(json.dumps(res.to_json())))
    assert back == res


def test_batching_equals_one_at_a_time(tiny_model):
    one = score_options(tiny_model, QS, batch_size=1)
    many = score_options(tiny_model, QS, batch_size=64)
    np.testing.assert_allclose(
        np.concatenate(many.logprob), np.concatenate(one.logprob), rtol=0, atol=1e-5
    )
    again = score_options(tiny_model, QS, batch_size=64)
    assert again == many  # deterministic


def _vectors(model, seed: int = 0) -> SteeringVectors:
    g = torch.Generator().manual_seed(seed)
    return SteeringVectors(
        torch.randn(2, model.cfg.d_model, generator=g) * 4,
        label_names=("up", "down"),
        hook_name="blocks.1.hook_resid_post",
        model=model_signature(model),
    )


def test_steering_changes_the_scores_and_its_hooks_are_removed(tiny_model):
    base = evaluate_capability(tiny_model, QS)
    with CAA(_vectors(tiny_model)).steer(tiny_model, target=["up"], alpha=3.0):
        steered = evaluate_capability(tiny_model, QS, label="caa up")
    assert not any(hp._forward_hooks for hp in tiny_model.hook_dict.values())
    diffs = np.abs(np.concatenate(steered.logprob) - np.concatenate(base.logprob))
    assert diffs.min() > 1e-4
    after = evaluate_capability(tiny_model, QS)
    assert after.logprob == base.logprob  # nothing left behind
    # positions mean what they mean in generation: "generated" steers only the option tokens,
    # so a one-token option (predicted from the question alone) keeps its score exactly
    with CAA(_vectors(tiny_model)).steer(
        tiny_model, target=["up"], alpha=3.0, positions="generated"
    ):
        gen_only = evaluate_capability(tiny_model, QS)
    for q, g, b in zip(QS, gen_only.logprob, base.logprob, strict=True):
        for o, x, y in zip(q.options, g, b, strict=True):
            assert (x == y) if len(o.encode()) == 1 else abs(x - y) > 1e-4, (o, x, y)
    with CAA(_vectors(tiny_model)).steer(tiny_model, target=["up"], alpha=3.0, positions="last"):
        last_only = evaluate_capability(tiny_model, QS)
    assert np.abs(np.concatenate(last_only.logprob) - np.concatenate(base.logprob)).min() > 1e-4


@pytest.mark.parametrize("positions", ["all", "generated", "last"])
def test_shared_rows_equal_one_run_at_a_time(tiny_model, positions, monkeypatch):
    """Many runs in shared batches (each batch row steered by its own configuration, options
    continuing their question's cached row, the layers below the steering run once per distinct
    question of a batch) equal one score_options call per run."""
    from ks_lens.capability import scoring as capability

    resumed: list[int] = []
    real = capability.resume_prefill

    def counting(model, batch, prefill):
        resumed.append(int(batch.input_ids.shape[0]))
        return real(model, batch, prefill)

    monkeypatch.setattr(capability, "resume_prefill", counting)
    caa = CAA(_vectors(tiny_model))
    up = (caa, SteeringSpec(("up",), (), 3.0))
    down = (caa, SteeringSpec(("down",), (), 5.0))
    rows = [(0, 0), (1, 0), (2, 1), (1, 2), (0, 2), (2, 0), (1, 1)]
    systems = [None, None, "Answer briefly.", None, "Answer briefly.", None, None]
    got = score_option_rows(
        tiny_model, QS, [None, up, down], rows, systems=systems, positions=positions, batch_size=8
    )
    for r, ((g, i), system) in enumerate(zip(rows, systems, strict=True)):
        if g == 0:
            want = score_options(tiny_model, [QS[i]], system=system)
        else:
            method, spec = (up, down)[g - 1]
            with method.steer(
                tiny_model, target=list(spec.target), alpha=spec.alpha, positions=positions
            ):
                want = score_options(tiny_model, [QS[i]], system=system)
        np.testing.assert_allclose(got.logprob[r], want.logprob[0], rtol=0, atol=1e-5)
        assert got.n_tokens[r] == want.n_tokens[0] and got.n_chars[r] == want.n_chars[0]
    assert resumed  # some batch held one question under two runs and shared its lower layers
    assert not any(hp._forward_hooks for hp in tiny_model.hook_dict.values())
    with pytest.raises(ConfigError, match="out of range"):
        score_option_rows(tiny_model, QS, [None], [(1, 0)])
    with pytest.raises(ConfigError, match="2 system prompts for 1 rows"):
        score_option_rows(tiny_model, QS, [None], [(0, 0)], systems=[None, None])
    with pytest.raises(ConfigError, match="no rows"):
        score_option_rows(tiny_model, QS, [None], [])


def test_paired_difference_on_a_hand_case():
    def result(correct: list[int], ids: list[str] | None = None) -> CapabilityResult:
        n = len(correct)
        return CapabilityResult(
            ids or [str(i) for i in range(n)],
            ["s"] * n,
            [0] * n,
            [[0.0, -1.0] if c else [-1.0, 0.0] for c in correct],
            [[1, 1]] * n,
            [[1, 1]] * n,
        )

    a = result([1, 1, 0, 0, 1, 1, 1, 0])
    b = result([1, 0, 0, 0, 1, 0, 1, 0])
    d = paired_accuracy_difference(a, b)
    assert d.estimate == pytest.approx(0.25) and d.n == 8
    assert d.low <= 0.25 <= d.high and d.low >= 0.0  # the paired differences are 0 or +1
    same = paired_accuracy_difference(a, a)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ConfigError, match="same questions in the same order"):
        paired_accuracy_difference(a, result([1] * 8, ids=list("abcdefgh")))


# ----------------------------------------------------------------------------- the command


def test_capability_cli_unsteered_and_steered(tiny_model, tmp_path, capsys):
    qfile = _write(tmp_path, [q.to_json() for q in QS])
    out = tmp_path / "res" / "cap.json"
    args = ["capability", "--model", "tiny-random-llama", "--questions", str(qfile)]
    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    ref = evaluate_capability(tiny_model, QS)
    assert f"accuracy {ref.interval().fmt()}" in text and "3 questions, 3 subjects" in text
    saved = json.loads(out.read_text())
    assert saved["baseline"] is None and saved["difference"] is None
    assert CapabilityResult.from_json(saved["result"]).logprob == ref.logprob
    assert set(saved["versions"]) >= {"ks_lens", "torch", "transformers"}

    vec_dir = tmp_path / "vec"
    _vectors(tiny_model).save(vec_dir)
    steer = [*args, "--vectors", str(vec_dir), "--target", "up", "--alpha", "3", "--out", str(out)]
    assert main(steer) == 0
    text = capsys.readouterr().out
    assert "difference (paired, 95 % bootstrap over questions)" in text
    saved = json.loads(out.read_text())
    with CAA(_vectors(tiny_model)).steer(tiny_model, target=["up"], alpha=3.0):
        ref_steered = evaluate_capability(tiny_model, QS)
    got = CapabilityResult.from_json(saved["result"])
    assert got.logprob == ref_steered.logprob
    assert CapabilityResult.from_json(saved["baseline"]).logprob == ref.logprob
    assert saved["result"]["settings"]["method"] == "caa"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--alpha", "2"], "need --classifier DIR or --vectors DIR"),
        (["--vectors", "v", "--classifier", "c"], "at most one of --classifier"),
        (["--system", "Be brief.", "--instruct", "casual"], "--system TEXT or --instruct"),
        (["--instruct", "nosuchtone"], "unknown label 'nosuchtone'"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_capability_cli_refuses_bad_options(tmp_path, capsys, extra, message):
    qfile = _write(tmp_path, [q.to_json() for q in QS])
    args = ["capability", "--model", "tiny-random-llama", "--questions", str(qfile), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_capability_cli_instructed_and_steering_without_alpha(tmp_path, capsys):
    qfile = _write(tmp_path, [q.to_json() for q in QS])
    args = ["capability", "--model", "tiny-random-llama", "--questions", str(qfile)]
    assert main([*args, "--instruct", "casual"]) == 0
    text = capsys.readouterr().out
    assert "instructed (casual)" in text and "difference (paired" in text
    assert main([*args, "--vectors", str(tmp_path), "--target", "up"]) == 2
    assert "steering needs --alpha" in capsys.readouterr().err
