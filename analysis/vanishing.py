"""Vanishing tones: which targets get lost in 2- and 3-target steering, why, and which remedy helps.

Over all 2- and 3-target combinations, each method at its own alpha calibrated to the same
coherence budget (equal KL): per-question vanish rate (a target below the floor while the best
target reaches the bar, :class:`~ks_lens.evaluation.VanishRule`), mean and minimum target
probability, with bootstrap intervals, for K-Steering (1 step) and the remedies built into
``KSteering`` (multi-step with decay, log-sigmoid and soft-min objectives, per-label gradient
balancing, PCGrad conflict projection) and CAA (mean), at the activation level (held-out
evaluator). Each method is compared with K-Steering 1 step: paired difference of the
per-question vanish rate with a bootstrap interval, and a sign-flip permutation test over
questions on the vanished cells; the study names the remedy that cuts 3-target vanishing most
and whether its interval excludes 0.
Every (method, combination) where a target vanished on most questions is diagnosed with that
method's own steerer, alpha and settings (K-Steering: its probe's gradients; CAA: its vectors'
geometry) and given a cause. Writes vanishing.json, PNG figures and a circuitsvis token view
(HTML, works offline).

    python analysis/vanishing.py [--fast] [--out DIR] [--work DIR]
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from common import StudyOptions, parse, save_figure, start, write_json

from ks_lens.activations import collect_activations
from ks_lens.analysis.diagnosis import (
    Diagnosis,
    RemedyRow,
    best_remedy,
    diagnose_cases,
    remedy_table,
    vanished_cases,
)
from ks_lens.analysis.viz import save_token_view, token_view_html
from ks_lens.comparison import (
    ComparisonConfig,
    ComparisonResult,
    build_methods,
    method_label,
)
from ks_lens.generation import generate
from ks_lens.steering import SteeringSpec

REFERENCE = "ksteer"  # K-Steering, 1 step: every remedy is paired with it
METHODS = (
    "ksteer",
    "ksteer_multistep",
    "ksteer_logsigmoid",
    "ksteer_softmin",
    "ksteer_balanced",
    "ksteer_pcgrad",
    "caa_mean",
)


def main() -> None:
    opts = parse(StudyOptions, __doc__.splitlines()[0], "runs/analysis/vanishing")
    out, setup, started = start(opts)
    cfg = setup.config
    config = ComparisonConfig(
        methods=METHODS,
        baseline=REFERENCE,
        sizes=(2, 3),
        act_combos_per_size=3 if opts.fast else None,
        max_new_tokens=8 if opts.fast else 32,
        calib_tokens=cfg.comparison.calib_tokens,
        calib_bisect_steps=cfg.comparison.calib_bisect_steps,
        n_resamples=cfg.comparison.n_resamples,
    )
    res = setup.compare(config, text=False)
    assert res.activation is not None
    tables = {
        k: remedy_table(
            res.activation,
            config.vanish,
            k=k,
            reference=REFERENCE,
            calibrated_kl={m: c[k].metric for m, c in res.calibration.items()},
            seed=config.seed,
            n_resamples=config.n_resamples,
        )
        for k in config.sizes
    }
    verdicts = {k: best_remedy(rows, reference=REFERENCE) for k, rows in tables.items()}
    # diagnostics at the steering layer, on the same neutral questions, each case with its own
    # method's steerer and calibrated alpha
    x = collect_activations(
        setup.model,
        setup.part("test", cfg.n_eval),
        mode="neutral",
        layers=[setup.layer],
        progress=False,
    ).at(setup.layer)
    cases = vanished_cases(res.activation, config.vanish)
    steerers = build_methods(config, setup.kit)
    diagnoses = diagnose_cases(
        cases, steerers, res.alphas, x, readout=setup.probe, combo_alphas=res.combo_alphas
    )
    causes: dict[str, Counter[str]] = {}
    for d in diagnoses:
        for t in d.per_target.values():
            if t.vanished:
                causes.setdefault(d.method, Counter())[t.cause or "other"] += 1
    vanished_labels: dict[str, Counter[str]] = {}
    for case in cases:
        for lab in case.vanished:
            vanished_labels.setdefault(case.method, Counter())[lab] += 1
    figs = plot(out, res, tables, diagnoses, vanished_labels, list(setup.dataset.labels))
    html = token_views(out, setup, res, verdicts[max(verdicts)].best)
    for k, rows in tables.items():
        print(f"{k} targets (equal KL: each method's alpha calibrated to {config.kl_budget} nats)")
        for r in rows:
            diff = "" if r.vanish_diff is None else f"  vs {REFERENCE}: {r.vanish_diff.fmt(2)}"
            t = r.vanish_cluster_test
            test = "" if t is None else f" (sign-flip p {t.p_value:.3g}, {t.n_questions} q)"
            print(
                f"  {method_label(r.method):22s} vanished {r.vanish_rate.fmt(2)}{diff}{test}  "
                f"mean p {r.target_prob.fmt()}  min p {r.min_target_prob.fmt()}"
            )
        print(f"  -> {verdicts[k].statement}")
    path = write_json(
        out,
        "vanishing.json",
        {
            "model": setup.model.cfg.model_name,
            "layer": setup.layer,
            "reference": REFERENCE,
            "equal_kl": {
                "calibration_metric": config.calibration_metric,
                "kl_budget": config.kl_budget,
                "note": "every method's alpha is calibrated per number of targets to the same KL "
                "budget on the calibration questions; calibrated_kl is the KL each reached",
            },
            "remedies": {str(k): [r.to_json() for r in rows] for k, rows in tables.items()},
            "verdict": {str(k): v.to_json() for k, v in verdicts.items()},
            "summary": [r.to_json() for r in res.summary("activation")],
            "alpha": {m: {str(k): a for k, a in v.items()} for m, v in res.alphas.items()},
            "calibration": res.to_json()["calibration"],
            "vanish_rule": config.vanish.to_json(),
            "causes": {m: dict(c) for m, c in causes.items()},
            "vanished_labels": {m: dict(c) for m, c in vanished_labels.items()},
            "cases": [c.to_json() for c in cases],
            "diagnoses": [d.to_json() for d in diagnoses],
            "activation_eval": res.activation.to_json(),
            "figures": [f.name for f in figs],
            "token_view": html.name,
            "probe_per_label_accuracy": setup.probe.metrics.get("val_per_label_accuracy"),
        },
        started,
    )
    print(f"wrote {path}, {len(figs)} figures and {html}")


def plot(
    out: Path,
    res: ComparisonResult,
    tables: dict[int, list[RemedyRow]],
    diagnoses: list[Diagnosis],
    vanished: dict[str, Counter[str]],
    labels: list[str],
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.6))
    methods = list(res.config.methods)
    unsteered = [r for r in res.summary("activation") if r.method == "unsteered"]
    for ax, key, title in (
        (axes[0], "vanish_rate", "vanish rate (per question)"),
        (axes[1], "vanish_diff", f"vanish rate - {method_label(REFERENCE)} (paired)"),
        (axes[2], "target_prob", "mean target prob."),
        (axes[3], "min_target_prob", "min target prob."),
    ):
        for j, (k, rows) in enumerate(sorted(tables.items())):
            by = {r.method: getattr(r, key) for r in rows}
            ivs = [by.get(m) for m in methods]
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
        if key == "vanish_diff":
            ax.axhline(0.0, color="k", lw=1)
        base = [getattr(r, key).estimate for r in unsteered if key in ("target_prob",)]
        if key == "min_target_prob":
            base = [r.min_target_prob.estimate for r in unsteered]
        if base:
            ax.axhline(sum(base) / len(base), color="k", ls=":", lw=1, label="unsteered")
        ax.set_xticks([i + 0.2 for i in range(len(methods))])
        ax.set_xticklabels([method_label(m) for m in methods], rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{title} (held-out evaluator)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Remedies for vanishing targets at equal KL (95 % bootstrap intervals)")
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

    multi = [d for d in diagnoses if d.settings.get("steps", 1) > 1]
    cases = (multi or [d for d in diagnoses if d.geometry == "probe gradients"] or diagnoses)[:6]
    if cases:
        fig, axes = plt.subplots(1, len(cases), figsize=(3.3 * len(cases), 3.2), squeeze=False)
        for ax, d in zip(axes[0], cases, strict=True):
            for lab, t in d.per_target.items():
                ax.plot(
                    t.prob_trajectory,
                    "o-" if t.vanished else "s--",
                    ms=3,
                    label=f"{lab}{' (vanished: ' + str(t.cause) + ')' if t.vanished else ''}",
                )
            ax.set(
                title=f"{method_label(d.method)}\n{'+'.join(d.targets)}",
                xlabel="step",
                ylabel="steering-probe p",
                ylim=(0, 1.02),
            )
            ax.title.set_fontsize(8)
            ax.legend(fontsize=6)
        fig.suptitle("Per-step target probabilities at the steering probe, vanished cases")
        fig.tight_layout()
        paths.append(save_figure(fig, out / "trajectories.png"))
    return paths


def token_views(out: Path, setup: Any, res: ComparisonResult, best: str | None) -> Path:
    """One question answered unsteered, by CAA, K-Steering and the best remedy (each at its own
    calibrated alpha), coloured by the response evaluator."""
    from ks_lens.comparison import METHODS as REGISTRY

    combo = next((c for c in res.plan.act_combos if len(c) == 3), res.plan.act_combos[0])
    question = setup.questions("test", 1)[0]
    answers = {"unsteered": generate(setup.model, [question], max_new_tokens=40).texts[0]}
    for m in dict.fromkeys(("caa_mean", "ksteer", best or "ksteer_multistep")):
        method = REGISTRY[m].build(setup.kit)
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
