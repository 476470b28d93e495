"""Grouped-query attention without copying keys and values, for the plain-HF fast path.

Hugging Face's eager attention (which the TransformerLens bridge switches a model to) repeats
every key/value head for each query head that shares it (``repeat_kv``) before its two matmuls,
so each decoding step copies the whole KV cache ``n_heads / n_kv_heads`` times, layer by layer.
On the default model (9 query heads, 3 key/value heads) that copy was 16 % of a 48-row decoding
step on 2 CPU cores. :func:`grouped_attention` computes the same attention with the query heads
of each key/value head stacked along the query axis instead: the same dot products and the same
softmax, no copy; it equals eager attention within float rounding (tested on the tiny model's
grouped heads), because the matmuls are split differently.

:func:`grouped_attention_for` switches a model to it for the duration of a block (the model's
config is restored on exit), only where the model runs HF's standard eager attention; anything
it cannot take (soft-capped logits, attention sinks, dropout while training, no grouping) is
handed to the model's own eager function, unchanged. The function and its mask builder are
registered in Hugging Face's attention registries under :data:`GROUPED`, Hugging Face's own
extension point for attention implementations (a named pure function, registered once).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: the name the grouped attention is registered under in Hugging Face's attention registries
GROUPED = "ks_lens_grouped"

# keyword arguments that change eager attention's result; a call carrying one is not grouped
_SPECIAL = ("softcap", "s_aux", "sinks")


def _eager_of(module: torch.nn.Module) -> Any:
    """The eager attention function of ``module``'s own modeling file (``None`` if none)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def grouped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention, ``softmax(q k^T * scaling + mask) v``, for ``query`` ``[batch, heads, q,
    d]`` and ``key``/``value`` ``[batch, kv_heads, k, d]`` without repeating the key/value heads.

    Returns ``(output [batch, q, heads, d], weights [batch, heads, q, k])`` as Hugging Face's
    eager attention does; calls it cannot take exactly (module docstring) go to the module's
    own eager function."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    special = any(kwargs.get(k) is not None for k in _SPECIAL)
    if special or kv_heads == heads or heads % kv_heads or (dropout and module.training):
        eager = _eager_of(module)
        if eager is None:
            raise RuntimeError(f"no eager attention function for {type(module).__name__}")
        return eager(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    rep = heads // kv_heads
    # query head h uses key/value head h // rep (as repeat_kv lays them out)
    scores = torch.matmul(query.reshape(batch, kv_heads, rep * q_len, dim), key.transpose(2, 3))
    scores = scores * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        scores = (scores.view(batch, kv_heads, rep, q_len, -1) + mask[:, :, None]).view(
            batch, kv_heads, rep * q_len, -1
        )
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).view(batch, heads, q_len, value.shape[-1])
    return out.transpose(1, 2).contiguous(), weights.view(batch, heads, q_len, -1)


def _register() -> None:
    """Register :func:`grouped_attention` and eager attention's mask builder under
    :data:`GROUPED` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if GROUPED not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(GROUPED, grouped_attention)
        AttentionMaskInterface.register(GROUPED, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _eager_configs(hf: torch.nn.Module) -> list[Any] | None:
    """The distinct configs of ``hf``'s modules that select an attention implementation, if all
    of them select eager attention and every attention module has a standard eager function;
    else ``None`` (the model is left as it is)."""
    configs: dict[int, Any] = {}
    for module in hf.modules():
        config = module.__dict__.get("config")  # a plain attribute (not a submodule)
        impl = getattr(config, "_attn_implementation", None)
        if impl is None:
            continue
        if impl != "eager":
            return None
        if "Attention" in type(module).__name__ and _eager_of(module) is None:
            return None
        configs[id(config)] = config
    return list(configs.values()) or None


@contextmanager
def grouped_attention_for(hf: torch.nn.Module) -> Iterator[bool]:
    """Within the block, the Hugging Face model ``hf`` runs :func:`grouped_attention` instead of
    eager attention; yields whether it does (``False``: it does not run eager attention, and is
    left as it is). Its configs' attention implementation is restored on exit, also after an
    exception."""
    configs = _eager_configs(hf)
    if configs is None:
        yield False
        return
    _register()
    try:
        for config in configs:
            config._attn_implementation = GROUPED
        yield True
    finally:
        for config in configs:
            config._attn_implementation = "eager"


__all__ = ["GROUPED", "grouped_attention", "grouped_attention_for"]
