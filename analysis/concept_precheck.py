"""Pre-check of a behaviour family: can calibrated CAA move each label at all?

For every single label: CAA (mean) toward that label alone, its alpha calibrated (as in the demo:
the largest alpha whose generated answers stay within ``--kl-budget`` nats/token of the unsteered
answers, at most ``--max-degenerate-rate`` newly degenerate) on the first ``--n-calib``
calibration-split questions; then ``--max-new-tokens`` answers, unsteered and steered, to
``--n-check`` *other* calibration-split questions, scored by the family's text evaluator (trained
on the gold texts the steering vectors did not learn from). Per label: alpha, measured KL,
mean target probability unsteered vs steered (and the paired difference with a bootstrap 95 %
interval over questions), and the share of answers whose top label is the target. Nothing is
read from the test split. Writes precheck.json.

    python analysis/concept_precheck.py --dataset concepts --fast [--n-check 12]
        [--texts FILE] [--out DIR] [--work DIR] [any PipelineConfig option, see --help]
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import StudyOptions, parse, write_json

from ks_lens.calibration import calibrate_alphas
from ks_lens.comparison import ComparisonConfig
from ks_lens.evaluation import generate_and_score_rows
from ks_lens.evaluation.stats import paired_difference
from ks_lens.logs import configure_logging
from ks_lens.pipeline import PipelineConfig, Setup, prepare
from ks_lens.steering import CAA
from ks_lens.steering.base import SteeringSpec
from ks_lens.text_evaluator import TextEvaluator


@dataclass(frozen=True)
class PrecheckOptions(StudyOptions):
    n_check: int = 12  # calibration-split questions (after the first n_calib) that are scored
    # a saved text evaluator to score with (None: the setup's, trained on the gold texts that the
    # steering vectors did not learn from)
    evaluator: str | None = None


def calibrate_each(setup: Setup, caa: CAA, questions: list[str]) -> dict[str, tuple[float, float]]:
    """Per label: (alpha, measured KL) of CAA toward that label alone, within the KL budget."""
    cfg: ComparisonConfig = setup.config.comparison
    labels = list(setup.dataset.base_labels)
    base = answer_all(setup, questions, [None], cfg.calib_tokens)
    base_bad = [cfg.degenerate.is_degenerate(t) for t in base.texts]
    n = len(questions)

    def metrics(which: list[int], alphas: list[float]) -> list[float]:
        steerings = [
            (caa, SteeringSpec((labels[w],), (), a)) for w, a in zip(which, alphas, strict=True)
        ]
        scores = answer_all(setup, questions, steerings, cfg.calib_tokens)
        out = []
        for g in range(len(steerings)):
            sub = scores.select(range(g * n, (g + 1) * n))
            new_bad = np.mean(
                [
                    cfg.degenerate.is_degenerate(t) and not base_bad[i]
                    for i, t in enumerate(sub.texts)
                ]
            )
            kl = sub.mean_kl if not math.isnan(sub.mean_kl) else 0.0
            out.append(kl if new_bad <= cfg.max_degenerate_rate else math.inf)
        return out

    cals = calibrate_alphas(
        metrics, cfg.kl_budget, [1.0] * len(labels), bisect_steps=cfg.calib_bisect_steps
    )
    return {lab: (c.alpha, c.metric) for lab, c in zip(labels, cals, strict=True)}


def answer_all(
    setup: Setup, questions: list[str], steerings: list[Any], max_new_tokens: int
) -> Any:
    """Every question answered under every steering (``None`` = unsteered), steering-major."""
    rows = [(g, i) for g in range(len(steerings)) for i in range(len(questions))]
    return generate_and_score_rows(
        setup.model,
        questions,
        steerings,
        rows,
        response_probe=None,
        max_new_tokens=max_new_tokens,
        batch_size=setup.config.comparison.gen_batch_size,
    )


def check_each(
    setup: Setup,
    caa: CAA,
    alphas: dict[str, tuple[float, float]],
    questions: list[str],
    ev: TextEvaluator,
) -> dict[str, dict[str, Any]]:
    """Per label: unsteered and steered answers to ``questions``, scored by the text evaluator."""
    cfg = setup.config.comparison
    labels = list(alphas)
    steerings = [None] + [(caa, SteeringSpec((lab,), (), alphas[lab][0])) for lab in labels]
    n = len(questions)
    scores = answer_all(setup, questions, steerings, cfg.max_new_tokens)
    probs = ev.predict_proba(list(scores.texts))  # [rows, K]
    col = {lab: ev.label_names.index(lab) for lab in labels}
    unsteered = probs[:n]
    out: dict[str, dict[str, Any]] = {}
    for g, lab in enumerate(labels, start=1):
        steered = probs[g * n : (g + 1) * n]
        sub = scores.select(range(g * n, (g + 1) * n))
        diff = paired_difference(
            steered[:, col[lab]], unsteered[:, col[lab]], seed=cfg.seed, n_resamples=cfg.n_resamples
        )
        out[lab] = {
            "alpha": alphas[lab][0],
            "calibration_kl": alphas[lab][1],
            "check_kl": sub.mean_kl,
            "p_unsteered": float(unsteered[:, col[lab]].mean()),
            "p_steered": float(steered[:, col[lab]].mean()),
            "diff": diff.estimate,
            "diff_ci95": [diff.low, diff.high],
            "top1_unsteered": float((unsteered.argmax(axis=1) == col[lab]).mean()),
            "top1_steered": float((steered.argmax(axis=1) == col[lab]).mean()),
            "examples": list(sub.texts[:2]),
        }
    return out


def main() -> None:
    opts = parse(
        PrecheckOptions,
        __doc__ or "",
        "runs/precheck",
        full=PipelineConfig(dataset="concepts", n_calib=6),
    )
    configure_logging(opts.verbosity, names=("ks_lens", "analysis"))
    started = time.time()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    work = opts.work or f"runs/precheck-{opts.config.dataset}"
    setup = prepare(opts.config, work)
    calib = setup.part("calibration", None).questions
    n_fit = opts.config.n_calib
    if len(calib) < n_fit + opts.n_check:
        raise SystemExit(f"the calibration split has only {len(calib)} questions")
    fit_q = [q.text for q in calib[:n_fit]]
    check_q = [q.text for q in calib[n_fit : n_fit + opts.n_check]]
    caa = CAA(setup.vectors, combine="mean")
    alphas = calibrate_each(setup, caa, fit_q)
    ev = TextEvaluator.load(opts.evaluator) if opts.evaluator else setup.text_evaluator
    if ev.label_names != setup.dataset.base_labels:
        raise SystemExit(f"the evaluator's labels {ev.label_names} are not the dataset's")
    result = check_each(setup, caa, alphas, check_q, ev)
    print(
        f"{setup.dataset.name}: layer {setup.layer}, KL budget {opts.config.comparison.kl_budget}"
        f", {n_fit} questions calibrate, {len(check_q)} scored, "
        f"{opts.config.comparison.max_new_tokens} tokens; text evaluator on "
        f"{ev.training_hash[:12]} ({'--evaluator' if opts.evaluator else 'setup'})"
    )
    print(
        f"{'label':10s} {'alpha':>7s} {'KL':>6s} {'p unst':>7s} {'p steer':>7s} "
        f"{'diff [95% CI]':>22s} {'top1 unst':>9s} {'top1 st':>8s}"
    )
    for lab, r in result.items():
        lo, hi = r["diff_ci95"]
        print(
            f"{lab:10s} {r['alpha']:7.3g} {r['check_kl']:6.3f} {r['p_unsteered']:7.3f} "
            f"{r['p_steered']:7.3f} {r['diff']:+7.3f} [{lo:+.3f}, {hi:+.3f}] "
            f"{r['top1_unsteered']:9.2f} {r['top1_steered']:8.2f}"
        )
    path = write_json(
        out,
        "precheck.json",
        {
            "dataset": setup.dataset.name,
            "layer": setup.layer,
            "n_gold_texts": len(setup.gold_texts),
            "evaluator": opts.evaluator or "setup (gold texts the vectors did not learn from)",
            "config": dataclasses.asdict(opts.config),
            "labels": result,
        },
        started,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
