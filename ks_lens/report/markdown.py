"""``report.md`` and the plain-text headline of a comparison, assembled from the tables of
:mod:`ks_lens.report.tables`.

:func:`render_markdown` writes the report section by section (each section one private
function, in the order they appear); :func:`render_summary` is the headline ``ks-lens demo``
prints; :func:`seeds_summary` and :func:`seeds_table` give the spread of the estimates over
seeds; :func:`versions_line` the package versions a report was made with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ks_lens.capability.stage import capability_table
from ks_lens.comparison import ComparisonResult, method_label
from ks_lens.evaluation.instructed import INSTRUCTED, MIN_INSTRUCTED_GAIN
from ks_lens.evaluation.stats import seed_summary
from ks_lens.report.tables import (
    _ci,
    _f,
    combination_rows,
    combination_table,
    compare_word,
    curve_table,
    equal_kl_table,
    examples,
    instructed_notes,
    markdown_table,
    style_table,
    summary_table,
    verdict,
)

LENS_TEXT = {
    "text": "text evaluator (TF-IDF + logistic regression on gold texts; model-independent)",
    "text_activation": "response-activation evaluator (gold texts re-encoded without instruction)",
    "activation": "held-out multi-label activation evaluator (steered forward pass, last prompt token)",
}
_METRIC_TEXT = {
    "generation_kl": "mean per-token KL(steered || unsteered) along steered greedy answers",
    "first_token_kl": "KL(steered || unsteered) of the next-token distribution at the end of the prompt",
}


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
    f"gain or the low end of its interval is below {MIN_INSTRUCTED_GAIN}.",
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
    lines = _intro_lines(result, info)
    lines += [f"- {k}: {v}" for k, v in info.get("evaluators", {}).items()]
    if result.equal_kl:
        lines += _equal_kl_lines(result)
    lines += _summary_lines(result)
    lines += _combination_lines(result)
    lines += capability_section(result)
    lines += _style_and_example_lines(result)
    lines += _alpha_and_definition_lines(result)
    lines += _seeds_and_timing_lines(result, info)
    return "\n".join(lines) + "\n"


#: how the intro names :attr:`ComparisonConfig.alpha_per`
_ALPHA_PER = {"size": "number of targets", "combination": "target combination"}


def _intro_lines(result: ComparisonResult, info: Mapping[str, Any]) -> list[str]:
    """Title, provenance, setup, the verdict and the evaluators' heading (their list follows)."""
    cfg = result.config
    return [
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
        f"Alpha calibrated per method and {_ALPHA_PER.get(cfg.alpha_per, cfg.alpha_per)} on "
        f"{result.n_calib_questions} calibration "
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


def _equal_kl_lines(result: ComparisonResult) -> list[str]:
    """The equal-KL headline per text lens, then the text trade-off curves."""
    cfg = result.config
    lines: list[str] = []
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
    return lines


def _summary_lines(result: ComparisonResult) -> list[str]:
    """One summary table per lens at the calibrated alpha."""
    lines: list[str] = []
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
    return lines


def _combination_lines(result: ComparisonResult) -> list[str]:
    """The per-combination text section (none unless the text level covered every combination)."""
    cfg = result.config
    crows = combination_rows(result)
    if not crows:
        return []
    return [
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


def _style_and_example_lines(result: ComparisonResult) -> list[str]:
    """The style meters and example answers (each only where there are text answers)."""
    lines: list[str] = []
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
    return lines


def _combo_alpha_lines(result: ComparisonResult) -> list[str]:
    """The per-combination alphas (``alpha_per="combination"``; none otherwise): one row per
    combination, one column per method calibrated per combination."""
    combo = result.combo_alphas
    if not combo:
        return []
    methods = [m for m in result.config.methods if m in combo]
    rows = [
        [" + ".join(t)] + [f"{combo[m][t]:.4g}" if t in combo[m] else "-" for m in methods]
        for t in dict.fromkeys(t for m in methods for t in combo[m])
    ]
    return [
        "",
        "Per combination (each combination steered at its own alpha; the table above gives the "
        "median per number of targets):",
        "",
        markdown_table(rows, ["targets", *[method_label(m) for m in methods]]),
    ]


def _alpha_and_definition_lines(result: ComparisonResult) -> list[str]:
    """The calibrated alphas per method and k, and the definitions of the reported quantities."""
    cfg = result.config
    return [
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
        *_combo_alpha_lines(result),
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


def _seeds_and_timing_lines(result: ComparisonResult, info: Mapping[str, Any]) -> list[str]:
    """The across-seeds table (multi-seed runs only) and the timings."""
    lines: list[str] = []
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
    return lines


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
