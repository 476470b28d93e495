"""A steered readout's shared prompt start, run once per steering configuration.

Every prompt of a readout starts with the same tokens (the chat header and the system prompt:
24 of the default model's 44-token prompts). A configuration that steers every position
(``positions="all"``) writes the same change at those tokens whatever question follows, because
a causal model's activations there depend only on the tokens before them and a steering
transform acts on each token's activation alone (:meth:`~ks_lens.steering.SteeringMethod.transforms`).
:class:`SteeredPrefix` therefore runs those tokens once per configuration, from the first
steered layer up, and keeps their keys and values; each prompt then runs only its own tokens,
attending to its configuration's cached start. Used by
:func:`~ks_lens.evaluation.readouts.readout_groups`; equal to full passes within float rounding
(tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ks_lens._runtime.batching import record_activations
from ks_lens._runtime.hf_path import layer_input, plain_forward, resume_at
from ks_lens._runtime.prefix import PrefixCache, _new_cache
from ks_lens.activations import MIN_SHARED_PREFIX
from ks_lens.models import model_device
from ks_lens.models.chat import TokenBatch

if TYPE_CHECKING:
    from ks_lens.evaluation.readouts import _Reader


def common_start(ids: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The longest token prefix all of ``ids`` start with, leaving every row at least one token.

    >>> common_start([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]])
    (1, 2)
    """
    if not ids:
        return ()
    first, n = ids[0], min(len(r) for r in ids) - 1
    for row in ids[1:]:
        m = 0
        while m < n and row[m] == first[m]:
            m += 1
        n = m
    return tuple(first[: max(n, 0)])


class SteeredPrefix:
    """The shared start ``ids`` of a readout's prompts: its unsteered keys and values below the
    first steered layer, and its steered keys and values from there up, per configuration."""

    def __init__(self, reader: _Reader, ids: tuple[int, ...], batch_size: int) -> None:
        model, start = reader.model, reader.start
        assert start is not None
        self.reader, self.ids, self.start = reader, ids, start
        tokens = torch.tensor([list(ids)], device=model_device(model))
        cache = _new_cache(model)
        hidden, self.as_tuple = layer_input(
            model, start, tokens, torch.ones_like(tokens), cache=cache
        )
        # below the steering: one unsteered copy serves every configuration
        self.base = PrefixCache(ids, _layer_kv(cache)[:start])
        self.steered: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        n_groups = len(reader.steerings)
        for c in range(0, n_groups, batch_size):
            self._run_groups(list(range(c, min(c + batch_size, n_groups))), hidden)

    @classmethod
    def build(
        cls, reader: _Reader, ids: Sequence[Sequence[int]], batch_size: int
    ) -> SteeredPrefix | None:
        """The shared start of the prompts ``ids`` (``None`` when they share fewer than
        :data:`~ks_lens.activations.MIN_SHARED_PREFIX` tokens, as collection's shared prefixes)."""
        shared = common_start(ids)
        return cls(reader, shared, batch_size) if len(shared) >= MIN_SHARED_PREFIX else None

    def __len__(self) -> int:
        return len(self.ids)

    def _run_groups(self, groups: list[int], hidden: torch.Tensor) -> None:
        """Run the start once per configuration of ``groups`` (one row each), from layer
        ``start`` up, steered, and keep each row's keys and values."""
        from ks_lens.steering.base import steer_groups

        reader, model = self.reader, self.reader.model
        n = len(groups)
        tokens = torch.tensor([list(self.ids)] * n, device=model_device(model))
        cache = _new_cache(model)
        names = [reader.probe.hook_name] if reader.probe is not None else []
        with (
            torch.no_grad(),
            steer_groups(model, reader.only(groups), groups, positions="all"),
            record_activations(model, names, last_token=True, stop=not reader.next_token),
            resume_at(model, self.start, hidden.repeat(n, 1, 1), self.as_tuple),
        ):
            plain_forward(model, tokens, attention_mask=torch.ones_like(tokens), cache=cache)
        kv = _layer_kv(cache, first=self.start)
        for j in range(n):
            self.steered.append([(k[j : j + 1], v[j : j + 1]) for k, v in kv])

    def _cache(self, groups: Sequence[int]) -> Any:
        """A KV cache holding the start for rows steered by ``groups``: the unsteered keys and
        values below the first steered layer, each row's configuration's from there up."""
        cache = _new_cache(self.reader.model)
        layers: list[Any] = cache.layers
        rows = len(groups)
        for i, (k, v) in enumerate(self.base.kv):
            layers[i].update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
        for i in range(len(self.steered[0])):
            keys = torch.cat([self.steered[g][i][0] for g in groups])
            values = torch.cat([self.steered[g][i][1] for g in groups])
            layers[self.start + i].update(keys, values)
        return cache

    def read(self, idx: list[int], batch: TokenBatch, n: int, batch_size: int, bar: Any) -> None:
        """One batch of prompts' own tokens (``idx`` of ``n``, left padded, after the start):
        the layers below ``start`` run once, then every configuration resumes from them after
        its cached start, ``batch_size`` rows per pass."""
        reader, model = self.reader, self.reader.model
        width = len(self.ids)
        mask = torch.cat(
            [torch.ones_like(batch.attention_mask[:, :1]).expand(-1, width), batch.attention_mask],
            1,
        )
        pos = width + (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden, as_tuple = layer_input(
            model,
            self.start,
            batch.input_ids,
            mask,
            position_ids=pos,
            cache=self.base.cache_for(model, len(idx)),
        )
        pairs = [(g, j) for g in range(len(reader.steerings)) for j in range(len(idx))]
        for c in range(0, len(pairs), batch_size):
            chunk = pairs[c : c + batch_size]
            js = [j for _, j in chunk]
            groups = [g for g, _ in chunk]
            sub = TokenBatch(batch.input_ids[js], batch.attention_mask[js])
            after = (self._cache(groups), pos[js], mask[js])
            reader.run(
                sub, [g * n + idx[j] for g, j in chunk], groups, (hidden[js], as_tuple), after
            )
            bar.update(len(chunk))


def _layer_kv(cache: Any, first: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(keys, values)`` a Hugging Face ``DynamicCache`` holds, layer by layer from layer
    ``first``, up to the first layer the pass did not reach."""
    out = []
    for layer in cache.layers[first:]:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.numel() == 0:
            break
        assert isinstance(values, torch.Tensor)
        out.append((keys, values))
    return out


__all__ = ["SteeredPrefix", "common_start"]
