"""Reports of a comparison: ``report.json``, ``report.md`` and PNG figures.

Everything here renders from the typed records of :mod:`ks_lens.comparison`
(:class:`~ks_lens.comparison.ComparisonResult` and its rows); the JSON is their ``to_json()``.
A verdict says "beats" only when the paired 95 % interval of the difference excludes zero.
Figures use matplotlib's non-interactive Agg backend, so they render on headless machines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ks_lens.capability_stage import capability_table
from ks_lens.comparison import (
    CombinationRow,
    ComparisonResult,
    CurvePoint,
    EqualKL,
    SummaryRow,
    method_label,
    summarise_combinations,
)
from ks_lens.compat import versions
from ks_lens.errors import KsLensError, StoreError
from ks_lens.instructed import INSTRUCTED, MIN_INSTRUCTED_GAIN
from ks_lens.io import atomic_write_bytes, atomic_write_json
from ks_lens.stats import ClusteredTest, Interval, seed_summary
from ks_lens.utils import git_commit

LENS_TEXT = {
    "text": "text evaluator (TF-IDF + logistic regression on gold texts; model-independent)",
    "text_activation": "response-activation evaluator (gold texts re-encoded without instruction)",
    "activation": "held-out multi-label activation evaluator (steered forward pass, last prompt token)",
}
_METRIC_TEXT = {
    "generation_kl": "mean per-token KL(steered || unsteered) along steered greedy answers",
    "first_token_kl": "KL(steered || unsteered) of the next-token distribution at the end of the prompt",
}


def _f(x: float | None, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def _ci(x: Interval | None, nd: int = 3) -> str:
    return "" if x is None else x.fmt(nd)


def compare_word(diff: Interval | None) -> str:
    """ "beats" / "trails" only when the interval excludes 0, else "no significant difference"."""
    if diff is None or math.isnan(diff.estimate) or math.isnan(diff.low):
        return "cannot be compared"
    if diff.low > 0:
        return "beats"
    if diff.high < 0:
        return "trails"
    return "shows no significant difference from"


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def verdict(result: ComparisonResult) -> list[str]:
    """Sentences comparing every method with the baseline, per number of targets: at equal
    measured KL on generated text (text lens) and at the calibrated alpha (activation lens)."""
    base = method_label(result.config.baseline)
    out = []
    for e in result.equal_kl:
        if e.lens != "text" or e.diff_vs_baseline is None:
            continue
        out.append(
            f"text, k={e.k}, at KL {e.kl:g} nats/token: {method_label(e.method)} "
            f"({_ci(e.target_prob)}) {compare_word(e.diff_vs_baseline)} {base}; "
            f"difference {_ci(e.diff_vs_baseline)}"
        )
    for r in result.summary("activation"):
        if r.diff_vs_baseline is None or r.method == INSTRUCTED:  # reference_lines: not a method
            continue
        p = "" if r.diff_test is None else f" ({_p(r.diff_test)})"
        v = ""
        if r.vanish_cluster_test is not None:
            t = r.vanish_cluster_test
            v = (
                f"; vanished {r.n_vanished}/{r.n_cells} cells, per-question rate {t.mean_a:.3f} vs "
                f"{t.mean_b:.3f} ({_p(t)})"
            )
        out.append(
            f"activation, k={r.k}, at calibrated alpha: {method_label(r.method)} "
            f"{compare_word(r.diff_vs_baseline)} {base}; difference {_ci(r.diff_vs_baseline)}{p}{v}"
        )
    return out


def _p(t: ClusteredTest | None) -> str:
    """``p=0.031, sign-flip over 16 questions`` (``exact`` when every pattern was enumerated)."""
    if t is None or math.isnan(t.p_value):
        return ""
    how = "exact sign-flip" if t.exact else "sign-flip"
    return f"{_pval(t)}, {how} over {t.n_questions} questions"


def _pnum(t: ClusteredTest) -> str:
    """``0.031``, or ``<=0.001`` at the floor of a random sign-flip test."""
    if t.p_value <= t.p_floor * (1 + 1e-9):
        return f"<={t.p_floor:.2g}"
    return f"{t.p_value:.3g}"


def _pval(t: ClusteredTest) -> str:
    n = _pnum(t)
    return f"p{n}" if n.startswith("<") else f"p={n}"


def _alpha(method: str, alpha: float) -> str:
    """The alpha cell: none for the instructed row (it is asked, not steered)."""
    return "—" if method == INSTRUCTED else f"{alpha:.4g}"


def share_cell(fraction: Interval | None, note: str | None) -> str:
    """A method's share of the instructed gain: the interval, ``n/a*`` where it is withheld
    (the note, listed under the table by :func:`instructed_notes`, says why), else empty."""
    if fraction is not None:
        return _ci(fraction, 2)
    return "n/a*" if note else ""


def instructed_notes(rows: Sequence[SummaryRow | EqualKL]) -> list[str]:
    """One line per number of targets whose instructed gain is too small for a share of it."""
    notes = dict.fromkeys(f"k={r.k}: {r.instructed_note}" for r in rows if r.instructed_note)
    return [f"\\* {n}" for n in notes]


def _with_share(rows: Sequence[SummaryRow | EqualKL]) -> bool:
    return any(r.instructed_fraction is not None or r.instructed_note for r in rows)


def summary_table(rows: Sequence[SummaryRow], text: bool) -> str:
    header = ["method", "k", "alpha", "cells", "mean target p", "min target p", "norm. gain"]
    header += ["vanished (rate)", "diff vs baseline", "p (clustered)", "vanished p (clustered)"]
    share = _with_share(rows)
    if share:
        header += ["share of instructed gain"]
    if text:
        header += ["KL/token", "perplexity", "degenerate"]
    body = []
    for r in rows:
        cells = [
            method_label(r.method),
            r.k,
            _alpha(r.method, r.alpha),
            r.n_cells,
            _ci(r.target_prob),
            _ci(r.min_target_prob),
            _ci(r.gain),
            "" if r.vanish_rate is None else f"{r.n_vanished} ({_ci(r.vanish_rate, 2)})",
            _ci(r.diff_vs_baseline),
            "" if r.diff_test is None else _pnum(r.diff_test),
            "" if r.vanish_cluster_test is None else _pnum(r.vanish_cluster_test),
        ]
        if share:
            cells.append(share_cell(r.instructed_fraction, r.instructed_note))
        if text:
            cells += [
                _ci(r.kl),
                _f(r.perplexity, 2),
                "" if r.n_degenerate is None else f"{r.n_degenerate}/{r.n_cells}",
            ]
        body.append(cells)
    return markdown_table(body, header)


def combination_rows(result: ComparisonResult) -> list[CombinationRow]:
    """Per-combination text-level rows (text lens), when the text level covered every
    combination (``text_coverage="all-combinations"``); else none."""
    if result.text is None or result.config.text_coverage != "all-combinations":
        return []
    return summarise_combinations(result.text, result.config)


def combination_table(rows: Sequence[CombinationRow]) -> str:
    """One row per combination, one column per method: ``mean target p / weakest target p /
    vanished cells``."""
    methods = list(dict.fromkeys(r.method for r in rows))
    combos = list(dict.fromkeys(r.targets for r in rows))
    by = {(r.method, r.targets): r for r in rows}
    body = []
    for c in combos:
        cells: list[Any] = ["+".join(c), by[(methods[0], c)].n_questions]
        for m in methods:
            r = by.get((m, c))
            if r is None:
                cells.append("")
                continue
            gone = "" if r.n_vanished is None else f" / {r.n_vanished}/{r.n_cells}"
            cells.append(f"{r.target_prob:.2f} / {r.min_target_prob:.2f}{gone}")
        body.append(cells)
    return markdown_table(body, ["targets", "questions", *[method_label(m) for m in methods]])


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
            [
                [get(by[(m, c)]) if (m, c) in by else float("nan") for m in methods]
                for c in combos
            ],
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


def curve_table(points: Sequence[CurvePoint]) -> str:
    return markdown_table(
        [
            [
                method_label(p.method),
                p.k,
                "—" if p.method == INSTRUCTED else f"{p.factor:g}",
                _alpha(p.method, p.alpha),
                _ci(p.kl),
                _ci(p.target_prob),
                f"{p.degenerate_rate:.2f}",
                p.n_answers,
            ]
            for p in points
        ],
        ["method", "k", "x alpha", "alpha", "KL/token", "mean target p", "degenerate", "answers"],
    )


def equal_kl_table(rows: Sequence[EqualKL]) -> str:
    """One row per method and k; the instructed row (no curve) at its own measured KL."""
    share = _with_share(rows)
    body = []
    for e in rows:
        ref = e.method == INSTRUCTED
        cells = [
            method_label(e.method),
            e.k,
            f"{_f(e.kl)} (own)" if ref else _f(e.kl),
            _ci(e.target_prob),
            _f(e.degenerate_rate, 2),
            _ci(e.diff_vs_baseline),
            "(reference, no alpha)"
            if ref
            else compare_word(e.diff_vs_baseline)
            if e.diff_vs_baseline is not None
            else "(baseline)",
        ]
        if share:
            cells.append("" if ref else share_cell(e.instructed_fraction, e.instructed_note))
        body.append(cells)
    header = [
        "method",
        "k",
        "KL level",
        "target p at equal KL",
        "degenerate",
        "diff vs baseline",
        "verdict",
    ]
    return markdown_table(body, header + (["share of instructed gain"] if share else []))


def style_table(result: ComparisonResult) -> str:
    """Mean style meters of the answers per method (calibrated alpha, all k)."""
    if result.text is None:
        return ""
    groups: dict[str, list[dict[str, float]]] = {}
    for a in result.text.answers:
        if a.method in ("unsteered", INSTRUCTED) or a.factor == 1.0:
            groups.setdefault(a.method, []).append(a.style)
    if not groups:
        return ""
    names = list(next(iter(groups.values()))[0])
    body = []
    for m, styles in groups.items():
        body.append(
            [method_label(m)] + [_f(sum(s[n] for s in styles) / len(styles), 2) for n in names]
        )
    return markdown_table(body, ["method", *names])


def examples(result: ComparisonResult, n: int = 2) -> list[str]:
    if result.text is None:
        return []
    te = result.text
    lines = []
    for k in result.config.sizes:
        cells = [c for c in te.cells if len(c.targets) == k][:n]
        for c in cells:
            q = te.questions[c.question]
            lines.append(f"**{q}** (targets: {'+'.join(c.targets)})")
            for a in te.answers:
                if a.question == c.question and (
                    a.method == "unsteered"
                    or (a.targets == c.targets and (a.factor == 1.0 or a.method == INSTRUCTED))
                ):
                    p = {lab: a.text_probs[i] for i, lab in enumerate(te.labels)}
                    tp = " ".join(f"{t}={p[t]:.2f}" for t in c.targets)
                    flag = f" [degenerate: {a.degenerate}]" if a.degenerate else ""
                    lines.append(f"- {method_label(a.method)} ({tp}){flag}: {a.text[:240]!r}")
            lines.append("")
    return lines


def versions_line(info: Mapping[str, Any]) -> str:
    """``Made with ks_lens 0.1.0, torch 2.13.0+cpu, ... on cpu, seed 0.`` from a report's info
    (``versions unknown`` for reports written before versions were recorded)."""
    made = info.get("versions")
    if not isinstance(made, Mapping) or not made:
        return "Package versions: unknown (not recorded by the ks-lens that wrote this report)."
    text = ", ".join(f"{k} {v}" for k, v in made.items())
    where = f" on {info['device']}" if info.get("device") else ""
    seed = f", seed {info['seed']}" if info.get("seed") is not None else ""
    return f"Made with {text}{where}{seed}."


INSTRUCTED_DEFINITIONS = (
    "- Instructed (system prompt): the reference row, not a steering method. The unsteered "
    "model is asked for the targets by system prompt (each target's instruction, several joined "
    "as for combined behaviours), no alpha. Its answers are scored like steered ones: "
    "re-encoded after the question without the instruction, and its KL/token compares its "
    "next-token distributions (instruction + question + answer so far) with the unsteered "
    "model's (question + answer so far). At the activation level the evaluator reads "
    "instruction + question, the kind of prompt it was trained on: a ceiling by construction.",
    "- share of instructed gain: (p_method - p_unsteered) / (p_instructed - p_unsteered) on the "
    "same cells (questions resampled for the interval); withheld (n/a*) where the instructed "
    f"gain is below {MIN_INSTRUCTED_GAIN} or its interval reaches 0.",
)


def reference_lines(result: ComparisonResult) -> list[str]:
    """Verdict lines for the instructed reference row: what asking achieves, per lens and k."""
    base = {(r.lens, r.k): r for r in result.summaries if r.method == "unsteered"}
    out = []
    for r in result.summaries:
        if r.method != INSTRUCTED or (r.lens, r.k) not in base:
            continue
        kl = f" at {_ci(r.kl)} nats/token" if r.kl is not None else ""
        out.append(
            f"- reference, {r.lens}, k={r.k}: asked by system prompt {_ci(r.target_prob)}{kl} "
            f"vs unsteered {_ci(base[(r.lens, r.k)].target_prob)}"
        )
    return out


def render_markdown(result: ComparisonResult, info: Mapping[str, Any]) -> str:
    """The human-readable report: verdict, evaluator validity, headline, curves, tables."""
    cfg = result.config
    lines = [
        f"# ks-lens comparison: {info.get('model', '')}",
        "",
        f"Steering at `{info.get('steering_hook', '')}`; labels: {', '.join(result.plan.labels)}; "
        f"baseline: {method_label(cfg.baseline)}. Produced by `{info.get('command', 'ks-lens demo')}` at "
        f"commit `{info.get('commit', 'unknown')}`"
        + (
            f"; summaries recomputed by `{info['rerendered_by']['command']}` at commit "
            f"`{info['rerendered_by']['commit']}`."
            if info.get("rerendered_by")
            else "."
        ),
        versions_line(info),
        f"Alpha calibrated per method and number of targets on {result.n_calib_questions} calibration "
        f"questions to {cfg.kl_budget} nats/token ({_METRIC_TEXT.get(cfg.calibration_metric, cfg.calibration_metric)}) "
        f"with at most {cfg.max_degenerate_rate:.0%} of answers newly degenerate (degenerate where the "
        f"unsteered answer is not). Test questions: "
        f"{result.n_test_questions} (activation level), {result.n_text_questions} (text) from "
        f"{info.get('eval_source', 'the test split')}. Intervals: 95 % percentile bootstrap over "
        f"questions ({cfg.n_resamples} resamples); differences are paired.",
        "",
        "## Verdict",
        "",
        *[f"- {s}" for s in verdict(result)],
        *reference_lines(result),
        "",
        "## Evaluators (never optimised against)",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in info.get("evaluators", {}).items()]
    if result.equal_kl:
        for lens in ("text", "text_activation"):
            rows = [e for e in result.equal_kl if e.lens == lens]
            if rows:
                lines += [
                    "",
                    f"## Headline: generated text at equal measured KL ({cfg.kl_budget} nats/token), {lens}",
                    "",
                    f"Lens: {LENS_TEXT[lens]}. Each method's target probability is interpolated "
                    "(linear in log KL) along its trade-off curve at the KL level: the budget, or, where "
                    "the method's or the baseline's measured curve does not reach it, a level inside the KL range "
                    "both reach (the middle of the limiting curve's last segment; never extrapolated); the "
                    "difference to the baseline is read at the same level.",
                    "",
                    equal_kl_table(rows),
                    *(["", *instructed_notes(rows)] if instructed_notes(rows) else []),
                ]
        lines += [
            "",
            "## Trade-off curves (text evaluator)",
            "",
            "![trade-off](text_tradeoff.png)",
            "",
            curve_table([p for p in result.curves if p.lens == "text"]),
        ]
    for lens in ("text", "text_activation", "activation"):
        srows = result.summary(lens)
        if not srows:
            continue
        where = "at the calibrated alpha" + (
            ", all combinations x all test questions" if lens == "activation" else ""
        )
        lines += [
            "",
            f"## {lens}: {LENS_TEXT[lens]}, {where}",
            "",
            summary_table(srows, text=lens != "activation"),
            *(["", *instructed_notes(srows)] if instructed_notes(srows) else []),
        ]
    crows = combination_rows(result)
    if crows:
        lines += [
            "",
            "## Text level per combination (calibrated alpha, text evaluator)",
            "",
            f"Every combination answered on at least {cfg.min_questions_per_combination} test "
            "questions. Each cell: mean target probability / weakest target's probability / "
            "vanished cells (2+ targets), over the combination's questions; no intervals (few "
            "questions per combination): these rows show which combinations conflict.",
            "",
            "![per combination](text_combinations.png)",
            "",
            combination_table(crows),
        ]
    lines += capability_section(result)
    st = style_table(result)
    if st:
        lines += ["", "## Style meters (mean per answer, calibrated alpha)", "", st]
    ex = examples(result)
    if ex:
        lines += [
            "",
            "## Example answers (calibrated alpha; text-evaluator target probabilities)",
            "",
            *ex,
        ]
    lines += [
        "",
        "## Alpha per method (calibrated)",
        "",
        markdown_table(
            [
                [method_label(m)] + [f"{result.alphas[m][k]:.4g}" for k in cfg.sizes]
                for m in cfg.methods
            ],
            ["method", *[f"k={k}" for k in cfg.sizes]],
        ),
        "",
        "## Definitions",
        "",
        f"- vanished: {cfg.vanish.to_json()['definition']}.",
        f"- degenerate: {cfg.degenerate.to_json()['definition']}.",
        "- normalised gain: (p - p0) / (1 - p0) for a rise, (p - p0) / p0 for a fall, per target, p0 the "
        "unsteered probability on the same question (in [-1, 1]).",
        "- KL/token: KL(steered || unsteered) of the next-token distributions along the reported answer "
        "(including the step that ended it); perplexity: of the answer tokens under the unsteered model.",
        *INSTRUCTED_DEFINITIONS,
    ]
    if info.get("seeds"):
        lines += [
            "",
            "## Across seeds (mean ± sd of the estimates)",
            "",
            seeds_table(info["seeds"]),
        ]
    lines += ["", "## Timings", ""]
    lines += [  # seconds, and resident memory (``*_mb``: MiB, see ks_lens.memory)
        f"- {k}: {v:.0f} MiB" if k.endswith("_mb") else f"- {k}: {v:.1f} s"
        for k, v in {**info.get("timings", {}), **result.timings}.items()
    ]
    return "\n".join(lines) + "\n"


def capability_section(result: ComparisonResult) -> list[str]:
    """The capability table's lines in ``report.md`` (none without a capability stage)."""
    cap = result.capability
    if cap is None:
        return []
    n = len(cap.question_ids)
    return [
        "",
        "## Capability retention (multiple choice, calibrated alpha)",
        "",
        f"Accuracy on {n} questions of the shipped multiple-choice set (stratified over subjects, "
        f"seed {cap.seed}), scored by option log-likelihood (per character), unsteered, under each "
        "method at its calibrated alpha and, where run, with the targets asked for in the system "
        "prompt (instructed). For k targets, question i is steered toward combination i mod C of "
        "the C combinations of that size. Differences are paired with the unsteered run, 95 % "
        "bootstrap intervals over questions; bold: the interval excludes 0.",
        "",
        capability_table(result.capability_rows(), method_label),
    ]


def render_summary(result: ComparisonResult) -> str:
    """The headline as plain text (what ``ks-lens demo`` prints): equal-KL text results and
    activation means, with intervals."""
    lines = [f"generated text at equal KL ({result.config.kl_budget} nats/token), text evaluator:"]
    for e in result.equal_kl:
        if e.lens != "text":
            continue
        d = (
            f"  diff vs {method_label(result.config.baseline)} {e.diff_vs_baseline.fmt()} -> "
            f"{compare_word(e.diff_vs_baseline)}"
            if e.diff_vs_baseline is not None
            else ""
        )
        if e.method == INSTRUCTED:
            d = f"  (reference, at its own KL {_f(e.kl)})"
        elif e.instructed_fraction is not None:
            d += f"; share of instructed gain {e.instructed_fraction.fmt(2)}"
        lines.append(f"  k={e.k} {method_label(e.method):22s} {e.target_prob.fmt()}{d}")
    lines += ["", "activation level (held-out multi-label evaluator, calibrated alpha):"]
    for r in result.summary("activation"):
        v = "" if r.vanish_rate is None else f"  vanished {r.n_vanished}/{r.n_cells}"
        lines.append(f"  k={r.k} {method_label(r.method):22s} {r.target_prob.fmt()}{v}")
    return "\n".join(lines)


def seeds_summary(results: Sequence[ComparisonResult]) -> list[dict[str, Any]]:
    """Mean ± sd over seeds of the equal-KL estimates and differences, and activation means."""
    rows: dict[tuple[str, str, int, str], list[float]] = {}
    for r in results:
        for e in r.equal_kl:
            rows.setdefault((e.lens, e.method, e.k, "target p at equal KL"), []).append(
                e.target_prob.estimate
            )
            if e.diff_vs_baseline is not None:
                rows.setdefault((e.lens, e.method, e.k, "diff vs baseline at equal KL"), []).append(
                    e.diff_vs_baseline.estimate
                )
        for s in r.summary("activation"):
            rows.setdefault(("activation", s.method, s.k, "mean target p"), []).append(
                s.target_prob.estimate
            )
    return [
        {"lens": lens, "method": m, "k": k, "what": what, **seed_summary(v)}
        for (lens, m, k, what), v in rows.items()
    ]


def seeds_table(rows: Sequence[Mapping[str, Any]]) -> str:
    return markdown_table(
        [
            [
                r["lens"],
                method_label(r["method"]),
                r["k"],
                r["what"],
                f"{_f(r['mean'])} ± {_f(r['sd'])}",
                r["n"],
            ]
            for r in rows
        ],
        ["lens", "method", "k", "quantity", "mean ± sd", "seeds"],
    )


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
        labels = list(act.labels)
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
            ax.set_xticklabels(
                ["+".join(act.combos[j]) for j in idx], rotation=45, ha="right", fontsize=7
            )
            ax.set_ylim(0, 1)
            ax.set_ylabel("mean target p")
            ax.set_title(f"{k} target{'s' if k > 1 else ''}")
        axes[0, 0].legend(fontsize=7, ncol=len(methods))
        fig.suptitle("Activation level: held-out evaluator, per combination (calibrated alpha)")
        fig.tight_layout()
        p = out_dir / "activation_combinations.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, by_k in result.calibration.items():
        for k, cal in by_k.items():
            ev = sorted((a, v if math.isfinite(v) else float("nan")) for a, v in cal.evaluations)
            ax.plot(
                [a for a, _ in ev],
                [v for _, v in ev],
                marker="o",
                ms=3,
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
    paths.append(p)
    return paths


def write_report(
    result: ComparisonResult, info: Mapping[str, Any], out_dir: str | Path
) -> dict[str, Path]:
    """Write ``report.json`` (``info`` + the result's JSON), ``report.md`` and the figures."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**info, **result.to_json()}
    doc["timings"] = {**info.get("timings", {}), **result.timings}  # setup stages + comparison
    crows = combination_rows(result)
    if crows:
        doc["combinations"] = [r.to_json() for r in crows]
    atomic_write_json(out / "report.json", doc)
    atomic_write_bytes(out / "report.md", render_markdown(result, info).encode())
    figs = plot_report(result, out)
    return {"json": out / "report.json", "markdown": out / "report.md", **{p.stem: p for p in figs}}


_RESULT_KEYS = frozenset(
    {
        "labels",
        "methods",
        "method_labels",
        "comparison_config",
        "plan",
        "alpha",
        "calibration",
        "n_calib_questions",
        "n_test_questions",
        "n_text_questions",
        "summaries",
        "curves",
        "equal_kl",
        "activation_eval",
        "text_eval",
        "timings",
        "combinations",
        "capability",
        "capability_eval",
    }
)


def rerender(directory: str | Path, *, command: str | None = None) -> dict[str, Path]:
    """Re-render ``directory/report.{json,md}`` and the figures from its ``report.json``, with
    summaries, curves and equal-KL rows recomputed from the stored per-question records by this
    version's code (no model needed). The original run's info is kept; ``rerendered_by``
    records the command and commit of the re-rendering."""
    from ks_lens.io import read_json

    directory = Path(directory)
    path = directory / "report.json"
    doc = read_json(path, what="comparison report")
    try:
        result = ComparisonResult.from_json(doc)
    except KsLensError as e:
        raise StoreError(
            f"{path} cannot be re-rendered: {e}. Re-run the demo to regenerate it."
        ) from e
    info = {k: v for k, v in doc.items() if k not in _RESULT_KEYS}
    info["timings"] = {k: v for k, v in doc.get("timings", {}).items() if k not in result.timings}
    info["rerendered_by"] = {
        "command": command or "ks-lens report",
        "commit": git_commit(),
        "versions": versions(),
    }
    return write_report(result, info, directory)


__all__ = [
    "capability_section",
    "combination_rows",
    "combination_table",
    "compare_word",
    "curve_table",
    "equal_kl_table",
    "markdown_table",
    "plot_combinations",
    "plot_report",
    "render_markdown",
    "render_summary",
    "rerender",
    "seeds_summary",
    "seeds_table",
    "summary_table",
    "verdict",
    "versions_line",
    "write_report",
]
