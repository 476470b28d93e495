"""``ks-lens demo``: the whole pipeline on the embedded default model and the shipped tones.

collect (prompt mode: train split; evaluator split with single and two-tone instructions; the
gold tone texts re-encoded without instruction) -> train the steering probe, CAA vectors and the
held-out evaluators (multi-label activation evaluator, response-activation evaluator, and the
model-independent text evaluator on the gold texts) -> calibrate alpha per method on the
calibration split -> evaluate on the test split: activation level at the calibrated alpha, and
generated text at several alphas per method (trade-off curves, equal-KL headline) ->
``report.json``, ``report.md`` and PNG figures.

Every intermediate artefact is saved under ``--out``; activation stores resume, so a rerun after
an interruption continues where it stopped. ``--fast`` is a small smoke run (CI). ``--seeds N``
repeats everything (splits, probes, evaluators, calibration) with N seeds and reports mean ± sd.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

from ks_lens.cli import paper
from ks_lens.cli.options import PipelineOptions, given, parse_pipeline_options
from ks_lens.cli.presets import PRESET_OPTION, apply_preset, get_preset, preset_in, presets_help
from ks_lens.comparison import METHODS, ComparisonResult, method_label
from ks_lens.compat import versions
from ks_lens.datasets import load_dataset
from ks_lens.errors import ConfigError, Interrupted, KsLensError
from ks_lens.io import atomic_write_bytes, atomic_write_json
from ks_lens.memory import Estimate
from ks_lens.models import model_device, model_signature
from ks_lens.pipeline import (
    PipelineConfig,
    Setup,
    eval_gap_note,
    prepare,
    probe_source_text,
)
from ks_lens.report import render_summary, seeds_summary, write_report
from ks_lens.utils import git_commit

log = logging.getLogger(__name__)


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _evaluator_lines(setup: Setup) -> dict[str, str]:
    ev, resp, probe = setup.evaluator, setup.response_evaluator, setup.probe
    chance = 1 / len(setup.dataset.labels)
    lines = {}
    validity = setup.text_evaluator.validity
    if validity is not None:
        for name, sc in (
            ("question-grouped CV", validity.question_cv),
            ("leave-one-writer-out", validity.writer_cv),
        ):
            if sc is None:
                continue
            lines[f"text evaluator, gold texts, {name}"] = (
                f"{validity.n_texts} texts, {sc.n_folds} folds: single-label accuracy "
                f"{sc.single_accuracy:.3f}, mean per-label AUC {sc.mean_auc:.3f}, two-label both in "
                f"top 2 {_rate(sc.two_tone_top2)} ({sc.n_two}), three-label all in top 3 "
                f"{_rate(sc.three_tone_top3)} ({sc.n_three})"
            )
    note = eval_gap_note(setup.config, setup.layer, setup.eval_layer)
    lines["activation evaluator"] = (
        f"`{ev.hook_name}`, MLP h={ev.config.hidden}, evaluator split with single and two-label "
        f"instructions: held-out single-label accuracy {ev.metrics['val_accuracy']:.3f}, two-label "
        f"both-in-top-2 {ev.metrics.get('val_multi_topk_rate', float('nan')):.3f} "
        f"({ev.metrics.get('n_val_multi', 0)} held-out combined prompts)"
        + (f". **Note: {note}**" if note else "")
    )
    lines["response-activation evaluator"] = (
        f"`{resp.hook_name}` (best layer on held-out gold questions), gold texts re-encoded without "
        f"instruction: single-label accuracy {resp.metrics['val_accuracy']:.3f} (chance {chance:.3f}), "
        f"multi-label all-in-top-k {resp.metrics.get('val_multi_topk_rate', float('nan')):.3f}"
    )
    lines["steering probe (not an evaluator)"] = (
        f"`{probe.hook_name}`, {probe_source_text(setup.config)}: validation accuracy "
        f"{probe.metrics['val_accuracy']:.3f}"
    )
    return lines


def _info(setup: Setup, cfg: PipelineConfig, command: str, commit: str) -> dict[str, Any]:
    validity = setup.text_evaluator.validity
    return {
        "model": setup.model.cfg.model_name,
        "model_info": model_signature(setup.model),
        "command": command,
        "commit": commit,
        "versions": versions(),
        "device": str(model_device(setup.model)),
        "seed": cfg.seed,
        "dataset": {
            "name": setup.dataset.name,
            "hash": setup.dataset.content_hash(),
            "splits": setup.splits.sizes(),
            "split_seed": cfg.seed,
            "n_gold_texts": len(setup.gold_texts),
        },
        "layer": setup.layer,
        "eval_layer": setup.eval_layer,
        "eval_layer_note": eval_gap_note(cfg, setup.layer, setup.eval_layer),
        "probe_source": probe_source_text(cfg),
        "steering_hook": setup.probe.hook_name,
        "eval_source": setup.eval_questions(1)[1],
        "evaluators": _evaluator_lines(setup),
        "text_evaluator_validity": None if validity is None else validity.to_json(),
        "activation_evaluator_metrics": setup.evaluator.metrics,
        "response_evaluator_metrics": {
            "hook_name": setup.response_evaluator.hook_name,
            **setup.response_evaluator.metrics,
        },
        "steering_probe_metrics": setup.probe.metrics,
        # ksteer_linear's probe (None when no method needs it)
        "linear_probe_metrics": None
        if setup.kit.linear_probe is None
        else setup.kit.linear_probe.metrics,
        # what the instructed reference row asks for (each target's instruction; several joined)
        "instructions": setup.dataset.instructions if cfg.comparison.instructed else None,
        "demo_config": dataclasses.asdict(cfg),
        "stores": {
            "train": None if setup.train_store is None else str(setup.train_store.path),
            "evaluator": str(setup.evaluator_store.path),
            "gold_judge": str(setup.response_store.path),
            "gold_steer": None if setup.steer_store is None else str(setup.steer_store.path),
        },
        "timings": dict(setup.timings),
    }


def run_demo(
    cfg: PipelineConfig,
    out: str | Path,
    *,
    seeds: int = 1,
    command: str = "ks-lens demo",
    progress: bool = True,
    memory_check: bool = True,
    sweep: SweepPlan | None = None,
    on_estimate: Callable[[Estimate], None] | None = None,
) -> list[ComparisonResult]:
    """Run the pipeline once per seed (``cfg.seed``, ``cfg.seed + 1``, ...); returns the results.

    The first seed's report goes to ``out``; further seeds to ``out/seed-N``. With several
    seeds, the first report also gets the mean ± sd of the estimates across seeds. With a
    ``sweep``, each method steers at its own layer, chosen by a layer sweep on the calibration
    questions (:mod:`ks_lens.cli.paper`; ``paper.json`` and ``paper.md`` beside the report).
    ``on_estimate`` receives the run's estimated memory and time before any collection.
    """
    if seeds < 1:
        raise ConfigError("seeds must be at least 1")
    cfg.validate()
    out = Path(out)
    commit = git_commit()  # the code that runs: read before anything else can change it
    results: list[ComparisonResult] = []
    first: tuple[ComparisonResult, dict[str, Any]] | None = None
    for i in range(seeds):
        s = cfg.seed + i
        cfg_s = replace(cfg, seed=s)  # the comparison takes the seed too (PipelineConfig)
        out_s = out if i == 0 else out / f"seed-{s}"
        t_start = time.perf_counter()
        extra = _sweep_kwargs(cfg_s, sweep)
        setup = prepare(
            cfg_s,
            out_s,
            progress=progress,
            memory_check=memory_check,
            on_estimate=on_estimate if i == 0 else None,
            **extra,
        )
        info = _info(setup, cfg_s, command, commit)
        if sweep is None:
            result = setup.compare(progress=progress)
        else:
            protocol = paper.run_paper(
                setup, layers=sweep.layers, points=sweep.points, progress=progress
            )
            result = protocol.result
            info.update(paper_info(protocol))
            info["timings"].update(protocol.timings)
            write_paper(protocol, out_s)
        info["timings"]["total_s"] = time.perf_counter() - t_start
        paths = write_report(result, info, out_s)
        log.info(
            f"[ks-lens demo] seed {s}: wrote {paths['json']}, {paths['markdown']} and "
            f"{len(paths) - 2} figures in {info['timings']['total_s']:.0f} s"
        )
        results.append(result)
        if first is None:
            first = (result, info)
    if seeds > 1 and first is not None:
        result, info = first
        info["seeds"] = seeds_summary(results)
        write_report(result, info, out)
    return results


@dataclass(frozen=True)
class SweepPlan:
    """The layers a per-method layer sweep tries (``layers``, or ``points`` spread over the
    depth when empty; :func:`ks_lens.cli.paper.sweep_layers`)."""

    layers: tuple[int, ...] = ()
    points: int = 5


def _sweep_kwargs(cfg: PipelineConfig, sweep: SweepPlan | None) -> dict[str, Any]:
    """What :func:`~ks_lens.pipeline.prepare` needs for a sweep: its layers in the stores and
    its work in the estimate."""
    if sweep is None:
        return {}
    labels = load_dataset(cfg.dataset).labels
    return dict(
        study_layers=paper.study_layers(sweep.layers, sweep.points),
        extra_work=paper.extra_work(cfg, labels, sweep.layers, sweep.points),
    )


class _Estimated(Exception):
    """Stops :func:`estimate_demo`'s setup once the estimate is made."""

    def __init__(self, estimate: Estimate):
        super().__init__("estimated")
        self.estimate = estimate


def estimate_demo(cfg: PipelineConfig, *, sweep: SweepPlan | None = None) -> Estimate:
    """The estimated peak memory and time of ``run_demo(cfg, sweep=sweep)`` for one seed: loads
    the model for its shape, collects and writes nothing."""

    def stop(est: Estimate) -> None:
        raise _Estimated(est)

    cfg.validate()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            prepare(cfg, tmp, progress=False, on_estimate=stop, **_sweep_kwargs(cfg, sweep))
        except _Estimated as e:
            return e.estimate
    raise AssertionError("prepare returned without an estimate")  # pragma: no cover


def paper_info(protocol: paper.PaperResult) -> dict[str, Any]:
    """What the report says about a swept run: each method's hook point and layer choice."""
    hooks = ", ".join(
        f"{method_label(m)} at blocks.{r.layer}.hook_resid_post"
        for m, r in protocol.choices.items()
    )
    return {
        "steering_hook": f"each method's own layer ({hooks})",
        "layer": {m: r.layer for m, r in protocol.choices.items()},
        "eval_layer": protocol.eval_layer,
        "eval_layer_note": None,
        "paper": protocol.to_json(),
    }


def write_paper(protocol: paper.PaperResult, out: Path) -> None:
    """``paper.json`` and ``paper.md`` of a swept run in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "paper.json", protocol.to_json())
    atomic_write_bytes(out / "paper.md", paper.render_markdown(protocol).encode())


def print_estimate(est: Estimate, *, starting: bool = True) -> None:
    """Print the run's estimated peak memory and time (before anything is collected)."""
    took = f"{est.seconds:.0f} s" if est.seconds < 120 else f"{est.seconds / 60:.0f} min"
    print(
        f"[ks-lens demo] estimated peak memory {est.peak_mb / 1024:.1f} GiB, time about {took} "
        "on 2 CPU cores (rough, docs/performance.md; a GPU is faster)"
        + ("; starting" if starting else ""),
        flush=True,
    )


def print_summary(result: ComparisonResult) -> None:
    """Print :func:`~ks_lens.report.render_summary` (the headline) on stdout."""
    print("\n" + render_summary(result))


@dataclass(frozen=True)
class DemoOptions(PipelineOptions):
    """Run the whole pipeline (collect, train, calibrate, evaluate, report) and print the headline.

    Every PipelineConfig setting is an option. The comparison's settings drop their
    "comparison." prefix (--kl-budget, --methods); its rules keep theirs (--vanish.floor), and it
    takes --seed and --batch-size from the pipeline. A tuple takes one
    comma-separated argument (--methods caa_mean,ksteer). --fast is a small smoke run (CI): it
    changes the defaults, and options given explicitly still win. ks-lens -q/-v demo: less or
    more progress on stderr.
    """

    out: str = "runs/demo"  # output directory (activation stores resume from it)
    seeds: int = 1  # repeat with this many seeds (seed, seed + 1, ...) and report mean ± sd
    max_questions: int | None = None  # cap the test questions (n_eval and n_gen)
    # refuse a run whose estimated peak memory exceeds the available memory
    memory_check: bool = True
    # a named set of option values (see Presets above); options given explicitly win
    preset: Annotated[str | None, PRESET_OPTION] = None
    # choose each method's steering layer by a layer sweep on the calibration questions
    sweep: bool = False
    sweep_layers: tuple[int, ...] = ()  # layers the sweep tries (empty: sweep_points layers)
    sweep_points: int = 5  # layers spread over the depth when sweep_layers is empty (--fast: 2)
    # print the estimated peak memory and time, then stop (loads the model, computes nothing)
    estimate_only: bool = False


def parse_demo_options(argv: Sequence[str], *, prog: str = "ks-lens demo") -> DemoOptions:
    """``ks-lens demo``'s options from ``argv`` (the arguments after ``demo``); not validated.

    ``--help`` and parse errors exit (codes 0 and 2) as with ``argparse``.
    """
    paragraphs = inspect.cleandoc(DemoOptions.__doc__ or "").split("\n\n")
    paragraphs.append("Methods: " + ", ".join(METHODS))
    paragraphs.append("Presets: " + presets_help())
    description = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    name = preset_in(argv)
    preset = None if name is None else get_preset(name)
    defaults: dict[str, Any] = {"sweep_points": 2} if given(argv, "--fast") else {}
    return parse_pipeline_options(
        DemoOptions,
        argv,
        prog=prog,
        description=description,
        adjust=None if preset is None else (lambda o: apply_preset(o, preset)),
        **defaults,
    )


def config_from_args(opts: DemoOptions) -> PipelineConfig:
    """The demo's :class:`PipelineConfig` from its options, validated (no compute yet)."""
    cfg = opts.config
    if opts.max_questions is not None:
        if opts.max_questions < 1:
            raise ConfigError("--max-questions must be positive")
        cfg = replace(
            cfg,
            n_eval=min(cfg.n_eval, opts.max_questions),
            n_gen=min(cfg.n_gen, opts.max_questions),
        )
    if opts.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    if opts.preset is not None:
        get_preset(opts.preset)
    if opts.sweep_points < 1:
        raise ConfigError(f"--sweep-points must be at least 1, got {opts.sweep_points}")
    if any(L < 0 for L in opts.sweep_layers):
        raise ConfigError(f"--sweep-layers must be layer indices >= 0, got {opts.sweep_layers}")
    if opts.sweep_layers and not opts.sweep:
        raise ConfigError("--sweep-layers needs --sweep (or --preset paper)")
    return cfg.validate()


def saved_summary(out: str | Path) -> str:
    """What a demo run interrupted in ``out`` leaves there, and how to go on: the sentence
    ``ks-lens demo`` prints after Ctrl-C."""
    from ks_lens.activations import ActivationStore
    from ks_lens.io import artifact_format

    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return "nothing was saved"
    stores: list[str] = []
    others = 0
    for meta in sorted(out.rglob("meta.json")):
        found = artifact_format(meta.parent)
        if found == "ks_lens.activation_store":
            try:
                st = ActivationStore(meta.parent)
                done = "complete" if st.complete else f"{st.n_rows_done}/{st.meta['n_rows']} rows"
            except KsLensError:
                done = "damaged, to be redone"
            stores.append(f"{meta.parent.relative_to(out)} ({done})")
        elif found:
            others += 1
    if not stores and not others:
        return "nothing was saved"
    what = [f"{len(stores)} activation store(s): " + ", ".join(stores)] if stores else []
    if others:
        what.append(f"{others} other artefact(s) (probes, vectors, evaluators)")
    return (
        f"{out} holds {'; '.join(what)}; rerun the same command to resume (complete stores are "
        "reused, an incomplete one continues where it stopped)"
    )


def cmd_demo(opts: DemoOptions) -> int:
    cfg = config_from_args(opts)
    command = (
        "ks-lens " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if sys.argv[1:]
        else "ks-lens demo"
    )
    sweep = SweepPlan(opts.sweep_layers, opts.sweep_points) if opts.sweep else None
    if opts.estimate_only:
        print_estimate(estimate_demo(cfg, sweep=sweep), starting=False)
        return 0
    try:
        results = run_demo(
            cfg,
            opts.out,
            seeds=opts.seeds,
            command=command,
            memory_check=opts.memory_check,
            sweep=sweep,
            on_estimate=print_estimate,
        )
    except KeyboardInterrupt:
        raise Interrupted(saved_summary(opts.out)) from None
    print_summary(results[0])
    print(f"\nfull report: {Path(opts.out) / 'report.md'}")
    return 0


__all__ = [
    "DemoOptions",
    "SweepPlan",
    "cmd_demo",
    "config_from_args",
    "estimate_demo",
    "git_commit",
    "parse_demo_options",
    "print_estimate",
    "print_summary",
    "run_demo",
]
