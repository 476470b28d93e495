"""Which token positions a steering hook writes to, in forward passes and cached generation.

``positions=`` takes one of:

``"all"``        every real (non-padding) token: prompt and generated;
``"prompt"``     prompt tokens only;
``"generated"``  tokens produced during generation only (nothing in a plain forward pass);
``"last"``       the last prompt token only (the position probes are trained on).

Hooks see only activations, so a :class:`PositionTracker` reads what the hooks cannot: a forward
pre-hook on the underlying HF model records, for each forward call, the attention mask and the
KV-cache length. A call with an empty cache starts a new sequence whose length is the prompt
length (left padding aligns the prompt ends, so "generated" is ``position >= prompt_len`` for
every row); a call with a cache continues it (``[batch, 1, d]`` per new token). Padding positions
(mask 0) are never steered. Without a tracker (hand-made hooks for ``run_with_hooks``), each
call is treated as a whole prompt with no padding information beyond what the caller supplies.

Generation without a KV cache re-runs the whole sequence each step. The tracker recognises such a
step (a cache-less call whose token ids are the previous call's plus one new token) and keeps the
prompt length of the first call, so ``model.generate(..., use_past_kv_cache=False)`` inside
``steer()`` selects the same positions as with the cache. For inputs given as embeddings, fix the
prompt length with :meth:`PositionTracker.expect_prompt`.

Hooks made by :meth:`~ks_lens.steering.base.SteeringMethod.hooks` without a tracker cannot see any of
this (each decode step looks like a new prompt), so they accept only ``positions="all"``; use
``with method.steer(model, ..., positions=...)`` around ``model.generate`` / ``run_with_hooks``.
"""

from __future__ import annotations

from typing import Any, Literal, cast, get_args

import torch
from jaxtyping import Bool

from ks_lens.errors import ConfigError
from ks_lens.types import Model

Positions = Literal["all", "prompt", "generated", "last"]
POSITIONS: tuple[Positions, ...] = get_args(Positions)


def check_positions(positions: str) -> Positions:
    """``positions`` if it is one of :data:`POSITIONS` (callers may be untyped), else ConfigError."""
    if positions not in POSITIONS:
        raise ConfigError(f"unknown positions {positions!r}; use one of {POSITIONS}")
    return cast(Positions, positions)


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple-of-tuples cache: [layer][k/v] -> [batch, heads, pos, d_head]
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


class PositionTracker:
    """Tracks absolute positions and padding of the tokens in the current forward call."""

    def __init__(self) -> None:
        self.past_len = 0
        self.seq_len: int | None = None
        self.prompt_len: int | None = None
        self.mask: torch.Tensor | None = None  # [batch, past + seq] attention mask, if given
        self.last_index: torch.Tensor | None = None  # [batch] index of each row's last prompt token
        self._expected_prompt: int | None = None
        self._prev_ids: torch.Tensor | None = None  # input ids of the previous cache-less call
        # [batch] row of the prompt call each current row continues (None: the same rows)
        self.rows: torch.Tensor | None = None
        self._handle: Any = None

    # -- installation ---------------------------------------------------------------------------
    def install(self, model: Model) -> PositionTracker:
        hf = getattr(model, "original_model", model)
        self._handle = hf.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def reindex(self, sel: torch.Tensor) -> None:
        """The next calls continue rows ``sel`` of the current batch (a KV cache re-indexed with
        ``batch_select_indices(sel)``, e.g. one row per option of each question): per-row state
        (:attr:`rows`, the last prompt token) follows them until the next prompt."""
        sel = sel.detach().long().cpu()
        self.rows = sel if self.rows is None else self.rows[sel]
        if self.last_index is not None:
            self.last_index = self.last_index[sel.to(self.last_index.device)]

    def expect_prompt(self, prompt_len: int | None) -> None:
        """Fix the prompt length of the next sequences (for generation without a KV cache)."""
        self._expected_prompt = prompt_len

    # -- the pre-hook -----------------------------------------------------------------------------
    def _pre_hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        seq = int(ids.shape[1]) if isinstance(ids, torch.Tensor) and ids.ndim >= 2 else None
        # transformers >= 5.25 passes the KV cache as ``cache``; earlier releases as ``past_key_values``
        cache = kwargs.get("cache")
        past = _cache_length(cache if cache is not None else kwargs.get("past_key_values"))
        cache_position = kwargs.get("cache_position")
        if isinstance(cache_position, torch.Tensor) and cache_position.numel() > 0:
            past = int(cache_position.reshape(-1)[0])
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        self.past_len = past
        self.seq_len = seq
        continuing = past == 0 and self._continues(ids)
        self._prev_ids = ids.detach() if past == 0 and isinstance(ids, torch.Tensor) else None
        if past == 0 and continuing:
            return  # generation without a KV cache: same sequence, one token longer
        if past == 0:
            self.rows = None
            self.prompt_len = self._expected_prompt if self._expected_prompt is not None else seq
            if self.mask is not None and self.prompt_len is not None:
                m = self.mask[:, : self.prompt_len].long()
                idx = torch.arange(m.shape[1], device=m.device).expand_as(m)
                self.last_index = (
                    torch.where(m > 0, idx, torch.full_like(idx, -1)).max(dim=1).values
                )
            else:
                self.last_index = None

    def _continues(self, ids: Any) -> bool:
        """Whether a cache-less call re-runs the previous call's tokens plus one new token (how
        generation without a KV cache looks, e.g. ``model.generate(use_past_kv_cache=False)``)."""
        prev = self._prev_ids
        if prev is None or self.prompt_len is None or not isinstance(ids, torch.Tensor):
            return False
        if ids.ndim != 2 or ids.dtype != prev.dtype or ids.shape[0] != prev.shape[0]:
            return False
        if ids.shape[1] != prev.shape[1] + 1:
            return False
        return bool(torch.equal(ids[:, : prev.shape[1]], prev.to(ids.device)))

    # -- selection --------------------------------------------------------------------------------
    def select(
        self, positions: Positions, batch: int, seq: int, device: torch.device
    ) -> Bool[torch.Tensor, "batch seq"]:
        """Boolean mask ``[batch, seq]`` of the positions of this call to steer."""
        if self.seq_len is not None and self.seq_len != seq:
            # The hook saw a different length than the model input (should not happen); be safe.
            return select_whole_call(positions, batch, seq, device)
        past = self.past_len
        prompt_len = self.prompt_len if self.prompt_len is not None else seq
        pos = torch.arange(past, past + seq, device=device).unsqueeze(0).expand(batch, seq)
        if (
            self.mask is not None
            and self.mask.shape[0] == batch
            and self.mask.shape[1] >= past + seq
        ):
            valid = self.mask[:, past : past + seq].to(device).bool()
        else:
            valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
        if positions == "all":
            return valid
        if positions == "prompt":
            return valid & (pos < prompt_len)
        if positions == "generated":
            return valid & (pos >= prompt_len)
        if positions == "last":
            if self.last_index is not None and self.last_index.shape[0] == batch:
                return valid & (pos == self.last_index.to(device).unsqueeze(1))
            return valid & (pos == prompt_len - 1)
        raise ConfigError(f"unknown positions {positions!r}")


def select_whole_call(
    positions: Positions, batch: int, seq: int, device: torch.device
) -> Bool[torch.Tensor, "batch seq"]:
    """Selection for a call treated as one whole prompt (no tracker)."""
    sel = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    if positions in ("all", "prompt"):
        sel[:] = True
    elif positions == "last":
        sel[:, -1] = True
    elif positions != "generated":
        raise ConfigError(f"unknown positions {positions!r}")
    return sel
