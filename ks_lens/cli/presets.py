"""Named sets of ``ks-lens demo`` option values (``--preset NAME``), defined in one place.

A preset changes the defaults, like ``--fast``: its values are applied to the defaults before the
options given on the command line, so an option given explicitly wins (``--preset paper
--methods ksteer,dct``). ``--fast`` and a preset combine: the fast sizes, then the preset's values.
Each value is keyed by its path in :class:`~ks_lens.cli.demo.DemoOptions`
(``config.comparison.methods`` is the option ``--methods``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tyro.constructors import PrimitiveConstructorSpec

from ks_lens.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Preset:
    """A named set of option values and what it is for (one line)."""

    name: str
    summary: str
    values: Mapping[str, Any]  # option path in DemoOptions -> value

    def options(self) -> list[str]:
        """The values as command-line options (``--methods caa_mean,ksteer,dct``)."""
        return [spell(path, value) for path, value in self.values.items()]


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "paper",
        "the K-Steering paper's protocol: K-Steering vs CAA vs DCT at 1, 2 and 3 labels, each "
        "method at its own steering layer chosen by a layer sweep on the calibration questions "
        "(docs/paper.md)",
        {
            "config.comparison.methods": ("caa_mean", "ksteer", "dct"),
            "config.comparison.baseline": "caa_mean",
            "config.comparison.sizes": (1, 2, 3),
            "sweep": True,
        },
    ),
}


#: the ``--preset`` option: a preset name (checked by :func:`get_preset`) or none
PRESET_OPTION = PrimitiveConstructorSpec(
    nargs=1,
    metavar="{" + ",".join(PRESETS) + "}",
    instance_from_str=lambda args: args[0],
    is_instance=lambda x: x is None or isinstance(x, str),
    str_from_instance=lambda x: ["none" if x is None else x],
)


def spell(path: str, value: Any) -> str:
    """One preset value as the command-line option that gives it."""
    name = "--" + path.split(".")[-1].replace("_", "-")
    if value is True:
        return name
    if isinstance(value, tuple):
        return f"{name} {','.join(str(v) for v in value)}"
    return f"{name} {value}"


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error naming the known presets otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def preset_in(argv: Sequence[str]) -> str | None:
    """The preset named in ``argv`` (``--preset NAME`` or ``--preset=NAME``, before any ``--``)."""
    found = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token.startswith("--preset="):
            found = token.split("=", 1)[1]
        elif token == "--preset":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--preset needs a name: one of {', '.join(sorted(PRESETS))}")
            found = argv[i + 1]
    return found


def _set(obj: Any, path: Sequence[str], value: Any, full: str) -> Any:
    head, rest = path[0], path[1:]
    if not dataclasses.is_dataclass(obj) or head not in {f.name for f in dataclasses.fields(obj)}:
        raise ConfigError(f"preset value {full!r}: {type(obj).__name__} has no field {head!r}")
    new = value if not rest else _set(getattr(obj, head), rest, value, full)
    return dataclasses.replace(obj, **{head: new})  # type: ignore[type-var]


def apply_preset(options: T, preset: Preset) -> T:
    """``options`` (a dataclass of option values) with ``preset``'s values set."""
    for path, value in preset.values.items():
        options = _set(options, path.split("."), value, path)
    return options


def presets_help() -> str:
    """The presets and their values, one paragraph each (for ``--help``)."""
    return " ".join(
        f"--preset {p.name}: {p.summary}; sets {' '.join(p.options())}." for p in PRESETS.values()
    )


__all__ = [
    "PRESETS",
    "PRESET_OPTION",
    "Preset",
    "apply_preset",
    "get_preset",
    "preset_in",
    "presets_help",
    "spell",
]
