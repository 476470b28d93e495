"""A token prefix that several rows share, run once and kept as a KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ks_lens._runtime.batching import record_activations
from ks_lens._runtime.hf_path import plain_forward
from ks_lens.errors import ConfigError
from ks_lens.hooks import n_layers
from ks_lens.models import model_device
from ks_lens.types import Model


@dataclass
class PrefixCache:
    """The keys and values of a token prefix that several rows share, computed once.

    Made by :func:`prefix_cache`; :func:`capture_features` takes it as ``prefix=`` and then runs
    only each row's remaining (suffix) tokens, attending to the cached prefix. ``kv`` holds, for
    the layers the prefix pass reached, ``(keys, values)`` of shape ``[1, kv_heads, prefix_len,
    d_head]``.
    """

    ids: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    def __len__(self) -> int:
        return len(self.ids)

    def cache_for(self, model: Model, batch_size: int) -> Any:
        """A fresh Hugging Face ``DynamicCache`` holding the prefix for ``batch_size`` rows (the
        suffix pass extends it in place, so every batch needs its own)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=_hf_config(model))
        layers: list[Any] = cache.layers
        for i, (k, v) in enumerate(self.kv):
            layers[i].update(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
        return cache


def stacked_cache(
    model: Model, prefixes: Sequence[PrefixCache], *, from_layer: int = 0
) -> tuple[Any, torch.Tensor]:
    """A fresh Hugging Face ``DynamicCache`` whose row ``b`` holds ``prefixes[b]``, left padded
    to the longest of them (zero keys and values on the padding), and the attention mask of
    that part ``[batch, longest]`` (0 on the padding). A pass after it gives row ``b``'s tokens
    the positions ``len(prefixes[b]) + 0, 1, ...`` (the caller passes them as ``position_ids``).

    Layers below ``from_layer`` hold zeros of the right shape (for a pass that resumes at
    ``from_layer`` and never reads them)."""
    from transformers import DynamicCache

    if not prefixes:
        raise ConfigError("no prefixes to stack")
    width = max(len(p) for p in prefixes)
    n_kv = min(len(p.kv) for p in prefixes)
    cache = DynamicCache(config=_hf_config(model))
    layers: list[Any] = cache.layers
    for i in range(n_kv):
        k0, v0 = prefixes[0].kv[i]
        shape = (len(prefixes), k0.shape[1], width, k0.shape[3])
        if i < from_layer:
            keys = k0.new_zeros(1, *shape[1:]).expand(shape)
            values = v0.new_zeros(1, v0.shape[1], width, v0.shape[3]).expand(
                len(prefixes), -1, -1, -1
            )
        else:
            keys = k0.new_zeros(shape)
            values = v0.new_zeros(len(prefixes), v0.shape[1], width, v0.shape[3])
            for b, p in enumerate(prefixes):
                k, v = p.kv[i]
                keys[b, :, width - len(p) :] = k[0]
                values[b, :, width - len(p) :] = v[0]
        layers[i].update(keys, values)
    mask = torch.zeros(len(prefixes), width, dtype=torch.long)
    for b, p in enumerate(prefixes):
        mask[b, width - len(p) :] = 1
    return cache, mask


def _hf_config(model: Model) -> Any:
    """The Hugging Face config of the bridge's model (TransformerBridge types ``original_model``
    as a plain ``nn.Module``, so its ``config`` is untyped)."""
    hf: Any = model.original_model
    return hf.config


def prefix_cache(model: Model, ids: Sequence[int], hook_names: Sequence[str]) -> PrefixCache | None:
    """Run the token prefix ``ids`` once (batch 1, no padding) and keep its KV cache, for the
    layers that a capture of ``hook_names`` reaches (the pass stops once all of them fired, as
    :func:`capture_features` does, so both passes run the same attention layers).

    Returns ``None`` where nothing can be cached: an empty prefix, a capture that stops before
    the first attention layer (``blocks.0.hook_resid_pre`` only), or a cache layer that does not
    hold the whole prefix (e.g. a sliding window shorter than it).
    """
    if not ids or not hook_names:
        return None
    cache = _new_cache(model)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=model_device(model))
    with torch.no_grad(), record_activations(model, hook_names, last_token=True, stop=True):
        plain_forward(model, tokens, cache=cache, logits_to_keep=-1)
    return _as_prefix(cache, ids)


def prefix_pass(
    model: Model, ids: Sequence[int], hook_names: Sequence[str] = ()
) -> tuple[PrefixCache | None, torch.Tensor, dict[str, torch.Tensor]]:
    """Run the token prefix ``ids`` through the whole model once (batch 1): its KV cache for
    every layer (``None`` where it cannot be shared, as in :func:`prefix_cache`), the next-token
    logits at its last token ``[vocab]``, and the activation at each of ``hook_names`` at its
    last token (``[*feature]``)."""
    if not ids:
        raise ConfigError("the prefix is empty")
    cache = _new_cache(model)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=model_device(model))
    with torch.no_grad(), record_activations(model, hook_names, last_token=True) as rec:
        logits = plain_forward(model, tokens, cache=cache, logits_to_keep=1)
    assert logits is not None
    prefix = _as_prefix(cache, ids)
    if prefix is not None and len(prefix.kv) != n_layers(model):
        prefix = None  # some layer's attention left no cache
    return prefix, logits[0, -1], {k: v[0] for k, v in rec.items()}


def _new_cache(model: Model) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=_hf_config(model))


def _as_prefix(cache: Any, ids: Sequence[int]) -> PrefixCache | None:
    from transformers.cache_utils import DynamicLayer

    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.numel() == 0:
            break  # the pass stopped before this layer's attention
        if (
            not isinstance(layer, DynamicLayer)
            or not isinstance(values, torch.Tensor)
            or keys.shape[-2] != len(ids)
        ):
            return None  # another kind of cache layer, or a window shorter than the prefix
        kv.append((keys, values))
    if not kv:
        return None
    return PrefixCache(tuple(int(t) for t in ids), kv)
