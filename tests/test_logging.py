"""The library reports through ``logging`` (never ``print``); entry points configure it once."""

from __future__ import annotations

import logging

import pytest

import ks_lens as ks
from ks_lens import cli
from ks_lens.comparison import ComparisonConfig, run_comparison
from ks_lens.logs import configure_logging, quieted
from ks_lens.probes import ProbeConfig, train_probe
from ks_lens.steering import SteeringVectors


@pytest.fixture(autouse=True)
def _restore_ks_lens_logger():
    """Leave the ``ks_lens`` logger as this test found it (handlers and level)."""
    logger = logging.getLogger("ks_lens")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_library_calls_log_and_print_nothing(tiny_model, tiny_acts, tiny_probe, caplog, capsys):
    caplog.set_level(logging.DEBUG, logger="ks_lens")
    capsys.readouterr()
    ks.load_model("tiny-random-llama")
    evaluator = train_probe(tiny_acts, 3, config=ProbeConfig(hidden=16, epochs=3, seed=1))
    run_comparison(
        tiny_model,
        probe=tiny_probe,
        vectors=SteeringVectors.fit(tiny_acts, 2),
        evaluator=evaluator,
        text_evaluator=None,
        calib_questions=["hi?", "yo?"],
        test_questions=["a?", "b?"],
        config=ComparisonConfig(
            methods=("caa_mean", "ksteer"),
            sizes=(1,),
            kl_budget=0.05,
            act_combos_per_size=1,
            calib_tokens=3,
            calib_bisect_steps=1,
            n_resamples=20,
            instructed=False,
        ),
        progress=False,
    )
    assert capsys.readouterr().out == ""  # nothing on stdout from a library call
    by_logger = {(r.name, r.levelno) for r in caplog.records}
    assert ("ks_lens.models.loading", logging.DEBUG) in by_logger  # "loaded ... in ... s"
    calibrated = [r for r in caplog.records if "calibrated" in r.getMessage()]
    assert len(calibrated) == 2  # one line per method (one size)
    assert {r.name for r in calibrated} == {"ks_lens.comparison"}
    assert all(r.levelno == logging.INFO for r in calibrated)


def test_configure_logging_levels_and_no_duplicate_handlers(capsys):
    log = logging.getLogger("ks_lens.some_module")
    configure_logging()
    configure_logging()  # again: replaces its handler, no second line
    log.info("progress")
    log.debug("detail")
    assert capsys.readouterr().err == "progress\n"
    configure_logging(1)
    log.debug("detail")
    assert capsys.readouterr().err == "detail\n"
    configure_logging(-1)
    log.info("progress")
    log.warning("careful")
    assert capsys.readouterr().err == "careful\n"


def test_quieted_restores_the_level(caplog):
    caplog.set_level(logging.INFO, logger="ks_lens")
    log = logging.getLogger("ks_lens.comparison")
    with quieted("ks_lens.comparison"):
        log.info("hidden")
        log.warning("shown")
    log.info("shown again")
    assert [r.getMessage() for r in caplog.records] == ["shown", "shown again"]


@pytest.mark.parametrize(
    "flags, level", [([], logging.INFO), (["-q"], logging.WARNING), (["-v"], logging.DEBUG)]
)
def test_cli_quiet_and_verbose(flags, level, capsys):
    assert cli.main([*flags, "models"]) == 0
    assert logging.getLogger("ks_lens").level == level
    assert "tiny-random-llama" in capsys.readouterr().out  # the command's output stays on stdout


def test_cli_quiet_and_verbose_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["-q", "-v", "models"])
    assert "not allowed with argument" in capsys.readouterr().err
