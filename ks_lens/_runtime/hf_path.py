"""Run the wrapped Hugging Face modules directly, firing only the hook points that have hooks.

TransformerLens 4's ``TransformerBridge`` swaps every submodule of the HF model for a hooked
component (blocks, attention, MLP, norms, each linear layer), and its attention bridge runs
through extra Python around HF's own attention. That costs about a third over plain HF
``generate`` on a small model, whether or not any hook is used. :func:`hf_modules` puts the
original HF modules back for the duration of a call and routes only the hook points that
currently have hooks through HF forward (pre-)hooks on the matching original modules:

==============================================  ===============================================
hook point (alias)                               where it fires on the plain HF modules
==============================================  ===============================================
``blocks.{L}.hook_in`` (``hook_resid_pre``)      the decoder layer's input ``hidden_states``
``blocks.{L}.hook_out`` (``hook_resid_post``)    the decoder layer's output
``blocks.{L}.attn.hook_out`` (``hook_attn_out``)  the attention module's output (after o_proj)
``blocks.{L}.ln2.hook_in`` (``hook_resid_mid``)   the second norm's input
``blocks.{L}.mlp.hook_out`` (``hook_mlp_out``)    the MLP module's output
``blocks.{L}.mlp.hook_in`` / ``ln1.hook_in``      the MLP / first norm's input
==============================================  ===============================================

The hook functions are called by the same ``HookPoint`` objects, so they receive the same
tensors, under the same (canonical) ``hook.name``, and what they return replaces the activation
exactly as in the bridge. Anything else falls back to the full bridge, unchanged: a hook on any
other hook point (attention patterns, ``hook_z``, q/k/v, ...), a hook placed directly on a bridge
component, or components whose hook semantics differ (scaled-residual blocks, parallel blocks).
HF forward hooks on the HF model itself (e.g. ks-lens's position tracker) are kept.

The bridge switches the HF model to eager attention. On the plain modules, a model that runs
Hugging Face's standard eager attention runs it without copying its key/value heads
(:mod:`ks_lens._runtime.attention`): the same numbers within float rounding (greedy tokens
identical to plain Hugging Face ``generate`` in the tests).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ks_lens._runtime.attention import grouped_attention_for
from ks_lens.compat import cache_keyword, check_bridge_cache
from ks_lens.errors import ConfigError
from ks_lens.types import Model

_ROUTABLE = re.compile(
    r"^blocks\.(\d+)\.(?:(hook_in|hook_out)|(attn|mlp|ln1|ln2)\.(hook_in|hook_out))$"
)
# which (component, hook) pairs are routed, and the component classes whose semantics are known
_ROUTED = {
    ("block", "hook_in"),
    ("block", "hook_out"),
    ("attn", "hook_out"),
    ("mlp", "hook_in"),
    ("mlp", "hook_out"),
    ("ln1", "hook_in"),
    ("ln2", "hook_in"),
}


# the bridge classes whose hook_in / hook_out are checked to sit on the wrapped module's first
# input / first output (subclasses such as scaled-residual or parallel blocks are not routed)
_KNOWN = {
    "block": {"BlockBridge"},
    "attn": {"AttentionBridge", "PositionEmbeddingsAttentionBridge"},
    "mlp": {"MLPBridge", "GatedMLPBridge"},
    "ln1": {"NormalizationBridge", "RMSNormalizationBridge"},
    "ln2": {"NormalizationBridge", "RMSNormalizationBridge"},
}


def _hook_ids(module: torch.nn.Module) -> set[int]:
    return {
        *module._forward_hooks,
        *module._forward_pre_hooks,
        *module._backward_hooks,
        *module._backward_pre_hooks,
    }


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _internal_hook_ids(modules: list[torch.nn.Module]) -> set[int]:
    """The ids of TransformerLens's own capture hooks on bridge components (they only serve the
    bridge's forward, which the plain HF modules do not run)."""
    return {
        int(h.id) for mod in modules for h in mod.__dict__.get("_capture_hook_handles", ())
    }


def _plan_routes(model: Model) -> list[tuple[Any, str, Any]] | None:
    """``(original module, "hook_in"/"hook_out", HookPoint)`` for every hook point with hooks, or
    ``None`` when one of them (or a hook elsewhere on the bridge) cannot be routed."""
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    routes: list[tuple[Any, str, Any]] = []
    seen: set[int] = set()
    modules = list(model.modules())
    hooked = [m for m in modules if _has_hooks(m)]
    internal = _internal_hook_ids(modules) if hooked else set()
    for module in hooked:
        if id(module) in seen or not (_hook_ids(module) - internal):
            continue
        seen.add(id(module))
        if not isinstance(module, HookPoint):
            if isinstance(module, GeneralizedComponent):
                return None  # a hook on a bridge component itself
            continue  # hooks on HF modules stay where they are
        m = _ROUTABLE.match(str(getattr(module, "name", "")))
        if m is None:
            return None
        layer = int(m.group(1))
        part, hook = ("block", m.group(2)) if m.group(2) else (m.group(3), m.group(4))
        if (part, hook) not in _ROUTED:
            return None
        block = model.blocks[layer]
        comp = block if part == "block" else getattr(block, part, None)
        if comp is None or getattr(comp, hook, None) is not module:
            return None
        if type(comp).__name__ not in _KNOWN[part]:
            return None
        orig = comp.original_component
        if orig is None:
            return None
        routes.append((orig, hook, module))
    return routes


def _pre_hook(point: Any):
    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args and isinstance(args[0], torch.Tensor):
            return (point(args[0]), *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = point(kwargs["hidden_states"])
            return args, kwargs
        return None

    return hook


def _post_hook(point: Any):
    def hook(module: Any, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return point(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (point(output[0]), *output[1:])
        return None

    return hook


def _unwrap(module: torch.nn.Module, swaps: list[tuple[torch.nn.Module, str, Any]]) -> None:
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    for name, child in list(module._modules.items()):
        if child is None:
            continue
        orig = (
            child._modules.get("_original_component")
            if isinstance(child, GeneralizedComponent)
            else None
        )
        if orig is not None:
            module._modules[name] = orig
            swaps.append((module, name, child))
            _unwrap(orig, swaps)
        else:
            _unwrap(child, swaps)


def _is_bridge(model: Model) -> bool:
    return hasattr(model, "original_model") and hasattr(model, "blocks")


def can_bypass(model: Model) -> bool:
    """Whether :func:`hf_modules` would run the plain HF modules with the hooks active now."""
    return _is_bridge(model) and _plan_routes(model) is not None


@contextmanager
def hf_modules(model: Model, enabled: bool = True) -> Iterator[bool]:
    """Within the block, ``model.original_model`` runs its own HF modules, with the hook points
    that have hooks right now routed as in the module docstring; yields whether it does (``False``:
    the full bridge runs, because something cannot be routed or ``enabled`` is false).

    Hooks must be in place before entering (steering contexts, ``model.hooks(...)``); the module
    tree is restored on exit, also after an exception.
    """
    routes = _plan_routes(model) if enabled and _is_bridge(model) else None
    if routes is None:
        yield False
        return
    swaps: list[tuple[torch.nn.Module, str, Any]] = []
    handles: list[Any] = []
    try:
        _unwrap(model.original_model, swaps)
        for orig, hook, point in routes:
            if hook == "hook_in":
                handles.append(orig.register_forward_pre_hook(_pre_hook(point), with_kwargs=True))
            else:
                handles.append(orig.register_forward_hook(_post_hook(point)))
        with grouped_attention_for(model.original_model):
            yield True
    finally:
        for h in handles:
            h.remove()
        for parent, name, bridge in reversed(swaps):
            parent._modules[name] = bridge


def plain_forward(
    model: Model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache: Any = None,
    logits_to_keep: int = 0,
    full_bridge: bool = False,
) -> torch.Tensor | None:
    """One forward pass, through the plain HF modules with the hooked points routed
    (:func:`hf_modules`) where possible, else through the bridge; hooks must be in place.

    Returns the logits of the last ``logits_to_keep`` positions (all with 0), ``[batch, pos,
    vocab]``, or ``None`` when ``logits_to_keep`` is negative (no unembedding: for passes that
    only record activations). ``cache`` is a Hugging Face KV cache the pass extends (handed to the
    model under the keyword its transformers version takes: :func:`cache_keyword`).
    ``position_ids`` ``[batch, pos]`` (default: the model's, continuing after the cache) are
    passed on.
    """
    keep = max(logits_to_keep, 1) if logits_to_keep < 0 else logits_to_keep
    hf: Any = model.original_model
    extra: dict[str, Any] = {cache_keyword(hf): cache} if cache is not None else {}
    if position_ids is not None:
        extra["position_ids"] = position_ids
    if cache is not None and full_bridge:
        check_bridge_cache()
    with hf_modules(model, enabled=not full_bridge) as plain:
        if plain:
            out = hf(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=cache is not None,
                logits_to_keep=keep,
                **extra,
            )
            return None if logits_to_keep < 0 else out.logits
        if logits_to_keep < 0:
            model(input_ids, attention_mask=attention_mask, return_type=None, **extra)
            return None
        logits: torch.Tensor = model(
            input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, **extra
        )
        return logits


# ----------------------------------------------------------------------------- resuming at a layer


class _Reached(Exception):
    """Ends :func:`layer_input`'s forward pass at the requested layer."""


def decoder_layers(model: Model) -> torch.nn.ModuleList | None:
    """The Hugging Face ``ModuleList`` that holds the model's decoder layers (the one whose items
    the bridge's ``blocks`` wrap, or, inside :func:`hf_modules`, the plain layers); ``None`` if
    it cannot be found."""
    blocks = getattr(model, "blocks", None)
    hf = getattr(model, "original_model", None)
    if blocks is None or hf is None or len(blocks) == 0:
        return None
    first = {id(blocks[0]), id(getattr(blocks[0], "original_component", None))}
    for module in hf.modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and len(module) == len(blocks)
            and id(module[0]) in first
        ):
            return module
    return None


class _Skip(torch.nn.Module):
    """Stands in for a skipped decoder layer: passes its input on, or (the last skipped layer)
    returns ``value``, in the layer's own output format."""

    def __init__(self, value: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.value = value
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = hidden_states if self.value is None else self.value
        return (out,) if self.as_tuple else out


def layer_input(
    model: Model,
    layer: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    cache: Any = None,
) -> tuple[torch.Tensor, bool]:
    """Run the plain HF modules (no hooks) up to decoder layer ``layer`` and return its input
    hidden states ``[batch, pos, d_model]``, and whether the layer below returns a tuple (the
    format :func:`resume_at` must imitate). The pass stops there (nothing above runs).

    ``position_ids`` (default: the model's, ``0..pos-1``) are passed on; a Hugging Face KV
    ``cache`` is filled for the layers below ``layer``."""
    if layer < 1:
        raise ConfigError(f"layer must be at least 1 to have layers below it, got {layer}")
    hf: Any = model.original_model
    box: dict[str, Any] = {}

    def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        box["hidden"] = h.detach()
        raise _Reached

    def post(module: Any, args: Any, output: Any) -> None:
        box["tuple"] = isinstance(output, tuple)

    with torch.no_grad(), hf_modules(model) as plain:
        layers = decoder_layers(model)
        if not plain or layers is None:
            raise RuntimeError("the plain HF modules cannot run for this model")
        handles = [
            # first in line: a routed hook at this layer's input must not change what is read
            layers[layer].register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
            layers[layer - 1].register_forward_hook(post),
        ]
        try:
            kw = {cache_keyword(hf): cache} if cache is not None else {}
            hf(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=cache is not None,
                **kw,
            )
        except _Reached:
            pass
        finally:
            for h in handles:
                h.remove()
    if "hidden" not in box:
        raise RuntimeError(f"decoder layer {layer} never ran")
    return box["hidden"], bool(box.get("tuple", False))


@contextmanager
def resume_at(model: Model, layer: int, hidden: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Inside a :func:`hf_modules` block that runs the plain modules: decoder layers below
    ``layer`` are skipped, and layer ``layer`` receives ``hidden`` (from :func:`layer_input`, for
    the same token batch) as its input. Hooks at ``layer`` and above fire as usual; nothing
    below ``layer`` may be hooked (its hooks would not fire). Restored on exit."""
    layers = decoder_layers(model)
    if layers is None:
        raise RuntimeError("the model's decoder layers cannot be found")
    saved = [layers[i] for i in range(layer)]
    try:
        for i in range(layer):
            layers[i] = _Skip(hidden if i == layer - 1 else None, as_tuple)
        yield
    finally:
        for i, m in enumerate(saved):
            layers[i] = m
