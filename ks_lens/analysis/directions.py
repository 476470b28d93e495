"""Geometry of K-Steering gradient directions versus CAA vectors.

All functions take activations ``x`` ``[n, d_model]`` (e.g. neutral prompts' last tokens at the
probe's layer) and return plain tensors or dataclasses, for notebooks and the
``analysis/geometry.py`` study.

* :func:`step_directions`: each input's unit K-Steering step direction ``-grad L / |grad L|``.
* :func:`direction_stats`: cosines of those directions with a reference (the CAA vector for the
  same targets), their spread, the mean resultant length ``|mean of unit directions|`` (1 for a
  constant direction, ~0 for directions spread over the sphere) and the PCA spectrum
  (:func:`pca_explained`, scikit-learn's ``PCA``).
* :func:`label_gradient_geometry`: per-label gradient norms and the label x label cosine matrix
  (negative entries: behaviours that pull against each other).
* :func:`multistep_rotation`: how the step direction turns over multi-step steering.

A linear probe has a constant gradient, so its step directions are identical for all inputs
(mean resultant length 1, one cosine value): a sanity check the tests use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from jaxtyping import Float

from ks_lens.probes import Probe
from ks_lens.steering.base import SteeringSpec
from ks_lens.steering.ksteer import KSteering, probe_gradients

_EPS = 1e-12


def unit(v: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=_EPS)


def cosine(
    a: Float[torch.Tensor, "... d"], b: Float[torch.Tensor, "... d"]
) -> Float[torch.Tensor, "..."]:
    return (unit(a) * unit(b)).sum(-1)


def step_directions(
    method: KSteering, x: Float[torch.Tensor, "n d"], spec: SteeringSpec
) -> Float[torch.Tensor, "n d"]:
    """Unit direction of each input's first K-Steering step (``-grad``, after combination)."""
    return unit(-method.direction(x, spec))


@dataclass
class DirectionStats:
    cos_to_reference: Float[torch.Tensor, " n"]
    mean_cos: float
    std_cos: float
    mean_resultant_length: float
    pca_explained: Float[
        torch.Tensor, " k"
    ]  # fraction of variance of the unit directions per component

    def to_json(self) -> dict[str, object]:
        return {
            "mean_cos": self.mean_cos,
            "std_cos": self.std_cos,
            "mean_resultant_length": self.mean_resultant_length,
            "pca_explained": [float(v) for v in self.pca_explained[:10]],
            "cos_quantiles": [
                float(q)
                for q in torch.quantile(
                    self.cos_to_reference, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
                )
            ],
        }


def pca_explained(x: Float[torch.Tensor, "n d"], n_components: int) -> Float[torch.Tensor, " k"]:
    """Explained-variance ratios of the first ``n_components`` principal components of ``x``
    (``sklearn.decomposition.PCA(svd_solver="full")``, in ``x``'s float precision; ``k`` is
    ``min(n_components, n, d)``)."""
    from sklearn.decomposition import PCA

    k = min(n_components, *x.shape)
    pca = PCA(n_components=k, svd_solver="full").fit(x.detach().cpu().numpy())
    return torch.from_numpy(pca.explained_variance_ratio_.copy())


def direction_stats(
    directions: Float[torch.Tensor, "n d"],
    reference: Float[torch.Tensor, " d"],
    *,
    n_components: int = 10,
) -> DirectionStats:
    """Cosines of unit ``directions`` with ``reference``, their mean resultant length, and the
    PCA spectrum of the unit directions (``sklearn.decomposition.PCA``, exact SVD): the share of
    variance of the first ``min(n_components, n, d)`` components (all zeros when the
    directions do not vary, empty for a single direction)."""
    u = unit(directions.float())
    cos = cosine(u, reference.float().expand_as(u))
    mrl = float(u.mean(0).norm())
    centred = u - u.mean(0, keepdim=True)
    if u.shape[0] > 1:
        k = min(n_components, *u.shape)
        tot = float(centred.pow(2).sum())
        explained = pca_explained(u, k) if tot > 1e-12 else torch.zeros(k)
    else:
        explained = torch.zeros(0)
    return DirectionStats(
        cos, float(cos.mean()), float(cos.std()) if len(cos) > 1 else 0.0, mrl, explained
    )


@dataclass
class LabelGeometry:
    labels: tuple[str, ...]
    norms: Float[torch.Tensor, " k"]  # mean per-input gradient norm of each label's logit
    cos_matrix: Float[torch.Tensor, "k k"]  # mean over inputs of cos(grad f_i, grad f_j)
    cos_per_input: Float[torch.Tensor, "n k k"]

    def conflicts(self, threshold: float = 0.0) -> list[tuple[str, str, float]]:
        """Label pairs whose gradients point against each other on average (cos < threshold)."""
        out = []
        k = len(self.labels)
        for i in range(k):
            for j in range(i + 1, k):
                c = float(self.cos_matrix[i, j])
                if c < threshold:
                    out.append((self.labels[i], self.labels[j], c))
        return sorted(out, key=lambda t: t[2])


def label_gradient_geometry(
    probe: Probe, x: Float[torch.Tensor, "n d"], labels: Sequence[str] | None = None
) -> LabelGeometry:
    """Gradients of each label's raw logit: mean norms and pairwise cosines."""
    names = tuple(labels or probe.label_names)
    idx = probe.label_indices(names)
    p = probe.mean
    g, _ = probe_gradients(probe, x.to(device=p.device, dtype=p.dtype), idx)  # [k, n, d]
    g = rearrange(g, "label n d -> n label d")
    u = unit(g)
    cos = u @ u.transpose(1, 2)  # [n, k, k]
    return LabelGeometry(names, g.norm(dim=-1).mean(0).cpu(), cos.mean(0).cpu(), cos.cpu())


@dataclass
class Rotation:
    cos_to_first: Float[torch.Tensor, "n steps"]
    cos_to_previous: Float[torch.Tensor, "n steps"]  # first column is 1 by definition
    step_norms: Float[torch.Tensor, "n steps"]


def multistep_rotation(
    method: KSteering, x: Float[torch.Tensor, "n d"], spec: SteeringSpec
) -> Rotation:
    """Directions of each step along a multi-step K-Steering trajectory."""
    traj = method.trajectory(x, spec)
    steps = [traj[k + 1] - traj[k] for k in range(len(traj) - 1)]
    first = steps[0]
    to_first = torch.stack([cosine(s, first) for s in steps], dim=1)
    prev = [torch.ones(x.shape[0], device=first.device)] + [
        cosine(steps[k], steps[k - 1]) for k in range(1, len(steps))
    ]
    return Rotation(
        to_first.cpu(),
        torch.stack(prev, dim=1).cpu(),
        torch.stack([s.norm(dim=-1) for s in steps], 1).cpu(),
    )
