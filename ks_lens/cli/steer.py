"""``ks-lens steer``: answers to questions unsteered and steered (K-Steering or CAA), side by
side."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import tyro

from ks_lens.cli.common import Model
from ks_lens.cli.options import given, parse
from ks_lens.errors import ConfigError, Interrupted
from ks_lens.models import ModelOptions
from ks_lens.steering.config import CAAConfig, KSteeringConfig
from ks_lens.steering.positions import Positions


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
    # K-Steering's and CAA's settings, spelled --steps, ..., --caa-combine, --normalize, ...
    # (ks_lens.cli.options); no prefix, so that their checks report as ks-lens errors
    ksteer: Annotated[KSteeringConfig, tyro.conf.arg(name="")] = field(
        default_factory=KSteeringConfig
    )
    caa: Annotated[CAAConfig, tyro.conf.arg(name="")] = field(default_factory=CAAConfig)
    system: str | None = None  # system prompt for the questions
    max_new_tokens: int = 64
    sample: bool = False  # sample instead of greedy decoding
    seed: int = 0


def _option(config: type, name: str) -> str:
    """The option of a method setting: ``--NAME``, or ``--caa-NAME`` for CAA's settings that
    K-Steering also has (``ks_lens.cli.options`` spells them so)."""
    if config is CAAConfig and name in {f.name for f in dataclasses.fields(KSteeringConfig)}:
        name = f"caa_{name}"
    return "--" + name.replace("_", "-")


#: each method's own option, the method, and its settings (whose options only it takes)
_METHODS = (("--classifier", "K-Steering", KSteeringConfig), ("--vectors", "CAA", CAAConfig))


def _refuse_misplaced(chosen: str, misplaced: Sequence[str]) -> None:
    """Refuse the options ``misplaced`` of the method not ``chosen`` (its own option)."""
    if misplaced:
        own = next(name for flag, name, _ in _METHODS if flag == chosen)
        other_flag, other, _ = next(m for m in _METHODS if m[0] != chosen)
        raise ConfigError(
            f"{', '.join(sorted(misplaced))} apply to {other} ({other_flag}), not to {chosen} "
            f"({own})"
        )


def check_method_options(argv: Sequence[str]) -> None:
    """Refuse the options of the method not chosen (K-Steering's with ``--vectors``, CAA's with
    ``--classifier``): they would be silently ignored. Checked on ``argv``, before the options
    are read, so that ``--vectors V --steps 0`` names the misplaced option, not its value."""
    chosen = [flag for flag, _, _ in _METHODS if given(argv, flag)]
    if len(chosen) != 1:
        return  # cmd_steer asks for exactly one
    _, _, other = next(m for m in _METHODS if m[0] != chosen[0])
    options = [_option(other, f.name) for f in dataclasses.fields(other)]
    # tyro also reads --step_norm for --step-norm
    spellings = {o: (o, "--" + o[2:].replace("-", "_")) for o in options}
    _refuse_misplaced(chosen[0], [o for o in options if any(given(argv, s) for s in spellings[o])])


def parse_steer_options(argv: Sequence[str], *, prog: str = "ks-lens steer") -> SteerOptions:
    """``argv`` read into :class:`SteerOptions`, after :func:`check_method_options`."""
    check_method_options(argv)
    return parse(SteerOptions, argv, prog=prog)


def cmd_steer(o: SteerOptions) -> int:
    import textwrap

    from ks_lens.generation import generate
    from ks_lens.models.chat import ChatPrompt
    from ks_lens.probes import load_probe_any
    from ks_lens.steering import CAA, KSteering, Steerer, SteeringVectors

    if not o.question:
        raise ConfigError("give one or more questions to answer")
    if bool(o.classifier) == bool(o.vectors):
        raise ConfigError(
            "give exactly one of --classifier DIR (K-Steering) or --vectors DIR (CAA)"
        )
    # settings of the other method would be silently ignored (options built in code; on the
    # command line, check_method_options refused them already)
    other = o.caa if o.classifier else o.ksteer
    _refuse_misplaced(
        "--classifier" if o.classifier else "--vectors",
        [
            _option(type(other), f.name)
            for f in dataclasses.fields(other)
            if getattr(other, f.name) != getattr(type(other)(), f.name)
        ],
    )
    model = o.model.load()
    method: Steerer
    if o.classifier:
        probe = load_probe_any(o.classifier, model=model, layer=o.layer)
        method = KSteering(probe, o.ksteer)
    else:
        assert o.vectors is not None
        vectors = SteeringVectors.load(o.vectors, model=model)
        if o.layer is not None and o.layer != vectors.layer:
            raise ConfigError(
                f"--layer {o.layer} does not apply: the vectors in {o.vectors} were made at "
                f"{vectors.hook_name} and CAA steers there; drop --layer or use vectors made at "
                f"layer {o.layer}"
            )
        method = CAA(vectors, o.caa)

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
