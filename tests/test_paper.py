"""The paper protocol (issue #25): DCT options, presets, the sweep's estimate, and
``ks-lens demo --fast --preset paper`` end to end on the tiny model (DCT artefact saved and
loaded back identically, each method's layer chosen on calibration questions only)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ks_lens.cli import main
from ks_lens.cli.demo import DemoOptions, config_from_args, parse_demo_options
from ks_lens.cli.paper import check_layers, extra_work, sweep_layers
from ks_lens.cli.presets import PRESETS, Preset, apply_preset, get_preset, preset_in, spell
from ks_lens.comparison import ComparisonConfig, method_label
from ks_lens.errors import ConfigError
from ks_lens.memory import RunShape, add_work, comparison_work, dct_readout_rows
from ks_lens.pipeline import PipelineConfig
from ks_lens.steering.base import SteeringSpec
from ks_lens.steering.dct import DCT, DCTConfig, DCTSettings, DCTVectors

TONES = ("helpful", "expert", "casual", "cautious", "empathetic", "concise")


def one_line(text: str) -> str:
    return " ".join(text.replace("\u2502", " ").split())


# ----------------------------------------------------------------------------- DCT options


def test_dct_options_default_to_the_dataclass_and_round_trip():
    assert parse_demo_options([]).config.comparison.dct == DCTSettings()
    got = parse_demo_options(
        [
            *("--dct.target-offset", "2", "--dct.n-vectors", "6", "--dct.radius", "2.5"),
            *("--dct.steps", "5", "--dct.lr", "0.1", "--dct.power", "1.5", "--dct.batch-size", "8"),
        ]
    ).config.comparison.dct
    assert got == DCTSettings(
        target_offset=2, n_vectors=6, radius=2.5, steps=5, lr=0.1, power=1.5, batch_size=8
    )
    c = replace(ComparisonConfig(), dct=got)
    assert ComparisonConfig.from_json(json.loads(json.dumps(c.to_json()))) == c
    # an older report.json without DCT settings reads with the defaults
    old = {k: v for k, v in ComparisonConfig().to_json().items() if k != "dct"}
    assert ComparisonConfig.from_json(old).dct == DCTSettings()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dct.steps", "0"], "dct.steps must be an integer >= 1, got 0"),
        (["--dct.n-vectors", "0"], "dct.n_vectors must be an integer >= 1, got 0"),
        (["--dct.target-offset", "0"], "dct.target_offset must be an integer >= 1, got 0"),
        (["--dct.lr", "nan"], "dct.lr must be a positive finite number, got nan"),
        (["--dct.radius", "-1"], "dct.radius must be a positive finite number, got -1.0"),
        (["--dct.power", "0"], "dct.power must be a positive finite number, got 0.0"),
        (["--comparison.dct.steps", "3"], "--comparison.dct.steps is spelled --dct.steps"),
    ],
)
def test_bad_dct_options_are_refused_before_any_compute(argv, message, tmp_path, capsys):
    out = tmp_path / "o"
    try:
        code = main(["demo", "--model", "tiny-random-llama", "--out", str(out), *argv])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = one_line(capsys.readouterr().err)
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_dct_settings_give_a_config_at_a_layer(tiny_model):
    s = DCTSettings(n_vectors=3, steps=4)
    cfg = s.config(tiny_model, 1, seed=7)
    assert cfg == DCTConfig(source_layer=1, target_offset=2, n_vectors=3, steps=4, seed=7)
    assert cfg.target_layer == 3  # offset 3 capped at the last layer (4 layers)
    assert s.config(tiny_model, 0).target_offset == 3  # room for the full offset
    with pytest.raises(ConfigError, match="needs a target layer after the source layer 3"):
        s.config(tiny_model, 3)
    # a comparison asks for one vector per label: n_vectors is raised, never lowered
    assert s.config(tiny_model, 1, min_vectors=5).n_vectors == 5
    assert s.config(tiny_model, 1, min_vectors=2).n_vectors == 3


# ----------------------------------------------------------------------------- presets


def test_the_paper_preset_sets_its_values_and_explicit_options_win():
    plain = parse_demo_options([])
    opts = parse_demo_options(["--preset", "paper"])
    assert opts.preset == "paper" and opts.sweep is True
    assert opts.config.comparison.methods == ("caa_mean", "ksteer", "dct")
    assert opts.config.comparison.baseline == "caa_mean"
    assert opts.config.comparison.sizes == (1, 2, 3)
    # everything else keeps its default
    assert replace(opts.config, comparison=plain.config.comparison) == plain.config
    assert parse_demo_options(["--preset=paper"]).config == opts.config
    # explicit options win, wherever they stand
    mine = parse_demo_options(["--methods", "ksteer,dct", "--preset", "paper", "--no-sweep"])
    assert mine.config.comparison.methods == ("ksteer", "dct")
    assert mine.config.comparison.baseline == "ksteer"  # the first method, as without a preset
    assert mine.sweep is False
    assert parse_demo_options(["--preset", "paper", "--sizes", "1,2"]).config.comparison.sizes == (
        1,
        2,
    )


def test_fast_and_the_paper_preset_combine():
    opts = parse_demo_options(["--fast", "--preset", "paper"])
    fast = PipelineConfig.fast()
    assert opts.config.n_eval == fast.n_eval and opts.config.n_train == fast.n_train
    assert opts.config.comparison.max_new_tokens == fast.comparison.max_new_tokens
    assert opts.config.comparison.methods == ("caa_mean", "ksteer", "dct")
    assert opts.sweep and opts.sweep_points == 2
    assert opts.config.comparison.dct == DCTSettings(steps=8)  # a shorter DCT fit
    assert parse_demo_options(["--preset", "paper"]).sweep_points == DemoOptions.sweep_points
    assert (
        parse_demo_options(["--fast", "--preset", "paper", "--sweep-points", "3"]).sweep_points == 3
    )


def test_unknown_presets_are_refused_with_the_known_names(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown preset 'papr'; known presets: paper"):
        parse_demo_options(["--preset", "papr"])
    with pytest.raises(ConfigError, match="--preset needs a name: one of paper"):
        preset_in(["--preset"])
    assert main(["demo", "--preset", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown preset 'nope'; known presets: paper" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="PipelineConfig has no field 'no_such'"):
        apply_preset(DemoOptions(), Preset("x", "", {"config.no_such": 1}))


def test_presets_are_listed_by_help_with_their_options(capsys):
    with pytest.raises(SystemExit) as e:
        parse_demo_options(["--help"])
    assert e.value.code == 0
    text = one_line(capsys.readouterr().out)
    assert (
        "--preset paper: the K-Steering paper's protocol" in text
        and "sets --methods caa_mean,ksteer,dct --baseline caa_mean --sizes 1,2,3 --sweep." in text
    )
    assert "--preset {paper}" in text and "--dct.steps INT" in text
    assert get_preset("paper") is PRESETS["paper"]
    assert spell("config.comparison.sizes", (1, 2)) == "--sizes 1,2"
    assert spell("sweep", True) == "--sweep" and spell("config.layer", 3) == "--layer 3"


def test_sweep_options_are_checked():
    with pytest.raises(ConfigError, match="--sweep-points must be at least 1, got 0"):
        config_from_args(parse_demo_options(["--preset", "paper", "--sweep-points", "0"]))
    with pytest.raises(ConfigError, match="--sweep-layers needs --sweep"):
        config_from_args(parse_demo_options(["--sweep-layers", "3,5"]))
    with pytest.raises(ConfigError, match="--sweep-layers must be layer indices >= 0"):
        config_from_args(parse_demo_options(["--sweep", "--sweep-layers", "-1"]))
    with pytest.raises(ConfigError, match="sweep layer 3 must be between 0 and 2"):
        check_layers([1, 3], 4)
    assert check_layers([2, 1, 2], 4) == [1, 2]


# ----------------------------------------------------------------------------- sweep and estimate


def test_sweep_layers_spread_over_the_depth():
    # 30 layers, evaluator gap 4: from round(7.5) = 8 to 25, five points
    assert sweep_layers(30, 5) == [8, 12, 16, 21, 25]
    assert sweep_layers(30, 2) == [8, 25]
    assert sweep_layers(30, 1) == [16]  # the middle of 8..25 (round(16.5) = 16)
    # 4 layers: no layer has a full gap, so up to the last-but-one layer
    assert sweep_layers(4, 2) == [1, 2]
    assert sweep_layers(4, 9) == [1, 2]
    with pytest.raises(ConfigError, match="sweep_points must be at least 1"):
        sweep_layers(30, 0)


def test_dct_work_in_the_estimate_is_hand_computed():
    s = DCTSettings(steps=2, n_vectors=3)
    # per prompt: (2 + 1) x 3 vectors x 3 readouts + 1 unsteered + (2 x 3 + 1) mapping = 35
    assert dct_readout_rows(s, 4) == 4 * 35
    # a comparison learns one vector per label: with 6 labels, K = 6 instead of 3
    # per prompt: (2 + 1) x 6 x 3 + 1 + (2 x 6 + 1) = 68
    assert dct_readout_rows(s, 4, n_labels=6) == 4 * 68
    base = replace(ComparisonConfig(), methods=("caa_mean",), sizes=(1,), instructed=False)
    with_dct = replace(base, methods=("caa_mean", "dct"), dct=s)
    kw = dict(n_calib=4, n_eval=5, n_gen=2)
    a = comparison_work(base, TONES, **kw)
    b = comparison_work(with_dct, TONES, **kw)
    # 5 test questions x 6 single-label combinations x methods, plus the DCT vectors' learning
    assert a.readout_rows == 5 * 6 * 1
    assert b.readout_rows == 5 * 6 * 2 + 4 * 68  # six tones: six DCT vectors
    assert b.gen_tokens == 2 * a.gen_tokens - 2 * base.max_new_tokens  # unsteered answers once
    swept = comparison_work(base, TONES, text=False, reread_calib=True, **kw)
    assert swept.readout_rows == (5 + 4) * 6 and swept.text_rows == 0
    shape = RunShape(d_model=8, d_vocab=10, n_params=100, readout_rows=7, gen_tokens=11)
    added = add_work(shape, a, a)
    assert added.readout_rows == 7 + 2 * a.readout_rows
    assert added.gen_tokens == 11 + 2 * a.gen_tokens


def test_the_paper_estimate_adds_one_activation_comparison_per_swept_layer(tiny_model):
    cfg = PipelineConfig.fast(model="tiny-random-llama")
    cfg = replace(cfg, comparison=replace(cfg.comparison, methods=("caa_mean", "ksteer", "dct")))
    shape = RunShape(d_model=64, d_vocab=10, n_params=1000)
    per_layer = comparison_work(
        replace(cfg.comparison, curve_factors=(1.0,)),
        TONES,
        n_calib=cfg.n_calib,
        n_eval=cfg.n_eval,
        n_gen=cfg.n_gen,
        text=False,
        reread_calib=True,
    )
    got = extra_work(cfg, TONES, (), 2)(tiny_model, shape)  # layers 1 and 2 of 4
    assert got.readout_rows == 2 * per_layer.readout_rows
    assert got.gen_tokens == 2 * per_layer.gen_tokens
    one = extra_work(cfg, TONES, (2,), 5)(tiny_model, shape)
    assert one.readout_rows == per_layer.readout_rows


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """``ks-lens demo --fast --preset paper`` on the tiny model, in-process."""
    out = tmp_path_factory.mktemp("paper") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(
            [
                *("demo", "--fast", "--preset", "paper", "--model", "tiny-random-llama"),
                *("--n-gold", "24", "--out", str(out)),
            ]
        )
    return code, out, buf.getvalue()


def test_the_paper_preset_runs_end_to_end(paper_run):
    code, out, stdout = paper_run
    assert code == 0
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("[ks-lens demo] estimated peak memory ")
    assert "GiB, time about" in lines[0] and "starting" in lines[0]
    assert stdout.index("estimated peak memory") < stdout.index("full report")
    report = json.loads((out / "report.json").read_text())
    paper = json.loads((out / "paper.json").read_text())
    layer = {m: c["layer"] for m, c in paper["layer_choice"].items()}
    assert set(layer) == {"caa_mean", "ksteer", "dct"}
    assert paper["swept_layers"] == [1, 2]
    expected = {f"{m}@L{L}" for m, L in layer.items()}
    assert set(report["methods"]) == expected
    assert report["comparison_config"]["baseline"] == f"caa_mean@L{layer['caa_mean']}"
    for lens in ("activation", "text"):
        for m in expected:
            ks = {r["k"] for r in report["summaries"] if r["lens"] == lens and r["method"] == m}
            assert ks == {1, 2, 3}, (lens, m)
    assert paper["final_eval_layer"] == 3  # above every chosen layer (capped at the last)
    # capability retention: the merged comparison's rows, one per method at its layer (+ the
    # unsteered and instructed rows), in paper.json and as a table in paper.md
    assert paper["capability"] == report["capability"] and paper["capability"]
    assert {r["method"] for r in paper["capability"]} >= expected
    md = (out / "paper.md").read_text()
    assert "## Capability retention" in md and "not measured" not in md
    assert "| method | targets | alpha | accuracy [95 % CI] | vs unsteered [95 % CI] |" in md
    for m in expected:
        assert f"| {method_label(m)} |" in md, m
    assert report["paper"]["layer_choice"] == paper["layer_choice"]
    assert {"sweep_s", "paper_comparison_s"} <= set(report["timings"])


def _mean_gain(rows, method):
    mine = [r for r in rows if r["method"] == method]
    return sum(r["gain"]["estimate"] for r in mine) / len(mine)


def test_each_layer_is_chosen_on_calibration_questions_only(paper_run):
    _, out, _ = paper_run
    paper = json.loads((out / "paper.json").read_text())
    sweep = {rec["layer"]: rec for rec in paper["sweep"]}
    for method, choice in paper["choices"].items():
        cal = {L: _mean_gain(rec["calibration"], method) for L, rec in sweep.items()}
        best = max(cal.values())
        # the chosen layer has the best calibration score (ties: the first in layer order)
        assert cal[choice["layer"]] == best
        assert choice["layer"] == min(L for L, v in cal.items() if v == best)
        assert choice["chosen_on"] == "calibration questions"
        assert choice["choice"]["scores"] == {str(L): v for L, v in cal.items()}
        test = {L: _mean_gain(rec["test"], method) for L, rec in sweep.items()}
        assert choice["test_scores"] == pytest.approx({str(L): v for L, v in test.items()})


def test_the_dct_artefact_is_saved_and_loads_back_identically(paper_run, tmp_path, tiny_model):
    _, out, _ = paper_run
    paper = json.loads((out / "paper.json").read_text())
    layer = paper["layer_choice"]["dct"]["layer"]
    path = Path(paper["dct_vectors"][f"L{layer}"])
    assert path == out / "vectors" / f"dct-text-L{layer}"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == "ks_lens.dct_vectors"
    assert meta["layer"] == layer and meta["hook_name"] == f"blocks.{layer}.hook_resid_post"
    assert meta["target_layer"] == 3  # offset 3 capped at the tiny model's last layer
    assert meta["model"]["n_layers"] == 4 and "torch" in meta["versions"]
    assert meta["mapping"]["label_names"] == list(TONES)
    assert meta["config"] == {
        **PipelineConfig.fast().comparison.dct.__dict__,  # --fast: 8 steps
        "target_offset": 3 - layer,
        "source_layer": layer,
        "seed": 0,
    }
    a = DCTVectors.load(path, model=tiny_model)
    a.save(tmp_path / "again")
    b = DCTVectors.load(tmp_path / "again", model=tiny_model)
    assert a.mapping is not None and b.mapping is not None
    assert torch.equal(a.vectors, b.vectors) and torch.equal(a.values, b.values)
    assert torch.equal(a.mapping.gains, b.mapping.gains)
    assert (a.mapping.vector, a.mapping.sign) == (b.mapping.vector, b.mapping.sign)
    assert (a.config, a.radius, a.model_info) == (b.config, b.radius, b.model_info)
    spec = SteeringSpec(("casual", "expert"), (), 2.0)
    assert torch.equal(DCT(a).direction(spec), DCT(b).direction(spec))
    # the mapping kept in the artefact is the one the report's DCT steered with: each label's
    # (vector, sign) is its best gain among the vectors (up to the one-label-per-vector rule)
    for row in meta["mapping"]["table"]:
        assert row["gain"] == pytest.approx(
            float(
                a.mapping.gains[
                    row["vector"], 0 if row["sign"] > 0 else 1, TONES.index(row["label"])
                ]
            )
        )


def test_estimate_only_prints_the_estimate_and_computes_nothing(tmp_path, capsys, tiny_model):
    from ks_lens.cli.demo import SweepPlan, estimate_demo
    from ks_lens.memory import SECONDS_PER_MPARAM

    out = tmp_path / "o"
    argv = ["demo", "--fast", "--preset", "paper", "--model", "tiny-random-llama"]
    assert main([*argv, "--out", str(out), "--estimate-only"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("[ks-lens demo] estimated peak memory ") and "starting" not in line
    assert not out.exists()
    opts = parse_demo_options(argv[1:])
    plain = estimate_demo(opts.config)
    swept = estimate_demo(opts.config, sweep=SweepPlan((), 2))
    per_layer = comparison_work(
        replace(opts.config.comparison, curve_factors=(1.0,)),
        TONES,
        n_calib=opts.config.n_calib,
        n_eval=opts.config.n_eval,
        n_gen=opts.config.n_gen,
        text=False,
        reread_calib=True,
    )
    mparams = sum(p.numel() for p in tiny_model.parameters()) / 1e6
    extra = mparams * (
        SECONDS_PER_MPARAM["readout"] * 2 * per_layer.readout_rows
        + SECONDS_PER_MPARAM["token"] * 2 * per_layer.gen_tokens
    )
    assert swept.seconds - plain.seconds == pytest.approx(extra)
