from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ks_lens.cli import main
from ks_lens.cli.demo import parse_demo_options, print_summary, run_demo
from ks_lens.compat import versions
from ks_lens.io import artifact_format
from ks_lens.pipeline import PipelineConfig
from ks_lens.report import render_summary

REQUIRED_TOP = (
    "model",
    "commit",
    "command",
    "layer",
    "labels",
    "n_test_questions",
    "n_text_questions",
    "alpha",
    "summaries",
    "curves",
    "equal_kl",
    "activation_eval",
    "text_eval",
    "text_evaluator_validity",
    "timings",
)
SUMMARY_KEYS = ("lens", "method", "k", "alpha", "target_prob", "min_target_prob", "gain")
DEMO_METHODS = ("caa_mean", "caa_sum", "ksteer", "ksteer_multistep", "ksteer_linear")


def _fast(**kw):
    methods = kw.pop("methods", None)
    cfg = PipelineConfig.fast(model="tiny-random-llama", n_gold=24, **kw)
    if methods:
        from dataclasses import replace

        cfg = replace(cfg, comparison=replace(cfg.comparison, methods=methods))
    return cfg


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("info", "models", "collect", "train", "vectors", "steer", "demo"):
        assert cmd in out
    assert main([]) == 0


def test_models_lists_named_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "tiny-random-llama" in out


def test_collect_train_vectors_steer_cli(tmp_path, capsys):
    acts = tmp_path / "acts"
    assert (
        main(
            [
                "collect",
                "--model",
                "tiny-random-llama",
                "--split",
                "train",
                "--max-questions",
                "6",
                "--layers",
                "1,2",
                "--out",
                str(acts),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--acts",
                str(acts),
                "--layer",
                "2",
                "--epochs",
                "3",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--acts",
                str(acts),
                "--layer",
                "all",
                "--epochs",
                "2",
                "--out",
                str(tmp_path / "ps"),
            ]
        )
        == 0
    )
    assert artifact_format(tmp_path / "ps") == "ks_lens.probe_set"
    assert main(["vectors", "--acts", str(acts), "--layer", "2", "--out", str(tmp_path / "v")]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "steer",
                "--model",
                "tiny-random-llama",
                "--classifier",
                str(tmp_path / "p"),
                "--target",
                "casual,concise",
                "--avoid",
                "expert",
                "--alpha",
                "5",
                "--max-new-tokens",
                "4",
                "Hello?",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "unsteered" in out and "steered (target=casual,concise, avoid=expert, alpha=5.0)" in out
    assert (
        main(
            [
                "steer",
                "--model",
                "tiny-random-llama",
                "--vectors",
                str(tmp_path / "v"),
                "--target",
                "casual",
                "--alpha",
                "2",
                "--max-new-tokens",
                "3",
                "Hi?",
            ]
        )
        == 0
    )
    # errors are reported, not raised
    assert (
        main(
            [
                "steer",
                "--model",
                "tiny-random-llama",
                "--classifier",
                str(tmp_path / "p"),
                "--target",
                "sarcastic",
                "--alpha",
                "5",
                "Hello?",
            ]
        )
        == 2
    )
    assert "unknown label(s) ['sarcastic']" in capsys.readouterr().err
    assert main(["train", "--acts", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert (
        main(
            [
                "steer",
                "--model",
                "not-a-model",
                "--vectors",
                str(tmp_path / "v"),
                "--alpha",
                "1",
                "x",
            ]
        )
        == 2
    )


@pytest.fixture(scope="module")
def two_seed_demo(tmp_path_factory):
    """One fast two-seed demo on the tiny model, shared by the schema and seeds tests."""
    out = tmp_path_factory.mktemp("demo")
    results = run_demo(
        _fast(methods=DEMO_METHODS),
        out,
        seeds=2,
        progress=False,
    )
    return out, results


def test_demo_report_schema_on_tiny_model(two_seed_demo):
    tmp, results = two_seed_demo
    result = results[0]
    on_disk = json.loads((tmp / "report.json").read_text())
    assert on_disk["layer"] == 2
    for key in REQUIRED_TOP:
        assert key in on_disk, key
    assert set(on_disk["alpha"]) == set(DEMO_METHODS)
    lenses = {r["lens"] for r in on_disk["summaries"]}
    assert lenses == {"activation", "text", "text_activation"}
    for r in on_disk["summaries"]:
        for key in SUMMARY_KEYS:
            assert key in r, key
        assert r["method"] in {"unsteered", "instructed", *DEMO_METHODS}
        iv = r["target_prob"]
        assert iv["low"] <= iv["estimate"] <= iv["high"]
    assert {k for k in (r["k"] for r in on_disk["summaries"])} == {1, 2, 3}
    answers = on_disk["text_eval"]["answers"]
    steered = [a for a in answers if a["method"] not in ("unsteered", "instructed")]
    assert {a["factor"] for a in steered} == {0.5, 1.0, 2.0}  # the default curve_factors
    # the instructed reference row: one answer per text cell, in every lens and table
    cells = on_disk["plan"]["gen_cells"]
    asked = [[a["question"], a["targets"]] for a in answers if a["method"] == "instructed"]
    assert asked == cells and on_disk["comparison_config"]["instructed"] is True
    assert {(r["lens"], r["k"]) for r in on_disk["summaries"] if r["method"] == "instructed"} == {
        (lens, k) for lens in ("activation", "text", "text_activation") for k in (1, 2, 3)
    }
    assert len(on_disk["activation_eval"]["instructed"]) == len(on_disk["plan"]["act_combos"])
    assert {e["k"] for e in on_disk["equal_kl"] if e["method"] == "instructed"} == {1, 2, 3}
    assert on_disk["method_labels"]["instructed"] == "Instructed (system prompt)"
    shares = [r for r in on_disk["summaries"] if r["method"] == "ksteer_linear"]
    assert all((r["instructed_fraction"] is None) != (r["instructed_note"] is None) for r in shares)
    assert all(set(a["text_probs"]) and len(a["text_probs"]) == 6 for a in answers)
    md = (tmp / "report.md").read_text()
    assert "## Verdict" in md and "equal measured KL" in md and "## Definitions" in md
    assert "| Instructed (system prompt) |" in md and "share of instructed gain" in md
    assert "- reference, text, k=1: asked by system prompt " in md
    assert "| K-Steer linear probe |" in md
    # ksteer_linear's probe: linear, beside the MLP probe (same hook point), saved with it
    from ks_lens.probes import Probe

    linear = Probe.load(tmp / "probes" / "steering-text-linear")
    mlp = Probe.load(tmp / "probes" / "steering-text")
    assert len(linear.linears) == 1 and len(mlp.linears) > 1
    assert linear.hook_name == mlp.hook_name and linear.label_names == mlp.label_names
    for png in ("activation_combinations.png", "text_tradeoff.png", "calibration.png"):
        assert (tmp / png).stat().st_size > 1000
    assert result.config.kl_budget == on_disk["comparison_config"]["kl_budget"]
    # tests against the baseline are clustered by question (McNemar is no longer reported)
    ks2 = [r for r in on_disk["summaries"] if r["method"] == "ksteer" and r["k"] == 2]
    assert all(r["diff_test"]["n_questions"] == r["n_questions"] for r in ks2)
    assert all(r["vanish_cluster_test"]["p_value"] <= 1 for r in ks2)
    assert "McNemar" not in md and "sign-flip over" in md
    # the default text coverage: no per-combination table or heatmap
    assert "combinations" not in on_disk and not (tmp / "text_combinations.png").exists()
    assert {"collect_s", "calibration_s", "text_eval_s", "total_s"} <= set(on_disk["timings"])
    # what produced the numbers: package versions, device and seed (also in the markdown)
    assert on_disk["versions"] == versions()
    assert on_disk["device"] == "cpu" and on_disk["seed"] == 0
    assert f"transformers {versions()['transformers']}" in md and "on cpu, seed 0." in md


def test_summary_is_rendered_by_the_report_module(two_seed_demo, capsys):
    _, results = two_seed_demo
    text = render_summary(results[0])
    assert text.startswith("generated text at equal KL (0.5 nats/token), text evaluator:\n  k=1 ")
    assert "\n\nactivation level (held-out multi-label evaluator, calibrated alpha):\n" in text
    assert "K-Steering (3 steps)" in text and "diff vs CAA (mean)" in text
    print_summary(results[0])  # the demo prints it after a blank line
    assert capsys.readouterr().out == "\n" + text + "\n"


def test_demo_rejects_malformed_questions_file(tmp_path, capsys):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"text": "fine?"}\n{"text": "oops"\n')
    code = main(
        [
            "demo",
            "--fast",
            "--model",
            "tiny-random-llama",
            "--questions",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "q.jsonl:2: malformed JSON line" in err
    assert not (tmp_path / "o" / "report.json").exists()


def test_demo_with_external_questions(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(
        "\n".join(json.dumps({"text": t}) for t in ["Why is grass green?", "How do magnets work?"])
        + "\n"
    )
    cfg = _fast(questions=str(q), methods=("caa_mean", "ksteer"))
    (result,) = run_demo(cfg, tmp_path / "d", progress=False)
    on_disk = json.loads((tmp_path / "d" / "report.json").read_text())
    assert result.n_test_questions == 2 and on_disk["eval_source"].startswith("external file")
    assert set(result.alphas) == {"caa_mean", "ksteer"}


def test_demo_covers_every_combination_on_request(tmp_path):
    from dataclasses import replace

    from ks_lens.report import rerender

    cfg = _fast(methods=("caa_mean", "ksteer"))
    # one alpha per method and no capability stage: the coverage is what is tested here
    c = replace(
        cfg.comparison,
        text_coverage="all-combinations",
        curve_factors=(1.0,),
        capability_questions=0,
    )
    (result,) = run_demo(replace(cfg, comparison=c), tmp_path / "d", progress=False)
    te = result.text
    assert te is not None and len(te.questions) == 4
    combos = {c.targets for c in te.cells}
    assert len(combos) == 6 + 15 + 20
    for c in combos:
        assert len({x.question for x in te.cells if x.targets == c}) >= 2
    doc = json.loads((tmp_path / "d" / "report.json").read_text())
    rows = doc["combinations"]
    assert len(rows) == 41 * 4  # unsteered, instructed and two methods
    assert {r["method"] for r in rows} == {"unsteered", "instructed", "caa_mean", "ksteer"}
    assert all((r["vanish_rate"] is None) == (len(r["targets"]) == 1) for r in rows)
    md = (tmp_path / "d" / "report.md").read_text()
    assert "## Text level per combination" in md and "| helpful+expert+casual | 2 |" in md
    assert (tmp_path / "d" / "text_combinations.png").stat().st_size > 1000
    rerender(tmp_path / "d")  # the table is recomputed from the stored answers
    again = json.loads((tmp_path / "d" / "report.json").read_text())
    assert again["combinations"] == rows


def test_demo_parser_defaults():
    opts = parse_demo_options([])
    assert opts.out == "runs/demo" and not opts.fast and opts.seeds == 1
    assert opts.config == PipelineConfig() and opts.max_questions is None
    assert opts.config.comparison.text_coverage == "all-combinations"  # the full demo
    assert parse_demo_options(["--fast"]).config.comparison.text_coverage == "per-size"
    opts = parse_demo_options(
        ["--text-coverage", "per-size", "--min-questions-per-combination", "3"]
    )
    assert opts.config.comparison.text_coverage == "per-size"
    assert opts.config.comparison.min_questions_per_combination == 3


def test_demo_validates_arguments_before_any_compute(tmp_path, capsys):
    for extra, msg in (
        (["--methods", "caa_mean,magic"], "unknown method 'magic'"),
        (["--kl-budget", "-1"], "kl_budget must be a positive"),
        (["--eval-layer", "-3"], "eval_layer must be a non-negative"),
        (["--seeds", "0"], "--seeds must be at least 1"),
        (
            ["--text-coverage", "all-combinations", "--n-gen", "1"],
            "on at least 2 test questions, but n_gen is 1",
        ),
        (["--min-questions-per-combination", "0"], "must be at least 1, got 0"),
    ):
        code = main(
            ["demo", "--fast", "--model", "tiny-random-llama", "--out", str(tmp_path / "o"), *extra]
        )
        assert code == 2, extra
        assert msg in capsys.readouterr().err, extra
        assert not (tmp_path / "o").exists()  # nothing collected or written


def test_demo_is_deterministic_given_the_seed(two_seed_demo, tmp_path):
    first, _ = two_seed_demo
    cfg = _fast(methods=DEMO_METHODS)
    run_demo(cfg, tmp_path / "again", progress=False)
    a = json.loads((first / "seed-1" / "report.json").read_text())
    b = json.loads((tmp_path / "again" / "report.json").read_text())
    assert a["demo_config"]["seed"] == 1 and b["demo_config"]["seed"] == 0
    b1 = json.loads((first / "report.json").read_text())
    for key in (
        "alpha",
        "calibration",
        "summaries",
        "curves",
        "equal_kl",
        "activation_eval",
        "text_eval",
    ):
        assert json.dumps(b1[key]) == json.dumps(b[key]), key  # same seed: identical
    assert json.dumps(a["text_eval"]) != json.dumps(b["text_eval"])  # another seed differs


def test_demo_with_two_seeds_reports_mean_and_sd(two_seed_demo):
    out, results = two_seed_demo
    assert len(results) == 2 and results[0].config.seed == 0 and results[1].config.seed == 1
    assert (out / "seed-1" / "report.json").is_file()
    top = json.loads((out / "report.json").read_text())
    ns = {(r["lens"], r["method"], r["k"], r["what"]): r["n"] for r in top["seeds"]}
    assert max(ns.values()) == 2 and all(n <= 2 for n in ns.values())
    act = [r for r in top["seeds"] if r["lens"] == "activation"]
    assert act and all(r["n"] == 2 and r["sd"] is not None for r in act)
    assert "Across seeds" in (out / "report.md").read_text()


def test_token_view_of_a_demo_answer(two_seed_demo, tmp_path):
    """analysis/token_view.py colours one saved answer per method by a held-out probe."""
    demo, _ = two_seed_demo
    out = tmp_path / "view.html"
    base = [
        sys.executable,
        str(Path(__file__).resolve().parents[1] / "analysis" / "token_view.py"),
        "--report",
        str(demo / "report.json"),
        "--probe",
        str(demo / "probes" / "response-evaluator"),
        "--model",
        "tiny-random-llama",
    ]
    res = subprocess.run([*base, "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    page = out.read_text()
    assert page.count("<h3>") == 3 and "<h3>unsteered</h3>" in page
    assert "<h3>CAA (mean) (alpha" in page and "<h3>K-Steering (alpha" in page
    bad = subprocess.run(
        [*base, "--targets", "no-such-label", "--out", str(out)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "0 cells match" in bad.stderr and "Traceback" not in bad.stderr


def _refused_before_collection(argv, out, capsys):
    """Run the demo; it must exit 2 with one line and write nothing under ``out``."""
    code = main(["demo", "--fast", "--model", "tiny-random-llama", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("ks-lens: error: "), err
    assert not out.exists()  # nothing collected or written
    return err


def test_demo_refuses_an_evaluator_on_the_steered_layer(tmp_path, capsys):
    """--layer 3 on the 4-layer tiny model put steering and evaluator on one hook point."""
    err = _refused_before_collection(["--layer", "3"], tmp_path / "o", capsys)
    assert "steering layer 3 is the model's last layer (4 layers): the activation evaluator " in err
    err = _refused_before_collection(["--layer", "1", "--eval-layer", "1"], tmp_path / "o", capsys)
    assert "the evaluator layer (1) must be above the steering layer (1)" in err


def test_demo_external_questions_are_checked_before_collection(tmp_path, capsys):
    """Questions the probes, evaluators or calibration learn from are not test questions; a
    15,019-token question grew the activation stage to 15 GB: both refused up front."""
    from ks_lens.datasets import load_dataset, make_splits
    from ks_lens.datasets.gold_texts import load_gold_texts

    ds = load_dataset("tones")
    calib = ds.subset(make_splits(ds, seed=0).ids("calibration")).head(4).questions[1].text
    gold = load_gold_texts()[0].question
    q = tmp_path / "q.jsonl"
    rows = ["Why is grass green?", "  " + calib.upper() + " "]  # case and spacing ignored
    q.write_text("\n".join(json.dumps({"text": t}) for t in rows) + "\n")
    err = _refused_before_collection(["--questions", str(q)], tmp_path / "o", capsys)
    assert f"{q}: 1 of 2 test questions are not held out: question 2 " in err
    assert "is a calibration-split question of dataset 'tones' (seed 0)" in err
    q.write_text(json.dumps({"text": gold}) + "\n")
    err = _refused_before_collection(["--questions", str(q)], tmp_path / "o", capsys)
    assert "is the question of gold text 'gold-" in err
    long = "word " * 15019
    q.write_text("\n".join(json.dumps({"text": t}) for t in ["Why?", long]) + "\n")
    err = _refused_before_collection(["--questions", str(q)], tmp_path / "o", capsys)
    assert f"{q}: question 2 (" in err and "more than the model's context window of 2048" in err
    fits = (
        "x" * 2025
    )  # 2044 tokens with the chat template: fits alone, not with the answer (--fast: 8 new tokens)
    q.write_text("\n".join(json.dumps({"text": t}) for t in ["Why?", fits]) + "\n")
    err = _refused_before_collection(["--questions", str(q)], tmp_path / "o", capsys)
    assert "plus max_new_tokens=8 does not fit in the model's context window" in err


def test_demo_texts_must_cover_every_label(tmp_path, capsys):
    """--texts with only some labels failed after collection without naming the file."""
    texts = tmp_path / "t.jsonl"
    rows = [
        {"question": f"Q{i}?", "labels": [lab], "text": f"A {lab} answer number {i}."}
        for i, lab in enumerate(["casual", "concise", "casual", "expert"])
    ]
    texts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    err = _refused_before_collection(["--texts", str(texts)], tmp_path / "o", capsys)
    assert f"{texts}: no single-label text for ['helpful', 'cautious', 'empathetic']" in err


def test_report_describes_the_probe_source_that_ran():
    """Every demo report said 'instruction prompts of the train split', whatever ran."""
    from types import SimpleNamespace

    from ks_lens.cli.demo import _evaluator_lines

    def lines(**kw):
        cfg = _fast(**kw)
        probe = SimpleNamespace(hook_name="blocks.2.hook_resid_post", metrics={"val_accuracy": 0.5})
        ev = SimpleNamespace(
            hook_name="blocks.3.hook_resid_post",
            config=SimpleNamespace(hidden=256),
            metrics={"val_accuracy": 0.4},
        )
        setup = SimpleNamespace(
            config=cfg,
            layer=2,
            eval_layer=3,
            evaluator=ev,
            response_evaluator=ev,
            probe=probe,
            dataset=SimpleNamespace(labels=("a", "b")),
            text_evaluator=SimpleNamespace(validity=None),
        )
        return _evaluator_lines(setup)

    text = lines()["steering probe (not an evaluator)"]
    assert text == (
        "`blocks.2.hook_resid_post`, gold texts re-encoded without instruction (last answer "
        "token), on the gold questions set aside for steering (50%): validation accuracy 0.500"
    )
    mean = lines(text_pooling="mean_response")["steering probe (not an evaluator)"]
    assert "(mean over the answer tokens)" in mean
    prompt = lines(probe_source="prompt")["steering probe (not an evaluator)"]
    assert "last prompt token of behaviour instruction + question, train split (16 q" in prompt
    # the tiny model's default evaluator sits 1 layer above the steering (capped): marked
    note = "**Note: the activation evaluator reads 1 layer above the steering layer, not the "
    assert note + "default 4 (capped at the model's last layer)" in lines()["activation evaluator"]
    assert "Note" not in lines(eval_layer=3)["activation evaluator"]  # chosen explicitly
