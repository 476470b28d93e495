"""The ``ks-lens`` command line: ``info``, ``models``, ``collect``, ``train``, ``vectors``,
``steer``, ``capability``, ``demo``, ``evaluate-text``, ``train-text-evaluator``, ``report``.

Each subcommand is a thin shell over the library; run ``ks-lens SUBCOMMAND --help``. Its
options are the fields of one dataclass (``CollectOptions``, ``TrainOptions``, ...), read by
:mod:`ks_lens.cli.options`: shared settings come from the library's own dataclasses
(:class:`~ks_lens.models.ModelOptions` for ``--model/--device/--dtype``,
:class:`~ks_lens.probes.ProbeConfig` for the probe options of ``train``,
:class:`~ks_lens.pipeline.PipelineConfig` for ``demo``), and choices from its ``Literal`` types.
``-q``/``-v`` come before the subcommand (``ks-lens -v demo``).

What lives where (the options dataclasses and ``cmd_*`` functions are re-exported here):

* :mod:`ks_lens.cli.info`: ``info`` and ``models``.
* :mod:`ks_lens.cli.collect`: ``collect``, ``train`` and ``vectors``.
* :mod:`ks_lens.cli.steer`: ``steer``.
* :mod:`ks_lens.cli.capability`: ``capability``.
* :mod:`ks_lens.cli.texts`: ``report``, ``evaluate-text`` and ``train-text-evaluator``.
* :mod:`ks_lens.cli.demo`: ``demo`` (:class:`~ks_lens.cli.demo.DemoOptions`,
  :func:`~ks_lens.cli.demo.cmd_demo`), with :mod:`ks_lens.cli.presets` (``--preset NAME``)
  and :mod:`ks_lens.cli.paper` (the paper's protocol, ``--preset paper``).
* :mod:`ks_lens.cli.options`: the options read from the dataclasses (also by ``analysis/``).
* :mod:`ks_lens.cli.common`: what the commands share (the model options, the ``--out`` check).
* here: the top level, :func:`build_parser` and :func:`main` (the ``ks-lens`` entry point;
  ``python -m ks_lens.cli`` runs it too).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ks_lens.cli.capability import CapabilityOptions, cmd_capability
from ks_lens.cli.collect import (
    CollectOptions,
    TrainOptions,
    VectorsOptions,
    cmd_collect,
    cmd_train,
    cmd_vectors,
)
from ks_lens.cli.common import Model, _describe_os_error
from ks_lens.cli.demo import DemoOptions, cmd_demo, parse_demo_options
from ks_lens.cli.info import InfoOptions, ModelsOptions, cmd_info, cmd_models
from ks_lens.cli.options import parse
from ks_lens.cli.steer import SteerOptions, cmd_steer, parse_steer_options
from ks_lens.cli.texts import (
    EvaluateTextOptions,
    ReportOptions,
    TrainTextEvaluatorOptions,
    cmd_evaluate_text,
    cmd_report,
    cmd_train_text_evaluator,
)
from ks_lens.errors import Interrupted, KsLensError
from ks_lens.logs import add_logging_arguments, configure_logging

__all__ = [
    "CapabilityOptions",
    "CollectOptions",
    "DemoOptions",
    "EvaluateTextOptions",
    "InfoOptions",
    "Model",
    "ModelsOptions",
    "ReportOptions",
    "SteerOptions",
    "TrainOptions",
    "TrainTextEvaluatorOptions",
    "VectorsOptions",
    "build_parser",
    "cmd_capability",
    "cmd_collect",
    "cmd_demo",
    "cmd_evaluate_text",
    "cmd_info",
    "cmd_models",
    "cmd_report",
    "cmd_steer",
    "cmd_train",
    "cmd_train_text_evaluator",
    "cmd_vectors",
    "main",
]

Parser = Callable[[Sequence[str], str], Any]


def _reader(cls: type[Any]) -> Parser:
    return lambda argv, prog: parse(cls, argv, prog=prog)


def _summary(cls: type[Any]) -> str:
    """The first line of ``cls``'s docstring, for ``ks-lens --help``."""
    line = (cls.__doc__ or "").strip().splitlines()[0].rstrip(".")
    return line[:1].lower() + line[1:]


def build_parser() -> argparse.ArgumentParser:
    """The top level: ``ks-lens [-q|-v] COMMAND``; each command reads the rest of the arguments
    into its options dataclass (``ks-lens COMMAND --help``)."""
    parser = argparse.ArgumentParser(
        prog="ks-lens",
        description="Multi-direction activation steering on TransformerLens hooks.",
        epilog="Run 'ks-lens COMMAND --help' for the options of a command.",
    )
    add_logging_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands: list[tuple[str, type[Any], Callable[[Any], int], Parser | None]] = [
        ("info", InfoOptions, cmd_info, None),
        ("models", ModelsOptions, cmd_models, None),
        ("collect", CollectOptions, cmd_collect, None),
        ("train", TrainOptions, cmd_train, None),
        ("vectors", VectorsOptions, cmd_vectors, None),
        ("steer", SteerOptions, cmd_steer, lambda argv, prog: parse_steer_options(argv, prog=prog)),
        ("capability", CapabilityOptions, cmd_capability, None),
        ("evaluate-text", EvaluateTextOptions, cmd_evaluate_text, None),
        ("train-text-evaluator", TrainTextEvaluatorOptions, cmd_train_text_evaluator, None),
        ("report", ReportOptions, cmd_report, None),
        ("demo", DemoOptions, cmd_demo, lambda argv, prog: parse_demo_options(argv, prog=prog)),
    ]
    for name, cls, func, reader in commands:
        p = sub.add_parser(name, help=_summary(cls), add_help=False)
        p.set_defaults(func=func, read=reader or _reader(cls))
    return parser


def _format_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    return f"ks-lens: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # the top level has only flags: the first other argument is the command, the rest its options
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    args = parser.parse_args(argv[: at + 1])
    configure_logging(args.verbosity)
    warnings.formatwarning = _format_warning
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        options = args.read(argv[at + 1 :], f"ks-lens {args.command}")
        return int(args.func(options) or 0)
    except KsLensError as e:
        # bad input or a damaged artefact: a clear message, no traceback
        print(f"ks-lens: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # the file system or the machine refused (permissions, full disk, missing file, ...)
        print(f"ks-lens: error: {_describe_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        saved = e.saved if isinstance(e, Interrupted) else "nothing was saved"
        print(f"ks-lens: interrupted; {saved}", file=sys.stderr)
        return 130
    # anything else is a bug in ks-lens (or a library below it): let the traceback show
