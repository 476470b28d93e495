"""The markdown tables and sentences of a comparison report, and their formatting helpers.

Every table is built by :func:`markdown_table` from the typed rows of :mod:`ks_lens.comparison`
(:class:`~ks_lens.comparison.SummaryRow`, :class:`~ks_lens.comparison.EqualKL`,
:class:`~ks_lens.comparison.CurvePoint`, :class:`~ks_lens.comparison.CombinationRow`).
A verdict says "beats" only when the paired 95 % interval of the difference excludes zero
(:func:`compare_word`). :mod:`ks_lens.report.markdown` assembles these into ``report.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ks_lens.comparison import (
    CombinationRow,
    ComparisonResult,
    CurvePoint,
    EqualKL,
    SummaryRow,
    method_label,
    summarise_combinations,
)
from ks_lens.evaluation.instructed import INSTRUCTED
from ks_lens.evaluation.stats import ClusteredTest, Interval


def _f(x: float | None, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def _ci(x: Interval | None, nd: int = 3) -> str:
    return "" if x is None else x.fmt(nd)


def compare_word(diff: Interval | None) -> str:
    """ "beats" / "trails" only when the interval excludes 0, else "no significant difference"."""
    if diff is None or math.isnan(diff.estimate) or math.isnan(diff.low):
        return "cannot be compared with"
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
