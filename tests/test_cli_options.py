"""Command-line options generated from the config dataclasses (ks_lens.cli.options): every field is
reachable with its dataclass default, --fast changes defaults only, bad values exit with code 2.

No model is loaded here: these tests only parse."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from ks_lens.cli import (
    CollectOptions,
    InfoOptions,
    SteerOptions,
    TrainOptions,
    main,
)
from ks_lens.cli.demo import config_from_args, parse_demo_options
from ks_lens.cli.options import parse
from ks_lens.errors import ConfigError
from ks_lens.models import ModelOptions
from ks_lens.pipeline import PipelineConfig
from ks_lens.probes import ProbeConfig

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"
PIPELINE_FIELDS = {f.name for f in dataclasses.fields(PipelineConfig)}
#: the comparison's fields the pipeline sets (its seed and batch size): no options of their own
SET_BY_PIPELINE = {("comparison", name) for name in PIPELINE_FIELDS}


def one_line(text: str) -> str:
    """tyro frames its messages and wraps them at the terminal width: undo both."""
    return " ".join(text.replace("\u2502", " ").split())


def _leaves(cls: type, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(field path, resolved type) of every non-dataclass field under ``cls``."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if (*path, f.name) in SET_BY_PIPELINE:
            continue
        if dataclasses.is_dataclass(t):
            out += _leaves(t, (*path, f.name))
        else:
            out.append(((*path, f.name), t))
    return out


def _option(path: tuple[str, ...]) -> str:
    """The documented spelling: comparison fields drop 'comparison.'; the comparison's rules keep
    their own prefix."""
    if path[0] == "comparison":
        path = path[1:]
    return "--" + ".".join(p.replace("_", "-") for p in path)


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        obj = getattr(obj, p)
    return obj


def _set(obj: Any, path: tuple[str, ...], value: Any) -> Any:
    if len(path) == 1:
        return replace(obj, **{path[0]: value})
    return replace(obj, **{path[0]: _set(getattr(obj, path[0]), path[1:], value)})


def _other_value(path: tuple[str, ...], t: Any, default: Any) -> tuple[Any, list[str]]:
    """A value of type ``t`` other than ``default``, and the arguments that give it."""
    if get_origin(t) in (typing.Union, types.UnionType):
        (t,) = [a for a in get_args(t) if a is not type(None)]
    name = _option(path)
    if t is bool:  # a flag named after its non-default value
        return not default, [name if not default else name.replace("--", "--no-", 1)]
    if get_origin(t) is Literal:
        value = next(v for v in get_args(t) if v != default)
        return value, [name, value]
    if get_origin(t) is tuple:
        value = {int: (-5, 0), float: (0.5, 1.0, 3.0), str: ("caa_mean", "ksteer")}[get_args(t)[0]]
        if path[-1] == "sizes":
            value = (2, 3)  # numbers of targets are positive
        return value, [name, ",".join(str(v) for v in value)]
    if t is int:
        value = 3 if default is None else default + 1
        if path[-1] == "eval_layer":
            value = 4  # above the steering layer (3)
    elif t is float:
        value = 0.375 if default is None else default / 2 + 0.125
    else:
        assert t is str, t
        value = "ksteer" if path[-1] == "baseline" else "other"  # the baseline is a method
    return value, [name, str(value)]


def _every_option(cls: type) -> tuple[list[str], Any]:
    """Arguments that set every field of ``cls`` to a non-default value, and the result."""
    expected = cls()
    argv: list[str] = []
    for path, t in _leaves(cls):
        value, tokens = _other_value(path, t, _get(expected, path))
        expected = _set(expected, path, value)
        argv += tokens
    return argv, expected


# ----------------------------------------------------------------------------- demo


def test_every_pipeline_field_is_a_demo_option_with_the_dataclass_default():
    assert parse_demo_options([]).config == PipelineConfig()
    argv, expected = _every_option(PipelineConfig)
    assert parse_demo_options(argv).config == expected
    # each option alone touches its own field only
    for path, t in _leaves(PipelineConfig):
        value, tokens = _other_value(path, t, _get(PipelineConfig(), path))
        got = parse_demo_options(tokens).config
        assert got == _set(PipelineConfig(), path, value), path


def test_demo_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        parse_demo_options(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    defaults = PipelineConfig()
    for path, kind in _leaves(PipelineConfig):
        option = _option(path)
        if kind is bool and _get(defaults, path) is True:  # a flag on by default: --no-NAME
            option = "--no-" + option[2:]
        assert option + " " in text, path
    assert "--fast" in text and "--seeds" in text and "ksteer_multilayer" in text


@pytest.mark.parametrize(
    "argv, path, value",
    [
        (["--kl-budget", "0.3"], ("comparison", "kl_budget"), 0.3),
        (["--kl-budget=0.3"], ("comparison", "kl_budget"), 0.3),
        (["--probe-source", "prompt"], ("probe_source",), "prompt"),
        (
            ["--calibration-metric", "first_token_kl"],
            ("comparison", "calibration_metric"),
            "first_token_kl",
        ),
        (["--methods", "caa_mean,ksteer"], ("comparison", "methods"), ("caa_mean", "ksteer")),
        (["--avoid", ""], ("comparison", "avoid"), ()),
        (["--sizes", "1, 2"], ("comparison", "sizes"), (1, 2)),
        (["--layer", "3", "--eval-layer", "5"], ("eval_layer",), 5),
        # one --batch-size and one --seed: the comparison takes the pipeline's
        (["--batch-size", "4"], ("batch_size",), 4),
        (["--batch-size", "4"], ("comparison", "batch_size"), 4),
        (["--seed", "7"], ("comparison", "seed"), 7),
        (["--vanish.floor", "0.2"], ("comparison", "vanish", "floor"), 0.2),
        (["--degenerate.min-words", "5"], ("comparison", "degenerate", "min_words"), 5),
        (["--multilayer-offsets", "-4,-2,0"], ("multilayer_offsets",), (-4, -2, 0)),
        (["--model", "tiny-random-llama"], ("model",), "tiny-random-llama"),
        (["--device", "cpu", "--dtype", "bfloat16"], ("dtype",), "bfloat16"),
    ],
)
def test_demo_option_round_trips(argv, path, value):
    cfg = parse_demo_options(argv).config
    assert _get(cfg, path) == value
    assert config_from_args(parse_demo_options(argv)) == cfg  # valid as given


def test_methods_without_the_baseline_compare_with_the_first_method():
    c = parse_demo_options(["--methods", "ksteer,caa_sum"]).config.comparison
    assert c.methods == ("ksteer", "caa_sum") and c.baseline == "ksteer"
    # an explicit --baseline is kept, and checked
    opts = parse_demo_options(["--methods", "ksteer,caa_sum", "--baseline", "caa_mean"])
    assert opts.config.comparison.baseline == "caa_mean"
    with pytest.raises(ConfigError, match="baseline 'caa_mean' is not among the methods"):
        config_from_args(opts)


def test_fast_changes_the_defaults_and_explicit_options_win():
    fast = PipelineConfig.fast()
    opts = parse_demo_options(["--fast"])
    assert opts.fast and opts.config == fast
    # n_eval 32 and calib_tokens 16 are the full defaults: given explicitly, they still win
    expected = replace(
        fast,
        n_eval=32,
        model="tiny-random-llama",
        comparison=replace(fast.comparison, max_new_tokens=16, calib_tokens=16, kl_budget=0.3),
    )
    argv = ["--n-eval", "32", "--model", "tiny-random-llama", "--max-new-tokens", "16"]
    argv += ["--calib-tokens", "16", "--kl-budget", "0.3"]
    assert parse_demo_options(["--fast", *argv]).config == expected
    assert parse_demo_options([*argv, "--fast"]).config == expected  # order does not matter
    assert parse_demo_options(argv).config == replace(
        PipelineConfig(),
        n_eval=32,
        model="tiny-random-llama",
        comparison=replace(PipelineConfig().comparison, max_new_tokens=16, kl_budget=0.3),
    )


def test_fast_help_shows_the_fast_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_demo_options(["--fast", "--help"])
    text = one_line(capsys.readouterr().out)
    assert "--n-eval INT test questions, activation level (default: 6)" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--probe-source", "bogus"], "invalid choice 'bogus' for argument '--probe-source'"),
        (
            ["--calibration-metric", "kl"],
            "invalid choice 'kl' for argument '--calibration-metric'",
        ),
        (["--positions", "middle"], "invalid choice 'middle' for argument '--positions'"),
        (["--text-coverage", "every"], "invalid choice 'every' for argument '--text-coverage'"),
        (["--kl-budget", "abc"], "--kl-budget"),
        (["--n-eval", "many"], "--n-eval"),
        (["--no-such-option", "1"], "Unrecognized options: --no-such-option"),
        (
            ["--sizes", "1,x"],
            "Error parsing --sizes: expected int values separated by commas, got 'x'",
        ),
    ],
)
def test_bad_demo_values_exit_2_with_a_message(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2
    err = one_line(capsys.readouterr().err)
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--vanish.floor", "nan"], "vanish.floor must be a number between 0 and 1, got nan"),
        (["--vanish.floor", "2"], "vanish.floor must be a number between 0 and 1, got 2.0"),
        (["--vanish.reach", "-1"], "vanish.reach must be a number between 0 and 1, got -1.0"),
        (
            ["--degenerate.min-letters", "-1"],
            "degenerate.min_letters must be a non-negative whole number, got -1",
        ),
        (
            ["--degenerate.min-compression", "nan"],
            "degenerate.min_compression must be a number between 0 and 1, got nan",
        ),
        (["--sizes", "1,1"], "sizes [1, 1] repeat [1]: each number of targets is evaluated once"),
        (["--sizes", ""], "sizes must name at least one number of targets"),
        (["--sizes", "0,1"], "sizes must be at least 1"),
        (["--sizes", "1,7"], "combination size 7 is impossible with 6 labels"),
        (["--n-resamples", "0"], "n_resamples must be a positive number of bootstrap resamples"),
        (["--n-resamples", "-5"], "n_resamples must be a positive number of bootstrap resamples"),
        (["--comparison.seed", "7"], "--comparison.seed was renamed in ks-lens 0.2.0; use --seed"),
        (
            ["--comparison.batch-size", "4"],
            "--comparison.batch-size was renamed in ks-lens 0.2.0; use --batch-size",
        ),
        (
            ["--text-position", "last"],
            "--text-position was renamed in ks-lens 0.2.0; use --text-pooling",
        ),
        (["--fast=False"], "--fast takes no value (got '--fast=False')"),
        (["--fast=True"], "--fast takes no value (got '--fast=True')"),
        (["--fast", "False"], "--fast takes no value (got '--fast False')"),
        (["--comparison.methods", "caa_mean"], "--comparison.methods is spelled --methods"),
        (
            ["--comparison.vanish.floor", "0.2"],
            "--comparison.vanish.floor is spelled --vanish.floor",
        ),
        (
            ["--layer", "2", "--eval-layer", "2"],
            "the evaluator layer (2) must be above the steering layer (2)",
        ),
    ],
)
def test_demo_refuses_before_any_compute(argv, message, tmp_path, capsys, monkeypatch):
    """Issue #22: values that ran (or were ignored) and gave a wrong or no report are refused
    in one message before the model is loaded or anything is written."""
    import ks_lens.pipeline.steps

    monkeypatch.setattr(
        ks_lens.pipeline.steps, "load_model", lambda *a, **k: pytest.fail("the model was loaded")
    )
    out = tmp_path / "o"
    try:
        code = main(["demo", "--model", "tiny-random-llama", "--out", str(out), *argv])
    except SystemExit as e:  # the generated parser's own checks (a rule's thresholds)
        code = e.code
    assert code == 2
    err = one_line(capsys.readouterr().err)
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_out_of_range_demo_values_are_bad_input(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "o"), "--n-eval", "0"]) == 2
    assert capsys.readouterr().err == "ks-lens: error: n_eval must be positive, got 0\n"
    assert main(["demo", "--out", str(tmp_path / "o"), "--max-questions", "0"]) == 2
    assert "--max-questions must be positive" in capsys.readouterr().err


# ----------------------------------------------------------------------------- other commands


def test_every_probe_config_field_is_a_train_option():
    base = ["--acts", "a", "--out", "p"]
    assert parse(TrainOptions, base, prog="t").probe == ProbeConfig()
    argv, expected = _every_option(ProbeConfig)
    # a valid config: the MLP-only fields stay meaningful with kind=linear
    opts = parse(TrainOptions, [*base, *argv], prog="t")
    assert opts.probe == expected and opts.probe.normalize is False
    assert "--no-normalize" in argv


def test_train_probe_options_are_checked_by_probe_config(tmp_path):
    with pytest.raises(ConfigError, match="val_fraction must be in"):
        parse(TrainOptions, ["--acts", "a", "--out", "p", "--val-fraction", "1.5"], prog="t")


@pytest.mark.parametrize(
    "cls, required",
    [
        (CollectOptions, ["--out", "x"]),
        (SteerOptions, ["--alpha", "1", "Hi?"]),
        (InfoOptions, []),
    ],
)
def test_model_options_are_shared(cls, required):
    got = parse(
        cls, [*required, "--model", "m", "--device", "cpu", "--dtype", "bfloat16"], prog="x"
    )
    assert got.model == ModelOptions("m", "cpu", "bfloat16")
    default = parse(cls, required, prog="x").model
    # info loads no model unless --model is given
    assert default == (ModelOptions(model="") if cls is InfoOptions else ModelOptions())


def test_steer_questions_keep_their_commas_and_labels_split():
    # a tuple option takes one argument: it does not swallow the questions after it
    argv = ["--target", "casual,concise", "Hello, how are you?", "Why?", "--alpha", "2"]
    o = parse(SteerOptions, argv, prog="s")
    assert o.question == ["Hello, how are you?", "Why?"]
    assert o.target == ("casual", "concise") and o.avoid == ()


#: the options of ks-lens steer generated from the steering configs (issue 21)
STEER_METHOD_OPTIONS = {
    "ksteer": {
        "steps": "--steps",
        "decay": "--decay",
        "step_norm": "--step-norm",
        "objective": "--objective",
        "combine": "--combine",
        "temperature": "--temperature",
        "max_step": "--max-step",
        "precondition": "--precondition",
    },
    "caa": {"combine": "--caa-combine", "normalize": "--normalize", "avoid_mode": "--avoid-mode"},
}


def test_steer_method_options_come_from_the_steering_configs(capsys):
    import re

    from ks_lens.steering import CAAConfig, KSteeringConfig

    required = ["--alpha", "1", "Hi?"]
    o = parse(SteerOptions, required, prog="s")
    assert o.ksteer == KSteeringConfig() and o.caa == CAAConfig()
    with pytest.raises(SystemExit) as e:
        parse(SteerOptions, ["--help"], prog="s")
    assert e.value.code == 0
    text = one_line(capsys.readouterr().out)
    configs = {"ksteer": KSteeringConfig, "caa": CAAConfig}
    for group, options in STEER_METHOD_OPTIONS.items():
        cls = configs[group]
        assert set(options) == {f.name for f in dataclasses.fields(cls)}  # every field
        for name, option in options.items():
            default = getattr(cls(), name)  # the help shows the dataclass default
            assert re.search(
                rf"{re.escape(option)} .*?\(default: {re.escape(str(default))}\)", text
            )
    argv = [
        *["--steps", "3", "--decay", "0.5", "--step-norm", "unit", "--objective", "softmin"],
        *["--combine", "pcgrad", "--temperature", "2", "--max-step", "0.25"],
        *[
            "--precondition",
            "diag",
            "--caa-combine",
            "sum",
            "--normalize",
            "--avoid-mode",
            "ablate",
        ],
    ]
    o = parse(SteerOptions, [*required, *argv], prog="s")
    assert o.ksteer == KSteeringConfig(3, 0.5, "unit", "softmin", "pcgrad", 2.0, 0.25, "diag")
    assert o.caa == CAAConfig("sum", True, "ablate")
    # choices come from the configs' Literal types; the configs check the values that parse
    with pytest.raises(SystemExit) as e:
        parse(SteerOptions, [*required, "--combine", "x"], prog="s")
    assert e.value.code == 2
    assert "'sum', 'balanced', 'pcgrad'" in one_line(capsys.readouterr().err)
    with pytest.raises(ConfigError, match="temperature must be a positive finite number, got 0.0"):
        parse(SteerOptions, [*required, "--temperature", "0"], prog="s")
    with pytest.raises(ConfigError, match="max_step must be a positive finite fraction"):
        parse(SteerOptions, [*required, "--max-step", "-1"], prog="s")


def test_steer_refuses_the_other_methods_options_before_reading_them():
    from ks_lens.cli.steer import cmd_steer, parse_steer_options
    from ks_lens.steering import CAAConfig, KSteeringConfig

    base = ["--alpha", "1", "Hi?"]
    with pytest.raises(ConfigError, match=r"^--max-step, --step-norm apply to K-Steering"):
        parse_steer_options([*base, "--vectors", "v", "--max-step", "-1", "--step_norm", "unit"])
    with pytest.raises(
        ConfigError, match=r"^--avoid-mode, --caa-combine apply to CAA \(--vectors\)"
    ):
        parse_steer_options(
            [*base, "--classifier", "p", "--caa-combine", "sum", "--avoid-mode=ablate"]
        )
    # a method's own options, or an explicit default, are fine
    o = parse_steer_options([*base, "--classifier", "p", "--steps", "2", "--decay", "0.95"])
    assert o.ksteer == KSteeringConfig(steps=2)
    # options built in code: the other method's non-default settings are refused as well
    for kw, message in [
        ({"vectors": "v", "ksteer": KSteeringConfig(steps=2)}, "--steps apply to K-Steering"),
        ({"classifier": "p", "caa": CAAConfig(normalize=True)}, "--normalize apply to CAA"),
    ]:
        with pytest.raises(ConfigError, match=message):
            cmd_steer(SteerOptions(question=["Hi?"], alpha=1.0, **kw))


def test_collect_choices_come_from_the_library(capsys):
    with pytest.raises(SystemExit) as e:
        main(["collect", "--out", "x", "--split", "holdout"])
    assert e.value.code == 2
    err = one_line(capsys.readouterr().err)
    assert "invalid choice 'holdout' for argument '--split'" in err
    assert "'train', 'evaluator', 'calibration', 'test', 'all'" in err
    o = parse(
        CollectOptions,
        ["--out", "x", "--hooks", "resid_post,attn.hook_z", "--no-share-prefix"],
        prog="c",
    )
    assert o.hooks == ("resid_post", "attn.hook_z") and o.share_prefix is False and o.layers is None


# ----------------------------------------------------------------------------- analysis/common


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(ANALYSIS))
    import common as module

    return module


def test_studies_take_the_demo_options(common):
    argv, expected = _every_option(PipelineConfig)
    opts = common.parse(common.StudyOptions, "d", "runs/x", argv)
    assert opts.config == expected == parse_demo_options(argv).config
    assert opts.out == "runs/x" and opts.work is None and not opts.fast and opts.verbosity == 0
    assert common.parse(common.StudyOptions, "d", "runs/x", []).config == PipelineConfig()


def test_studies_fast_and_logging_flags(common, capsys):
    fast = PipelineConfig.fast()
    opts = common.parse(
        common.StudyOptions, "d", "runs/x", ["-v", "--fast", "--n-calib", "12", "--work", "w"]
    )
    assert opts.fast and opts.verbosity == 1 and opts.work == "w"
    assert opts.config == replace(fast, n_calib=12)
    # a study's own full-run defaults (layer_sweep: 24 calibration questions) give way to --fast
    full = PipelineConfig(n_calib=24)
    assert common.parse(common.StudyOptions, "d", "o", [], full=full).config.n_calib == 24
    assert common.parse(common.StudyOptions, "d", "o", ["--fast"], full=full).config.n_calib == 4
    with pytest.raises(SystemExit) as e:
        common.parse(common.StudyOptions, "d", "o", ["-q", "-v"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        common.parse(common.StudyOptions, "d", "o", ["--kl-budget", "-1"])
    assert e.value.code == 2
    assert "error: kl_budget must be a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        common.parse(common.StudyOptions, "d", "o", ["--comparison.methods", "ksteer"])
    assert e.value.code == 2
    assert "--comparison.methods is spelled --methods" in capsys.readouterr().err
    # studies, like the demo, seed the comparison with --seed (there is no --comparison.seed)
    assert common.parse(common.StudyOptions, "d", "o", ["--seed", "7"]).config.comparison.seed == 7
    with pytest.raises(SystemExit) as e:
        common.parse(common.StudyOptions, "d", "o", ["--comparison.seed", "7"])
    assert e.value.code == 2
    assert "--comparison.seed was renamed in ks-lens 0.2.0; use --seed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        common.parse(common.StudyOptions, "d", "o", ["--probe-source", "bogus"])
    assert e.value.code == 2
    assert "invalid choice 'bogus'" in one_line(capsys.readouterr().err)


def test_a_study_adds_options_of_its_own(common, capsys):
    import layer_sweep
    import steering_levers

    full = PipelineConfig(n_calib=24)
    o = common.parse(layer_sweep.SweepOptions, "d", "o", ["--layers", "2,3"], full=full)
    assert o.layers == (2, 3) and o.config == full
    o = common.parse(steering_levers.LeversOptions, "d", "o", ["--levers", "source,step"])
    assert o.levers == ("source", "step") and o.n_val is None
    with pytest.raises(SystemExit) as e:
        common.parse(steering_levers.LeversOptions, "d", "o", ["--levers", "source,bogus"])
    assert e.value.code == 2
    assert "Error parsing --levers: invalid choice 'bogus'" in one_line(capsys.readouterr().err)
