"""``ks-lens demo``: the whole pipeline on the embedded default model and the shipped tones.

collect (prompt mode, train + evaluator splits; response-only answers for the response
evaluator) -> train the steering probe, CAA vectors and the held-out evaluators -> calibrate alpha
per method to a coherence budget on the calibration split -> evaluate every 1-, 2- and 3-tone
combination on the test split (activation level and generated text) -> ``report.json``,
``report.md`` and PNG figures.

Every intermediate artefact is saved under ``--out``; activation stores resume, so a rerun after
an interruption continues where it stopped. ``--fast`` is a small smoke run (CI).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ks_lens.comparison import ComparisonConfig, summarise
from ks_lens.models import model_signature
from ks_lens.pipeline import PipelineConfig, prepare
from ks_lens.report import method_label, verdict, write_report

DemoConfig = PipelineConfig


def comparison_config(cfg: PipelineConfig) -> ComparisonConfig:
    config = ComparisonConfig(
        methods=tuple(cfg.methods),
        calibration_metric=cfg.calibration_metric,
        batch_size=cfg.batch_size,
        act_combos_per_size=cfg.act_combos_per_size,
        gen_combos_per_size=cfg.gen_combos_per_size,
        max_new_tokens=cfg.max_new_tokens,
        calib_tokens=cfg.calib_tokens,
        calib_bisect_steps=cfg.calib_bisect_steps,
        seed=cfg.seed,
    )
    return config if cfg.kl_budget is None else replace(config, kl_budget=cfg.kl_budget)


def run_demo(
    cfg: PipelineConfig, out: str | Path, *, log: Any = print, progress: bool = True
) -> dict[str, Any]:
    """Run the pipeline; returns the report dict (also written to ``out``)."""
    out = Path(out)
    t_start = time.perf_counter()
    setup = prepare(cfg, out, log=log, progress=progress)
    source = setup.eval_questions(cfg.n_eval)[1]
    result = setup.compare(comparison_config(cfg), progress=progress, log=log)
    timings = {**setup.timings, **result.pop("timings")}
    timings["total_s"] = time.perf_counter() - t_start
    probe, evaluator, resp = setup.probe, setup.evaluator, setup.response_evaluator
    report: dict[str, Any] = {
        "model": setup.model.cfg.model_name,
        "model_info": model_signature(setup.model),
        "dataset": {
            "name": setup.dataset.name,
            "hash": setup.dataset.content_hash(),
            "splits": setup.splits.sizes(),
            "split_seed": cfg.seed,
        },
        "layer": setup.layer,
        "steering_hook": probe.hook_name,
        "eval_source": source,
        "steering_probe": {
            "hook_name": probe.hook_name,
            "val_accuracy": probe.metrics["val_accuracy"],
            "n_train_questions": len(setup.part("train", cfg.n_train).questions),
        },
        "evaluator": {
            "hook_name": evaluator.hook_name,
            "kind": f"mlp h={evaluator.config.hidden} seed={evaluator.config.seed}",
            "val_accuracy": evaluator.metrics["val_accuracy"],
            "n_questions": len(setup.part("evaluator", cfg.n_evaluator).questions),
        },
        "response_evaluator": {
            "hook_name": resp.hook_name,
            "val_accuracy": resp.metrics["val_accuracy"],
            "val_accuracy_by_layer": {
                str(k): v.metrics["val_accuracy"] for k, v in setup.response_probes.items()
            },
            "n_questions": len(setup.part("evaluator", cfg.n_response).questions),
            "max_new_tokens": cfg.response_tokens,
        },
        **result,
        "demo_config": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
        },
        "timings": timings,
        "stores": {
            "train": str(setup.train_store.path),
            "evaluator": str(setup.evaluator_store.path),
            "response": str(setup.response_store.path),
        },
    }
    paths = write_report(report, out)
    log(
        f"[ks-lens demo] wrote {paths['json']}, {paths['markdown']} and {len(paths) - 2} figures "
        f"in {timings['total_s']:.0f} s"
    )
    return report


def print_summary(report: dict[str, Any]) -> None:
    for section, title in (
        ("activation_eval", "activation level (held-out evaluator)"),
        ("generation_eval", "generated text (response evaluator)"),
    ):
        if not report.get(section):
            continue
        rows = summarise(report, section)
        print(f"\n{title}: mean target probability (min target / vanish rate)")
        ks = sorted({r["k"] for r in rows})
        methods = list(dict.fromkeys(r["method"] for r in rows))
        print(f"{'method':24s}" + "".join(f"{'k=' + str(k):>22s}" for k in ks))
        for m in methods:
            cells = []
            for k in ks:
                r = next((r for r in rows if r["method"] == m and r["k"] == k), None)
                cells.append(
                    f"{r['mean_target_prob']:.3f} ({r['min_target_prob']:.2f}/{r['vanish_rate']:.2f})"
                    if r
                    else ""
                )
            print(f"{method_label(m):24s}" + "".join(f"{c:>22s}" for c in cells))
        for s in verdict(report, section):
            print("  " + s)


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
        "--max-questions", type=int, default=None, help="cap the number of evaluation questions"
    )
    p.add_argument(
        "--kl-budget",
        type=float,
        default=None,
        help="coherence budget in nats per token (default 0.25)",
    )
    p.add_argument(
        "--calibration-metric",
        default="generation_kl",
        choices=["generation_kl", "first_token_kl"],
        help="coherence cost that alpha is calibrated against (default: %(default)s)",
    )
    p.add_argument(
        "--methods", default=None, help="comma-separated methods (default: the reference four)"
    )
    p.add_argument("--fast", action="store_true", help="small smoke run (CI), about a minute")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    kw: dict[str, Any] = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "layer": args.layer,
        "eval_layer": args.eval_layer,
        "questions": args.questions,
        "seed": args.seed,
        "calibration_metric": args.calibration_metric,
        "kl_budget": args.kl_budget,
    }
    if args.methods:
        kw["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    cfg = PipelineConfig.fast(**kw) if args.fast else PipelineConfig(**kw)
    if args.max_questions is not None:
        if args.max_questions < 1:
            raise SystemExit("--max-questions must be positive")
        cfg = replace(
            cfg,
            n_eval=min(cfg.n_eval, args.max_questions),
            n_gen=min(cfg.n_gen, args.max_questions),
        )
    report = run_demo(cfg, args.out)
    print_summary(report)
    print(f"\nfull report: {Path(args.out) / 'report.md'}")
    return 0


__all__ = ["DemoConfig", "add_demo_parser", "comparison_config", "print_summary", "run_demo"]
