"""Layer sweep: at which layer should we steer?

For every layer: MLP and linear probe validation accuracy (trained for all layers in one batched
call each); CAA (mean) and K-Steering effect at alphas calibrated to the same coherence budget,
read by a held-out activation evaluator ``--eval-gap`` layers after the steering layer (capped at
the last layer; such layers are flagged and left out of the choice), on the calibration questions
(the layer is chosen on these) and on the test questions (reported beside them), and on generated
text for a small test subset. Writes layer_sweep.json and layer_sweep.png, and recommends a layer
with the reason.

    python analysis/layer_sweep.py [--fast] [--layers 6,12,18] [--eval-gap 4] [--n-calib 24]
        [--out DIR] [--work DIR] [any PipelineConfig option, see --help]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common import StudyOptions, parse, start, write_json

from ks_lens.analysis.sweep import (
    DEFAULT_EVAL_GAP,
    LayerAccuracy,
    LayerRecord,
    evaluator_placement,
    layer_sweep,
    probe_accuracy_by_layer,
    recommend,
    train_evaluators,
)
from ks_lens.comparison import ComparisonConfig
from ks_lens.pipeline import PipelineConfig
from ks_lens.probes import ProbeConfig


def plot(
    out: Path, accuracy: list[LayerAccuracy], sweep: list[LayerRecord], recommended: int
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.2))
    ax = axes[0]
    ax.plot([r.layer for r in accuracy], [r.mlp_val_accuracy for r in accuracy], "o-", label="MLP")
    ax.plot(
        [r.layer for r in accuracy],
        [r.linear_val_accuracy for r in accuracy],
        "s--",
        label="linear probe",
    )
    ax.set(
        xlabel="layer",
        ylabel="validation accuracy",
        title="Probe accuracy (prompt activations)",
        ylim=(0, 1.02),
    )
    ax.legend()
    for ax, section, title in (
        (axes[1], "calibration", "Activation evaluator, calibration questions (chooses)"),
        (axes[2], "test", "Activation evaluator, test questions"),
        (axes[3], "text", "Text evaluator (generated test answers)"),
    ):
        for method, style in (("unsteered", ":"), ("caa_mean", "-"), ("ksteer", "-")):
            for k, marker in ((1, "o"), (2, "s")):
                pts = [
                    (rec.layer, r.target_prob.estimate)
                    for rec in sweep
                    for r in getattr(rec, section)
                    if r.method == method and r.k == k
                ]
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        linestyle=style,
                        marker=marker,
                        ms=4,
                        label=f"{method} k={k}",
                    )
        capped = [rec.layer for rec in sweep if rec.capped]
        if capped:
            ax.axvspan(min(capped) - 0.5, max(capped) + 0.5, color="grey", alpha=0.12, lw=0)
        ax.axvline(recommended, color="grey", lw=1, ls="--")
        ax.set(xlabel="steering layer", ylabel="mean target probability", title=title)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.suptitle(
        "Layer sweep at matched coherence (alpha calibrated per layer and method; evaluator "
        "reads steering layer + gap, shaded: gap capped at the last layer)"
    )
    fig.tight_layout()
    path = out / "layer_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class SweepOptions(StudyOptions):
    """The study's options: the pipeline's (``--n-calib``: calibration questions for the alphas
    and the layer choice, 24 in a full run) and the sweep's own."""

    layers: tuple[int, ...] | None = None  # layers to sweep (None: all; --fast: three)
    # the evaluator reads this many layers after the steering layer
    eval_gap: int = DEFAULT_EVAL_GAP


def main() -> None:
    opts = parse(
        SweepOptions,
        __doc__.splitlines()[0],
        "runs/analysis/layer_sweep",
        full=PipelineConfig(n_calib=24),
    )
    out, setup, started = start(opts)
    n = int(setup.model.cfg.n_layers)
    if opts.layers:
        layers = list(opts.layers)
    elif opts.fast:
        layers = sorted({max(0, setup.layer - 6), setup.layer, min(n - 1, setup.layer + 6)})
    else:
        layers = list(range(n))
    assert setup.train_store is not None  # common.setup_from_options prepares both sources
    acts = setup.train_store.load()
    mlps, _, accuracy = probe_accuracy_by_layer(acts, mlp=ProbeConfig(seed=opts.config.seed))
    placements = [evaluator_placement(layer, n, opts.eval_gap) for layer in layers]
    eval_layers = sorted({pl.eval_layer for pl in placements})
    evaluators = train_evaluators(
        setup.evaluator_store.load(layers=eval_layers),
        placements,
        config=ProbeConfig(hidden=256, seed=opts.config.seed + 1),
    )
    config = ComparisonConfig(
        methods=("caa_mean", "ksteer"),
        sizes=(1, 2),
        calibration_metric="first_token_kl",
        kl_budget=0.5,
        act_combos_per_size=1 if opts.fast else 3,
        curve_factors=(1.0,),
        max_new_tokens=8 if opts.fast else 24,
        calib_bisect_steps=2 if opts.fast else 3,
        n_resamples=setup.config.comparison.n_resamples,
    )
    n_calib = setup.config.n_calib  # 24 by default, 4 with --fast
    calib_questions = setup.questions("calibration", n_calib)
    sweep = layer_sweep(
        setup.model,
        acts,
        evaluators=evaluators,
        text_evaluator=setup.text_evaluator,
        layers=layers,
        calib_questions=calib_questions,
        test_questions=setup.questions("test", 8 if opts.fast else 24),
        text_questions=setup.questions("test", 4 if opts.fast else 6),
        config=config,
        eval_gap=opts.eval_gap,
        probes=mlps,
    )
    rec = recommend(accuracy, sweep)
    fig = plot(out, accuracy, sweep, rec.layer)
    path = write_json(
        out,
        "layer_sweep.json",
        {
            "model": setup.model.cfg.model_name,
            "layers": layers,
            "eval_gap": opts.eval_gap,
            "evaluators": {
                str(layer): {
                    "hook_name": ev.hook_name,
                    "val_accuracy": ev.metrics["val_accuracy"],
                }
                for layer, ev in sorted(evaluators.items())
            },
            "n_calib_questions": len(calib_questions),
            "text_evaluator": repr(setup.text_evaluator),
            "comparison_config": config.to_json(),
            "probe_accuracy": [a.to_json() for a in accuracy],
            "sweep": [r.to_json() for r in sweep],
            "recommended_layer": rec.layer,
            "reason": rec.reason,
            "recommendation": rec.to_json(),
            "figure": fig.name,
        },
        started,
    )
    print(f"recommended {rec.reason}\nwrote {path} and {fig}")


if __name__ == "__main__":
    main()
