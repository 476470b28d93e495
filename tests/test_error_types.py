"""Bad input raises the specific :class:`~ks_lens.errors.KsLensError` subclass in every module,
and the CLI reports those (exit 2) but lets anything else surface as a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from ks_lens import (
    activations,
    calibration,
    cli,
    comparison,
    datasets,
    hooks,
    io,
    models,
    pipeline,
    probes,
    steering,
    text_evaluator,
    utils,
)
from ks_lens.analysis import sweep
from ks_lens.cli import demo
from ks_lens.datasets import gold_texts
from ks_lens.errors import (
    ConfigError,
    DatasetError,
    HookPointError,
    KsLensError,
    LabelError,
    MissingKeyError,
    StoreError,
    UnknownModelError,
    WrongTypeError,
)
from ks_lens.evaluation import stats
from ks_lens.steering import base as steering_base
from ks_lens.steering import positions


def _raises(call: Callable[[], Any], expected: type[KsLensError], match: str) -> KsLensError:
    with pytest.raises(KsLensError, match=match) as info:
        call()
    assert info.type is expected, f"{info.type.__name__} raised, {expected.__name__} expected"
    return info.value


def test_error_classes_keep_the_builtins_they_refine():
    assert issubclass(WrongTypeError, ConfigError) and issubclass(WrongTypeError, TypeError)
    assert issubclass(WrongTypeError, ValueError)  # it was a ValueError in some places
    assert issubclass(MissingKeyError, KeyError) and issubclass(MissingKeyError, KsLensError)
    # unlike a plain KeyError, the message is not shown in quotes
    assert str(MissingKeyError("no probe for layer 9")) == "no probe for layer 9"


# ----------------------------------------------------------------------------- no model needed


def _bad_questions_file(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"text": "fine"}\n{not json\n')
    return f


def _bad_labelled_texts(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"text": "hi", "labels": [], "question": "q"}) + "\n")
    return f


CASES_WITHOUT_MODEL: list[tuple[str, Callable[[Any], Any], type[KsLensError], str]] = [
    (
        "activations",
        lambda tmp: activations.ActivationStore(tmp / "none"),
        StoreError,
        "no activation store",
    ),
    (
        "comparison",
        lambda tmp: comparison.ComparisonConfig(methods=("nope",)).validate(("a", "b")),
        ConfigError,
        "unknown method",
    ),
    (
        "datasets",
        lambda tmp: datasets.load_questions(_bad_questions_file(tmp)),
        DatasetError,
        "q.jsonl:2",
    ),
    (
        "evaluation (NaN metric)",
        lambda tmp: calibration.calibrate_alpha(lambda a: float("nan"), 0.1),
        ConfigError,
        "NaN",
    ),
    (
        "evaluation (metrics length)",
        lambda tmp: calibration.calibrate_alphas(lambda which, alphas: [], 0.1, [1.0]),
        ConfigError,
        "one value per alpha",
    ),
    (
        "gold_texts",
        lambda tmp: gold_texts.load_labelled_texts(_bad_labelled_texts(tmp)),
        DatasetError,
        "labels",
    ),
    (
        "hooks",
        lambda tmp: hooks.parse_hook("blocks.x.nothing"),
        HookPointError,
        "not a per-block hook point",
    ),
    (
        "io",
        lambda tmp: io.read_json(tmp / "missing.json", "probe metadata"),
        StoreError,
        "probe metadata not found",
    ),
    (
        "models",
        lambda tmp: models.load_model(""),
        UnknownModelError,
        "non-empty string",
    ),
    (
        "pipeline",
        lambda tmp: pipeline.PipelineConfig(n_gold=1).validate(),
        ConfigError,
        "n_gold",
    ),
    (
        "probes",
        lambda tmp: probes.ProbeConfig(architecture="bogus"),
        ConfigError,
        "probe architecture",
    ),
    (
        "stats",
        lambda tmp: stats.paired_difference([1.0, 2.0], [1.0]),
        ConfigError,
        "differ in shape",
    ),
    (
        "text_evaluator (config)",
        lambda tmp: text_evaluator.TextEvaluatorConfig(C=0),
        ConfigError,
        "C must be",
    ),
    (
        "text_evaluator (fields)",
        lambda tmp: text_evaluator.TextEvaluatorConfig.from_json({"bogus": 1}),
        ConfigError,
        "unknown text-evaluator config fields",
    ),
    (
        "utils",
        lambda tmp: utils.resolve_device("garbage"),
        ConfigError,
        "unknown device",
    ),
    (
        "steering/base",
        lambda tmp: steering_base.SteeringSpec.make(["nope"], None, 1.0, ("a", "b")),
        LabelError,
        "unknown label",
    ),
    (
        "steering/ksteer",
        lambda tmp: steering.KSteering("not a probe"),
        WrongTypeError,
        "needs a ks_lens Probe",
    ),
    (
        "steering/multilayer",
        lambda tmp: steering.MultiLayer(["not a steerer"]),
        WrongTypeError,
        "single-hook Steerers",
    ),
    (
        "steering/positions",
        lambda tmp: positions.check_positions("sideways"),
        ConfigError,
        "unknown positions",
    ),
    (
        "analysis/sweep",
        lambda tmp: sweep.evaluator_placement(9, 4),
        ConfigError,
        "out of range",
    ),
    (
        "demo",
        lambda tmp: demo.run_demo(pipeline.PipelineConfig.fast(), tmp, seeds=0),
        ConfigError,
        "seeds",
    ),
]


@pytest.mark.parametrize(
    "call, expected, match",
    [c[1:] for c in CASES_WITHOUT_MODEL],
    ids=[c[0] for c in CASES_WITHOUT_MODEL],
)
def test_bad_input_raises_the_specific_error(call, expected, match, tmp_path):
    _raises(lambda: call(tmp_path), expected, match)


# ----------------------------------------------------------------------------- tiny model


def test_bad_input_with_a_model(tiny_model, tiny_dataset, tiny_acts, tiny_probe):
    from ks_lens.activations import collect_activations
    from ks_lens.generation import generate
    from ks_lens.models.chat import tokenize_texts
    from ks_lens.probes import ProbeConfig, train_probe, train_probes
    from ks_lens.steering import SteeringVectors

    _raises(
        lambda: collect_activations(tiny_model, tiny_dataset, mode="bogus", progress=False),
        ConfigError,
        "unknown mode",
    )
    _raises(
        lambda: collect_activations(tiny_model, tiny_dataset, layers=[99], progress=False),
        HookPointError,
        "99",
    )
    tok = tiny_model.tokenizer
    _raises(lambda: tokenize_texts(tok, "one string"), WrongTypeError, "not one string")
    batch = tokenize_texts(tok, ["hi"])
    e = _raises(lambda: batch["nope"], MissingKeyError, "not 'nope'")
    assert isinstance(e, KeyError)
    _raises(lambda: generate(tiny_model, "hi", max_new_tokens=0), ConfigError, "max_new_tokens")
    _raises(lambda: train_probe(tiny_acts, 2, groups=["x"]), ConfigError, "groups has")
    probes = train_probes(tiny_acts, layers=[1], config=ProbeConfig(epochs=1), progress=False)
    _raises(lambda: probes[2], MissingKeyError, r"probes exist for layers \[1\]")
    _raises(
        lambda: SteeringVectors.fit(tiny_acts, 2, method="bogus"), ConfigError, "unknown method"
    )


# ----------------------------------------------------------------------------- CLI


def test_cli_bad_input_is_exit_2(capsys):
    # the shipped gold texts have fixed labels: a bad --labels is reported, not a traceback
    rc = cli.main(["train-text-evaluator", "--labels", "casual,concise", "--out", "unused"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("ks-lens: error: the shipped gold texts have the labels")
    assert "Traceback" not in err


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), ValueError("a bug"), KeyError("a bug")])
def test_cli_lets_genuine_bugs_propagate(monkeypatch, exc):
    def boom(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_models", boom)
    with pytest.raises(type(exc), match="a bug"):
        cli.main(["models"])
