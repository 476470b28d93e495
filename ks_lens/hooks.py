"""TransformerLens hook-point names for the residual stream, and their validation.

ks-lens addresses activations with HookedTransformer-style names, which TransformerLens 4's
``TransformerBridge`` keeps as aliases:

=============================  =====================================
``blocks.{L}.hook_resid_pre``  input of block ``L``
``blocks.{L}.hook_resid_mid``  between attention and MLP (read-only here)
``blocks.{L}.hook_resid_post`` output of block ``L`` (= input of ``L + 1``)
=============================  =====================================

Writing to ``hook_resid_mid`` changes only the MLP's input, not the residual stream carried to
later blocks (the HF decoder layer keeps its own residual variable), so steering there silently
does something else than it says; :func:`check_steerable` refuses it.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from ks_lens.errors import HookPointError

ResidKind = Literal["resid_pre", "resid_mid", "resid_post"]
RESID_KINDS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")
STEERABLE_KINDS: tuple[str, ...] = ("resid_pre", "resid_post")

_RESID_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post)$")
_CANONICAL = {"hook_in": "resid_pre", "hook_out": "resid_post", "ln2.hook_in": "resid_mid"}
_CANONICAL_RE = re.compile(r"^blocks\.(\d+)\.(hook_in|hook_out|ln2\.hook_in)$")


def n_layers(model: Any) -> int:
    return int(model.cfg.n_layers)


def check_layer(model: Any, layer: int) -> int:
    """Return ``layer`` as a non-negative index; negative indices count from the end."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise HookPointError(f"layer must be an int, got {layer!r}")
    n = n_layers(model)
    if not -n <= layer < n:
        raise HookPointError(
            f"layer {layer} is out of range: the model has {n} layers (0..{n - 1})"
        )
    return layer % n


def resid_hook(layer: int, kind: str = "resid_post") -> str:
    """``resid_hook(3) == "blocks.3.hook_resid_post"``."""
    if kind not in RESID_KINDS:
        raise HookPointError(f"unknown residual hook kind {kind!r}; use one of {RESID_KINDS}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise HookPointError(f"layer must be a non-negative int, got {layer!r}")
    return f"blocks.{layer}.hook_{kind}"


def parse_resid_hook(name: str) -> tuple[int, str]:
    """``"blocks.3.hook_resid_post"`` (or its canonical ``"blocks.3.hook_out"``) -> ``(3, "resid_post")``."""
    m = _RESID_RE.match(name)
    if m:
        return int(m.group(1)), m.group(2)
    m = _CANONICAL_RE.match(name)
    if m:
        return int(m.group(1)), _CANONICAL[m.group(2)]
    raise HookPointError(
        f"{name!r} is not a residual-stream hook name; expected 'blocks.{{L}}.hook_resid_pre', "
        "'blocks.{L}.hook_resid_mid' or 'blocks.{L}.hook_resid_post'"
    )


def check_hook_name(model: Any, name: str) -> str:
    """Check that ``name`` exists on ``model`` (clear error with close matches otherwise)."""
    hook_dict = model.hook_dict
    if name in hook_dict:
        return name
    m = re.match(r"^blocks\.(\d+)\.", name)
    if m and int(m.group(1)) >= n_layers(model):
        raise HookPointError(
            f"hook {name!r} does not exist: layer {m.group(1)} is out of range, the model has "
            f"{n_layers(model)} layers (0..{n_layers(model) - 1})"
        )
    close = difflib.get_close_matches(name, list(hook_dict), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise HookPointError(f"hook {name!r} does not exist on this model{hint}")


def check_steerable(model: Any, name: str) -> tuple[int, str]:
    """Validate a hook point that steering will write to; returns ``(layer, kind)``."""
    layer, kind = parse_resid_hook(name)
    check_layer(model, layer)
    if kind == "resid_mid":
        raise HookPointError(
            f"refusing to steer at {name!r}: in TransformerLens 4 a write to hook_resid_mid only "
            "changes the MLP input of that block, not the residual stream carried forward. Steer "
            f"at 'blocks.{layer}.hook_resid_pre' or 'blocks.{layer}.hook_resid_post' instead."
        )
    check_hook_name(model, name)
    return layer, kind
