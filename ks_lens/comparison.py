"""The reference comparison: unsteered vs CAA vs K-Steering over 1-, 2- and 3-label combinations.

:func:`run_comparison` calibrates each method's alpha to a coherence budget on calibration
prompts (separately for each number of targets), then evaluates every target combination on
held-out neutral prompts, at the activation level (held-out evaluator probe read in the same
forward pass) and on generated text (response-level evaluator on the re-encoded answer, with
perplexity, distinct-2 and per-token KL). It returns plain records, ready for JSON.

Methods are looked up by name in :data:`METHODS`; the reference set is ``caa_mean``,
``caa_sum``, ``ksteer`` and ``ksteer_multistep``. The vanishing-tone remedies
(``ksteer_balanced``, ``ksteer_pcgrad``, ``ksteer_logsigmoid``, ``ksteer_softmin``) are there too.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ks_lens.evaluation import (
    CALIBRATION_METRICS,
    Calibration,
    GenerationScores,
    VanishRule,
    calibrate_alphas,
    first_token_kl,
    generate_and_score_groups,
    generation_kl,
    readout,
    readout_groups,
)
from ks_lens.probes import Probe
from ks_lens.steering import CAA, KSteering, Steerer, SteeringSpec, SteeringVectors


@dataclass(frozen=True)
class MethodDef:
    description: str
    build: Callable[[Probe, SteeringVectors], Steerer]
    alpha0: float  # starting point of the calibration search


METHODS: dict[str, MethodDef] = {
    "caa_mean": MethodDef(
        "CAA, mean of per-label vectors (reference baseline)",
        lambda p, v: CAA(v, combine="mean"),
        1.0,
    ),
    "caa_sum": MethodDef(
        "CAA, sum of per-label vectors, unit norm",
        lambda p, v: CAA(v, combine="sum", normalize=True),
        20.0,
    ),
    "ksteer": MethodDef("K-Steering, 1 gradient step", lambda p, v: KSteering(p, steps=1), 30.0),
    "ksteer_multistep": MethodDef(
        "K-Steering, 3 steps with decay 0.95", lambda p, v: KSteering(p, steps=3, decay=0.95), 10.0
    ),
    "ksteer_balanced": MethodDef(
        "K-Steering, per-label gradients balanced to equal norm",
        lambda p, v: KSteering(p, combine="balanced"),
        30.0,
    ),
    "ksteer_pcgrad": MethodDef(
        "K-Steering, conflicting label gradients projected out (PCGrad)",
        lambda p, v: KSteering(p, combine="pcgrad"),
        30.0,
    ),
    "ksteer_logsigmoid": MethodDef(
        "K-Steering, log-sigmoid objective (saturated targets stop pulling)",
        lambda p, v: KSteering(p, objective="logsigmoid", steps=3, decay=0.95),
        30.0,
    ),
    "ksteer_softmin": MethodDef(
        "K-Steering, soft-min objective (weakest target pulls hardest)",
        lambda p, v: KSteering(p, objective="softmin", steps=3, decay=0.95),
        30.0,
    ),
}
REFERENCE_METHODS: tuple[str, ...] = ("caa_mean", "caa_sum", "ksteer", "ksteer_multistep")


def label_combinations(
    labels: Sequence[str], sizes: Sequence[int] = (1, 2, 3)
) -> list[tuple[str, ...]]:
    """All combinations of ``labels`` of each size, in a fixed order."""
    out: list[tuple[str, ...]] = []
    for k in sizes:
        if k < 1 or k > len(labels):
            raise ValueError(f"combination size {k} is impossible with {len(labels)} labels")
        out.extend(itertools.combinations(labels, k))
    return out


def spread(items: Sequence[Any], n: int | None) -> list[Any]:
    """``n`` items evenly spread over ``items`` (all if ``n`` is None or large)."""
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        return []
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


@dataclass
class ComparisonConfig:
    methods: tuple[str, ...] = REFERENCE_METHODS
    sizes: tuple[int, ...] = (1, 2, 3)
    avoid: tuple[str, ...] = ()  # labels to avoid in every combination (never also targets)
    calibration_metric: str = "generation_kl"  # or "first_token_kl"
    kl_budget: float = 0.25  # nats per token
    calib_tokens: int = 12  # continuation length for the generation_kl metric
    positions: str = "all"
    calib_combos_per_size: int = 1
    calib_bisect_steps: int = 4  # final bracket within a factor 4 ** (1/16) = 1.09
    act_combos_per_size: int | None = None  # None = every combination
    gen_combos_per_size: int | None = 6
    max_new_tokens: int = 32
    batch_size: int = 16
    gen_batch_size: int = 48  # generation rows per batch (several methods share a batch)
    vanish: VanishRule = field(default_factory=VanishRule)
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["vanish"] = self.vanish.to_json()
        return d


def _entry(
    targets: Sequence[str],
    avoid: Sequence[str],
    method: str,
    alpha: float,
    probs: torch.Tensor,
    base: torch.Tensor,
    labels: Sequence[str],
    rule: VanishRule,
) -> dict[str, Any]:
    mean_p = probs.mean(0)
    base_p = base.mean(0)
    per = {lab: float(mean_p[i]) for i, lab in enumerate(labels)}
    delta = {lab: float(mean_p[i] - base_p[i]) for i, lab in enumerate(labels)}
    t_idx = [labels.index(t) for t in targets]
    e: dict[str, Any] = {
        "targets": list(targets),
        "avoid": list(avoid),
        "method": method,
        "alpha": alpha,
        "mean_target_prob": float(probs[:, t_idx].mean()),
        "min_target_prob": min(per[t] for t in targets),
        "mean_target_delta": sum(delta[t] for t in targets) / len(targets),
        "per_label_prob": per,
        "per_label_delta": delta,
    }
    if avoid:
        e["mean_avoid_prob"] = sum(per[a] for a in avoid) / len(avoid)
    gone = rule.vanished(delta, targets) if method != "unsteered" else []
    e["vanished"] = bool(gone)
    e["vanished_labels"] = gone
    return e


def run_comparison(
    model: Any,
    *,
    probe: Probe,
    vectors: SteeringVectors,
    evaluator: Probe,
    response_evaluator: Probe | None,
    calib_questions: Sequence[str],
    eval_questions: Sequence[str],
    gen_questions: Sequence[str],
    config: ComparisonConfig | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Calibrate, evaluate and return ``{"calibration", "activation_eval", "generation_eval", ...}``."""
    config = config or ComparisonConfig()
    labels = list(probe.label_names)
    if list(vectors.label_names) != labels or list(evaluator.label_names) != labels:
        raise ValueError(
            "probe, vectors and evaluator must share the same labels in the same order"
        )
    if evaluator.layer < probe.layer:
        raise ValueError(
            f"the evaluator (layer {evaluator.layer}) must read at or after the steering layer ({probe.layer})"
        )
    for m in config.methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; known: {sorted(METHODS)}")
    for a in config.avoid:
        if a not in labels:
            raise ValueError(f"unknown avoid label {a!r}")
    pool = [lab for lab in labels if lab not in config.avoid]
    all_combos = label_combinations(pool, config.sizes)
    combos = [
        c
        for k in config.sizes
        for c in spread([c for c in all_combos if len(c) == k], config.act_combos_per_size)
    ]
    methods = {m: METHODS[m].build(probe, vectors) for m in config.methods}
    timings: dict[str, float] = {}

    # 1. calibration: all methods in lockstep, one search per method and number of targets ------
    if config.calibration_metric not in CALIBRATION_METRICS:
        raise ValueError(
            f"unknown calibration metric {config.calibration_metric!r}; use one of {CALIBRATION_METRICS}"
        )
    t0 = time.perf_counter()
    names = list(methods)
    calib: dict[str, dict[int, Calibration]] = {name: {} for name in names}
    base_calib = (
        readout(model, calib_questions, next_token=True, batch_size=config.batch_size)
        if config.calibration_metric == "first_token_kl"
        else None
    )
    for k in config.sizes:
        specs = [
            SteeringSpec(c, config.avoid, 1.0)
            for c in spread([c for c in all_combos if len(c) == k], config.calib_combos_per_size)
        ]

        def metrics(
            which: list[int], alphas: list[float], specs: list[SteeringSpec] = specs
        ) -> list[float]:
            groups = [
                (methods[names[i]], SteeringSpec(sp.target, sp.avoid, a))
                for i, a in zip(which, alphas, strict=True)
                for sp in specs
            ]
            if config.calibration_metric == "generation_kl":
                vals = generation_kl(
                    model,
                    calib_questions,
                    groups,
                    positions=config.positions,
                    max_new_tokens=config.calib_tokens,
                    batch_size=config.gen_batch_size,
                )
            else:
                vals = first_token_kl(
                    model,
                    calib_questions,
                    groups,
                    positions=config.positions,
                    batch_size=config.batch_size,
                    base=base_calib,
                )
            n = len(specs)
            return [sum(vals[j * n : (j + 1) * n]) / n for j in range(len(which))]

        # start each search from the alpha found for one target fewer: it is usually close
        starts = [
            calib[name][k - 1].alpha
            if calib[name].get(k - 1) and calib[name][k - 1].alpha > 0
            else METHODS[name].alpha0
            for name in names
        ]
        results = calibrate_alphas(
            metrics, config.kl_budget, starts, bisect_steps=config.calib_bisect_steps
        )
        for name, cal in zip(names, results, strict=True):
            calib[name][k] = cal
            log(
                f"  calibrated {name:18s} k={k}: alpha={cal.alpha:.4g} ({config.calibration_metric} "
                f"{cal.metric:.3f} <= {config.kl_budget}; {len(cal.evaluations)} evals){' ' + cal.note if cal.note else ''}"
            )
    timings["calibration_s"] = time.perf_counter() - t0

    # 2. activation-level evaluation: every method of a combination in one batched pass ----------
    t0 = time.perf_counter()
    base = readout(model, eval_questions, probe=evaluator, batch_size=config.batch_size).probs
    act_entries: list[dict[str, Any]] = []
    bar = tqdm(total=len(combos), desc="activation eval", disable=not progress, leave=False)
    for c in combos:
        act_entries.append(
            _entry(c, config.avoid, "unsteered", 0.0, base, base, labels, config.vanish)
        )
        alphas = [calib[name][len(c)].alpha for name in names]
        groups = [
            (methods[name], SteeringSpec(c, config.avoid, a))
            for name, a in zip(names, alphas, strict=True)
        ]
        outs = readout_groups(
            model,
            eval_questions,
            groups,
            probe=evaluator,
            positions=config.positions,
            batch_size=config.batch_size,
        )
        for name, alpha, r in zip(names, alphas, outs, strict=True):
            act_entries.append(
                _entry(c, config.avoid, name, alpha, r.probs, base, labels, config.vanish)
            )
        bar.update(1)
    bar.close()
    timings["activation_eval_s"] = time.perf_counter() - t0

    # 3. generation-level evaluation ---------------------------------------------------------
    gen_entries: list[dict[str, Any]] = []
    if response_evaluator is not None and gen_questions:
        t0 = time.perf_counter()
        gen_combos = [
            c
            for k in config.sizes
            for c in spread([c for c in combos if len(c) == k], config.gen_combos_per_size)
        ]
        kw: dict[str, Any] = dict(
            response_probe=response_evaluator,
            positions=config.positions,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.gen_batch_size,
            seed=config.seed,
        )
        (base_gen,) = generate_and_score_groups(model, gen_questions, [None], **kw)
        bar = tqdm(total=len(gen_combos), desc="generation eval", disable=not progress, leave=False)
        for c in gen_combos:
            gen_entries.append(
                _gen_entry(c, config, "unsteered", 0.0, base_gen, base_gen, labels, gen_questions)
            )
            alphas = [calib[name][len(c)].alpha for name in names]
            groups = [
                (methods[name], SteeringSpec(c, config.avoid, a))
                for name, a in zip(names, alphas, strict=True)
            ]
            all_scores = generate_and_score_groups(model, gen_questions, groups, **kw)
            for name, alpha, scores in zip(names, alphas, all_scores, strict=True):
                gen_entries.append(
                    _gen_entry(c, config, name, alpha, scores, base_gen, labels, gen_questions)
                )
            bar.update(1)
        bar.close()
        timings["generation_eval_s"] = time.perf_counter() - t0

    return {
        "labels": labels,
        "methods": {m: METHODS[m].description for m in config.methods},
        "alpha": {m: {str(k): calib[m][k].alpha for k in config.sizes} for m in config.methods},
        "calibration": {
            m: {str(k): calib[m][k].to_json() for k in config.sizes} for m in config.methods
        },
        "comparison_config": config.to_json(),
        "n_eval_questions": len(eval_questions),
        "n_gen_questions": len(gen_questions) if gen_entries else 0,
        "n_calib_questions": len(calib_questions),
        "activation_eval": act_entries,
        "generation_eval": gen_entries,
        "timings": timings,
    }


def _gen_entry(
    c: Sequence[str],
    config: ComparisonConfig,
    method: str,
    alpha: float,
    scores: GenerationScores,
    base: GenerationScores,
    labels: Sequence[str],
    questions: Sequence[str],
) -> dict[str, Any]:
    e = _entry(c, config.avoid, method, alpha, scores.probs, base.probs, labels, config.vanish)
    e.update(
        {
            "perplexity": scores.perplexity,
            "distinct2": scores.mean_distinct2,
            "kl": scores.mean_kl,
            "n_empty": scores.n_empty,
            "examples": [
                {"question": q, "answer": t}
                for q, t in list(zip(questions, scores.texts, strict=True))[:3]
            ],
        }
    )
    return e


def summarise(result: dict[str, Any], section: str = "activation_eval") -> list[dict[str, Any]]:
    """Mean over combinations, per method and number of targets: the headline table."""
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for e in result[section]:
        rows.setdefault((e["method"], len(e["targets"])), []).append(e)
    out = []
    order = ["unsteered", *result["methods"]]
    for (method, k), es in sorted(rows.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        row: dict[str, Any] = {
            "method": method,
            "k": k,
            "n_combos": len(es),
            "mean_target_prob": sum(e["mean_target_prob"] for e in es) / len(es),
            "min_target_prob": sum(e["min_target_prob"] for e in es) / len(es),
            "mean_target_delta": sum(e["mean_target_delta"] for e in es) / len(es),
            "vanish_rate": sum(e["vanished"] for e in es) / len(es),
        }
        for key in ("perplexity", "distinct2", "kl"):
            if key in es[0]:
                vals = [e[key] for e in es if isinstance(e[key], (int, float)) and e[key] == e[key]]
                row[key] = sum(vals) / len(vals) if vals else float("nan")
        out.append(row)
    return out
