"""``ks-lens capability``: multiple-choice accuracy, unsteered, steered or instructed, with the
paired difference from the plain model."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ks_lens.capability.scoring import Rule
from ks_lens.cli.common import Model
from ks_lens.errors import ConfigError, Interrupted
from ks_lens.models import ModelOptions
from ks_lens.steering.caa import CAA
from ks_lens.steering.ksteer import KSteering
from ks_lens.steering.positions import Positions


@dataclass(frozen=True)
class CapabilityOptions:
    """Multiple-choice accuracy by option log-likelihood, unsteered or steered, with a 95 percent interval.

    Steered (--classifier or --vectors, with --alpha) or instructed (--system or --instruct), the
    plain model is scored too and the paired accuracy difference is printed.
    """

    model: Model = field(default_factory=ModelOptions)
    questions: str | None = None  # multiple-choice JSONL (None: the shipped set)
    classifier: str | None = None  # probe directory (K-Steering)
    vectors: str | None = None  # steering-vector directory (CAA)
    layer: int | None = None  # layer to pick from a multi-layer probe set
    target: tuple[str, ...] = ()  # labels to strengthen
    avoid: tuple[str, ...] = ()  # labels to suppress
    alpha: float | None = None  # steering strength (needed with --classifier or --vectors)
    positions: Positions = "all"  # steered tokens; the options count as generated
    system: str | None = None  # system prompt of every question
    instruct: tuple[str, ...] = ()  # tone labels whose shipped instructions are the system prompt
    rule: Rule = "char"  # how options are compared: sum, per token, per character
    batch_size: int = 64  # rows (question + one option) per forward pass
    baseline: bool = True  # also score the plain model (--no-baseline skips it)
    out: str | None = None  # JSON file for every question's scores
    seed: int = 0  # bootstrap seed


def _check_capability_steering(o: CapabilityOptions) -> None:
    """Refuse steering options that do not go together, before any work."""
    if o.classifier and o.vectors:
        raise ConfigError(
            "give at most one of --classifier DIR (K-Steering) or --vectors DIR (CAA)"
        )
    if not (o.classifier or o.vectors):
        if o.alpha is not None or o.target or o.avoid or o.layer is not None:
            raise ConfigError(
                "--alpha, --target, --avoid and --layer need --classifier DIR or --vectors DIR"
            )
    elif o.alpha is None or not (o.target or o.avoid):
        raise ConfigError("steering needs --alpha and at least one --target or --avoid label")


def _capability_steerer(o: CapabilityOptions, model: Any) -> Any:
    """The steering method of ``ks-lens capability`` (None: unsteered), with its defaults."""
    from ks_lens.probes import load_probe_any
    from ks_lens.steering import SteeringVectors

    if o.classifier:
        return KSteering(load_probe_any(o.classifier, model=model, layer=o.layer))
    if not o.vectors:
        return None
    vectors = SteeringVectors.load(o.vectors, model=model)
    if o.layer is not None and o.layer != vectors.layer:
        raise ConfigError(
            f"--layer {o.layer} does not apply: the vectors in {o.vectors} were made at "
            f"{vectors.hook_name}; drop --layer or use vectors made at layer {o.layer}"
        )
    return CAA(vectors)


def _capability_system(o: CapabilityOptions) -> str | None:
    if o.system is not None and o.instruct:
        raise ConfigError("give --system TEXT or --instruct LABELS, not both")
    if not o.instruct:
        return o.system
    from ks_lens.datasets import load_dataset

    tones = load_dataset("tones")
    return " ".join(tones.instruction(label) for label in o.instruct)


def _capability_label(
    o: CapabilityOptions, method: Any, system: str | None
) -> tuple[str, dict[str, Any]]:
    """The result's label and steering settings of ``ks-lens capability``."""
    label = "unsteered"
    settings: dict[str, Any] = {}
    if method is not None:
        name = "ksteer" if isinstance(method, KSteering) else "caa"
        label = f"{name} target={','.join(o.target) or '-'} avoid={','.join(o.avoid) or '-'}"
        label += f" alpha={o.alpha}"
        settings = {
            "method": name,
            "steerer": o.classifier or o.vectors,
            "target": list(o.target),
            "avoid": list(o.avoid),
            "alpha": o.alpha,
            "positions": o.positions,
        }
    if system is not None:
        label = ("instructed" if method is None else label + " +system") + (
            f" ({','.join(o.instruct)})" if o.instruct else ""
        )
    return label, settings


def cmd_capability(o: CapabilityOptions) -> int:
    from ks_lens.capability.scoring import evaluate_capability, load_mc_questions
    from ks_lens.capability.scoring import paired_accuracy_difference as paired
    from ks_lens.compat import versions
    from ks_lens.io import atomic_write_json
    from ks_lens.utils import git_commit

    if o.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {o.batch_size}")
    if o.out is not None and Path(o.out).is_dir():
        raise ConfigError(f"--out {o.out} is a directory; give a JSON file path")
    _check_capability_steering(o)
    system = _capability_system(o)
    questions = load_mc_questions(o.questions)
    model = o.model.load()
    method = _capability_steerer(o, model)
    run: dict[str, Any] = dict(rule=o.rule, batch_size=o.batch_size)
    label, settings = _capability_label(o, method, system)
    try:
        base = None
        if o.baseline and (method is not None or system is not None):
            base = evaluate_capability(model, questions, **run)
        if method is None:
            res = evaluate_capability(model, questions, system=system, label=label, **run)
        else:
            steer = method.steer(
                model,
                target=list(o.target),
                avoid=list(o.avoid),
                alpha=float(o.alpha or 0.0),
                positions=o.positions,
            )
            with steer:
                res = evaluate_capability(
                    model, questions, system=system, label=label, settings=settings, **run
                )
    except KeyboardInterrupt:
        raise Interrupted("nothing was saved; the model's hooks were removed") from None
    print(
        f"{res.settings['model']}: {len(res)} questions, {len(set(res.subjects))} subjects, "
        f"rule {o.rule}, chance {res.chance:.3f}"
    )
    for r in (base, res):
        if r is not None:
            print(f"  {r.label:40s} accuracy {r.interval(seed=o.seed).fmt()}")
    diff = paired(res, base, seed=o.seed) if base is not None else None
    if diff is not None:
        print(f"  difference (paired, 95 % bootstrap over questions): {diff.fmt()}")
    print("  by subject: " + ", ".join(f"{k} {v:.2f}" for k, v in res.by_subject().items()))
    if o.out is not None:
        out = {
            # the command line when run as ks-lens (not through main(argv) from Python)
            "command": "ks-lens " + " ".join(sys.argv[1:]) if "capability" in sys.argv else None,
            "versions": versions(),
            "commit": git_commit(),
            "questions": o.questions or "shipped",
            "result": res.to_json(),
            "baseline": base.to_json() if base is not None else None,
            "difference": diff.to_json() if diff is not None else None,
        }
        Path(o.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(o.out, out)
        print(f"saved to {o.out}")
    return 0
