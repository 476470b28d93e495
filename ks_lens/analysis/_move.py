"""The geometry of a steerer's move toward its targets, the first steps of :func:`~ks_lens.analysis.diagnosis.diagnose`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float

from ks_lens.probes import Probe
from ks_lens.steering import CAA, KSteering, SteeringSpec
from ks_lens.steering.ksteer import probe_gradients


class MoveGeometry(NamedTuple):
    """Per target (``k`` of them): the geometry of one method's move and what to read it with."""

    cos: torch.Tensor  # [k, k] cosines between the targets' gradients (vectors)
    norms: torch.Tensor  # [k] gradient (vector) norms
    push: torch.Tensor  # [k] the move along each target's unit gradient (vector)
    to_step: torch.Tensor  # [k] cosine of each target's gradient (vector) with the move
    accuracy: list[float]  # the steering probe's validation accuracy per target (NaN: none)
    readout: Probe | None  # the probe read along the trajectory
    traj: list[torch.Tensor]  # the input after 0, 1, ... steps ([]: nothing to read)
    move: torch.Tensor  # the total move x_T - x_0


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def ksteer_move(
    steerer: KSteering,
    x: Float[torch.Tensor, "n d"],
    targets: tuple[str, ...],
    spec: SteeringSpec,
    readout: Probe | None,
) -> MoveGeometry:
    """K-Steering: its probe's per-target gradients at ``x`` against its whole trajectory."""
    probe = steerer.probe
    readout = readout or probe
    ref = probe.mean
    x = x.detach().to(device=ref.device, dtype=ref.dtype)
    traj = steerer.trajectory(x, spec)  # its own steps, decay, objective, combine, step_norm
    move = traj[-1] - traj[0]  # [n, d]
    g, _ = probe_gradients(probe, x, probe.label_indices(targets))  # [k, n, d]
    u = unit(g)
    cos_in = torch.einsum("ind,jnd->nij", u, u)  # [n, k, k]
    cos = cos_in.mean(0)
    norms = g.norm(dim=-1).mean(1)  # [k]
    push = (u * move.unsqueeze(0)).sum(-1).mean(1)  # [k]
    to_step = (u * unit(move).unsqueeze(0)).sum(-1).mean(1)
    accs = probe.metrics.get("val_per_label_accuracy", {}) or {}
    accuracy = [float(accs.get(lab, float("nan"))) for lab in targets]
    return MoveGeometry(cos, norms, push, to_step, accuracy, readout, traj, move)


def caa_move(
    steerer: CAA,
    x: Float[torch.Tensor, "n d"],
    targets: tuple[str, ...],
    spec: SteeringSpec,
    alpha: float,
    readout: Probe | None,
) -> MoveGeometry:
    """CAA: its per-target vectors against the combined one (one step, read only with a
    ``readout``)."""
    vecs = steerer.vectors.vectors[steerer.vectors.indices(targets)].double()  # [k, d]
    v = steerer.vector(spec).double()  # the combined vector, the method's own combine
    uv = unit(vecs)
    cos = uv @ uv.T
    norms = vecs.norm(dim=-1)
    push = alpha * (uv @ v)
    to_step = uv @ unit(v)
    accuracy = [float("nan")] * len(targets)
    if readout is not None:
        x = x.detach().to(device=readout.mean.device, dtype=readout.mean.dtype)
        traj = [x, steerer.transform(spec)(x)]
        move = traj[-1] - traj[0]
    else:
        traj = []
        move = (alpha * v).unsqueeze(0)
    return MoveGeometry(cos, norms, push, to_step, accuracy, readout, traj, move)


def read_trajectory(
    readout: Probe | None, traj: Sequence[torch.Tensor], targets: tuple[str, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The readout's mean target logits before the move (NaN without a readout) and its mean
    target probabilities after 0, 1, ... steps ([] without)."""
    probs: list[torch.Tensor] = []
    base = torch.full((len(targets),), float("nan"))
    if readout is not None and traj:
        idx = readout.label_indices(targets)
        with torch.no_grad():
            logits = [
                readout(t.to(device=readout.mean.device, dtype=readout.mean.dtype)) for t in traj
            ]
        base = logits[0][:, idx].mean(0).cpu()
        probs = [torch.sigmoid(lg[:, idx]).mean(0).cpu() for lg in logits]
    return base, probs
