"""The comparison's capability stage: the stratified subset, the partition over combinations,
equality with hand-made calls of evaluate_capability, the records' JSON and checks, the report
table, and the settings."""

from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest

from ks_lens.capability.scoring import (
    MCQuestion,
    evaluate_capability,
    load_mc_questions,
    paired_accuracy_difference,
)
from ks_lens.capability.stage import (
    INSTRUCTED,
    UNSTEERED,
    CapabilityEvaluation,
    capability_table,
    evaluate_capability_stage,
    instructed_prompts,
    merge_capability,
    partition,
    stratified_subset,
)
from ks_lens.comparison import ComparisonConfig, ComparisonResult, run_comparison
from ks_lens.datasets.coverage import label_combinations
from ks_lens.errors import ConfigError, KsLensError, StoreError, WrongTypeError
from ks_lens.evaluation.stats import bootstrap_mean
from ks_lens.probes import ProbeConfig, train_probe
from ks_lens.steering import CAA, KSteering, SteeringVectors

LABELS = ("alpha", "beta", "gamma")  # the tiny_dataset's labels


# ----------------------------------------------------------------------------- partition, subset


def test_partition_gives_every_question_once_and_uses_every_combination():
    combos = [("a",), ("b",), ("c",)]
    groups = partition(10, combos)
    assert groups == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]  # question i -> combination i mod 3
    assert sorted(i for g in groups for i in g) == list(range(10))
    assert partition(10, combos) == groups  # deterministic
    pairs = label_combinations(list("abcdef"), (3,))
    g20 = partition(24, pairs)
    assert len(g20) == 20 and all(g20) and sorted(i for g in g20 for i in g) == list(range(24))
    assert [len(g) for g in g20] == [2] * 4 + [1] * 16
    # fewer questions than combinations: the first ones only
    assert partition(2, combos) == [[0], [1], []]
    with pytest.raises(ConfigError, match="no combinations"):
        partition(3, [])


def test_stratified_subset_is_balanced_over_subjects_and_fixed_by_seed():
    qs = load_mc_questions()
    subjects = Counter(q.subject for q in qs)
    assert len(subjects) == 12 and set(subjects.values()) == {26}
    sub = stratified_subset(qs, 24, seed=0)
    assert len({q.id for q in sub}) == 24
    assert Counter(q.subject for q in sub) == {s: 2 for s in subjects}
    assert [q.id for q in stratified_subset(qs, 24, seed=0)] == [q.id for q in sub]
    assert [q.id for q in stratified_subset(qs, 24, seed=1)] != [q.id for q in sub]
    # 30 = 12 x 2 + 6: six subjects get a third question, which six is seeded
    counts = Counter(q.subject for q in stratified_subset(qs, 30, seed=3))
    assert sorted(counts.values()) == [2] * 6 + [3] * 6
    # neighbours mix subjects (the final shuffle): not all of the first 12 from 1-2 subjects
    assert len({q.subject for q in sub[:12]}) >= 6
    # asking for more than there are: all of them, in a seeded order
    every = stratified_subset(qs, 1000, seed=0)
    assert sorted(q.id for q in every) == sorted(q.id for q in qs)
    # a subject with few questions gives all it has; the others fill the rest evenly
    small = [MCQuestion(f"a{i}", "A", f"A{i}?", ("x", "y"), 0) for i in range(1)] + [
        MCQuestion(f"b{i}", "B", f"B{i}?", ("x", "y"), 1) for i in range(10)
    ]
    assert Counter(q.subject for q in stratified_subset(small, 5, seed=0)) == {"A": 1, "B": 4}
    with pytest.raises(ConfigError, match="at least 1 question"):
        stratified_subset(qs, 0)


def test_instructed_prompts_join_as_combined_behaviours(tiny_dataset):
    combos = label_combinations(LABELS, (1, 2, 3))
    prompts = instructed_prompts(tiny_dataset, combos)
    combined = tiny_dataset.with_combinations((2, 3))
    assert prompts[("beta",)] == "Be brief."
    for c in combos:
        assert prompts[c] == combined.instruction("+".join(c))
    assert prompts[("alpha", "beta")] == (
        "Answer like a pirate, with many arrs and nautical words. Be brief."
    )


# ----------------------------------------------------------------------------- the stage


def _questions() -> list[MCQuestion]:
    return stratified_subset(load_mc_questions(), 12, seed=5)


@pytest.fixture(scope="module")
def kit(tiny_acts, tiny_probe):
    vec = SteeringVectors.fit(tiny_acts, 2)
    methods = {"caa_mean": CAA(vec, combine="mean"), "ksteer": KSteering(tiny_probe)}
    alphas = {"caa_mean": {1: 2.0, 2: 3.0}, "ksteer": {1: 4.0, 2: 5.0}}
    return methods, alphas


@pytest.fixture(scope="module")
def stage(tiny_model, tiny_dataset, kit):
    methods, alphas = kit
    combos = label_combinations(LABELS, (1, 2))
    return evaluate_capability_stage(
        tiny_model,
        methods,
        alphas,
        labels=LABELS,
        sizes=(1, 2),
        n_questions=8,
        seed=2,
        instructed=instructed_prompts(tiny_dataset, combos),
        questions=_questions(),
    )


def _close(got, want):
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-5)


def test_stage_equals_evaluate_capability_by_hand(tiny_model, tiny_dataset, kit, stage):
    methods, _ = kit
    subset = stratified_subset(_questions(), 8, seed=2)
    assert stage.question_ids == tuple(q.id for q in subset)
    assert [(r.method, r.k) for r in stage.runs] == [
        (UNSTEERED, 0),
        ("caa_mean", 1),
        ("caa_mean", 2),
        ("ksteer", 1),
        ("ksteer", 2),
        (INSTRUCTED, 1),
        (INSTRUCTED, 2),
    ]
    base = evaluate_capability(tiny_model, subset)
    # every run shares batches with the others (padding differs): equal up to float rounding
    _close(stage.run(UNSTEERED).result.logprob, base.logprob)
    # K-Steering at k=2: the second pair (alpha, gamma) steers questions 1, 4, 7
    pairs = label_combinations(LABELS, (2,))
    assert stage.combos[2] == tuple(pairs)
    idx = partition(8, pairs)[1]
    assert idx == [1, 4, 7]
    with methods["ksteer"].steer(tiny_model, target=["alpha", "gamma"], alpha=5.0):
        by_hand = evaluate_capability(tiny_model, [subset[i] for i in idx])
    run = stage.run("ksteer", 2)
    assert run.alpha == 5.0
    _close([run.result.logprob[i] for i in idx], by_hand.logprob)
    assert by_hand.logprob != [base.logprob[i] for i in idx]  # steering changed the scores
    # CAA at k=1: "beta" steers questions 1, 4, 7
    with methods["caa_mean"].steer(tiny_model, target=["beta"], alpha=2.0):
        caa = evaluate_capability(tiny_model, [subset[i] for i in (1, 4, 7)])
    _close([stage.run("caa_mean", 1).result.logprob[i] for i in (1, 4, 7)], caa.logprob)
    # instructed at k=2: the third pair's joined instructions as the system prompt (questions 2, 5)
    system = tiny_dataset.with_combinations((2,)).instruction("beta+gamma")
    asked = evaluate_capability(tiny_model, [subset[i] for i in (2, 5)], system=system)
    _close([stage.run(INSTRUCTED, 2).result.logprob[i] for i in (2, 5)], asked.logprob)
    assert stage.instructions["beta+gamma"] == system
    # the rows: accuracy and the paired difference, as computed by hand
    rows = stage.rows(n_resamples=100)
    row = next(r for r in rows if (r.method, r.k) == ("ksteer", 2))
    assert row.accuracy == bootstrap_mean(run.result.correct(), seed=2, n_resamples=100)
    assert row.diff_vs_unsteered == paired_accuracy_difference(
        run.result, base, seed=2, n_resamples=100
    )
    assert row.diff_vs_unsteered.estimate == pytest.approx(run.result.accuracy() - base.accuracy())
    assert rows[0].method == UNSTEERED and rows[0].diff_vs_unsteered is None


def test_stage_refuses_missing_instructions(tiny_model, kit):
    methods, alphas = kit
    with pytest.raises(ConfigError, match=r"no instructed system prompt .*\('beta',\)"):
        evaluate_capability_stage(
            tiny_model,
            methods,
            alphas,
            labels=LABELS,
            sizes=(1,),
            n_questions=4,
            instructed={("alpha",): "Be a pirate."},
            questions=_questions(),
        )


def test_capability_records_round_trip_and_merge(stage):
    doc = json.loads(json.dumps(stage.to_json()))
    again = CapabilityEvaluation.from_json(doc)
    assert again.to_json() == stage.to_json()
    assert [r.to_json() for r in again.rows(n_resamples=50)] == [
        r.to_json() for r in stage.rows(n_resamples=50)
    ]
    merged = merge_capability({"one": stage, "two": again})
    assert [(r.method, r.k) for r in merged.runs] == [
        (UNSTEERED, 0),
        *[(f"{m}@{n}", k) for n in ("one", "two") for m in ("caa_mean", "ksteer") for k in (1, 2)],
        (INSTRUCTED, 1),
        (INSTRUCTED, 2),
    ]
    other = CapabilityEvaluation.from_json({**doc, "question_ids": doc["question_ids"][::-1]})
    with pytest.raises(ConfigError, match="run 'two' scored capability on other questions"):
        merge_capability({"one": stage, "two": other})


def test_capability_table_renders_every_run(stage):
    table = capability_table(stage.rows(n_resamples=50), label=str.upper)
    lines = table.splitlines()
    assert lines[0].startswith("| method | targets | alpha | accuracy")
    assert len(lines) == 2 + len(stage.runs)
    assert lines[2].startswith("| UNSTEERED | - | - | ")
    assert lines[5].startswith("| KSTEER | 1 | 4 | ")
    assert lines[-1].startswith("| INSTRUCTED | 2 | - | ")


# ----------------------------------------------------------------------------- in the comparison


class _FakeTextEvaluator:
    label_names = LABELS

    def predict_proba(self, texts):
        return np.array([[len(t) % 7 / 7, len(t.split()) % 5 / 5, 0.5] for t in texts])


@pytest.fixture(scope="module")
def result(tiny_model, tiny_acts, tiny_probe, tiny_dataset):
    vec = SteeringVectors.fit(tiny_acts, 2)
    evaluator = train_probe(tiny_acts, 3, config=ProbeConfig(hidden=16, epochs=3, seed=1))
    cfg = ComparisonConfig(
        methods=("caa_mean", "ksteer"),
        sizes=(1, 2),
        kl_budget=0.05,
        act_combos_per_size=1,
        max_new_tokens=3,
        calib_tokens=3,
        calib_bisect_steps=1,
        curve_factors=(0.5, 1.0),
        n_resamples=100,
        capability_questions=6,
    )
    return run_comparison(
        tiny_model,
        probe=tiny_probe,
        vectors=vec,
        evaluator=evaluator,
        text_evaluator=_FakeTextEvaluator(),
        calib_questions=["hi?", "yo?"],
        test_questions=["a?", "b?"],
        config=cfg,
        progress=False,
        instructions=tiny_dataset.instructions,
    )


def test_comparison_carries_the_capability_stage(result):
    cap = result.capability
    assert cap is not None and len(cap.question_ids) == 6
    assert {(r.method, r.k) for r in cap.runs} == {
        (UNSTEERED, 0),
        *[(m, k) for m in ("caa_mean", "ksteer") for k in (1, 2)],
        (INSTRUCTED, 1),
        (INSTRUCTED, 2),
    }
    for r in cap.runs:
        if r.method in result.alphas:
            assert r.alpha == result.alphas[r.method][r.k]  # the calibrated alpha
    assert "capability_s" in result.timings
    doc = json.loads(json.dumps(result.to_json()))
    assert len(doc["capability"]) == len(cap.runs)
    again = ComparisonResult.from_json(doc)
    assert json.dumps(again.to_json()) == json.dumps(doc)
    # a report.json written before the capability stage still loads
    old = {k: v for k, v in doc.items() if k not in ("capability", "capability_eval")}
    old["comparison_config"] = {
        k: v
        for k, v in doc["comparison_config"].items()
        if k not in ("capability_questions", "capability_instructed")
    }
    assert ComparisonResult.from_json(old).capability is None


def _edited(doc: dict, edit) -> dict:
    out = copy.deepcopy(doc)
    edit(out["capability_eval"])
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["runs"][1].update(alpha=99.0), "has alpha 99.0; the calibrated alpha is"),
        (lambda c: c["runs"].pop(1), "capability_eval.runs lack"),
        (lambda c: c["runs"].append(c["runs"][1]), "repeat a method and size"),
        (lambda c: c["question_ids"].reverse(), "scored other questions than the subset"),
        (lambda c: c["combos"].update({"2": [["beta", "alpha"]]}), r"combos\[2\] are not"),
        (lambda c: c["combos"].pop("2"), "combos has sizes"),
        (
            lambda c: c["runs"][0]["questions"][0].update(answer=9),
            "question 0 has a bad answer key",
        ),
        (lambda c: c["runs"][0].pop("questions"), "no field 'questions'"),
    ],
)
def test_edited_capability_records_are_refused(result, edit, message):
    doc = json.loads(json.dumps(result.to_json()))
    with pytest.raises(KsLensError, match=message):
        ComparisonResult.from_json(_edited(doc, edit))


def test_report_renders_the_capability_table(result, tmp_path):
    from ks_lens.cli import main
    from ks_lens.report import write_report

    write_report(result, {"model": "tiny", "commit": "abc"}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Capability retention (multiple choice, calibrated alpha)" in md
    assert "| K-Steering | 2 | " in md and "| Instructed (system prompt) | 1 | - | " in md
    doc = json.loads((tmp_path / "report.json").read_text())
    assert [r["method"] for r in doc["capability"]][:2] == [UNSTEERED, "caa_mean"]
    (tmp_path / "report.md").unlink()
    assert main(["report", str(tmp_path)]) == 0  # ks-lens report re-renders it
    assert "## Capability retention" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "kw, error, message",
    [
        ({"capability_questions": -1}, ConfigError, "capability_questions must be a number"),
        ({"capability_questions": "24"}, WrongTypeError, "capability_questions must be a whole"),
        ({"capability_questions": 2.5}, WrongTypeError, "capability_questions must be a whole"),
        ({"capability_instructed": "yes"}, WrongTypeError, "capability_instructed must be true"),
    ],
)
def test_bad_capability_settings_are_refused(kw, error, message):
    with pytest.raises(error, match=message):
        ComparisonConfig(**kw).validate()


def test_capability_stage_off_and_options(tiny_model, tiny_acts, tiny_probe):
    from ks_lens.cli.demo import config_from_args, parse_demo_options

    vec = SteeringVectors.fit(tiny_acts, 2)
    res = run_comparison(
        tiny_model,
        probe=tiny_probe,
        vectors=vec,
        evaluator=tiny_probe,
        text_evaluator=None,
        calib_questions=["hi?"],
        test_questions=["a?"],
        config=ComparisonConfig(
            methods=("caa_mean",),
            sizes=(1,),
            calib_bisect_steps=0,
            capability_questions=0,
            instructed=False,
        ),
        progress=False,
    )
    assert res.capability is None and "capability_s" not in res.timings
    assert res.to_json()["capability"] == [] and res.to_json()["capability_eval"] is None
    cfg = config_from_args(parse_demo_options([])).comparison
    assert (cfg.capability_questions, cfg.capability_instructed) == (24, True)
    fast = config_from_args(parse_demo_options(["--fast"])).comparison
    assert (fast.capability_questions, fast.capability_instructed) == (12, False)
    opts = parse_demo_options(["--capability-questions", "36", "--no-capability-instructed"])
    assert opts.config.comparison.capability_questions == 36
    assert opts.config.comparison.capability_instructed is False
    with pytest.raises(ConfigError, match="capability_questions must be a number"):
        config_from_args(parse_demo_options(["--capability-questions", "-3"]))


def test_store_error_names_the_capability_record(result):
    doc = json.loads(json.dumps(result.to_json()))
    doc["capability_eval"]["runs"][2]["alpha"] = "x"
    with pytest.raises(StoreError, match="malformed record"):
        ComparisonResult.from_json(doc)


def test_demo_scores_capability_under_the_datasets_instructions(tmp_path):
    """ks-lens demo with the instructed row: Setup.compare gives the stage each combination's
    instructions joined as the dataset joins combined behaviours."""
    from dataclasses import replace

    from ks_lens.cli.demo import run_demo
    from ks_lens.datasets import load_dataset
    from ks_lens.pipeline import PipelineConfig

    cfg = PipelineConfig.fast(model="tiny-random-llama", n_gold=24)
    cfg = replace(
        cfg,
        comparison=replace(
            cfg.comparison,
            methods=("caa_mean",),
            sizes=(1, 2),
            capability_questions=15,
            capability_instructed=True,
        ),
    )
    (res,) = run_demo(cfg, tmp_path / "d", progress=False)
    cap = res.capability
    assert cap is not None and len(cap.question_ids) == 15
    tones = load_dataset("tones")
    pairs = label_combinations(tones.labels, (2,))
    assert cap.combos[2] == tuple(pairs) and len(pairs) == 15  # every pair steers one question
    joined = tones.with_combinations((2,))
    assert cap.instructions == {
        **{lab: tones.instruction(lab) for lab in tones.labels},
        **{"+".join(c): joined.instruction("+".join(c)) for c in pairs},
    }
    assert [(r.method, r.k) for r in cap.runs] == [
        (UNSTEERED, 0),
        ("caa_mean", 1),
        ("caa_mean", 2),
        (INSTRUCTED, 1),
        (INSTRUCTED, 2),
    ]
    assert cap.run(INSTRUCTED, 2).result.settings["system"].startswith("each combination's")
    assert cap.run("caa_mean", 2).result.settings["model"] == res_model_name(tmp_path)
    md = (tmp_path / "d" / "report.md").read_text()
    assert "| Instructed (system prompt) | 2 | - | " in md and "| CAA (mean) | 1 | " in md


def res_model_name(out) -> str:
    return json.loads((out / "d" / "report.json").read_text())["model"]
