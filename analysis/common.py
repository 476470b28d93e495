"""Shared command-line plumbing of the studies in this folder (not part of the library).

A study's options are a :class:`StudyOptions` dataclass (or a subclass with the study's own
fields): every :class:`~ks_lens.pipeline.PipelineConfig` setting, spelled as in ``ks-lens demo``
(:mod:`ks_lens.cli.options`), plus ``--fast``, ``--out`` and ``--work``; ``-q``/``-v`` set the
logging level.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import tyro

from ks_lens.cli.options import PipelineOptions, parse_pipeline_options
from ks_lens.compat import versions
from ks_lens.errors import ConfigError
from ks_lens.io import atomic_write_json
from ks_lens.logs import NORMAL, add_logging_arguments, configure_logging
from ks_lens.pipeline import PROBE_SOURCES, PipelineConfig, Setup, prepare
from ks_lens.utils import machine_info


@dataclass(frozen=True)
class StudyOptions(PipelineOptions):
    """The options every study takes."""

    out: str = "runs/analysis"  # output directory
    # where activation stores live and are reused (None: runs/demo, or runs/demo-fast with --fast)
    work: str | None = None
    verbosity: tyro.conf.Suppress[int] = NORMAL  # from -q/-v


StudyT = TypeVar("StudyT", bound=StudyOptions)


def parse(
    cls: type[StudyT],
    description: str,
    default_out: str,
    argv: Sequence[str] | None = None,
    *,
    full: PipelineConfig | None = None,
) -> StudyT:
    """The study's options from ``argv`` (default: the command line), validated.

    ``full`` holds the study's defaults for a full run (default ``PipelineConfig()``); with
    ``--fast`` the defaults are ``PipelineConfig.fast()``. Options given explicitly win over
    either. Bad values exit with code 2 and one message.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    prog = Path(sys.argv[0]).name
    logging_parser = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    add_logging_arguments(logging_parser)
    logging_args, rest = logging_parser.parse_known_args(args)
    description = (
        description.strip() + "\n\n-q/--quiet and -v/--verbose (before or after the options) "
        "print less or more progress on stderr."
    )
    try:
        opts = parse_pipeline_options(
            cls, rest, prog=prog, description=description, full=full, out=default_out
        )
        opts.config.validate()
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return dataclasses.replace(opts, verbosity=logging_args.verbosity)


def setup_from_options(opts: StudyOptions) -> Setup:
    """The standard setup of ``opts.config`` in ``opts.work`` (both probe sources)."""
    work = opts.work or ("runs/demo-fast" if opts.fast else "runs/demo")
    # studies may compare both sources and read any layer of the stores
    return prepare(opts.config, work, sources=PROBE_SOURCES, study_layers="all")


def start(opts: StudyOptions) -> tuple[Path, Setup, float]:
    """The output folder (created), the standard setup, and the start time of a study; sends
    ks-lens's and the study's log messages to stderr (``-q``/``-v``)."""
    configure_logging(opts.verbosity, names=("ks_lens", "analysis"))
    started = time.time()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, setup_from_options(opts), started


def write_json(out: Path, name: str, payload: dict[str, Any], started: float) -> Path:
    payload = {
        **payload,
        "elapsed_s": time.time() - started,
        "versions": versions(),
        "machine": machine_info(),
    }
    path = out / name
    atomic_write_json(path, json.loads(json.dumps(payload, default=_default)))
    return path


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
