"""Command-line options generated from the configuration dataclasses (with `tyro`_).

Every ``ks-lens`` command and every study in ``analysis/`` reads its options into a dataclass,
so each default, choice and help text lives in one place:

* :class:`~ks_lens.models.ModelOptions`: ``--model``, ``--device``, ``--dtype``;
* :class:`~ks_lens.probes.ProbeConfig`: the probe options of ``ks-lens train``;
* :class:`~ks_lens.steering.config.KSteeringConfig` and
  :class:`~ks_lens.steering.config.CAAConfig`: the method options of ``ks-lens steer``;
* :class:`~ks_lens.pipeline.PipelineConfig` with its
  :class:`~ks_lens.comparison.ComparisonConfig`: ``ks-lens demo`` and the studies
  (:class:`PipelineOptions`).

A field ``n_eval`` is the option ``--n-eval``; a ``Literal`` type gives its choices, its
default is the dataclass default and the comment next to it is its help. Nested settings are
spelled as follows:

* the comparison's fields drop their ``comparison.`` prefix (``--kl-budget``, ``--methods``),
  except the two that the pipeline also has: the comparison takes ``--seed`` and
  ``--batch-size`` from the pipeline (:class:`~ks_lens.pipeline.PipelineConfig`), so they are
  options once;
* the comparison's rules keep their own prefix (``--vanish.floor``, ``--degenerate.min-words``);
* the steering configs' fields have no prefix (``--steps``, ``--normalize``), except CAA's
  fields that K-Steering also has: ``--caa-combine``;
* a tuple takes one comma-separated argument (``--methods caa_mean,ksteer``; ``--avoid ""``
  for none);
* a flag is named after its non-default value: ``--fast``, ``--no-normalize``.

``--fast`` (:meth:`PipelineConfig.fast <ks_lens.pipeline.PipelineConfig.fast>`) changes the
defaults, not the options: an option given explicitly wins (``--fast --n-eval 32``), and
``--fast --help`` shows the fast defaults.

Bad values exit with code 2 and a message naming the option, as ``argparse`` does; values that
parse but are out of range raise :class:`~ks_lens.errors.ConfigError` when the config is
validated (``ks-lens`` reports it as bad input, also with code 2). An option renamed in 0.2.0
(:data:`RENAMED_OPTIONS`) raises :class:`~ks_lens.errors.RenamedError` naming its new spelling.

.. _tyro: https://brentyi.github.io/tyro/
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import tyro
from tyro.constructors import (
    ConstructorRegistry,
    PrimitiveConstructorSpec,
    PrimitiveTypeInfo,
    StructConstructorSpec,
    StructTypeInfo,
)

from ks_lens.comparison import ComparisonConfig
from ks_lens.errors import ConfigError, RenamedError
from ks_lens.pipeline import PipelineConfig
from ks_lens.steering.config import CAAConfig, KSteeringConfig

T = TypeVar("T")

_SCALARS: dict[type, Callable[[str], Any]] = {str: str, int: int, float: float}


def _element_parser(elem: Any) -> tuple[Callable[[str], Any], str] | None:
    """How to read one element of a tuple option: the converter (its ValueError is the
    message) and its metavar."""
    if elem in _SCALARS:
        name = elem.__name__

        def scalar(value: str) -> Any:
            try:
                return _SCALARS[elem](value)
            except ValueError:
                raise ValueError(
                    f"expected {name} values separated by commas, got {value!r}"
                ) from None

        return scalar, name.upper()
    if get_origin(elem) is Literal and all(isinstance(v, str) for v in get_args(elem)):
        choices: tuple[str, ...] = get_args(elem)

        def choice(value: str) -> str:
            if value not in choices:
                raise ValueError(f"invalid choice {value!r}; expected one of {choices}")
            return value

        return choice, "{" + ",".join(choices) + "}"
    return None


def _comma_tuple(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec[Any] | None:
    """``tuple[X, ...]`` options take one argument of comma-separated values (``""``: none), so
    that an option never swallows the positional arguments after it."""
    if info.type_origin is not tuple:
        return None
    args = get_args(info.type)
    if len(args) != 2 or args[1] is not Ellipsis:
        return None
    reader = _element_parser(args[0])
    if reader is None:
        return None
    convert, metavar = reader

    def from_str(tokens: list[str]) -> tuple[Any, ...]:
        (token,) = tokens
        return tuple(convert(part.strip()) for part in token.split(",") if part.strip())

    return PrimitiveConstructorSpec(
        nargs=1,
        metavar=f"{metavar},...",
        instance_from_str=from_str,
        is_instance=lambda x: isinstance(x, tuple),
        str_from_instance=lambda x: [",".join(str(v) for v in x)],
    )


def _flat(
    cls: type, arg: Callable[[str], Any | None], note: str = ""
) -> Callable[[StructTypeInfo], StructConstructorSpec | None]:
    """A struct rule: each field ``f`` of the dataclass ``cls`` nested in options is spelled as
    ``arg(f)`` says (a ``tyro.conf.arg``; ``None``: the default spelling, with the prefix), and
    its help ends with ``note``."""
    inside = [False]  # while this rule asks tyro for the plain dataclass spec

    def rule(info: StructTypeInfo) -> StructConstructorSpec | None:
        if info.type is not cls or inside[0]:
            return None
        inside[0] = True
        try:
            spec = ConstructorRegistry.get_struct_spec(info)
        finally:
            inside[0] = False
        if not isinstance(spec, StructConstructorSpec):
            return None
        return dataclasses.replace(spec, fields=tuple(spelled(f) for f in spec.fields))

    def spelled(f: Any) -> Any:
        conf = arg(f.name)
        if conf is not None:
            f = dataclasses.replace(f, type=Annotated[f.type, conf])
        if note:
            text = f.helptext() if callable(f.helptext) else f.helptext
            f = dataclasses.replace(f, helptext=f"{text}; {note}" if text else note)
        return f

    return rule


def _flat_comparison() -> Callable[[StructTypeInfo], StructConstructorSpec | None]:
    """A struct rule: the comparison's fields drop the ``comparison.`` prefix; those the
    pipeline also has (``seed``, ``batch_size``) are no options of their own (the pipeline sets
    them)."""
    pipeline = {f.name for f in dataclasses.fields(PipelineConfig)}
    return _flat(
        ComparisonConfig,
        lambda name: tyro.conf.Suppress if name in pipeline else tyro.conf.arg(prefix_name=False),
    )


def _flat_steering() -> list[Callable[[StructTypeInfo], StructConstructorSpec | None]]:
    """Struct rules: the steering methods' settings (``ks-lens steer``) are spelled by their
    names (``--steps``, ``--normalize``), except CAA's settings that K-Steering also has:
    ``--caa-NAME`` (``--caa-combine``)."""
    ksteer = {f.name for f in dataclasses.fields(KSteeringConfig)}
    return [
        _flat(KSteeringConfig, lambda name: None, "K-Steering (--classifier) only"),
        _flat(
            CAAConfig,
            lambda name: tyro.conf.arg(name=f"caa_{name}") if name in ksteer else None,
            "CAA (--vectors) only",
        ),
    ]


def _registry() -> ConstructorRegistry:
    registry = ConstructorRegistry()
    registry.primitive_rule(_comma_tuple)
    registry.struct_rule(_flat_comparison())
    for rule in _flat_steering():
        registry.struct_rule(rule)
    return registry


def one_of(choices: Sequence[str]) -> PrimitiveConstructorSpec[str]:
    """A string option restricted to ``choices`` (for choices kept in a tuple constant, not a
    ``Literal`` type): ``Annotated[str, one_of(SPLITS)]``."""
    values = tuple(choices)
    return PrimitiveConstructorSpec(
        nargs=1,
        metavar="{" + ",".join(values) + "}",
        instance_from_str=lambda args: args[0],
        is_instance=lambda x: isinstance(x, str),
        str_from_instance=lambda x: [x],
        choices=values,
    )


def _layers_from_str(args: list[str]) -> tuple[int, ...] | None:
    (value,) = args
    if value.strip().lower() == "all":
        return None
    try:
        layers = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        layers = ()
    if not layers:
        raise ValueError(
            f"expected 'all' or comma-separated layer indices such as 3 or 2,5,9; got {value!r}"
        )
    return layers


#: layer indices (``2,5,9``) or ``all`` (None)
Layers = Annotated[
    tuple[int, ...] | None,
    PrimitiveConstructorSpec(
        nargs=1,
        metavar="all|L,L,...",
        instance_from_str=_layers_from_str,
        is_instance=lambda x: x is None or isinstance(x, tuple),
        str_from_instance=lambda x: ["all" if x is None else ",".join(map(str, x))],
    ),
]


def parse(
    cls: type[T],
    argv: Sequence[str],
    *,
    prog: str,
    description: str | None = None,
    default: T | None = None,
) -> T:
    """``argv`` read into the dataclass ``cls`` (defaults from ``default`` if given).

    ``--help`` prints the options and exits with code 0; a bad value or an unknown option
    prints what is wrong and exits with code 2. Exceptions of the dataclass's own checks (e.g.
    :class:`~ks_lens.errors.ConfigError` from ``ProbeConfig``) propagate.
    """
    check_renamed(argv)
    return tyro.cli(
        cls,
        args=list(argv),
        prog=prog,
        description=description,
        default=tyro.MISSING_NONPROP if default is None else default,
        config=(tyro.conf.FlagCreatePairsOff,),
        registry=_registry(),
    )


@dataclass(frozen=True)
class PipelineOptions:
    """The options of a pipeline run: every :class:`PipelineConfig` field, and ``--fast``."""

    config: Annotated[PipelineConfig, tyro.conf.arg(name="")] = field(
        default_factory=PipelineConfig
    )
    fast: bool = False  # smoke-run sizes (PipelineConfig.fast) as defaults; options given still win


P = TypeVar("P", bound=PipelineOptions)


def given(argv: Sequence[str], option: str) -> bool:
    """Whether ``argv`` spells ``option`` (``--name`` or ``--name=value``) before any ``--``."""
    for token in argv:
        if token == "--":
            return False
        if token == option or token.startswith(option + "="):
            return True
    return False


#: command-line options renamed in 0.2.0 -> their new spelling (the old one is refused)
RENAMED_OPTIONS: dict[str, str] = {
    "--position": "--pooling",  # ks-lens collect: which tokens are read
    "--text-position": "--text-pooling",  # pipeline runs
    "--kind": "--architecture",  # ks-lens train: the probe's architecture
    "--comparison.seed": "--seed",  # the comparison takes the pipeline's
    "--comparison.batch-size": "--batch-size",
}


def check_renamed(argv: Sequence[str]) -> None:
    """Refuse an option of :data:`RENAMED_OPTIONS` with a
    :class:`~ks_lens.errors.RenamedError` naming its new spelling."""
    for old, new in RENAMED_OPTIONS.items():
        if given(argv, old):
            raise RenamedError(f"{old} was renamed in ks-lens 0.2.0; use {new}")


def check_spellings(argv: Sequence[str]) -> None:
    """Refuse, in one line naming the right spelling, what the generated parser would misread:
    ``--fast=VALUE`` (a flag takes no value) and a comparison option spelled with its
    ``comparison.`` prefix (``--comparison.methods``; the parser would suggest another option)."""
    pipeline = {f.name for f in dataclasses.fields(PipelineConfig)}
    flat = {f.name for f in dataclasses.fields(ComparisonConfig)} - pipeline
    for i, token in enumerate(argv):
        if token == "--":
            return
        name = token.split("=", 1)[0]
        after = argv[i + 1] if i + 1 < len(argv) else ""
        if name == "--fast" and ("=" in token or after.lower() in ("true", "false")):
            spelled = token if "=" in token else f"{token} {after}"
            raise ConfigError(
                f"--fast takes no value (got {spelled!r}): give --fast for the smoke-run sizes, "
                "or leave it out for the full run"
            )
        rest = name.removeprefix("--comparison.")
        if rest != name and rest.split(".")[0].replace("-", "_") in flat:
            raise ConfigError(
                f"{name} is spelled --{rest}: the comparison's options drop their "
                "'comparison.' prefix"
            )


def parse_pipeline_options(
    cls: type[P],
    argv: Sequence[str],
    *,
    prog: str,
    description: str | None = None,
    full: PipelineConfig | None = None,
    adjust: Callable[[P], P] | None = None,
    **defaults: Any,
) -> P:
    """``argv`` read into ``cls`` (a :class:`PipelineOptions`), defaults first.

    The config's defaults are :meth:`PipelineConfig.fast` when ``argv`` has ``--fast``, else
    ``full`` (default: ``PipelineConfig()``); options given explicitly override either.
    ``defaults`` sets the defaults of ``cls``'s own fields (e.g. ``out=``). When ``--methods``
    leaves out the baseline and ``--baseline`` is not given, the first method becomes the
    baseline. ``adjust`` changes the defaults last (a preset, :mod:`ks_lens.cli.presets`), before
    the options given. Nothing is validated here: call ``config.validate()``.
    """
    argv = list(argv)
    check_spellings(argv)
    fast = given(argv, "--fast")
    base = PipelineConfig.fast() if fast else (full or PipelineConfig())
    default = dataclasses.replace(cls(), config=base, **defaults)
    if adjust is not None:
        default = adjust(default)
    opts = parse(cls, argv, prog=prog, description=description, default=default)
    c = opts.config.comparison
    if c.methods and c.baseline not in c.methods and not given(argv, "--baseline"):
        config = dataclasses.replace(
            opts.config, comparison=dataclasses.replace(c, baseline=c.methods[0])
        )
        opts = dataclasses.replace(opts, config=config)
    return opts


__all__ = [
    "RENAMED_OPTIONS",
    "Layers",
    "PipelineOptions",
    "check_renamed",
    "check_spellings",
    "given",
    "one_of",
    "parse",
    "parse_pipeline_options",
]
