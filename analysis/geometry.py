"""Gradient geometry: K-Steering step directions versus CAA vectors.

For each target combination and layer: the cosine between each input's K-Steering step direction
and the CAA vector for the same targets (its distribution says how input-dependent K-Steering
is; a linear probe's gradient is constant and gives a single value, the sanity check), the mean
resultant length and PCA spectrum of the directions; the per-label gradient cosine matrix and
norms by depth; and how the direction rotates over multi-step steering. Inputs are neutral
test-split questions (no instruction), last token.

    python analysis/geometry.py [--fast] [--out DIR] [--work DIR]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from common import StudyOptions, parse, save_figure, start, write_json

from ks_lens.activations import collect_activations
from ks_lens.analysis.directions import (
    direction_stats,
    label_gradient_geometry,
    multistep_rotation,
    step_directions,
    unit,
)
from ks_lens.comparison import label_combinations
from ks_lens.probes import ProbeConfig, train_probes
from ks_lens.steering import KSteering, SteeringSpec, SteeringVectors


def main() -> None:
    opts = parse(StudyOptions, __doc__.splitlines()[0], "runs/analysis/geometry")
    out, setup, started = start(opts)
    model, n = setup.model, int(setup.model.cfg.n_layers)
    layers = (
        sorted({max(0, setup.layer - 6), setup.layer, min(n - 1, setup.layer + 6)})
        if opts.fast
        else sorted(set(range(0, n, 3)) | {setup.layer, n - 1})
    )
    assert setup.train_store is not None  # common.setup_from_options prepares both sources
    train = setup.train_store.load(layers=layers)
    mlps = train_probes(
        train, layers=layers, config=ProbeConfig(seed=opts.config.seed), progress=False
    )
    lins = train_probes(
        train,
        layers=layers,
        config=ProbeConfig(architecture="linear", seed=opts.config.seed),
        progress=False,
    )
    neutral = collect_activations(
        model,
        setup.part("test", 12 if opts.fast else 64),
        mode="neutral",
        layers=layers,
        progress=False,
    )
    labels = list(setup.dataset.labels)
    combos = label_combinations(labels, (1, 2, 3))
    per_layer: list[dict[str, Any]] = []
    steer_layer_dirs: dict[tuple[str, ...], torch.Tensor] = {}
    steer_layer_cos: dict[tuple[str, ...], list[float]] = {}
    for layer in layers:
        x = neutral.at(layer)
        vecs = SteeringVectors.fit(train, layer)
        rec: dict[str, Any] = {"layer": layer, "combos": []}
        for combo in combos:
            spec = SteeringSpec(combo, (), 1.0)
            caa = vecs.combine(combo, how="mean")
            d_mlp = step_directions(KSteering(mlps[layer]), x, spec)
            d_lin = step_directions(KSteering(lins[layer]), x, spec)
            s_mlp, s_lin = direction_stats(d_mlp, caa), direction_stats(d_lin, caa)
            rec["combos"].append(
                {
                    "targets": list(combo),
                    "mlp": s_mlp.to_json(),
                    "linear": s_lin.to_json(),
                    "cos_mlp_vs_linear_mean": float((unit(d_mlp) * unit(d_lin)).sum(-1).mean()),
                }
            )
            if layer == setup.layer:
                steer_layer_dirs[combo] = d_mlp
                steer_layer_cos[combo] = s_mlp.cos_to_reference.tolist()
        geo = label_gradient_geometry(mlps[layer], x)
        rec["label_cos_matrix"] = geo.cos_matrix.tolist()
        rec["label_grad_norms"] = dict(zip(labels, geo.norms.tolist(), strict=True))
        rec["conflicts"] = geo.conflicts(-0.05)
        rec["probe_val_accuracy"] = mlps[layer].metrics["val_accuracy"]
        per_layer.append(rec)
        print(
            f"layer {layer:2d}: mean cos(K-step, CAA) single={_mean(rec, 1):+.3f} pair={_mean(rec, 2):+.3f} "
            f"triple={_mean(rec, 3):+.3f}; conflicts {rec['conflicts'][:2]}"
        )

    # multi-step rotation at the steering layer; alpha: the first step moves 10% of |x|
    x = neutral.at(setup.layer)
    probe = mlps[setup.layer]
    rotation = []
    for combo in [c for c in combos if len(c) in (2, 3)][:: (10 if opts.fast else 3)]:
        g = KSteering(probe).direction(x, SteeringSpec(combo, (), 1.0))
        alpha = float(0.1 * x.norm(dim=-1).mean() / g.norm(dim=-1).mean().clamp(min=1e-12))
        rot = multistep_rotation(
            KSteering(probe, steps=5, decay=0.95), x, SteeringSpec(combo, (), alpha)
        )
        rotation.append(
            {
                "targets": list(combo),
                "alpha": alpha,
                "cos_to_first": rot.cos_to_first.mean(0).tolist(),
                "cos_to_previous": rot.cos_to_previous.mean(0).tolist(),
                "step_norms": rot.step_norms.mean(0).tolist(),
            }
        )
    figs = plot(out, per_layer, steer_layer_dirs, steer_layer_cos, rotation, labels, setup.layer)
    path = write_json(
        out,
        "geometry.json",
        {
            "model": model.cfg.model_name,
            "layers": layers,
            "steering_layer": setup.layer,
            "n_inputs": len(neutral),
            "per_layer": per_layer,
            "rotation": rotation,
            "figures": [f.name for f in figs],
        },
        started,
    )
    print(f"wrote {path} and {len(figs)} figures")


def _mean(rec: dict[str, Any], k: int) -> float:
    vals = [c["mlp"]["mean_cos"] for c in rec["combos"] if len(c["targets"]) == k]
    return sum(vals) / len(vals)


def plot(
    out: Path,
    per_layer: list[dict[str, Any]],
    dirs: dict[tuple[str, ...], torch.Tensor],
    cos_at_steer: dict[tuple[str, ...], list[float]],
    rotation: list[dict[str, Any]],
    labels: list[str],
    steer_layer: int,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # 1. cosine distributions at the steering layer
    rec = next(r for r in per_layer if r["layer"] == steer_layer)
    combos = (
        [c for c in dirs if len(c) == 1]
        + [c for c in dirs if len(c) == 2][:8]
        + [c for c in dirs if len(c) == 3][:8]
    )
    vecs = {tuple(c["targets"]): c for c in rec["combos"]}
    fig, ax = plt.subplots(figsize=(max(10, 0.45 * len(combos)), 4.5))
    ax.violinplot([cos_at_steer[c] for c in combos], showmedians=True)
    lin = [vecs[c]["linear"]["mean_cos"] for c in combos]
    ax.scatter(
        range(1, len(combos) + 1),
        lin,
        marker="x",
        color="k",
        zorder=3,
        label="linear probe (constant direction)",
    )
    ax.set_xticks(range(1, len(combos) + 1))
    ax.set_xticklabels(["+".join(c) for c in combos], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("cos(K-Steering step, CAA vector)")
    ax.set_title(
        f"Input dependence of K-Steering directions at layer {steer_layer} (violins: MLP probe, one value per input)"
    )
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save_figure(fig, out / "cosine_violins.png"))

    # 2. label cosine matrices by depth
    n = len(per_layer)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, per_layer, strict=False):
        ax.set_visible(True)
        im = ax.imshow(r["label_cos_matrix"], vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(labels)))
        ax.set_yticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, fontsize=7)
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_title(f"layer {r['layer']}", fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7, label="mean cos(grad f_i, grad f_j)")
    fig.suptitle("Per-label probe-gradient cosines (negative: behaviours pull against each other)")
    paths.append(save_figure(fig, out / "label_cosines.png"))

    # 3. by depth: mean cosine to CAA, mean resultant length, gradient norms
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    layers = [r["layer"] for r in per_layer]
    for k, color in zip((1, 2, 3), ("C0", "C1", "C2"), strict=True):
        axes[0].plot(
            layers, [_mean(r, k) for r in per_layer], "o-", color=color, label=f"MLP, {k} target(s)"
        )
        axes[0].plot(
            layers,
            [
                sum(c["linear"]["mean_cos"] for c in r["combos"] if len(c["targets"]) == k)
                / sum(1 for c in r["combos"] if len(c["targets"]) == k)
                for r in per_layer
            ],
            "x--",
            color=color,
            label=f"linear, {k}",
        )
        axes[1].plot(
            layers,
            [
                sum(
                    c["mlp"]["mean_resultant_length"] for c in r["combos"] if len(c["targets"]) == k
                )
                / sum(1 for c in r["combos"] if len(c["targets"]) == k)
                for r in per_layer
            ],
            "o-",
            label=f"{k} target(s)",
        )
    axes[0].set(xlabel="layer", ylabel="mean cos(K-step, CAA)", title="Agreement with CAA")
    axes[1].set(
        xlabel="layer",
        ylabel="mean resultant length",
        title="Direction consistency across inputs (1 = constant)",
    )
    for lab in labels:
        axes[2].plot(layers, [r["label_grad_norms"][lab] for r in per_layer], "o-", label=lab)
    axes[2].set(
        xlabel="layer", ylabel="mean |grad f_label|", title="Per-label gradient norms", yscale="log"
    )
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(save_figure(fig, out / "by_depth.png"))

    # 4. PCA scatter of single-target step directions, coloured by label
    from sklearn.decomposition import PCA

    singles = [c for c in dirs if len(c) == 1]
    allv = torch.cat([unit(dirs[c]) for c in singles])
    pca = PCA(n_components=2, svd_solver="full").fit(allv.numpy())
    fig, ax = plt.subplots(figsize=(6, 5))
    for c in singles:
        z = pca.transform(unit(dirs[c]).numpy())
        ax.scatter(z[:, 0], z[:, 1], s=12, label=c[0])
    share = pca.explained_variance_ratio_
    ax.set(
        xlabel=f"PC 1 ({share[0]:.0%} of variance)",
        ylabel=f"PC 2 ({share[1]:.0%} of variance)",
        title=f"K-Steering step directions at layer {steer_layer} (one point per input)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save_figure(fig, out / "pca_directions.png"))

    # 5. rotation over multi-step steering
    if rotation:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in rotation:
            ax.plot(
                range(1, len(r["cos_to_first"]) + 1),
                r["cos_to_first"],
                "o-",
                ms=3,
                label="+".join(r["targets"]),
            )
        ax.set(
            xlabel="step",
            ylabel="mean cos(step k, step 1)",
            title="Rotation of the step direction over 5 steps",
        )
        ax.legend(fontsize=6)
        fig.tight_layout()
        paths.append(save_figure(fig, out / "multistep_rotation.png"))
    return paths


if __name__ == "__main__":
    main()
