"""One forward pass: the activation summary at every requested hook point."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int

from ks_lens.activations.container import POOLINGS, Pooling
from ks_lens.activations.prefix import PrefixCache
from ks_lens.batching import record_activations
from ks_lens.chat import TokenBatch
from ks_lens.errors import ConfigError, HookPointError
from ks_lens.hf_path import forward
from ks_lens.types import Model
from ks_lens.utils import renamed


@renamed(position="pooling")
def capture_features(
    model: Model,
    batch: TokenBatch,
    hook_names: Sequence[str],
    *,
    response_start: Int[torch.Tensor, " batch"] | None = None,
    pooling: Pooling = "last",
    prefix: PrefixCache | None = None,
) -> list[Float[torch.Tensor, "batch ..."]]:
    """One forward pass; the activation summary at every hook in ``hook_names`` (in that order),
    each ``[batch, *feature]`` (e.g. ``[batch, d_model]``, ``[batch, n_heads, d_head]``).

    ``pooling="last"`` takes the final (left-padded, hence real) token; ``"mean_response"``
    averages positions ``response_start[b]`` (index within the unpadded row) to the end.
    Hook names are any per-block hook point with a ``[batch, pos, ...]`` activation; the pass
    stops as soon as all of them have fired.

    With ``prefix`` (a :class:`PrefixCache` from :func:`prefix_cache`, made for the same
    ``hook_names``), every row is ``prefix.ids`` followed by its row of ``batch``: only the
    suffix tokens are run, attending to the cached prefix, and the result equals that of the
    whole rows within float rounding. ``batch`` is left padded as everywhere else (it is
    re-padded on the right internally); ``response_start`` still counts from the start of the
    whole row and must not point into the prefix.
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")
    if not hook_names:
        raise ConfigError("hook_names must name at least one hook point")
    if pooling == "mean_response" and response_start is None:
        raise ConfigError("pooling='mean_response' needs response_start")
    ids, mask = batch.input_ids, batch.attention_mask
    n_rows, width = ids.shape
    pos = torch.arange(width, device=ids.device)
    kwargs: dict[str, Any] = {}
    if prefix is None:
        # left padded: every row ends at the last position
        read_last: torch.Tensor | None = None
        first = batch.n_pad.to(ids.device) + response_start if response_start is not None else None
        end = torch.full((n_rows,), width, device=ids.device)
    else:
        # The suffixes run RIGHT padded after the cached prefix: each row's real tokens then sit
        # at the same key positions whatever the batch's padding, so a row's numbers do not
        # depend on the rows it is batched with (a padding gap between prefix and suffix would
        # shift them and change float rounding).
        lengths = batch.lengths.to(ids.device)
        gather = (pos[None, :] + batch.n_pad.to(ids.device)[:, None]) % width
        ids, mask = ids.gather(1, gather), mask.gather(1, gather)
        n_prefix = len(prefix)
        if response_start is not None and bool((response_start < n_prefix).any()):
            raise ConfigError("response_start points into the shared prefix")
        read_last = lengths - 1
        first = response_start - n_prefix if response_start is not None else None
        end = lengths
        ones = torch.ones(n_rows, n_prefix, dtype=mask.dtype, device=mask.device)
        mask = torch.cat([ones, mask], dim=1)
        kwargs["cache"] = prefix.cache_for(model, n_rows)
    if pooling == "mean_response":
        assert first is not None
        first = first.to(ids.device)
        weights = ((pos[None, :] >= first[:, None]) & (pos[None, :] < end[:, None])).float()
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)

    def summarise(act: torch.Tensor, name: str) -> torch.Tensor:
        if act.dim() < 3 or tuple(act.shape[:2]) != (n_rows, width):
            raise HookPointError(
                f"{name} gives activations of shape {tuple(act.shape)}, not "
                f"[batch={n_rows}, pos={width}, ...]: ks-lens collects per-token activations "
                "only (attention patterns and scores are [batch, head, query, key])"
            )
        a = act.float()
        if pooling == "mean_response":
            w = weights.to(a.device)
            return (w.reshape(*w.shape, *([1] * (a.dim() - 2))) * a).sum(1)
        if read_last is None:
            return a[:, -1].clone()
        rows = torch.arange(n_rows, device=a.device)
        return a[rows, read_last.to(a.device)]

    with (
        torch.no_grad(),
        record_activations(model, hook_names, reduce=summarise, stop=True) as rec,
    ):
        forward(model, ids, attention_mask=mask, logits_to_keep=-1, **kwargs)
    if rec.missing:
        raise HookPointError(
            f"hook point(s) {rec.missing} did not fire in a forward pass: this architecture never "
            "calls them (model.hook_dict lists every name TransformerLens defines); collect at "
            "another hook point"
        )
    return [rec[name].cpu() for name in hook_names]


@renamed(position="pooling")
def capture_batch(
    model: Model,
    batch: TokenBatch,
    hook_names: Sequence[str],
    *,
    response_start: Int[torch.Tensor, " batch"] | None = None,
    pooling: Pooling = "last",
    prefix: PrefixCache | None = None,
) -> Float[torch.Tensor, "batch hook d_model"]:
    """:func:`capture_features` stacked to ``[batch, hook, d_model]``, for hook points that share one
    feature shape (e.g. the residual-stream kinds); otherwise use :func:`capture_features`."""
    feats = capture_features(
        model, batch, hook_names, response_start=response_start, pooling=pooling, prefix=prefix
    )
    shapes = {tuple(f.shape[1:]) for f in feats}
    if len(shapes) > 1:
        raise ConfigError(
            f"capture_batch stacks hook points of one feature shape; these have {sorted(shapes)}. "
            "Use capture_features for a list of [batch, *feature] tensors."
        )
    return torch.stack(feats, dim=1)
