"""Which steering choices move the text: probe source, step bound, multi-layer, positions,
vanishing remedies, and a target + avoid comparison, each chosen on VALIDATION questions.

Every lever is a comparison (``ks_lens.comparison``) on the same validation questions: alphas
calibrated on the calibration questions to the same KL budget, answers at four alphas per
method, target probability under the text evaluator read at equal measured KL, paired bootstrap
differences. The levers are decided in order, each with the winners of the ones before:

1. **source**: steering probe and CAA vectors from instruction prompts or from gold texts
   re-encoded without instruction (``PipelineConfig.probe_source``);
2. **step**: raw, unit, relative or clipped (trust-region) steps, and multi-layer steering;
   **precondition**: the raw step against the step in the probe's input geometry
   (``ksteer_precond``: the gradient times the probe's input variances; issue 24);
   **dense**: ``ksteer_precond`` against ``ksteer_dense`` (the same probe's step at resid_post
   of the steering layer and the 6 below, alpha split; issue 24);
   **token_probe**: the preconditioned step with the final-token probe against the same step
   with a probe trained on every answer token of the gold texts (``ksteer_token``; issue 24);
   **likelihood**: ``ksteer_precond`` against per-label vectors trained on the gold answers'
   likelihood (``likelihood``, BiPO-style, ``ks_lens.steering.likelihood``; issue 24), CAA
   (mean) beside them;
   **dac**: ``ksteer_precond`` against Dynamic Activation Composition (``dac``: CAA (mean) with
   each label's term weighted per generation step by its KL; ``ks_lens.steering.dac``; issue 24),
   a multi-property baseline whose vanished share at 3 targets says whether it remedies
   vanishing. These four (:data:`CANDIDATES`) share one run with CAA (mean) and
   ``ksteer_precond``; each is decided against ``ksteer_precond``, and the run's best
   K-Steering variant becomes the method of the levers after;
   **alpha_per**: ``ksteer_precond`` with one alpha per number of targets against one per
   target combination (``ComparisonConfig.alpha_per``; issue 24);
3. **positions**: all tokens, generated tokens only, prompt tokens only;
4. **remedies**: multi-step, log-sigmoid, soft-min, balanced, PCGrad (3-target vanishing);
5. **avoid**: toward one or two tones and away from ``expert``;
6. **alpha_per**: one calibrated alpha per number of targets (``alpha_per="size"``) against one
   per target combination (``"combination"``, the reference's choice; issue 24), for
   ``ksteer_precond`` (CAA is calibrated per combination too in the second run).

The winner of a lever is the K-Steering variant with the highest mean (over 1, 2 and 3
targets) text target probability at equal KL among those with at most 2 % degenerate answers.
The validation questions are calibration-split questions not used to calibrate alphas; the test
split is never read. Each run is saved as it finishes (``runs/*.json``) and reused by a rerun.

    python analysis/steering_levers.py [--fast] [--out DIR] [--work DIR] [--levers source,step,...]
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from common import StudyOptions, parse, start, write_json

from ks_lens.comparison import (
    ComparisonConfig,
    ComparisonResult,
    EqualKL,
    merge_results,
    method_label,
)
from ks_lens.evaluation.stats import bootstrap_mean
from ks_lens.io import atomic_write_json
from ks_lens.models.chat import tokenize_chat
from ks_lens.pipeline import Setup
from ks_lens.report import plot_tradeoff
from ks_lens.steering.dac import WeightSummary, generate_composed, summarize_weights
from ks_lens.steering.registry import METHODS

log = logging.getLogger("analysis.steering_levers")

Lever = Literal[
    "source",
    "step",
    "precondition",
    "token_probe",
    "dense",
    "likelihood",
    "dac",
    "alpha_per",
    "positions",
    "remedies",
    "avoid",
]
LEVERS: tuple[Lever, ...] = get_args(Lever)
STEP_VARIANTS = ("ksteer_unit", "ksteer_relative", "ksteer_clip", "ksteer_multilayer")
REMEDIES = (
    "ksteer_multistep",
    "ksteer_logsigmoid",
    "ksteer_softmin",
    "ksteer_balanced",
    "ksteer_pcgrad",
)
MAX_DEGENERATE = 0.02
#: issue 24's levers that are methods: each against ksteer_precond, in one shared run
CANDIDATES: dict[str, str] = {
    "dense": "ksteer_dense",
    "token_probe": "ksteer_token",
    "likelihood": "likelihood",
    "dac": "dac",
}


@dataclass(frozen=True)
class Choice:
    """The decision of one lever: the candidates' scores on validation questions and the winner."""

    lever: str
    winner: str  # the merged method name (``method@run``)
    scores: dict[str, float]  # mean over sizes of the equal-KL text target probability
    degenerate: dict[str, float]  # worst degenerate rate at equal KL over sizes
    rule: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def study_config(base: ComparisonConfig) -> ComparisonConfig:
    return replace(base, kl_budget=0.5, max_degenerate_rate=MAX_DEGENERATE)


class Runner:
    """Runs (or reloads) one comparison per named run on the validation questions."""

    def __init__(self, setup: Setup, out: Path, calib: list[str], val: list[str]):
        self.setup = setup
        self.dir = out / "runs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.calib = calib
        self.val = val
        self.base = study_config(setup.config.comparison)

    def run(
        self, name: str, *, source: str, methods: tuple[str, ...], **overrides: Any
    ) -> ComparisonResult:
        path = self.dir / f"{name}.json"
        cfg = replace(self.base, methods=methods, baseline=methods[0], **overrides).validate(
            self.setup.dataset.labels
        )
        if path.exists():
            saved = json.loads(path.read_text())
            if (
                saved.get("source") == source
                and saved["result"]["comparison_config"]
                == json.loads(json.dumps(cfg.to_json()))  # tuples as lists, as in the file
            ):
                log.info(f"[levers] reusing {path}")
                return ComparisonResult.from_json(saved["result"])
        log.info(
            f"[levers] run {name}: source={source} positions={cfg.positions} methods={methods}"
        )
        res = self.setup.compare(
            cfg,
            source=source,
            calib_questions=self.calib,
            test_questions=self.val,
            progress=False,
        )
        atomic_write_json(path, {"source": source, "result": res.to_json()})
        return res


def headline(res: ComparisonResult, lens: str = "text") -> dict[str, list[EqualKL]]:
    out: dict[str, list[EqualKL]] = {}
    for e in res.equal_kl:
        if e.lens == lens:
            out.setdefault(e.method, []).append(e)
    return out


def choose(lever: str, res: ComparisonResult, candidates: list[str]) -> Choice:
    h = headline(res)
    scores = {m: float(sum(e.target_prob.estimate for e in h[m]) / len(h[m])) for m in candidates}
    degenerate = {m: float(max(e.degenerate_rate for e in h[m])) for m in candidates}
    ok = [m for m in candidates if degenerate[m] <= MAX_DEGENERATE and math.isfinite(scores[m])]
    winner = max(ok or candidates, key=lambda m: (scores[m], -candidates.index(m)))
    rule = (
        f"highest mean equal-KL text target probability over sizes among candidates with "
        f"<= {MAX_DEGENERATE:.0%} degenerate answers (validation questions)"
    )
    if not ok:
        rule = (
            f"no candidate kept to {MAX_DEGENERATE:.0%} degenerate answers at every size, so the "
            "rule does not apply; fallback: the highest mean equal-KL text target probability "
            "over sizes among all candidates (validation questions). Not a basis for a default"
        )
    return Choice(lever, winner, scores, degenerate, rule)


def dac_weights(setup: Setup, res: ComparisonResult, source: str) -> dict[int, WeightSummary]:
    """How far DAC's per-step weights sat below 1 in the run's text cells (validation questions,
    the calibrated alpha of each cell), per number of targets."""
    assert res.text is not None
    dac: Any = METHODS["dac"].build(setup.kit_of(source))
    out: dict[int, WeightSummary] = {}
    for k in sorted({len(c.targets) for c in res.text.cells}):
        cells = [c for c in res.text.cells if len(c.targets) == k]
        weights = []
        for i in range(0, len(cells), 16):
            chunk = cells[i : i + 16]
            batch = tokenize_chat(setup.model, [res.text.questions[c.question] for c in chunk])
            steer = [
                (dac, dac.spec(target=c.targets, alpha=res.alpha("dac", c.targets))) for c in chunk
            ]
            gen = generate_composed(
                setup.model, batch, steer, max_new_tokens=res.config.max_new_tokens
            )
            weights += gen.answer_weights()
        out[k] = summarize_weights(weights)
    return out


def weights_table(summaries: dict[int, WeightSummary]) -> list[str]:
    lines = [
        "DAC's weights at its calibrated alpha (the text cells above; 1 = CAA (mean)'s full step)",
        "",
        "| k | mean weight | first step | later steps | at 1 | below 0.5 | label-steps | answers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, w in summaries.items():
        lines.append(
            f"| {k} | {w.mean:.3f} | {w.first_step:.3f} | {w.later_steps:.3f} | {w.at_one:.1%} "
            f"| {w.below_half:.1%} | {w.n_weights} | {w.n_answers} |"
        )
    return lines


def table(res: ComparisonResult) -> list[str]:
    """Markdown rows: equal-KL target probability and difference vs the baseline, per method and k."""
    lines = [
        f"baseline: {method_label(res.config.baseline)}; equal-KL level per row; 95 % bootstrap intervals over questions",
        "",
        "| method | k | KL | target p (text) | diff vs baseline | degenerate | vanished (calibrated alpha) |",
        "|---|---|---|---|---|---|---|",
    ]
    vanish = {
        (r.method, r.k): r for r in res.summaries if r.lens == "text" and r.vanish_rate is not None
    }
    for e in res.equal_kl:
        if e.lens != "text":
            continue
        d = "-" if e.diff_vs_baseline is None else e.diff_vs_baseline.fmt()
        v = vanish.get((e.method, e.k))
        vr = "-" if v is None or v.vanish_rate is None else v.vanish_rate.fmt()
        lines.append(
            f"| {method_label(e.method)} | {e.k} | {e.kl:.3f} | {e.target_prob.fmt()} | {d} | "
            f"{e.degenerate_rate:.1%} | {vr} |"
        )
    return lines


def activation_table(res: ComparisonResult) -> list[str]:
    lines = [
        "| method | k | target p (activation evaluator, calibrated alpha) | diff vs baseline |",
        "|---|---|---|---|",
    ]
    for r in res.summaries:
        if r.lens != "activation":
            continue
        d = "-" if r.diff_vs_baseline is None else r.diff_vs_baseline.fmt()
        lines.append(f"| {method_label(r.method)} | {r.k} | {r.target_prob.fmt()} | {d} |")
    return lines


def avoid_table(res: ComparisonResult, label: str) -> list[str]:
    """Markdown rows: the avoided label's text-evaluator probability, steered minus unsteered on
    the same question (mean over the question's cells), per method, size and alpha factor."""
    te = res.text
    if te is None:
        return []
    i = te.labels.index(label)
    unsteered = {a.question: a.text_probs[i] for a in te.answers if a.method == "unsteered"}
    lines = [
        f"Change of p({label}) under the text evaluator vs the unsteered answer to the same "
        f"question (unsteered mean {np.mean(list(unsteered.values())):.3f}); 95 % bootstrap over "
        "questions",
        "",
        "| method | k | x calibrated alpha | change of p(avoided) |",
        "|---|---|---|---|",
    ]
    for m in res.config.methods:
        for k in res.config.sizes:
            for f in res.config.curve_factors:
                per: dict[int, list[float]] = {}
                for a in te.answers:
                    if a.method == m and len(a.targets) == k and a.factor == f:
                        per.setdefault(a.question, []).append(
                            a.text_probs[i] - unsteered[a.question]
                        )
                if per:
                    iv = bootstrap_mean([float(np.mean(v)) for v in per.values()])
                    lines.append(f"| {method_label(m)} | {k} | {f:g} | {iv.fmt()} |")
    return lines


@dataclass(frozen=True)
class LeversOptions(StudyOptions):
    """The study's options: the pipeline's and the levers'."""

    n_val: int | None = None  # validation questions (None: 16, 4 with --fast)
    levers: tuple[Lever, ...] = LEVERS  # levers to decide (always in the order above)


def with_methods(opts: LeversOptions, *methods: str) -> LeversOptions:
    """``opts`` whose configured comparison also names ``methods``: prepare trains the artefacts
    a method needs (e.g. ``ksteer_token``'s per-token probe) only for the configured methods."""
    c = opts.config.comparison
    extra = tuple(m for m in methods if m not in c.methods)
    cmp = replace(c, methods=(*c.methods, *extra))
    return replace(opts, config=replace(opts.config, comparison=cmp)) if extra else opts


def main() -> None:
    opts = parse(LeversOptions, __doc__ or "", "runs/analysis/steering_levers")
    levers = list(opts.levers)
    # prepare trains the artefacts these methods need (per-token probe, likelihood vectors)
    opts = with_methods(
        opts, *[CANDIDATES[v] for v in ("token_probe", "likelihood") if v in levers]
    )
    out, setup, started = start(opts)
    cfg = setup.config
    n_val = opts.n_val or (4 if opts.fast else 16)
    pool = setup.questions("calibration", None)
    calib, val = pool[: cfg.n_calib], pool[cfg.n_calib : cfg.n_calib + n_val]
    if len(val) < n_val:
        raise SystemExit(
            f"the calibration split has {len(pool)} questions: too few for {cfg.n_calib} "
            f"calibration + {n_val} validation questions"
        )
    runner = Runner(setup, out, calib, val)
    choices: list[Choice] = []
    results: dict[str, ComparisonResult] = {}
    md: list[str] = [
        "# Steering levers (validation questions)",
        "",
        f"{len(calib)} calibration + {len(val)} validation questions (calibration split; the test "
        f"split is not read); KL budget {runner.base.kl_budget} nats/token; model "
        f"{setup.model.cfg.model_name}, steering layer {setup.layer}.",
        "",
    ]

    def section(
        title: str, res: ComparisonResult, choice: Choice | None, acts: bool = False
    ) -> None:
        results[title] = res
        md.extend([f"## {title}", ""])
        md.extend(table(res))
        if acts:
            md.extend(["", *activation_table(res)])
        if choice is not None:
            md.extend(["", f"**Chosen: {method_label(choice.winner)}** ({choice.rule}).", ""])
            choices.append(choice)
        md.append("")
        plot_tradeoff(res, out / f"{title}.png", title=f"{title}: text lens, validation questions")

    source = cfg.probe_source
    method = "ksteer"
    positions = "all"
    base_runs: dict[str, ComparisonResult] = {}

    def base_run(src: str, pos: str = "all") -> ComparisonResult:
        key = f"{src}-{pos}"
        if key not in base_runs:
            base_runs[key] = runner.run(
                f"base-{key}", source=src, methods=("caa_mean", "ksteer"), positions=pos
            )
        return base_runs[key]

    if "source" in levers:
        merged = merge_results(
            {"prompt": base_run("prompt"), "text": base_run("text")}, baseline="caa_mean@prompt"
        )
        ch = choose("source", merged, ["ksteer@prompt", "ksteer@text"])
        source = ch.winner.split("@")[1]
        section("source", merged, ch, acts=True)
    if "step" in levers:
        steps = runner.run("steps-" + source, source=source, methods=("caa_mean", *STEP_VARIANTS))
        merged = merge_results({"base": base_run(source), "steps": steps}, baseline="caa_mean@base")
        cands = ["ksteer@base", *[f"{m}@steps" for m in STEP_VARIANTS]]
        ch = choose("step", merged, cands)
        method = ch.winner.split("@")[0]
        section("step", merged, ch)
    if "precondition" in levers and method == "ksteer":
        pre = runner.run(f"precond-{source}", source=source, methods=("caa_mean", "ksteer_precond"))
        merged = merge_results({"base": base_run(source), "precond": pre}, baseline="caa_mean@base")
        ch = choose("precondition", merged, ["ksteer@base", "ksteer_precond@precond"])
        method = ch.winner.split("@")[0]
        section("precondition", merged, ch, acts=True)
    elif "precondition" in levers:
        log.info(
            f"[levers] precondition: skipped, the step lever chose {method} (not the raw step)"
        )
    # issue 24's candidate methods share one run (CAA (mean) and ksteer_precond calibrated once):
    # each lever is decided pairwise against ksteer_precond, the run's best becomes the method
    joint = [m for lever, m in CANDIDATES.items() if lever in levers]
    cand_run: ComparisonResult | None = None
    dac_summary: dict[str, Any] | None = None
    if joint:
        cand_run = runner.run(
            "candidates-" + "-".join([source, *joint]),
            source=source,
            methods=("caa_mean", "ksteer_precond", *joint),
        )
        for lever, m in CANDIDATES.items():
            if m in joint:
                choices.append(choose(lever, cand_run, ["ksteer_precond", m]))
        ch = choose("candidates", cand_run, ["ksteer_precond", *joint])
        method = ch.winner
        section("candidates", cand_run, ch, acts=True)
        if "dac" in joint:
            weights = dac_weights(setup, cand_run, source)
            dac_summary = {str(k): w.__dict__ for k, w in weights.items()}
            md.extend([*weights_table(weights), ""])
    if "positions" in levers:
        runs = {"all": base_run(source) if method == "ksteer" else None}
        if runs["all"] is None:
            runs["all"] = runner.run(
                f"{method}-{source}-all", source=source, methods=("caa_mean", method)
            )
        for pos in ("generated", "prompt"):
            runs[pos] = runner.run(
                f"{method}-{source}-{pos}",
                source=source,
                methods=("caa_mean", method),
                positions=pos,
            )
        merged = merge_results(
            {k: v for k, v in runs.items() if v is not None}, baseline="caa_mean@all"
        )
        ch = choose("positions", merged, [f"{method}@{k}" for k in runs])
        positions = ch.winner.split("@")[1]
        section("positions", merged, ch)
    if "remedies" in levers:
        # vanishing is a 3-target question: the remedies run at 3 targets only, beside
        # K-Steering 1 step (the baseline here: the remedies build on it) and CAA on the same cells
        rem = runner.run(
            f"remedies-{source}-{positions}",
            source=source,
            methods=("ksteer", "caa_mean", *REMEDIES),  # baseline: K-Steering 1 step
            positions=positions,
            sizes=(3,),
        )
        section("remedies", rem, None)
    if "avoid" in levers:
        av = runner.run(
            f"avoid-{method}-{source}-{positions}",
            source=source,
            methods=("caa_mean", method),
            positions=positions,
            avoid=("expert",),
            sizes=(1, 2),
        )
        section("avoid", av, None)
        md.extend([*avoid_table(av, "expert"), ""])
    if "alpha_per" in levers:
        # a per-size run of CAA (mean) and ksteer_precond (the candidates' run when there is one)
        # beside the same two methods calibrated per combination
        pair = ("caa_mean", "ksteer_precond")
        runs = {
            "size": cand_run or runner.run(f"precond-{source}", source=source, methods=pair),
            "combination": runner.run(
                f"precond-{source}-per-combination",
                source=source,
                methods=pair,
                alpha_per="combination",
            ),
        }
        merged = merge_results(runs, baseline="caa_mean@size")
        ch = choose("alpha_per", merged, ["ksteer_precond@size", "ksteer_precond@combination"])
        section("alpha_per", merged, ch, acts=True)
    md.extend(
        [
            "## Decisions",
            "",
            *[f"- {c.lever}: **{method_label(c.winner)}**" for c in choices],
            f"- resulting configuration: probe_source={source!r}, method={method!r}, positions={positions!r}",
            "",
        ]
    )
    (out / "steering_levers.md").write_text("\n".join(md))
    path = write_json(
        out,
        "steering_levers.json",
        {
            "calibration_questions": calib,
            "validation_questions": val,
            "choices": [c.to_json() for c in choices],
            "chosen": {"probe_source": source, "method": method, "positions": positions},
            "dac_weights": dac_summary,
            "results": {k: v.to_json() for k, v in results.items()},
        },
        started,
    )
    print("\n".join(md))
    print(f"[levers] wrote {path} and {out / 'steering_levers.md'}")


if __name__ == "__main__":
    main()
