"""Vanishing tones: which targets get lost in 2- and 3-target steering, why, and which remedy helps.

Over all 2- and 3-target combinations, at alphas calibrated to the same coherence budget:
per-question vanish rate (a target below the floor while the best target reaches the bar), mean
and minimum target probability, with bootstrap intervals, for CAA, K-Steering and the remedies built into
``KSteering`` (multi-step with decay, per-label gradient balancing, PCGrad conflict projection,
log-sigmoid and soft-min objectives), at the activation level (held-out evaluator) and on
generated text. Every combination where a target of CAA or K-Steering vanished on most questions is
diagnosed (gradient norms and cosines, probe margins and per-step trajectories, probe accuracy)
and given a cause. Writes
vanishing.json, PNG figures and a circuitsvis token view (HTML, works offline).

    python analysis/vanishing.py [--fast] [--out DIR] [--work DIR]
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from common import parser, save_figure, start, write_json

from ks_lens.activations import collect_activations
from ks_lens.analysis.vanishing import diagnose
from ks_lens.analysis.viz import save_token_view, token_view_html
from ks_lens.comparison import (
    ActivationEvaluation,
    ComparisonConfig,
    ComparisonResult,
    SteeringKit,
    method_label,
)
from ks_lens.generation import generate
from ks_lens.steering import SteeringSpec

METHODS = (
    "caa_mean",
    "caa_sum",
    "ksteer",
    "ksteer_multistep",
    "ksteer_balanced",
    "ksteer_pcgrad",
    "ksteer_logsigmoid",
    "ksteer_softmin",
)


def main() -> None:
    p = parser(__doc__.splitlines()[0], "runs/analysis/vanishing")
    args = p.parse_args()
    out, setup, started = start(args)
    cfg = setup.config
    config = ComparisonConfig(
        methods=METHODS,
        sizes=(2, 3),
        act_combos_per_size=3 if args.fast else None,
        max_new_tokens=8 if args.fast else 32,
        calib_tokens=cfg.comparison.calib_tokens,
        calib_bisect_steps=cfg.comparison.calib_bisect_steps,
        n_resamples=cfg.comparison.n_resamples,
    )
    res = setup.compare(config, text=False)
    assert res.activation is not None
    # diagnostics at the steering layer, on the same neutral questions
    x = collect_activations(
        setup.model,
        setup.part("test", cfg.n_eval),
        mode="neutral",
        layers=[setup.layer],
        progress=False,
    ).at(setup.layer)
    cases = vanished_cases(res.activation, config)
    diagnoses = []
    causes: dict[str, Counter[str]] = {}
    for case in cases:
        if case["method"] not in ("caa_mean", "ksteer", "ksteer_multistep"):
            continue
        alpha = res.alphas["ksteer"][len(case["targets"])]
        d = diagnose(
            setup.probe,
            x,
            case["targets"],
            alpha=alpha,
            steps=3,
            evaluator_delta=case["delta"],
            vanished=case["vanished"],
        )
        diagnoses.append({"method": case["method"], **d.to_json()})
        for lab in case["vanished"]:
            causes.setdefault(case["method"], Counter())[d.per_target[lab].cause or "other"] += 1
    vanished_labels: dict[str, Counter[str]] = {}
    for case in cases:
        for lab in case["vanished"]:
            vanished_labels.setdefault(case["method"], Counter())[lab] += 1
    summary = [r.to_json() for r in res.summary("activation")]
    figs = plot(out, res, diagnoses, vanished_labels, list(setup.dataset.labels))
    html = token_views(out, setup, res)
    for r in res.summary("activation"):
        v = "" if r.vanish_rate is None else f"  vanished {r.vanish_rate.fmt(2)}"
        print(
            f"{method_label(r.method):22s} k={r.k}: mean p {r.target_prob.fmt()}  min p "
            f"{r.min_target_prob.fmt()}{v}"
        )
    path = write_json(
        out,
        "vanishing.json",
        {
            "model": setup.model.cfg.model_name,
            "layer": setup.layer,
            "summary": summary,
            "alpha": {m: {str(k): a for k, a in v.items()} for m, v in res.alphas.items()},
            "calibration": res.to_json()["calibration"],
            "vanish_rule": config.vanish.to_json(),
            "causes": {m: dict(c) for m, c in causes.items()},
            "vanished_labels": {m: dict(c) for m, c in vanished_labels.items()},
            "diagnoses": diagnoses,
            "activation_eval": res.activation.to_json(),
            "figures": [f.name for f in figs],
            "token_view": html.name,
            "probe_per_label_accuracy": setup.probe.metrics.get("val_per_label_accuracy"),
        },
        started,
    )
    print(f"wrote {path}, {len(figs)} figures and {html}")


def vanished_cases(ev: ActivationEvaluation, config: ComparisonConfig) -> list[dict[str, Any]]:
    """(method, combination) pairs where some target vanished on at least half the questions
    (per-question rule of ``config.vanish``), with the per-label mean change vs unsteered."""
    labels = list(ev.labels)
    out = []
    for m, per_combo in ev.probs.items():
        for combo, p in zip(ev.combos, per_combo, strict=True):
            idx = [labels.index(t) for t in combo]
            flags = config.vanish.vanished(p[:, idx])
            gone = [t for j, t in enumerate(combo) if flags[:, j].mean() >= 0.5]
            if gone:
                delta = {
                    lab: float(np.mean(p[:, i] - ev.base[:, i])) for i, lab in enumerate(labels)
                }
                out.append({"method": m, "targets": combo, "vanished": gone, "delta": delta})
    return out


def plot(
    out: Path,
    res: ComparisonResult,
    diagnoses: list[dict[str, Any]],
    vanished: dict[str, Counter[str]],
    labels: list[str],
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    methods = list(res.config.methods)
    rows = res.summary("activation")
    for ax, key, title in (
        (axes[0], "vanish_rate", "vanish rate (question x combination)"),
        (axes[1], "target_prob", "mean target prob."),
        (axes[2], "min_target_prob", "min target prob."),
    ):
        for j, k in enumerate((2, 3)):
            ivs = [
                next((getattr(r, key) for r in rows if r.method == m and r.k == k), None)
                for m in methods
            ]
            vals = [float("nan") if iv is None else iv.estimate for iv in ivs]
            err = [
                [0.0 if iv is None else iv.estimate - iv.low for iv in ivs],
                [0.0 if iv is None else iv.high - iv.estimate for iv in ivs],
            ]
            ax.bar(
                [i + 0.4 * j for i in range(len(methods))],
                vals,
                0.4,
                yerr=err,
                capsize=2,
                label=f"{k} targets",
            )
        base = [
            getattr(r, key).estimate
            for r in rows
            if r.method == "unsteered" and key != "vanish_rate"
        ]
        if base:
            ax.axhline(sum(base) / len(base), color="k", ls=":", lw=1, label="unsteered")
        ax.set_xticks([i + 0.2 for i in range(len(methods))])
        ax.set_xticklabels([method_label(m) for m in methods], rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{title} (held-out evaluator)")
        ax.legend(fontsize=7)
    fig.suptitle("Remedies for vanishing targets at matched coherence")
    fig.tight_layout()
    paths.append(save_figure(fig, out / "remedies.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    mat = [[vanished.get(m, Counter()).get(lab, 0) for lab in labels] for m in methods]
    im = ax.imshow(mat, cmap="Reds")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30)
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels([method_label(m) for m in methods], fontsize=8)
    for i in range(len(methods)):
        for j in range(len(labels)):
            ax.text(j, i, str(mat[i][j]), ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="combinations where the label vanished")
    ax.set_title("Which targets vanish")
    fig.tight_layout()
    paths.append(save_figure(fig, out / "vanished_labels.png"))

    cases = [d for d in diagnoses if d["method"] == "ksteer"][:6] or diagnoses[:6]
    if cases:
        fig, axes = plt.subplots(1, len(cases), figsize=(3.3 * len(cases), 3.2), squeeze=False)
        for ax, d in zip(axes[0], cases, strict=True):
            for lab, t in d["per_target"].items():
                ax.plot(
                    t["prob_trajectory"],
                    "o-" if t["vanished"] else "s--",
                    ms=3,
                    label=f"{lab}{' (vanished: ' + str(t['cause']) + ')' if t['vanished'] else ''}",
                )
            ax.set(
                title="+".join(d["targets"]),
                xlabel="K-Steering step",
                ylabel="steering-probe p",
                ylim=(0, 1.02),
            )
            ax.legend(fontsize=6)
        fig.suptitle("Per-step target probabilities at the steering probe, vanished cases")
        fig.tight_layout()
        paths.append(save_figure(fig, out / "trajectories.png"))
    return paths


def token_views(out: Path, setup: Any, res: ComparisonResult) -> Path:
    from ks_lens.comparison import METHODS as REGISTRY

    combo = next((c for c in res.plan.act_combos if len(c) == 3), res.plan.act_combos[0])
    question = setup.questions("test", 1)[0]
    answers = {"unsteered": generate(setup.model, [question], max_new_tokens=40).texts[0]}
    for m in ("caa_mean", "ksteer", "ksteer_multistep"):
        method = REGISTRY[m].build(SteeringKit(setup.probe, setup.vectors))
        spec = SteeringSpec(combo, (), res.alphas[m][len(combo)])
        with method.steer(setup.model, spec.target, spec.avoid, spec.alpha):
            answers[f"{method_label(m)} (alpha {spec.alpha:.3g})"] = generate(
                setup.model, [question], max_new_tokens=40
            ).texts[0]
    page = token_view_html(
        setup.model,
        question,
        answers,
        setup.response_evaluator,
        title=f"targets {'+'.join(combo)}: response-evaluator probabilities per token",
    )
    return save_token_view(out / "token_view.html", page)


if __name__ == "__main__":
    main()
