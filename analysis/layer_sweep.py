"""Layer sweep: at which layer should we steer?

For every layer: MLP and linear probe validation accuracy (trained for all layers in one batched
call each); CAA (mean) and K-Steering effect at alphas calibrated to the same coherence budget,
read by one held-out evaluator at the last layer (activation level) and on generated text for a
small subset; the coherence cost. Writes layer_sweep.json and layer_sweep.png, and recommends a
layer with the reason.

    python analysis/layer_sweep.py [--fast] [--layers 6,12,18] [--out DIR] [--work DIR]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import parser, start, write_json

from ks_lens.analysis.sweep import layer_sweep, probe_accuracy_by_layer, recommend_layer
from ks_lens.comparison import ComparisonConfig
from ks_lens.probes import ProbeConfig, train_probe


def plot(
    out: Path, accuracy: list[dict[str, Any]], sweep: list[dict[str, Any]], recommended: int
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    ax.plot(
        [r["layer"] for r in accuracy],
        [r["mlp_val_accuracy"] for r in accuracy],
        "o-",
        label="MLP probe",
    )
    ax.plot(
        [r["layer"] for r in accuracy],
        [r["linear_val_accuracy"] for r in accuracy],
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
        (axes[1], "activation", "Held-out evaluator (activation level)"),
        (axes[2], "text", "Text evaluator (generated text)"),
    ):
        for method, style in (("unsteered", ":"), ("caa_mean", "-"), ("ksteer", "-")):
            for k, marker in ((1, "o"), (2, "s")):
                pts = [
                    (rec["layer"], r["target_prob"]["estimate"])
                    for rec in sweep
                    for r in rec[section]
                    if r["method"] == method and r["k"] == k
                ]
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        linestyle=style,
                        marker=marker,
                        ms=4,
                        label=f"{method} k={k}",
                    )
        ax.axvline(recommended, color="grey", lw=1, ls="--")
        ax.set(xlabel="steering layer", ylabel="mean target probability", title=title)
        ax.legend(fontsize=7)
    fig.suptitle("Layer sweep at matched coherence (alpha calibrated per layer and method)")
    fig.tight_layout()
    path = out / "layer_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = parser(__doc__.splitlines()[0], "runs/analysis/layer_sweep")
    p.add_argument(
        "--layers", default=None, help="comma-separated layers (default: all; --fast: three)"
    )
    args = p.parse_args()
    out, setup, started = start(args)
    n = int(setup.model.cfg.n_layers)
    if args.layers:
        layers = [int(x) for x in args.layers.split(",")]
    elif args.fast:
        layers = sorted({max(0, setup.layer - 6), setup.layer, min(n - 1, setup.layer + 6)})
    else:
        layers = list(range(n))
    acts = setup.train_store.load()
    mlps, _, accuracy = probe_accuracy_by_layer(acts, mlp=ProbeConfig(seed=args.seed))
    last = n - 1
    evaluator = train_probe(
        setup.evaluator_store.load(layers=[last]),
        last,
        config=ProbeConfig(hidden=256, seed=args.seed + 1),
    )
    config = ComparisonConfig(
        methods=("caa_mean", "ksteer"),
        sizes=(1, 2),
        calibration_metric="first_token_kl",
        kl_budget=0.5,
        act_combos_per_size=1 if args.fast else 3,
        curve_factors=(1.0,),
        max_new_tokens=8 if args.fast else 24,
        calib_bisect_steps=2 if args.fast else 3,
        n_resamples=setup.config.comparison.n_resamples,
    )
    cfg = setup.config
    sweep = layer_sweep(
        setup.model,
        acts,
        evaluator=evaluator,
        text_evaluator=setup.text_evaluator,
        layers=layers,
        calib_questions=setup.questions("calibration", cfg.n_calib),
        test_questions=setup.questions("test", 8 if args.fast else 24),
        text_questions=setup.questions("test", 4 if args.fast else 6),
        config=config,
        probes=mlps,
    )
    layer, reason = recommend_layer(accuracy, sweep)
    fig = plot(out, accuracy, sweep, layer)
    path = write_json(
        out,
        "layer_sweep.json",
        {
            "model": setup.model.cfg.model_name,
            "layers": layers,
            "evaluator": {
                "hook_name": evaluator.hook_name,
                "val_accuracy": evaluator.metrics["val_accuracy"],
            },
            "text_evaluator": repr(setup.text_evaluator),
            "comparison_config": config.to_json(),
            "probe_accuracy": accuracy,
            "sweep": sweep,
            "recommended_layer": layer,
            "reason": reason,
            "figure": fig.name,
        },
        started,
    )
    print(f"recommended {reason}\nwrote {path} and {fig}")


if __name__ == "__main__":
    main()
