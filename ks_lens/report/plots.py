"""The PNG figures of a comparison report.

:func:`plot_report` writes them all: the trade-off curves per text lens (:func:`plot_tradeoff`),
the text level per combination (:func:`plot_combinations`), the activation level per
combination, and the calibration curves. Figures use matplotlib's non-interactive Agg backend,
so they render on headless machines; matplotlib is imported on first use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ks_lens.comparison import ActivationEvaluation, CombinationRow, ComparisonResult, method_label
from ks_lens.evaluation.instructed import INSTRUCTED
from ks_lens.report.tables import combination_rows


def plot_combinations(rows: Sequence[CombinationRow], path: Path) -> Path:
    """Heatmaps, combinations x methods: mean target probability, weakest target's probability,
    vanished share of the cells (blank for single targets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(dict.fromkeys(r.method for r in rows))
    combos = list(dict.fromkeys(r.targets for r in rows))
    by = {(r.method, r.targets): r for r in rows}
    panels = (
        ("mean target p", lambda r: r.target_prob),
        ("weakest target p", lambda r: r.min_target_prob),
        ("vanished share", lambda r: float("nan") if r.vanish_rate is None else r.vanish_rate),
    )
    fig, axes = plt.subplots(
        1, 3, figsize=(3 + 3 * 0.9 * len(methods), 1.5 + 0.24 * len(combos)), squeeze=False
    )
    for ax, (title, get) in zip(axes[0], panels, strict=True):
        grid = np.array(
            [[get(by[(m, c)]) if (m, c) in by else float("nan") for m in methods] for c in combos],
            dtype=float,
        )
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, j in zip(*np.nonzero(np.isfinite(grid)), strict=True):
            v = grid[i, j]
            color = "white" if v < 0.5 else "black"
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color=color)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([method_label(m) for m in methods], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(combos)))
        ax.set_yticklabels(["+".join(c) for c in combos], fontsize=6)
        ax.set_title(title, fontsize=9)
    fig.suptitle("Text level per combination (calibrated alpha, text evaluator)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_tradeoff(
    result: ComparisonResult, path: Path, *, lens: str = "text", title: str | None = None
) -> Path:
    """One panel per number of targets: each method's mean target probability against measured
    KL along its alpha curve (95 % bootstrap CIs), the unsteered level and the KL level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3
    colors = dict(zip(["unsteered", *result.config.methods], palette, strict=False))
    sizes = list(result.config.sizes)
    pts = [p for p in result.curves if p.lens == lens]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.6), squeeze=False)
    for ax, k in zip(axes[0], sizes, strict=True):
        for m in result.config.methods:
            mp = [p for p in pts if p.method == m and p.k == k]
            if not mp:
                continue
            ax.errorbar(
                [p.kl.estimate for p in mp],
                [p.target_prob.estimate for p in mp],
                yerr=[
                    [p.target_prob.estimate - p.target_prob.low for p in mp],
                    [p.target_prob.high - p.target_prob.estimate for p in mp],
                ],
                marker="o",
                ms=3,
                capsize=2,
                color=colors[m],
                label=method_label(m),
            )
        un = [r for r in result.summary(lens) if r.method == "unsteered" and r.k == k]
        if un:
            ax.axhline(un[0].target_prob.estimate, color="grey", ls=":", lw=1, label="unsteered")
        for p in (p for p in pts if p.method == INSTRUCTED and p.k == k):  # one point, no alpha
            ax.errorbar(
                [p.kl.estimate],
                [p.target_prob.estimate],
                yerr=[
                    [p.target_prob.estimate - p.target_prob.low],
                    [p.target_prob.high - p.target_prob.estimate],
                ],
                marker="*",
                ms=9,
                capsize=2,
                color="k",
                ls="none",
                label=method_label(INSTRUCTED),
            )
        ax.axvline(result.config.kl_budget, color="k", ls="--", lw=0.8, label="KL level")
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("measured KL per token (nats)")
        ax.set_title(f"{k} target{'s' if k > 1 else ''}")
    axes[0, 0].set_ylabel("mean target probability")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title or f"Trade-off on generated test answers ({lens} lens; 95 % bootstrap CIs)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_report(result: ComparisonResult, out_dir: Path) -> list[Path]:
    """Write the PNG figures; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    methods = ["unsteered", *result.config.methods]
    if result.activation is not None and result.activation.instructed is not None:
        methods.insert(1, INSTRUCTED)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3
    colors = dict(zip(methods, palette, strict=False))
    paths: list[Path] = []
    sizes = list(result.config.sizes)

    for lens in ("text", "text_activation"):
        if any(p.lens == lens for p in result.curves):
            paths.append(plot_tradeoff(result, out_dir / f"{lens}_tradeoff.png", lens=lens))
    crows = combination_rows(result)
    if crows:
        paths.append(plot_combinations(crows, out_dir / "text_combinations.png"))

    act = result.activation
    if act is not None:
        paths.append(_plot_activation(act, sizes, methods, colors, out_dir))
    paths.append(_plot_calibration(result, colors, out_dir))
    return paths


def _plot_activation(
    act: ActivationEvaluation,
    sizes: Sequence[int],
    methods: Sequence[str],
    colors: Mapping[str, Any],
    out_dir: Path,
) -> Path:
    """``activation_combinations.png``: one panel per number of targets, one group of bars per
    combination (the held-out evaluator's mean target probability under each method)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(sizes),
        1,
        figsize=(
            max(8.0, 0.55 * len(act.combos) / len(sizes) * len(methods)),
            3.2 * len(sizes),
        ),
        squeeze=False,
    )
    for ax, k in zip(axes[:, 0], sizes, strict=True):
        _activation_panel(ax, act, k, methods, colors)
    axes[0, 0].legend(fontsize=7, ncol=len(methods))
    fig.suptitle("Activation level: held-out evaluator, per combination (calibrated alpha)")
    fig.tight_layout()
    p = out_dir / "activation_combinations.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def _activation_panel(
    ax: Any,
    act: ActivationEvaluation,
    k: int,
    methods: Sequence[str],
    colors: Mapping[str, Any],
) -> None:
    """One panel of :func:`_plot_activation`: the combinations of ``k`` targets."""
    labels = list(act.labels)
    idx = [j for j, c in enumerate(act.combos) if len(c) == k]
    width = 0.8 / len(methods)
    for jm, m in enumerate(methods):
        vals = []
        for j in idx:
            t = [labels.index(x) for x in act.combos[j]]
            pr = (
                act.base
                if m == "unsteered"
                else act.instructed[j]
                if m == INSTRUCTED and act.instructed is not None
                else act.probs[m][j]
            )
            vals.append(float(pr[:, t].mean()))
        ax.bar(
            [i + jm * width for i in range(len(idx))],
            vals,
            width,
            color=colors[m],
            label=method_label(m),
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(idx))])
    ax.set_xticklabels(["+".join(act.combos[j]) for j in idx], rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean target p")
    ax.set_title(f"{k} target{'s' if k > 1 else ''}")


def _plot_calibration(result: ComparisonResult, colors: Mapping[str, Any], out_dir: Path) -> Path:
    """``calibration.png``: every method's calibration evaluations (the calibration metric
    against alpha, per number of targets; per combination as points) and the KL budget."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, by_k in result.calibration.items():
        for k, cal in by_k.items():
            # per combination (alpha_per combination): every combination's evaluations, as points
            own = [c for t, c in result.combo_calibration.get(m, {}).items() if len(t) == k]
            evals = [e for c in own for e in c.evaluations] if own else cal.evaluations
            ev = sorted((a, v if math.isfinite(v) else float("nan")) for a, v in evals)
            ax.plot(
                [a for a, _ in ev],
                [v for _, v in ev],
                marker="o",
                ms=3,
                ls="none" if own else "-",
                color=colors.get(m),
                alpha=0.4 + 0.2 * int(k),
                label=f"{method_label(m)} k={k}",
            )
    ax.axhline(result.config.kl_budget, color="k", ls="--", lw=1, label="budget")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_xlabel("alpha")
    ax.set_ylabel(f"{result.config.calibration_metric} (nats)")
    ax.set_title("Calibration (calibration questions): coherence cost vs alpha")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    p = out_dir / "calibration.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
