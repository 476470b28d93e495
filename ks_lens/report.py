"""Reports of a comparison: ``report.json``, ``report.md`` and PNG figures.

Figures use matplotlib's non-interactive Agg backend, so they render on headless machines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ks_lens.comparison import summarise
from ks_lens.io import atomic_write_bytes, atomic_write_json

METHOD_LABELS = {
    "unsteered": "unsteered",
    "caa_mean": "CAA (mean)",
    "caa_sum": "CAA (sum)",
    "ksteer": "K-Steering",
    "ksteer_multistep": "K-Steering (3 steps)",
    "ksteer_balanced": "K-Steer balanced",
    "ksteer_pcgrad": "K-Steer PCGrad",
    "ksteer_logsigmoid": "K-Steer log-sigmoid",
    "ksteer_softmin": "K-Steer soft-min",
}


_METRIC_TEXT = {
    "generation_kl": "mean per-token KL(steered || unsteered) along a steered greedy continuation",
    "first_token_kl": "KL(steered || unsteered) of the next-token distribution at the end of the prompt",
}


def method_label(m: str) -> str:
    return METHOD_LABELS.get(m, m)


def _fmt(x: Any, nd: int = 3) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{nd}f}"
    return str(x)


def _combo(e: dict[str, Any]) -> str:
    s = "+".join(e["targets"])
    return s + (f" (avoid {'+'.join(e['avoid'])})" if e["avoid"] else "")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def per_combination_table(
    entries: Sequence[dict[str, Any]], methods: Sequence[str], key: str = "mean_target_prob"
) -> str:
    combos: dict[str, dict[str, dict[str, Any]]] = {}
    for e in entries:
        combos.setdefault(_combo(e), {})[e["method"]] = e
    cols = ["unsteered", *methods]
    lines = [
        "| targets | " + " | ".join(method_label(m) for m in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for combo, by in combos.items():
        cells = []
        for m in cols:
            if m not in by:
                cells.append("")
                continue
            v = _fmt(by[m][key])
            if by[m].get("vanished"):
                v += " (vanished: " + ",".join(by[m]["vanished_labels"]) + ")"
            cells.append(v)
        lines.append(f"| {combo} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(result: dict[str, Any], section: str) -> list[str]:
    """Sentences comparing the best K-Steering variant with the best CAA variant per k."""
    rows = summarise(result, section)
    out = []
    for k in sorted({r["k"] for r in rows}):
        ks_rows = [r for r in rows if r["k"] == k and r["method"].startswith("ksteer")]
        caa_rows = [r for r in rows if r["k"] == k and r["method"].startswith("caa")]
        if not ks_rows or not caa_rows:
            continue
        best_ks = max(ks_rows, key=lambda r: r["mean_target_prob"])
        best_caa = max(caa_rows, key=lambda r: r["mean_target_prob"])
        diff = best_ks["mean_target_prob"] - best_caa["mean_target_prob"]
        word = "beats" if diff > 0.01 else ("trails" if diff < -0.01 else "ties with")
        out.append(
            f"k={k}: best K-Steering ({method_label(best_ks['method'])}, {best_ks['mean_target_prob']:.3f}) {word} "
            f"best CAA ({method_label(best_caa['method'])}, {best_caa['mean_target_prob']:.3f}); "
            f"difference {diff:+.3f}; vanish rates {best_ks['vanish_rate']:.2f} vs {best_caa['vanish_rate']:.2f}."
        )
    return out


def render_markdown(report: dict[str, Any]) -> str:
    methods = list(report["methods"])
    cfg = report["comparison_config"]
    lines = [
        f"# ks-lens comparison: {report['model']}",
        "",
        f"Steering at `{report['steering_hook']}` (layer {report['layer']}); held-out activation evaluator at "
        f"`{report['evaluator']['hook_name']}`; labels: {', '.join(report['labels'])}.",
        f"Alpha calibrated per method and number of targets to a coherence budget of {cfg['kl_budget']} nats "
        f"({_METRIC_TEXT.get(cfg['calibration_metric'], cfg['calibration_metric'])}) "
        f"on {report['n_calib_questions']} calibration questions; evaluated on {report['n_eval_questions']} held-out "
        f"questions ({report.get('eval_source', 'test split')}).",
        "",
        "## Verdict",
        "",
        "Activation level (held-out evaluator probability of the targets):",
        "",
        *[f"- {s}" for s in verdict(report, "activation_eval")],
    ]
    if report.get("generation_eval"):
        lines += [
            "",
            "Generated text (response-level evaluator on answers re-encoded without instruction):",
            "",
            *[f"- {s}" for s in verdict(report, "generation_eval")],
        ]
    lines += [
        "",
        "## Summary (mean over combinations)",
        "",
        "### Activation level",
        "",
        markdown_table(
            [
                {**r, "method": method_label(r["method"])}
                for r in summarise(report, "activation_eval")
            ],
            [
                ("method", "method"),
                ("k", "targets"),
                ("n_combos", "combos"),
                ("mean_target_prob", "mean target p"),
                ("min_target_prob", "min target p"),
                ("mean_target_delta", "change vs unsteered"),
                ("vanish_rate", "vanish rate"),
            ],
        ),
    ]
    if report.get("generation_eval"):
        lines += [
            "",
            "### Generated text",
            "",
            markdown_table(
                [
                    {**r, "method": method_label(r["method"])}
                    for r in summarise(report, "generation_eval")
                ],
                [
                    ("method", "method"),
                    ("k", "targets"),
                    ("n_combos", "combos"),
                    ("mean_target_prob", "mean target p"),
                    ("min_target_prob", "min target p"),
                    ("vanish_rate", "vanish rate"),
                    ("perplexity", "perplexity"),
                    ("distinct2", "distinct-2"),
                    ("kl", "KL/token"),
                ],
            ),
        ]
    lines += [
        "",
        "## Alpha per method",
        "",
        "| method | " + " | ".join(f"k={k}" for k in cfg["sizes"]) + " |",
        "|---|" + "---|" * len(cfg["sizes"]),
    ]
    for m in methods:
        lines.append(
            f"| {method_label(m)} | "
            + " | ".join(f"{report['alpha'][m][str(k)]:.4g}" for k in cfg["sizes"])
            + " |"
        )
    lines += [
        "",
        "## Per combination: activation level (mean target probability)",
        "",
        per_combination_table(report["activation_eval"], methods),
    ]
    if report.get("generation_eval"):
        lines += [
            "",
            "## Per combination: generated text (mean target probability)",
            "",
            per_combination_table(report["generation_eval"], methods),
        ]
        lines += ["", "## Example answers", ""]
        shown = 0
        for e in report["generation_eval"]:
            if len(e["targets"]) >= 2 and shown < 8:
                ex = e["examples"][0]
                lines.append(
                    f"- **{method_label(e['method'])}**, targets {'+'.join(e['targets'])}: "
                    f"_{ex['question']}_ → {ex['answer'][:300]!r}"
                )
                shown += 1
    ev = report["evaluator"]
    lines += [
        "",
        "## Evaluators (never optimised against)",
        "",
        f"- activation-level: `{ev['hook_name']}`, {ev['kind']} probe, validation accuracy "
        f"{_fmt(ev['val_accuracy'])} on evaluator-split questions",
    ]
    if report.get("response_evaluator"):
        rv = report["response_evaluator"]
        lines.append(
            f"- response-level: `{rv['hook_name']}`, trained on answers re-encoded without instruction, "
            f"validation accuracy {_fmt(rv['val_accuracy'])} (chance {1 / len(report['labels']):.3f})"
        )
    sp = report.get("steering_probe", {})
    lines += [
        f"- steering probe: `{report['steering_hook']}`, validation accuracy {_fmt(sp.get('val_accuracy', float('nan')))}",
        "",
        "## Definitions",
        "",
        f"- vanished: {cfg['vanish']['definition']} (near={cfg['vanish']['near']}, rise={cfg['vanish']['rise']}).",
        "- perplexity: of the answer tokens under the unsteered model; KL/token: KL(steered || unsteered) "
        "next-token distributions along the steered answer; distinct-2: distinct word bigrams / bigrams.",
        "",
        "## Timings",
        "",
    ]
    for k, v in report.get("timings", {}).items():
        lines.append(f"- {k}: {v:.1f} s")
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the PNG figures; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    methods = ["unsteered", *report["methods"]]
    colors = {
        m: c
        for m, c in zip(
            methods, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3, strict=False
        )
    }
    paths = []
    for section in ("activation_eval", "generation_eval"):
        entries = report.get(section) or []
        if not entries:
            continue
        sizes = sorted({len(e["targets"]) for e in entries})
        fig, axes = plt.subplots(
            len(sizes),
            1,
            figsize=(max(8, 0.5 * 20 * len(methods) / 3), 3.2 * len(sizes)),
            squeeze=False,
        )
        for ax, k in zip(axes[:, 0], sizes, strict=True):
            es = [e for e in entries if len(e["targets"]) == k]
            combos = list(dict.fromkeys(_combo(e) for e in es))
            width = 0.8 / len(methods)
            for j, m in enumerate(methods):
                vals = [
                    next(
                        (e["mean_target_prob"] for e in es if _combo(e) == c and e["method"] == m),
                        float("nan"),
                    )
                    for c in combos
                ]
                ax.bar(
                    [i + j * width for i in range(len(combos))],
                    vals,
                    width,
                    label=method_label(m),
                    color=colors[m],
                )
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(combos))])
            ax.set_xticklabels(combos, rotation=45, ha="right", fontsize=7)
            ax.set_ylabel("mean target prob.")
            ax.set_ylim(0, 1)
            ax.set_title(f"{k} target{'s' if k > 1 else ''}")
        handles, names = axes[0, 0].get_legend_handles_labels()
        fig.legend(
            handles,
            names,
            fontsize=8,
            ncol=len(methods),
            loc="upper center",
            bbox_to_anchor=(0.5, 0.965),
        )
        where = (
            "held-out activation evaluator"
            if section == "activation_eval"
            else "response evaluator on generated text"
        )
        fig.suptitle(f"Target probability per combination ({where})", y=0.995)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        p = out_dir / f"{section}_combinations.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

        triples = [e for e in entries if len(e["targets"]) == 3]
        if triples:
            combos = list(dict.fromkeys(_combo(e) for e in triples))
            ncol = min(5, len(combos))
            nrow = math.ceil(len(combos) / ncol)
            fig, axes = plt.subplots(
                nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False, sharey=True
            )
            for ax in axes.flat:
                ax.set_visible(False)
            for ax, c in zip(axes.flat, combos, strict=False):
                ax.set_visible(True)
                by_method = {e["method"]: e for e in triples if _combo(e) == c}
                targets = next(iter(by_method.values()))["targets"]
                width = 0.8 / len(methods)
                for j, m in enumerate(methods):
                    if m in by_method:
                        ax.bar(
                            [i + j * width for i in range(3)],
                            [by_method[m]["per_label_prob"][t] for t in targets],
                            width,
                            color=colors[m],
                            label=method_label(m),
                        )
                ax.set_xticks([i + 0.4 - width / 2 for i in range(3)])
                ax.set_xticklabels(targets, fontsize=7)
                ax.set_ylim(0, 1)
                ax.set_title(c, fontsize=8)
            axes.flat[0].legend(fontsize=6)
            fig.suptitle(f"Per-target probability, 3-target combinations ({where})")
            fig.tight_layout()
            p = out_dir / f"{section}_triples.png"
            fig.savefig(p, dpi=100)
            plt.close(fig)
            paths.append(p)

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, by_k in report["calibration"].items():
        for k, cal in by_k.items():
            ev = sorted(cal["evaluations"])
            ax.plot(
                [a for a, _ in ev],
                [v for _, v in ev],
                marker="o",
                ms=3,
                color=colors.get(m),
                alpha=0.4 + 0.2 * int(k),
                label=f"{method_label(m)} k={k}",
            )
    ax.axhline(report["comparison_config"]["kl_budget"], color="k", ls="--", lw=1, label="budget")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_xlabel("alpha")
    ax.set_ylabel(f"{report['comparison_config']['calibration_metric']} (nats)")
    ax.set_title("Calibration: coherence cost vs alpha")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    p = out_dir / "calibration.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", render_markdown(report).encode())
    figs = plot_report(report, out)
    return {"json": out / "report.json", "markdown": out / "report.md", **{p.stem: p for p in figs}}
