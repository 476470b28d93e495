"""Diagnosing the "vanishing tone": one of several targets barely moves while the others rise.

:func:`diagnose` looks at one target combination on a set of inputs (activations at the
steering layer) and reports, per target:

* the norm of its logit gradient at the input, and its cosine with every other target's gradient
  (a small norm means the label is *dominated* in the summed gradient; a negative cosine means
  two behaviours *conflict*);
* its logit and probability under the steering probe before steering (margin), and along the
  multi-step trajectory (does it rise at all at the probe? does another target saturate first?);
* the steering probe's own validation accuracy for the label (a *weak* label is poorly
  represented to begin with);

and names the most likely cause for each vanished target (see :func:`classify_cause`). Remedies
are options of :class:`~ks_lens.steering.KSteering` (``steps``, ``combine="balanced"`` or
``"pcgrad"``, ``objective="logsigmoid"`` or ``"softmin"``); ``analysis/vanishing.py`` compares
them at matched coherence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float

from ks_lens.analysis.geometry import label_gradient_geometry
from ks_lens.probes import Probe
from ks_lens.steering.base import SteeringSpec
from ks_lens.steering.ksteer import KSteering

CAUSES = ("weak label", "conflict", "dominated", "overshoot", "not transferred", "other")


@dataclass
class TargetDiagnosis:
    label: str
    grad_norm: float
    grad_norm_ratio: float  # this label's gradient norm / the largest target gradient norm
    min_cos_to_other_targets: float
    base_logit: float
    base_prob: float
    prob_trajectory: list[float]  # steering-probe probability after 0, 1, ..., steps steps
    probe_accuracy: float
    evaluator_delta: float | None = None  # held-out evaluator change, if known
    vanished: bool = False
    cause: str | None = None


@dataclass
class Diagnosis:
    targets: tuple[str, ...]
    per_target: dict[str, TargetDiagnosis]
    cos_matrix: list[list[float]]  # targets x targets, mean over inputs
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "cos_matrix": self.cos_matrix,
            "notes": self.notes,
            "per_target": {k: vars(v) for k, v in self.per_target.items()},
        }


def classify_cause(
    t: TargetDiagnosis,
    *,
    weak_accuracy: float = 0.9,
    conflict_cos: float = -0.1,
    dominated_ratio: float = 0.5,
    probe_rise: float = 0.2,
) -> str:
    """The most likely reason a target vanished, checked in this order:

    ``weak label``: the steering probe itself recognises it poorly (accuracy < ``weak_accuracy``);
    ``conflict``: its gradient points against another target's (cosine < ``conflict_cos``);
    ``dominated``: its gradient norm is under ``dominated_ratio`` of the largest target's;
    ``overshoot``: along the multi-step trajectory its probe probability rose and then fell back by
    at least ``probe_rise`` (steps too large for the probe's locally linear regime);
    ``not transferred``: the probe's probability rose by at least ``probe_rise`` (the step
    worked on the probe) but the held-out evaluator did not follow: an off-distribution move;
    ``other`` otherwise.
    """
    if t.probe_accuracy < weak_accuracy:
        return "weak label"
    if t.min_cos_to_other_targets < conflict_cos:
        return "conflict"
    if t.grad_norm_ratio < dominated_ratio:
        return "dominated"
    if t.prob_trajectory and max(t.prob_trajectory) - t.prob_trajectory[-1] >= probe_rise:
        return "overshoot"
    if t.prob_trajectory and t.prob_trajectory[-1] - t.prob_trajectory[0] >= probe_rise:
        return "not transferred"
    return "other"


def diagnose(
    probe: Probe,
    x: Float[torch.Tensor, "n d"],
    targets: Sequence[str],
    *,
    alpha: float,
    steps: int = 3,
    decay: float = 0.95,
    evaluator_delta: dict[str, float] | None = None,
    vanished: Sequence[str] = (),
) -> Diagnosis:
    """Per-target diagnostics for steering ``x`` toward ``targets`` (see the module docstring)."""
    targets = tuple(targets)
    p = probe.mean
    x = x.to(device=p.device, dtype=p.dtype)
    geo = label_gradient_geometry(probe, x, targets)
    idx = probe.label_indices(targets)
    with torch.no_grad():
        base_logits = probe(x)[:, idx]
    traj = KSteering(probe, steps=steps, decay=decay).trajectory(
        x, SteeringSpec(targets, (), alpha)
    )
    with torch.no_grad():
        probs = [torch.sigmoid(probe(t)[:, idx]).mean(0) for t in traj]  # [steps+1][k]
    accs = probe.metrics.get("val_per_label_accuracy", {})
    max_norm = float(geo.norms.max())
    per: dict[str, TargetDiagnosis] = {}
    for j, lab in enumerate(targets):
        others = [float(geo.cos_matrix[j, o]) for o in range(len(targets)) if o != j]
        td = TargetDiagnosis(
            label=lab,
            grad_norm=float(geo.norms[j]),
            grad_norm_ratio=float(geo.norms[j]) / max_norm if max_norm > 0 else 0.0,
            min_cos_to_other_targets=min(others) if others else 1.0,
            base_logit=float(base_logits[:, j].mean()),
            base_prob=float(torch.sigmoid(base_logits[:, j]).mean()),
            prob_trajectory=[float(pr[j]) for pr in probs],
            probe_accuracy=float(accs.get(lab, float("nan"))) if accs else float("nan"),
            evaluator_delta=None if evaluator_delta is None else evaluator_delta.get(lab),
            vanished=lab in vanished,
        )
        if td.vanished:
            td.cause = classify_cause(td)
        per[lab] = td
    notes = []
    for lab, td in per.items():
        if td.vanished:
            notes.append(
                f"{lab}: {td.cause} (grad norm ratio {td.grad_norm_ratio:.2f}, min cos {td.min_cos_to_other_targets:+.2f}, "
                f"probe p {td.prob_trajectory[0]:.2f}->{td.prob_trajectory[-1]:.2f})"
            )
    return Diagnosis(targets, per, geo.cos_matrix.tolist(), notes)
