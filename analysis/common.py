"""Shared command-line plumbing of the studies in this folder (not part of the library)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ks_lens.io import atomic_write_json
from ks_lens.logs import add_logging_arguments, configure_logging
from ks_lens.pipeline import PROBE_SOURCES, PipelineConfig, Setup, prepare
from ks_lens.utils import machine_info, versions


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=default_out, help="output directory (default: %(default)s)")
    p.add_argument(
        "--work",
        default=None,
        help="where activation stores live/are reused "
        "(default: runs/demo, or runs/demo-fast with --fast)",
    )
    p.add_argument("--model", default="default")
    p.add_argument("--device", default=None)
    p.add_argument("--fast", action="store_true", help="small settings for CI (about two minutes)")
    p.add_argument("--seed", type=int, default=0)
    add_logging_arguments(p)
    return p


def setup_from_args(args: argparse.Namespace) -> Setup:
    kw: dict[str, Any] = {"model": args.model, "device": args.device, "seed": args.seed}
    cfg = PipelineConfig.fast(**kw) if args.fast else PipelineConfig(**kw)
    work = args.work or ("runs/demo-fast" if args.fast else "runs/demo")
    return prepare(cfg, work, sources=PROBE_SOURCES)  # studies may compare both sources


def start(args: argparse.Namespace) -> tuple[Path, Setup, float]:
    """The output folder (created), the standard setup, and the start time of a study; sends
    ks-lens's and the study's log messages to stderr (``-q``/``-v``)."""
    configure_logging(args.verbosity, names=("ks_lens", "analysis"))
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, setup_from_args(args), started


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
