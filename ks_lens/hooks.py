"""TransformerLens hook-point names ks-lens works with, their aliases, and their validation.

ks-lens addresses activations with HookedTransformer-style names, which TransformerLens 4's
``TransformerBridge`` keeps as aliases of its own (canonical) names. Both spellings are the same
hook point everywhere in ks-lens (collection, probes, vectors, steering, stores, metadata):

=============================  ============================  ===================================
ks-lens / HookedTransformer     TransformerLens 4 canonical   meaning
=============================  ============================  ===================================
``blocks.{L}.hook_resid_pre``   ``blocks.{L}.hook_in``        input of block ``L``
``blocks.{L}.hook_attn_out``    ``blocks.{L}.attn.hook_out``  attention output of block ``L``
``blocks.{L}.hook_resid_mid``   ``blocks.{L}.ln2.hook_in``    resid_pre + attn_out
``blocks.{L}.hook_mlp_out``     ``blocks.{L}.mlp.hook_out``   MLP output of block ``L``
``blocks.{L}.hook_resid_post``  ``blocks.{L}.hook_out``       output of block ``L`` (= input of L+1)
=============================  ============================  ===================================

Inside a hook function TransformerLens passes ``hook.name`` = the CANONICAL name (e.g.
``blocks.18.hook_out``) even when the hook was added under the alias; a ``run_with_cache``
``names_filter`` given an alias returns the activation under both spellings. Compare names with
:func:`same_hook_point` / :func:`canonical_hook_name`, never with ``==``.

Collection and probes also read every other per-block hook point with a position axis, named by
its block-relative suffix as a "kind": ``"attn.hook_z"`` (``blocks.{L}.attn.hook_z``,
``[batch, pos, n_heads, d_head]``), ``"mlp.hook_post"`` (``[batch, pos, d_mlp]``),
``"attn.hook_q"``, ``"ln1.hook_normalized"``, ... (``model.hook_dict`` lists them). Such
activations keep their feature shape (recorded in store metadata); probes train on them flattened.
Attention patterns and scores (``attn.hook_pattern``, ``attn.hook_attn_scores``, ``[batch, head,
query, key]``) have no per-token layout and are refused.

Steering adds ``d_model``-wide vectors, so it writes only to :data:`STEERABLE_KINDS`: every short
kind except ``hook_resid_mid`` (a write there changes only the MLP's input, not the residual stream
carried to later blocks; the HF decoder layer keeps its own residual variable).
:func:`check_steerable` refuses everything else with the list of what is allowed. A write to
``hook_attn_out`` (``hook_mlp_out``) is added to the residual stream at ``hook_resid_mid``
(``hook_resid_post``).
"""

from __future__ import annotations

import difflib
import re
from typing import Literal, get_args

from ks_lens.errors import HookPointError
from ks_lens.types import Model

ResidKind = Literal["resid_pre", "resid_mid", "resid_post"]
RESID_KINDS: tuple[ResidKind, ...] = get_args(ResidKind)
#: the d_model-wide per-block kinds with short names, in forward order (collection and probes
#: also read any other per-block hook point, see block_kind)
HOOK_KINDS: tuple[str, ...] = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
#: the kinds steering may write to (resid_mid is read-only, see the module docstring)
STEERABLE_KINDS: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "resid_post")
#: block-relative hook suffixes without a per-token layout ([batch, head, query, key])
NO_POSITION_KINDS: tuple[str, ...] = ("attn.hook_pattern", "attn.hook_attn_scores")

_ALIAS_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)$")
_CANONICAL = {
    "hook_in": "resid_pre",
    "hook_out": "resid_post",
    "ln2.hook_in": "resid_mid",
    "attn.hook_out": "attn_out",
    "mlp.hook_out": "mlp_out",
}
_TO_CANONICAL = {v: k for k, v in _CANONICAL.items()}
_CANONICAL_RE = re.compile(
    r"^blocks\.(\d+)\.(hook_in|hook_out|ln2\.hook_in|attn\.hook_out|mlp\.hook_out)$"
)
_GLOBAL_ALIASES = {"hook_embed": "embed.hook_out", "hook_pos_embed": "pos_embed.hook_out"}
# any per-block hook point: blocks.{L}.<suffix>, the suffix ending in a hook_* name
_SUFFIX = r"(?:[A-Za-z0-9_]+\.)*hook_[A-Za-z0-9_]+"
_SUFFIX_RE = re.compile(rf"^{_SUFFIX}$")
_BLOCK_RE = re.compile(rf"^blocks\.(\d+)\.({_SUFFIX})$")


def canonical_hook_name(name: str, model: Model | None = None) -> str:
    """The TransformerLens 4 canonical spelling of ``name`` (the one ``hook.name`` shows).

    ``canonical_hook_name("blocks.3.hook_resid_post") == "blocks.3.hook_out"``. With a ``model``
    any alias the bridge knows is resolved (the alias and its canonical name share one
    ``HookPoint``); without one, the block-level aliases in the table above and ``hook_embed``.
    Unknown names come back unchanged.
    """
    if model is not None:
        hp = getattr(model, "hook_dict", {}).get(name)
        if hp is not None and isinstance(getattr(hp, "name", None), str):
            return str(hp.name)
    m = _ALIAS_RE.match(name)
    if m:
        return f"blocks.{m.group(1)}.{_TO_CANONICAL[m.group(2)]}"
    return _GLOBAL_ALIASES.get(name, name)


def ks_hook_name(name: str) -> str:
    """The spelling ks-lens records in metadata: the HookedTransformer-style alias
    (``"blocks.3.hook_out"`` -> ``"blocks.3.hook_resid_post"``); other names unchanged."""
    m = _CANONICAL_RE.match(name)
    if m:
        return f"blocks.{m.group(1)}.hook_{_CANONICAL[m.group(2)]}"
    return name


def same_hook_point(a: str, b: str, model: Model | None = None) -> bool:
    """Whether two names are the same hook point (an alias and its canonical name are)."""
    return canonical_hook_name(a, model) == canonical_hook_name(b, model)


def n_layers(model: Model) -> int:
    return int(model.cfg.n_layers)


def hook_layer(name: str) -> int | None:
    """The block index of a per-block hook point (``"blocks.7.hook_resid_post"`` -> 7), or
    ``None`` for a hook point outside the blocks (``hook_embed``, ``ln_final.hook_out``)."""
    m = re.match(r"^blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def check_layer(model: Model, layer: int) -> int:
    """Return ``layer`` as a non-negative index; negative indices count from the end."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise HookPointError(f"layer must be an int, got {layer!r}")
    n = n_layers(model)
    if not -n <= layer < n:
        raise HookPointError(
            f"layer {layer} is out of range: the model has {n} layers (0..{n - 1})"
        )
    return layer % n


def block_kind(kind: str) -> str:
    """The kind ks-lens records for a per-block hook point, given any spelling of it.

    The five residual-stream-wide kinds have short names (:data:`HOOK_KINDS`):
    ``"resid_post"``, ``"hook_resid_post"`` and the canonical ``"hook_out"`` all give
    ``"resid_post"``. Any other block-relative suffix (``"attn.hook_z"``, ``"mlp.hook_post"``) is
    its own kind. Whether the hook exists on a model is checked by :func:`check_hook_name`.
    """
    if not isinstance(kind, str):
        raise HookPointError(f"a hook kind is a string, got {kind!r}")
    if kind in HOOK_KINDS:
        return kind
    if kind in _CANONICAL:
        return _CANONICAL[kind]
    if kind.startswith("hook_") and kind[5:] in HOOK_KINDS:
        return kind[5:]
    if _SUFFIX_RE.match(kind) and not kind.startswith("blocks."):
        return kind
    raise HookPointError(
        f"unknown hook kind {kind!r}; use one of {HOOK_KINDS} or a block-relative hook suffix "
        "such as 'attn.hook_z' or 'mlp.hook_post' (the part after 'blocks.{L}.' in "
        "model.hook_dict)"
    )


def resid_hook(layer: int, kind: str = "resid_post") -> str:
    """The hook name of ``kind`` at block ``layer``: ``resid_hook(3) == "blocks.3.hook_resid_post"``,
    ``resid_hook(3, "attn.hook_z") == "blocks.3.attn.hook_z"`` (see :func:`block_kind`)."""
    kind = block_kind(kind)
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise HookPointError(f"layer must be a non-negative int, got {layer!r}")
    return f"blocks.{layer}.hook_{kind}" if kind in HOOK_KINDS else f"blocks.{layer}.{kind}"


def parse_hook(name: str) -> tuple[int, str]:
    """``"blocks.3.hook_mlp_out"`` (or its canonical ``"blocks.3.mlp.hook_out"``) -> ``(3, "mlp_out")``;
    ``"blocks.3.attn.hook_z"`` -> ``(3, "attn.hook_z")``.

    Accepts every per-block hook name (``blocks.{L}.<suffix>``); the kind is as :func:`block_kind`
    gives it.
    """
    m = _ALIAS_RE.match(name)
    if m:
        return int(m.group(1)), m.group(2)
    m = _CANONICAL_RE.match(name)
    if m:
        return int(m.group(1)), _CANONICAL[m.group(2)]
    m = _BLOCK_RE.match(name) if isinstance(name, str) else None
    if m:
        return int(m.group(1)), m.group(2)
    allowed = ", ".join(f"'blocks.{{L}}.hook_{k}'" for k in HOOK_KINDS)
    raise HookPointError(
        f"{name!r} is not a per-block hook point ks-lens can read; expected one of {allowed} "
        "(or their TransformerLens 4 canonical names, e.g. 'blocks.{L}.hook_out'), or another "
        "'blocks.{L}.<...>.hook_<name>' point such as 'blocks.{L}.attn.hook_z'"
    )


def parse_resid_hook(name: str) -> tuple[int, str]:
    """``"blocks.3.hook_resid_post"`` (or its canonical ``"blocks.3.hook_out"``) -> ``(3, "resid_post")``."""
    try:
        layer, kind = parse_hook(name)
    except HookPointError:
        kind = ""
    if kind in RESID_KINDS:
        return layer, kind
    allowed = ", ".join(f"'blocks.{{L}}.hook_{k}'" for k in RESID_KINDS)
    raise HookPointError(
        f"{name!r} is not a residual-stream hook name; expected one of {allowed} (or their "
        "canonical names 'blocks.{L}.hook_in', 'blocks.{L}.ln2.hook_in', 'blocks.{L}.hook_out')"
    )


def check_hook_name(model: Model, name: str) -> str:
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


def check_steerable_kind(name: str) -> tuple[int, str]:
    """``(layer, kind)`` of a hook name steering may write to, without a model; raises
    :class:`HookPointError` listing exactly what is allowed (:data:`STEERABLE_KINDS`)."""
    allowed = ", ".join(f"'blocks.{{L}}.hook_{k}'" for k in STEERABLE_KINDS)
    try:
        layer, kind = parse_hook(name)
    except HookPointError:
        raise HookPointError(
            f"cannot steer at {name!r}: steering writes to one of {allowed} (or their "
            "TransformerLens 4 canonical names)"
        ) from None
    if kind == "resid_mid":
        raise HookPointError(
            f"refusing to steer at {name!r}: in TransformerLens 4 a write to hook_resid_mid only "
            "changes the MLP input of that block, not the residual stream carried forward. Steer "
            f"at one of {allowed.replace('{L}', str(layer))} instead."
        )
    if kind not in STEERABLE_KINDS:
        raise HookPointError(
            f"cannot steer at {name!r}: activations there can be collected and probed, but "
            "steering adds d_model-wide vectors and writes only to one of "
            f"{allowed.replace('{L}', str(layer))} (or their TransformerLens 4 canonical names)"
        )
    return layer, kind


def check_steerable(model: Model, name: str) -> tuple[int, str]:
    """Validate a hook point that steering will write to; returns ``(layer, kind)``.

    Allowed: :data:`STEERABLE_KINDS` (``hook_resid_pre``, ``hook_attn_out``, ``hook_mlp_out``,
    ``hook_resid_post``), in either spelling.
    """
    layer, kind = check_steerable_kind(name)
    check_layer(model, layer)
    check_hook_name(model, name)
    return layer, kind
