"""``ks-lens demo``: the whole pipeline on the embedded default model and the shipped tones.

collect (prompt mode: train split; evaluator split with single and two-tone instructions; the
gold tone texts re-encoded without instruction) -> train the steering probe, CAA vectors and the
held-out evaluators (multi-label activation evaluator, response-activation evaluator, and the
model-independent text evaluator on the gold texts) -> calibrate alpha per method on the
calibration split -> evaluate on the test split: activation level at the calibrated alpha, and
generated text at several alphas per method (trade-off curves, equal-KL headline) ->
``report.json``, ``report.md`` and PNG figures.

Every intermediate artefact is saved under ``--out``; activation stores resume, so a rerun after
an interruption continues where it stopped. ``--fast`` is a small smoke run (CI). ``--seeds N``
repeats everything (splits, probes, evaluators, calibration) with N seeds and reports mean ± sd.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ks_lens.comparison import METHODS, ComparisonConfig, ComparisonResult
from ks_lens.errors import ConfigError
from ks_lens.models import model_signature
from ks_lens.pipeline import PROBE_SOURCES, PipelineConfig, Setup, prepare
from ks_lens.report import render_summary, seeds_summary, write_report
from ks_lens.utils import git_commit

log = logging.getLogger(__name__)


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _evaluator_lines(setup: Setup) -> dict[str, str]:
    ev, resp, probe = setup.evaluator, setup.response_evaluator, setup.probe
    chance = 1 / len(setup.dataset.labels)
    lines = {}
    validity = setup.text_evaluator.validity
    if validity is not None:
        for name, sc in (
            ("question-grouped CV", validity.question_cv),
            ("leave-one-writer-out", validity.writer_cv),
        ):
            if sc is None:
                continue
            lines[f"text evaluator, gold texts, {name}"] = (
                f"{validity.n_texts} texts, {sc.n_folds} folds: single-tone accuracy "
                f"{sc.single_accuracy:.3f}, mean per-label AUC {sc.mean_auc:.3f}, two-tone both in "
                f"top 2 {_rate(sc.two_tone_top2)} ({sc.n_two}), three-tone all in top 3 "
                f"{_rate(sc.three_tone_top3)} ({sc.n_three})"
            )
    lines["activation evaluator"] = (
        f"`{ev.hook_name}`, MLP h={ev.config.hidden}, evaluator split with single and two-tone "
        f"instructions: held-out single-tone accuracy {ev.metrics['val_accuracy']:.3f}, two-tone "
        f"both-in-top-2 {ev.metrics.get('val_multi_topk_rate', float('nan')):.3f} "
        f"({ev.metrics.get('n_val_multi', 0)} held-out combined prompts)"
    )
    lines["response-activation evaluator"] = (
        f"`{resp.hook_name}` (best layer on held-out gold questions), gold texts re-encoded without "
        f"instruction: single-tone accuracy {resp.metrics['val_accuracy']:.3f} (chance {chance:.3f}), "
        f"multi-tone all-in-top-k {resp.metrics.get('val_multi_topk_rate', float('nan')):.3f}"
    )
    lines["steering probe (not an evaluator)"] = (
        f"`{probe.hook_name}`, instruction prompts of the train split: validation accuracy "
        f"{probe.metrics['val_accuracy']:.3f}"
    )
    return lines


def _info(setup: Setup, cfg: PipelineConfig, command: str, commit: str) -> dict[str, Any]:
    validity = setup.text_evaluator.validity
    return {
        "model": setup.model.cfg.model_name,
        "model_info": model_signature(setup.model),
        "command": command,
        "commit": commit,
        "dataset": {
            "name": setup.dataset.name,
            "hash": setup.dataset.content_hash(),
            "splits": setup.splits.sizes(),
            "split_seed": cfg.seed,
            "n_gold_texts": len(setup.gold_texts),
        },
        "layer": setup.layer,
        "eval_layer": setup.eval_layer,
        "steering_hook": setup.probe.hook_name,
        "eval_source": setup.eval_questions(1)[1],
        "evaluators": _evaluator_lines(setup),
        "text_evaluator_validity": None if validity is None else validity.to_json(),
        "activation_evaluator_metrics": setup.evaluator.metrics,
        "response_evaluator_metrics": {
            "hook_name": setup.response_evaluator.hook_name,
            **setup.response_evaluator.metrics,
        },
        "steering_probe_metrics": setup.probe.metrics,
        "demo_config": dataclasses.asdict(cfg),
        "stores": {
            "train": None if setup.train_store is None else str(setup.train_store.path),
            "evaluator": str(setup.evaluator_store.path),
            "gold_response": str(setup.response_store.path),
        },
        "timings": dict(setup.timings),
    }


def run_demo(
    cfg: PipelineConfig,
    out: str | Path,
    *,
    seeds: int = 1,
    command: str = "ks-lens demo",
    progress: bool = True,
) -> list[ComparisonResult]:
    """Run the pipeline once per seed (``cfg.seed``, ``cfg.seed + 1``, ...); returns the results.

    The first seed's report goes to ``out``; further seeds to ``out/seed-N``. With several
    seeds, the first report also gets the mean ± sd of the estimates across seeds.
    """
    if seeds < 1:
        raise ConfigError("seeds must be at least 1")
    cfg.validate()
    out = Path(out)
    commit = git_commit()  # the code that runs: read before anything else can change it
    results: list[ComparisonResult] = []
    first: tuple[ComparisonResult, dict[str, Any]] | None = None
    for i in range(seeds):
        s = cfg.seed + i
        cfg_s = replace(cfg, seed=s, comparison=replace(cfg.comparison, seed=s))
        out_s = out if i == 0 else out / f"seed-{s}"
        t_start = time.perf_counter()
        setup = prepare(cfg_s, out_s, progress=progress)
        result = setup.compare(progress=progress)
        info = _info(setup, cfg_s, command, commit)
        info["timings"]["total_s"] = time.perf_counter() - t_start
        paths = write_report(result, info, out_s)
        log.info(
            f"[ks-lens demo] seed {s}: wrote {paths['json']}, {paths['markdown']} and "
            f"{len(paths) - 2} figures in {info['timings']['total_s']:.0f} s"
        )
        results.append(result)
        if first is None:
            first = (result, info)
    if seeds > 1 and first is not None:
        result, info = first
        info["seeds"] = seeds_summary(results)
        write_report(result, info, out)
    return results


def print_summary(result: ComparisonResult) -> None:
    """Print :func:`~ks_lens.report.render_summary` (the headline) on stdout."""
    print("\n" + render_summary(result))


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="run the whole pipeline (collect, train, calibrate, evaluate, report)"
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default: %(default)s)")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--layer", type=int, default=None, help="steering layer (default: 60%% depth)")
    p.add_argument(
        "--eval-layer",
        type=int,
        default=None,
        help="activation evaluator layer (default: layer + 4)",
    )
    p.add_argument(
        "--questions", default=None, help="evaluate on this question file instead of the test split"
    )
    p.add_argument(
        "--texts",
        default=None,
        help="labelled texts (JSONL: text, labels, question) for the text evaluators "
        "(default: the shipped gold tone texts)",
    )
    p.add_argument(
        "--max-questions", type=int, default=None, help="cap the number of test questions"
    )
    p.add_argument(
        "--kl-budget",
        type=float,
        default=None,
        help="coherence budget and equal-KL level in nats per token (default 0.5)",
    )
    p.add_argument(
        "--probe-source",
        default=None,
        choices=list(PROBE_SOURCES),
        help="what the steering probe and CAA vectors learn from: gold texts without instruction "
        "('text', the measured default) or instruction prompts ('prompt', the reference code)",
    )
    p.add_argument(
        "--calibration-metric",
        default="generation_kl",
        choices=["generation_kl", "first_token_kl"],
        help="coherence cost that alpha is calibrated against (default: %(default)s)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated methods (default: the reference four); known: {','.join(METHODS)}",
    )
    p.add_argument("--fast", action="store_true", help="small smoke run (CI), about a minute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="repeat with this many seeds (mean ± sd)")
    p.set_defaults(func=cmd_demo)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The demo's :class:`PipelineConfig` from parsed arguments, validated (no compute yet)."""
    comparison = ComparisonConfig(calibration_metric=args.calibration_metric)
    if args.kl_budget is not None:
        comparison = replace(comparison, kl_budget=args.kl_budget)
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        comparison = replace(
            comparison,
            methods=methods,
            baseline=comparison.baseline if comparison.baseline in methods else methods[0],
        )
    kw: dict[str, Any] = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "layer": args.layer,
        "eval_layer": args.eval_layer,
        "questions": args.questions,
        "texts": args.texts,
        "seed": args.seed,
        "comparison": comparison,
    }
    if args.probe_source is not None:
        kw["probe_source"] = args.probe_source
    cfg = PipelineConfig.fast(**kw) if args.fast else PipelineConfig(**kw)
    if args.max_questions is not None:
        if args.max_questions < 1:
            raise ConfigError("--max-questions must be positive")
        cfg = replace(
            cfg,
            n_eval=min(cfg.n_eval, args.max_questions),
            n_gen=min(cfg.n_gen, args.max_questions),
        )
    if args.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    return cfg.validate()


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    command = (
        "ks-lens " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if sys.argv[1:]
        else "ks-lens demo"
    )
    results = run_demo(cfg, args.out, seeds=args.seeds, command=command)
    print_summary(results[0])
    print(f"\nfull report: {Path(args.out) / 'report.md'}")
    return 0


__all__ = ["add_demo_parser", "config_from_args", "git_commit", "print_summary", "run_demo"]
