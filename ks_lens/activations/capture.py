"""One forward pass: the activation summary at every requested hook point."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int

from ks_lens._runtime.batching import record_activations
from ks_lens._runtime.hf_path import plain_forward
from ks_lens._runtime.prefix import PrefixCache
from ks_lens.activations.container import POOLINGS, Pooling
from ks_lens.errors import ConfigError, HookPointError
from ks_lens.models.chat import TokenBatch
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
    _check_request(hook_names, pooling, response_start)
    n_rows, width = batch.input_ids.shape
    layout = _plan_layout(model, batch, response_start, prefix)
    weights = None
    if pooling == "mean_response":
        assert layout.first is not None
        weights = _response_weights(layout.first.to(layout.ids.device), layout.end, width)
    summarise = _summariser(n_rows, width, weights, layout.read_last)
    with (
        torch.no_grad(),
        record_activations(model, hook_names, reduce=summarise, stop=True) as rec,
    ):
        plain_forward(
            model, layout.ids, attention_mask=layout.mask, logits_to_keep=-1, **layout.kwargs
        )
    if rec.missing:
        raise HookPointError(
            f"hook point(s) {rec.missing} did not fire in a forward pass: this architecture never "
            "calls them (model.hook_dict lists every name TransformerLens defines); collect at "
            "another hook point"
        )
    return [rec[name].cpu() for name in hook_names]


def _check_request(
    hook_names: Sequence[str], pooling: Pooling, response_start: torch.Tensor | None
) -> None:
    """ConfigError for an unknown ``pooling``, no hook names, or ``"mean_response"`` without
    ``response_start``."""
    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")
    if not hook_names:
        raise ConfigError("hook_names must name at least one hook point")
    if pooling == "mean_response" and response_start is None:
        raise ConfigError("pooling='mean_response' needs response_start")


class _Layout(NamedTuple):
    """What one forward pass runs and where each row's summary is read."""

    ids: torch.Tensor  # [batch, width] tokens as run
    mask: torch.Tensor  # attention mask as run (prefix columns included)
    read_last: torch.Tensor | None  # per-row last real position; None: the final column
    first: torch.Tensor | None  # per-row first response position, as run
    end: torch.Tensor  # per-row end (exclusive) of the real tokens, as run
    kwargs: dict[str, Any]  # extra forward arguments (the prefix's cache)


def _plan_layout(
    model: Model,
    batch: TokenBatch,
    response_start: torch.Tensor | None,
    prefix: PrefixCache | None,
) -> _Layout:
    """The tokens, mask and read positions of the pass: ``batch`` as is (left padded) without a
    prefix, its suffixes re-padded on the right after the cached prefix with one."""
    ids, mask = batch.input_ids, batch.attention_mask
    n_rows, width = ids.shape
    kwargs: dict[str, Any] = {}
    if prefix is None:
        # left padded: every row ends at the last position
        first = batch.n_pad.to(ids.device) + response_start if response_start is not None else None
        end = torch.full((n_rows,), width, device=ids.device)
        return _Layout(ids, mask, None, first, end, kwargs)
    # The suffixes run RIGHT padded after the cached prefix: each row's real tokens then sit
    # at the same key positions whatever the batch's padding, so a row's numbers do not
    # depend on the rows it is batched with (a padding gap between prefix and suffix would
    # shift them and change float rounding).
    pos = torch.arange(width, device=ids.device)
    lengths = batch.lengths.to(ids.device)
    gather = (pos[None, :] + batch.n_pad.to(ids.device)[:, None]) % width
    ids, mask = ids.gather(1, gather), mask.gather(1, gather)
    n_prefix = len(prefix)
    if response_start is not None and bool((response_start < n_prefix).any()):
        raise ConfigError("response_start points into the shared prefix")
    first = response_start - n_prefix if response_start is not None else None
    ones = torch.ones(n_rows, n_prefix, dtype=mask.dtype, device=mask.device)
    mask = torch.cat([ones, mask], dim=1)
    kwargs["cache"] = prefix.cache_for(model, n_rows)
    return _Layout(ids, mask, lengths - 1, first, lengths, kwargs)


def _response_weights(
    first: Int[torch.Tensor, " batch"], end: Int[torch.Tensor, " batch"], width: int
) -> Float[torch.Tensor, "batch pos"]:
    """Per-row averaging weights over positions ``first`` (inclusive) to ``end`` (exclusive)."""
    pos = torch.arange(width, device=first.device)
    weights = ((pos[None, :] >= first[:, None]) & (pos[None, :] < end[:, None])).float()
    return weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)


def _check_per_token(act: torch.Tensor, name: str, n_rows: int, width: int) -> None:
    """HookPointError unless ``act`` is ``[batch=n_rows, pos=width, ...]``."""
    if act.dim() < 3 or tuple(act.shape[:2]) != (n_rows, width):
        raise HookPointError(
            f"{name} gives activations of shape {tuple(act.shape)}, not "
            f"[batch={n_rows}, pos={width}, ...]: ks-lens collects per-token activations "
            "only (attention patterns and scores are [batch, head, query, key])"
        )


def _summariser(
    n_rows: int,
    width: int,
    weights: torch.Tensor | None,
    read_last: torch.Tensor | None,
) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """The hook reducer: a ``[batch, pos, ...]`` activation to its ``[batch, ...]`` summary (the
    ``weights`` average when given, else the token at ``read_last``, else the final column)."""

    def summarise(act: torch.Tensor, name: str) -> torch.Tensor:
        _check_per_token(act, name, n_rows, width)
        a = act.float()
        if weights is not None:
            w = weights.to(a.device)
            return (w.reshape(*w.shape, *([1] * (a.dim() - 2))) * a).sum(1)
        if read_last is None:
            return a[:, -1].clone()
        rows = torch.arange(n_rows, device=a.device)
        return a[rows, read_last.to(a.device)]

    return summarise


def capture_tokens(
    model: Model,
    batch: TokenBatch,
    hook_names: Sequence[str],
    positions: Int[torch.Tensor, "batch n"],
) -> list[Float[torch.Tensor, "batch n ..."]]:
    """One forward pass; every row's activations at ``positions`` at every hook in
    ``hook_names`` (in that order), each ``[batch, n, *feature]`` in fp32 on the CPU.

    ``positions[b, j]`` indexes row ``b``'s unpadded tokens (0 = its first real token, as
    ``response_start`` of :func:`capture_features` counts), so a left-padded batch reads the
    same tokens as each row run alone. Rows that need fewer than ``n`` positions repeat a valid
    one and drop the extra columns afterwards. The hooks are those of :func:`capture_features`
    (:func:`~ks_lens._runtime.batching.record_activations`, the pass stops once all have fired,
    removed on exit); only the per-row reduction differs: a gather instead of a summary.
    """
    if not hook_names:
        raise ConfigError("hook_names must name at least one hook point")
    n_rows, width = batch.input_ids.shape
    if positions.ndim != 2 or positions.shape[0] != n_rows:
        raise ConfigError(
            f"positions must be [batch={n_rows}, n], got shape {tuple(positions.shape)}"
        )
    lengths = batch.lengths.to(positions.device)
    if bool(((positions < 0) | (positions >= lengths[:, None])).any()):
        raise ConfigError(
            "positions must index each row's real tokens: 0 <= position < row length "
            f"(row lengths {lengths.tolist()})"
        )
    cols = batch.n_pad.to(positions.device)[:, None] + positions  # as run, left padded

    def gather(act: torch.Tensor, name: str) -> torch.Tensor:
        _check_per_token(act, name, n_rows, width)
        rows = torch.arange(n_rows, device=act.device)[:, None]
        return act[rows, cols.to(act.device)].float()

    with (
        torch.no_grad(),
        record_activations(model, hook_names, reduce=gather, stop=True) as rec,
    ):
        plain_forward(
            model, batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=-1
        )
    if rec.missing:
        raise HookPointError(
            f"hook point(s) {rec.missing} did not fire in a forward pass: this architecture never "
            "calls them (model.hook_dict lists every name TransformerLens defines)"
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
