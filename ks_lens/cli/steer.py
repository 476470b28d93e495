"""``ks-lens steer``: answers to questions unsteered and steered (K-Steering or CAA), side by
side."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Annotated, Any

import tyro

from ks_lens.cli.common import Model
from ks_lens.errors import ConfigError, Interrupted
from ks_lens.models import ModelOptions
from ks_lens.steering.caa import CAA, CaaCombine
from ks_lens.steering.ksteer import Combine, KSteering, Objective, StepNorm
from ks_lens.steering.positions import Positions


def _method_arg(cls: type, name: str, meaning: str | None = None, param: str = "") -> Any:
    """Help for an option of one steering method whose None means the method's own default."""
    default = inspect.signature(cls).parameters[param or name].default
    which = "K-Steering (--classifier)" if cls is KSteering else "CAA (--vectors)"
    return tyro.conf.arg(help=f"{meaning or f'None: {default}'}; {which} only")


@dataclass(frozen=True)
class SteerOptions:
    """Answer questions unsteered and steered, side by side.

    Give exactly one of --classifier (K-Steering) or --vectors (CAA).
    """

    # one or more questions
    question: Annotated[list[str], tyro.conf.Positional, tyro.conf.arg(metavar="QUESTION")]
    alpha: float  # steering strength
    model: Model = field(default_factory=ModelOptions)
    classifier: str | None = None  # probe directory (K-Steering)
    vectors: str | None = None  # steering-vector directory (CAA)
    layer: int | None = None  # layer to pick from a multi-layer probe set
    target: tuple[str, ...] = ()  # labels to strengthen
    avoid: tuple[str, ...] = ()  # labels to suppress
    positions: Positions = "all"
    steps: Annotated[int | None, _method_arg(KSteering, "steps")] = None
    decay: Annotated[float | None, _method_arg(KSteering, "decay")] = None
    step_norm: Annotated[
        StepNorm | None, _method_arg(KSteering, "step_norm", "None: raw steps")
    ] = None
    objective: Annotated[Objective | None, _method_arg(KSteering, "objective")] = None
    combine: Annotated[Combine | None, _method_arg(KSteering, "combine")] = None
    caa_combine: Annotated[CaaCombine | None, _method_arg(CAA, "caa_combine", param="combine")] = (
        None
    )
    normalize: bool = False  # unit-norm combined vector; CAA (--vectors) only
    system: str | None = None  # system prompt for the questions
    max_new_tokens: int = 64
    sample: bool = False  # sample instead of greedy decoding
    seed: int = 0


# the options of one steering method only
_KSTEER_ONLY = ("steps", "decay", "step_norm", "objective", "combine")
_CAA_ONLY = ("caa_combine", "normalize")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cmd_steer(o: SteerOptions) -> int:
    import textwrap

    from ks_lens.generation import generate
    from ks_lens.models.chat import ChatPrompt
    from ks_lens.probes import load_probe_any
    from ks_lens.steering import Steerer, SteeringVectors

    if not o.question:
        raise ConfigError("give one or more questions to answer")
    if bool(o.classifier) == bool(o.vectors):
        raise ConfigError(
            "give exactly one of --classifier DIR (K-Steering) or --vectors DIR (CAA)"
        )
    # options of the other method would be silently ignored: refuse them instead. "Given" is
    # anything but the unset default (None, or False for --normalize): a 0 (--steps 0, --decay 0)
    # is given, and reaches the method's own checks (0 == False, so no `in (None, False)` test)
    given = {n for n in _KSTEER_ONLY + _CAA_ONLY if getattr(o, n) is not None}
    given -= {n for n in given if getattr(o, n) is False}
    if o.vectors and given & set(_KSTEER_ONLY):
        flags = ", ".join(sorted(_flag(n) for n in given & set(_KSTEER_ONLY)))
        raise ConfigError(f"{flags} apply to K-Steering (--classifier), not to --vectors (CAA)")
    if o.classifier and given & set(_CAA_ONLY):
        flags = ", ".join(sorted(_flag(n) for n in given & set(_CAA_ONLY)))
        raise ConfigError(f"{flags} apply to CAA (--vectors), not to --classifier (K-Steering)")
    model = o.model.load()
    method: Steerer
    if o.classifier:
        probe = load_probe_any(o.classifier, model=model, layer=o.layer)
        # the options not given keep KSteering's defaults
        method = KSteering(probe, **{n: getattr(o, n) for n in given & set(_KSTEER_ONLY)})
    else:
        assert o.vectors is not None
        vectors = SteeringVectors.load(o.vectors, model=model)
        if o.layer is not None and o.layer != vectors.layer:
            raise ConfigError(
                f"--layer {o.layer} does not apply: the vectors in {o.vectors} were made at "
                f"{vectors.hook_name} and CAA steers there; drop --layer or use vectors made at "
                f"layer {o.layer}"
            )
        if o.caa_combine is None:  # CAA's default
            method = CAA(vectors, normalize=o.normalize)
        else:
            method = CAA(vectors, combine=o.caa_combine, normalize=o.normalize)

    prompts = [ChatPrompt(q, system=o.system) for q in o.question]
    gen: dict[str, Any] = dict(max_new_tokens=o.max_new_tokens, do_sample=o.sample, seed=o.seed)
    try:
        base = generate(model, prompts, **gen)
        with method.steer(
            model, target=list(o.target), avoid=list(o.avoid), alpha=o.alpha, positions=o.positions
        ):
            steered = generate(model, prompts, **gen)
    except KeyboardInterrupt:
        raise Interrupted(
            "nothing was saved (steer writes no files); the model's hooks were removed"
        ) from None
    width = 60
    target, avoid = ",".join(o.target), ",".join(o.avoid)
    desc = f"steered (target={target or '-'}, avoid={avoid or '-'}, alpha={o.alpha})"
    for q, a, b in zip(o.question, base.texts, steered.texts, strict=True):
        print(f"\nQ: {q}")
        left = textwrap.wrap(a, width) or [""]
        right = textwrap.wrap(b, width) or [""]
        print(f"{'unsteered':<{width}} | {desc}")
        print(f"{'-' * width}-+-{'-' * width}")
        for i in range(max(len(left), len(right))):
            la = left[i] if i < len(left) else ""
            rb = right[i] if i < len(right) else ""
            print(f"{la:<{width}} | {rb}")
    return 0
