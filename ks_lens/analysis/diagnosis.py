"""Diagnosing the "vanishing tone": one of several targets barely moves while the others rise.

Finding the cases. :func:`vanished_cases` lists the (method, combination) pairs of an
activation-level evaluation where a target vanished (per-question rule
:class:`~ks_lens.evaluation.VanishRule`) on at least half the questions.

Diagnosing one case. :func:`diagnose` takes the **method that produced the case** (its
:class:`~ks_lens.steering.Steerer`, at **its own** calibrated alpha) and reports, per target, the
geometry of *that* method's move:

* K-Steering (any steps / decay / objective / combine / step_norm): the per-label gradients of
  its probe at the input: norm, cosine with every other target's gradient, and the *push*: the
  mean projection of the method's total move ``x_T - x_0`` (all its steps, with its own
  settings) on the target's unit gradient;
* CAA: its per-label vectors ``v_t``: norm, cosine with every other target's vector, cosine with
  the combined vector ``v`` (the method's own ``combine``/``normalize``), and the push
  ``alpha * v . v_t / |v_t|`` (how far the added vector moves along the target's own direction).
  No probe gradient enters a CAA diagnosis.

Both also read an optional probe at the steering layer before and after each step (a readout,
``prob_trajectory``; for CAA one step) and carry the held-out evaluator's change. The most likely
cause of each vanished target is named by :func:`classify_cause`.

Comparing remedies. :func:`remedy_table` gives each method's per-question vanish rate at one
number of targets with bootstrap intervals, its paired difference from a reference method
(K-Steering 1 step) with an interval, and a sign-flip permutation test over questions on the
vanished cells; :func:`best_remedy` names the method that cuts vanishing most and says whether its interval
excludes 0. ``analysis/vanishing.py`` runs it at matched coherence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from ks_lens.analysis._move import caa_move, ksteer_move, read_trajectory
from ks_lens.comparison import ActivationEvaluation, alpha_of, method_label
from ks_lens.errors import ConfigError
from ks_lens.evaluation import VanishRule
from ks_lens.evaluation.stats import (
    ClusteredTest,
    Interval,
    McNemar,
    bootstrap_mean,
    clustered_paired_test,
    mcnemar,
    paired_difference,
)
from ks_lens.probes import Probe
from ks_lens.steering import CAA, KSteering, Steerer, SteeringSpec

CAUSES = ("weak label", "conflict", "dominated", "overshoot", "not transferred", "other")
GEOMETRIES = ("probe gradients", "CAA vectors")


@dataclass
class TargetDiagnosis:
    """One target of a diagnosed case.

    ``norm``: the target's probe-gradient norm (K-Steering) or CAA vector norm; ``norm_ratio``:
    over the largest target's. ``min_cos_to_other_targets``: the lowest cosine of its gradient
    (vector) with another target's. ``cos_to_step``: cosine of its gradient (vector) with the
    method's total move. ``push``: the move's length along the target's unit gradient (vector),
    in activation units; ``push_ratio``: over the largest target's push.
    """

    label: str
    norm: float
    norm_ratio: float
    min_cos_to_other_targets: float
    cos_to_step: float = float("nan")
    push: float = float("nan")
    push_ratio: float = float("nan")
    base_logit: float = float("nan")  # readout probe, before steering
    base_prob: float = float("nan")
    prob_trajectory: list[float] = field(default_factory=list)  # readout after 0, 1, ... steps
    probe_accuracy: float = float("nan")  # steering probe's validation accuracy (K-Steering)
    evaluator_delta: float | None = None  # held-out evaluator change, if known
    vanished: bool = False
    cause: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Diagnosis:
    """A case diagnosed with the method's own steerer, alpha and settings."""

    method: str
    geometry: str  # "probe gradients" (K-Steering) or "CAA vectors"
    alpha: float
    settings: dict[str, Any]  # the steerer's own settings (steps, decay, objective, combine, ...)
    targets: tuple[str, ...]
    per_target: dict[str, TargetDiagnosis]
    cos_matrix: list[list[float]]  # targets x targets (gradients: mean over inputs)
    move_norm: float  # mean norm of the method's total move x_T - x_0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "geometry": self.geometry,
            "alpha": self.alpha,
            "settings": dict(self.settings),
            "targets": list(self.targets),
            "cos_matrix": self.cos_matrix,
            "move_norm": self.move_norm,
            "notes": self.notes,
            "per_target": {k: v.to_json() for k, v in self.per_target.items()},
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

    ``weak label``: the steering probe itself recognises it poorly (accuracy < ``weak_accuracy``;
    K-Steering only: a CAA diagnosis has no probe accuracy);
    ``conflict``: its gradient (CAA: vector) points against another target's (cosine <
    ``conflict_cos``);
    ``dominated``: its gradient (vector) norm is under ``dominated_ratio`` of the largest
    target's;
    ``overshoot``: along the multi-step trajectory its readout probability rose and then fell
    back by at least ``probe_rise`` (steps too large for the probe's locally linear regime);
    ``not transferred``: the readout probability rose by at least ``probe_rise`` (the step
    worked at the steering layer) but the held-out evaluator did not follow: an
    off-distribution move;
    ``other`` otherwise.
    """
    if t.probe_accuracy < weak_accuracy:
        return "weak label"
    if t.min_cos_to_other_targets < conflict_cos:
        return "conflict"
    if t.norm_ratio < dominated_ratio:
        return "dominated"
    if t.prob_trajectory and max(t.prob_trajectory) - t.prob_trajectory[-1] >= probe_rise:
        return "overshoot"
    if t.prob_trajectory and t.prob_trajectory[-1] - t.prob_trajectory[0] >= probe_rise:
        return "not transferred"
    return "other"


def _ratios(values: Sequence[float]) -> list[float]:
    top = max(values) if values else 0.0
    return [v / top if top > 0 else float("nan") for v in values]


def steerer_settings(steerer: Steerer) -> dict[str, Any]:
    """The settings that define a steerer's move (for the diagnosis record)."""
    if isinstance(steerer, KSteering):
        return {
            "method": "ksteer",
            "steps": steerer.steps,
            "decay": steerer.decay,
            "step_norm": steerer.step_norm,
            "objective": steerer.objective,
            "combine": steerer.combine,
            "temperature": steerer.temperature,
        }
    if isinstance(steerer, CAA):
        return {
            "method": "caa",
            "combine": steerer.combine,
            "normalize": steerer.normalize,
            "avoid_mode": steerer.avoid_mode,
            "vectors": steerer.vectors.method,
        }
    raise ConfigError(f"cannot diagnose {type(steerer).__name__}: only KSteering and CAA")


def diagnose(
    steerer: Steerer,
    x: Float[torch.Tensor, "n d"],
    targets: Sequence[str],
    *,
    alpha: float,
    method: str | None = None,
    readout: Probe | None = None,
    evaluator_delta: dict[str, float] | None = None,
    vanished: Sequence[str] = (),
) -> Diagnosis:
    """Per-target diagnostics of ``steerer`` moving ``x`` toward ``targets`` at ``alpha`` (see
    the module docstring).

    ``readout`` is read before and after each step (default: a K-Steering method's own probe;
    none for CAA unless given). ``method`` names the method in the record.
    """
    targets = tuple(targets)
    settings = steerer_settings(steerer)
    spec = SteeringSpec(targets, (), alpha)
    if isinstance(steerer, KSteering):
        geometry, m = GEOMETRIES[0], ksteer_move(steerer, x, targets, spec, readout)
    elif isinstance(steerer, CAA):
        geometry, m = GEOMETRIES[1], caa_move(steerer, x, targets, spec, alpha, readout)
    else:  # steerer_settings refused it already
        raise ConfigError(f"cannot diagnose {type(steerer).__name__}")
    base, probs = read_trajectory(m.readout, m.traj, targets)
    cos, to_step, accuracy = m.cos, m.to_step, m.accuracy
    norm_list = [float(n) for n in m.norms]
    push_list = [float(p) for p in m.push]
    per: dict[str, TargetDiagnosis] = {}
    for j, lab in enumerate(targets):
        others = [float(cos[j, o]) for o in range(len(targets)) if o != j]
        td = TargetDiagnosis(
            label=lab,
            norm=norm_list[j],
            norm_ratio=_ratios(norm_list)[j],
            min_cos_to_other_targets=min(others) if others else 1.0,
            cos_to_step=float(to_step[j]),
            push=push_list[j],
            push_ratio=_ratios(push_list)[j],
            base_logit=float(base[j]),
            base_prob=float(probs[0][j]) if probs else float("nan"),
            prob_trajectory=[float(p[j]) for p in probs],
            probe_accuracy=accuracy[j],
            evaluator_delta=None if evaluator_delta is None else evaluator_delta.get(lab),
            vanished=lab in vanished,
        )
        if td.vanished:
            td.cause = classify_cause(td)
        per[lab] = td
    notes = []
    for lab, td in per.items():
        if td.vanished:
            traj_note = (
                f", readout p {td.prob_trajectory[0]:.2f}->{td.prob_trajectory[-1]:.2f}"
                if td.prob_trajectory
                else ""
            )
            notes.append(
                f"{lab}: {td.cause} ({geometry}: norm ratio {td.norm_ratio:.2f}, min cos "
                f"{td.min_cos_to_other_targets:+.2f}, push ratio {td.push_ratio:.2f}{traj_note})"
            )
    return Diagnosis(
        method or settings["method"],
        geometry,
        float(alpha),
        settings,
        targets,
        per,
        cos.cpu().tolist(),
        float(m.move.norm(dim=-1).mean()),
        notes,
    )


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class VanishedCase:
    """A method and combination where targets vanished on at least ``min_share`` of questions."""

    method: str
    targets: tuple[str, ...]
    vanished: tuple[str, ...]
    share: dict[str, float]  # per vanished label: share of questions on which it vanished
    delta: dict[str, float]  # per label: mean evaluator change vs unsteered

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "targets": list(self.targets),
            "vanished": list(self.vanished),
            "share": dict(self.share),
            "delta": dict(self.delta),
        }


def vanished_cases(
    ev: ActivationEvaluation, rule: VanishRule, *, min_share: float = 0.5
) -> list[VanishedCase]:
    """(method, combination) pairs where some target vanished (per-question ``rule``) on at
    least ``min_share`` of the questions, with the per-label mean change vs unsteered."""
    labels = list(ev.labels)
    out = []
    for m, per_combo in ev.probs.items():
        for combo, p in zip(ev.combos, per_combo, strict=True):
            idx = [labels.index(t) for t in combo]
            share = rule.vanished(p[:, idx]).mean(0)
            gone = tuple(t for j, t in enumerate(combo) if share[j] >= min_share)
            if gone:
                delta = {
                    lab: float(np.mean(p[:, i] - ev.base[:, i])) for i, lab in enumerate(labels)
                }
                out.append(
                    VanishedCase(
                        m,
                        tuple(combo),
                        gone,
                        {t: float(share[combo.index(t)]) for t in gone},
                        delta,
                    )
                )
    return out


def diagnose_cases(
    cases: Sequence[VanishedCase],
    steerers: Mapping[str, Steerer],
    alphas: Mapping[str, Mapping[int, float]],
    x: Float[torch.Tensor, "n d"],
    *,
    readout: Probe | None = None,
    combo_alphas: Mapping[str, Mapping[tuple[str, ...], float]] | None = None,
) -> list[Diagnosis]:
    """Diagnose every case with **its own** method's steerer and calibrated alpha
    (``alphas[method][number of targets]``, or ``combo_alphas[method][targets]`` for a method
    calibrated per combination); cases of methods not in ``steerers`` are skipped."""
    out = []
    for case in cases:
        if case.method not in steerers:
            continue
        out.append(
            diagnose(
                steerers[case.method],
                x,
                case.targets,
                alpha=alpha_of(alphas, combo_alphas, case.method, case.targets),
                method=case.method,
                readout=readout,
                evaluator_delta=case.delta,
                vanished=case.vanished,
            )
        )
    return out


# ----------------------------------------------------------------------------- remedies


@dataclass
class RemedyRow:
    """One method at ``k`` targets: vanishing and target probability, paired with the reference.

    ``vanish_rate``: per question, the share of its ``k``-target cells where some target
    vanished, averaged over questions (bootstrap interval over questions). ``vanish_diff``: the
    paired difference of that per-question share from the reference method's;
    ``target_prob_diff``: the same for the mean target probability; ``vanish_cluster_test``:
    the vanished cells against the reference's, clustered by question (each question's share
    difference is one unit; sign-flip permutation p-value,
    :func:`~ks_lens.evaluation.stats.clustered_paired_test`);
    ``vanish_test``: McNemar's test over the cells (kept for old outputs; it treats a question's
    combinations as independent and overstates significance). ``calibrated_kl``: the KL the
    method's alpha was calibrated to.
    """

    method: str
    k: int
    alpha: float
    n_questions: int
    n_cells: int
    n_vanished: int
    vanish_rate: Interval
    target_prob: Interval
    min_target_prob: Interval
    calibrated_kl: float | None = None
    vanish_diff: Interval | None = None
    target_prob_diff: Interval | None = None
    vanish_test: McNemar | None = None
    vanish_cluster_test: ClusteredTest | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            k: (v.to_json() if hasattr(v, "to_json") else v) for k, v in self.__dict__.items()
        } | {"label": method_label(self.method)}


def _cells(
    ev: ActivationEvaluation, method: str, k: int, rule: VanishRule
) -> tuple[np.ndarray, np.ndarray]:
    """``[n_questions, n_combos]`` vanished flags and mean target probabilities of one method's
    ``k``-target cells (combinations in ``ev.combos`` order)."""
    labels = list(ev.labels)
    gone, mean_p = [], []
    for combo, p in zip(ev.combos, ev.probs[method], strict=True):
        if len(combo) != k:
            continue
        idx = [labels.index(t) for t in combo]
        gone.append(rule.vanished(p[:, idx]).any(1))
        mean_p.append(p[:, idx].mean(1))
    if not gone:
        raise ConfigError(f"no {k}-target combinations in the evaluation")
    return np.stack(gone, 1), np.stack(mean_p, 1)


def remedy_table(
    ev: ActivationEvaluation,
    rule: VanishRule,
    *,
    k: int = 3,
    reference: str = "ksteer",
    calibrated_kl: Mapping[str, float] | None = None,
    seed: int = 0,
    n_resamples: int = 2000,
) -> list[RemedyRow]:
    """Every method of ``ev`` at ``k`` targets, with paired differences from ``reference``."""
    if reference not in ev.probs:
        raise ConfigError(f"the reference method {reference!r} is not in the evaluation")
    labels = list(ev.labels)
    ref_gone, ref_p = _cells(ev, reference, k, rule)
    out = []
    for m in ev.probs:
        gone, mean_p = _cells(ev, m, k, rule)
        min_p = np.stack(
            [
                p[:, [labels.index(t) for t in combo]].min(1)
                for combo, p in zip(ev.combos, ev.probs[m], strict=True)
                if len(combo) == k
            ],
            1,
        )
        pq_gone = gone.mean(1)
        row = RemedyRow(
            m,
            k,
            float(ev.alphas[m][k]),
            gone.shape[0],
            int(gone.size),
            int(gone.sum()),
            bootstrap_mean(pq_gone, seed=seed, n_resamples=n_resamples),
            bootstrap_mean(mean_p.mean(1), seed=seed, n_resamples=n_resamples),
            bootstrap_mean(min_p.mean(1), seed=seed, n_resamples=n_resamples),
            None if calibrated_kl is None else calibrated_kl.get(m),
        )
        if m != reference:
            row.vanish_diff = paired_difference(
                pq_gone, ref_gone.mean(1), seed=seed, n_resamples=n_resamples
            )
            row.target_prob_diff = paired_difference(
                mean_p.mean(1), ref_p.mean(1), seed=seed, n_resamples=n_resamples
            )
            row.vanish_test = mcnemar(gone.ravel(), ref_gone.ravel())
            questions = np.repeat(np.arange(gone.shape[0]), gone.shape[1])
            row.vanish_cluster_test = clustered_paired_test(
                gone.ravel(), ref_gone.ravel(), questions, seed=seed, n_resamples=n_resamples
            )
        out.append(row)
    return out


@dataclass(frozen=True)
class RemedyVerdict:
    """Which method cuts vanishing most against the reference, and whether significantly."""

    k: int
    reference: str
    best: str | None  # the method with the lowest paired difference (None: none is lower)
    vanish_diff: Interval | None
    significant: bool  # its interval lies below 0
    statement: str

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "reference": self.reference,
            "best": self.best,
            "vanish_diff": None if self.vanish_diff is None else self.vanish_diff.to_json(),
            "significant": self.significant,
            "statement": self.statement,
        }


def best_remedy(rows: Sequence[RemedyRow], *, reference: str = "ksteer") -> RemedyVerdict:
    """The row (other than ``reference``) whose vanish rate is lowest relative to the reference;
    significant when its paired interval excludes 0 from below."""
    k = rows[0].k if rows else 0
    ref = method_label(reference)
    cands = [r for r in rows if r.method != reference and r.vanish_diff is not None]
    cands = [r for r in cands if np.isfinite(r.vanish_diff.estimate)]  # type: ignore[union-attr]
    if not cands:
        return RemedyVerdict(k, reference, None, None, False, "no remedy to compare")
    best = min(cands, key=lambda r: r.vanish_diff.estimate)  # type: ignore[union-attr]
    d = best.vanish_diff
    assert d is not None
    name = method_label(best.method)
    t = best.vanish_cluster_test
    p = f", sign-flip p = {t.p_value:.3g} over {t.n_questions} questions" if t else ""
    ref_row = next((r for r in rows if r.method == reference), None)
    if ref_row is not None and best.calibrated_kl is not None and ref_row.calibrated_kl is not None:
        p += f"; calibrated KL {best.calibrated_kl:.3f} vs {ref_row.calibrated_kl:.3f}"
    tp = (
        f"; its mean target probability differs by {best.target_prob_diff.fmt()}"
        if best.target_prob_diff is not None
        else ""
    )
    if d.estimate >= 0:
        return RemedyVerdict(
            k,
            reference,
            None,
            None,
            False,
            f"no remedy significantly reduces vanishing: none lowers the {k}-target vanish rate "
            f"below {ref}'s (closest: {name}, {d.fmt()})",
        )
    if d.high < 0:
        return RemedyVerdict(
            k,
            reference,
            best.method,
            d,
            True,
            f"{name} cuts {k}-target vanishing most: {d.fmt()} vs {ref} "
            f"(interval excludes 0{p}){tp}",
        )
    return RemedyVerdict(
        k,
        reference,
        best.method,
        d,
        False,
        f"no remedy significantly reduces vanishing: the largest cut, {name} ({d.fmt()} vs "
        f"{ref}{p}), has an interval that includes 0{tp}",
    )
