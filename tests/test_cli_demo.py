from __future__ import annotations

import json

import pytest

from ks_lens.cli import build_parser, main
from ks_lens.demo import DemoConfig, run_demo

REQUIRED_TOP = (
    "model",
    "layer",
    "labels",
    "n_eval_questions",
    "alpha",
    "activation_eval",
    "generation_eval",
)
REQUIRED_ENTRY = ("targets", "avoid", "method", "mean_target_prob", "per_label_prob", "vanished")


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
    assert (tmp_path / "ps" / "probes.json").is_file()
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


def test_demo_report_schema_on_tiny_model(tmp_path):
    cfg = DemoConfig.fast(model="tiny-random-llama")
    report = run_demo(cfg, tmp_path / "demo", log=lambda s: None, progress=False)
    on_disk = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert on_disk["layer"] == report["layer"] == 2
    for key in REQUIRED_TOP:
        assert key in on_disk, key
    assert set(on_disk["alpha"]) == {"caa_mean", "caa_sum", "ksteer", "ksteer_multistep"}
    for section in ("activation_eval", "generation_eval"):
        assert on_disk[section]
        for e in on_disk[section]:
            for key in REQUIRED_ENTRY:
                assert key in e, (section, key)
            assert e["method"] in {"unsteered", "caa_mean", "caa_sum", "ksteer", "ksteer_multistep"}
            assert set(e["per_label_prob"]) == set(on_disk["labels"])
    for e in on_disk["generation_eval"]:
        assert {"perplexity", "distinct2", "examples"} <= set(e)
    assert {len(e["targets"]) for e in on_disk["activation_eval"]} == {1, 2, 3}
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "## Verdict" in md and "| targets |" in md
    for png in (
        "activation_eval_combinations.png",
        "generation_eval_combinations.png",
        "calibration.png",
    ):
        assert (tmp_path / "demo" / png).stat().st_size > 1000


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
    cfg = DemoConfig.fast(
        model="tiny-random-llama", questions=str(q), methods=("caa_mean", "ksteer")
    )
    report = run_demo(cfg, tmp_path / "d", log=lambda s: None, progress=False)
    assert report["n_eval_questions"] == 2 and report["eval_source"].startswith("external file")
    assert set(report["alpha"]) == {"caa_mean", "ksteer"}


def test_demo_parser_defaults():
    args = build_parser().parse_args(["demo"])
    assert args.out == "runs/demo" and not args.fast


def test_demo_is_deterministic_given_the_seed(tmp_path):
    cfg = DemoConfig.fast(model="tiny-random-llama", methods=("caa_mean", "ksteer_multistep"))
    a = run_demo(cfg, tmp_path / "a", log=lambda s: None, progress=False)
    b = run_demo(cfg, tmp_path / "b", log=lambda s: None, progress=False)
    for key in ("alpha", "calibration", "activation_eval", "generation_eval"):
        assert json.dumps(a[key]) == json.dumps(b[key]), key  # JSON: NaN compares equal to NaN
