"""Batched, seeded text generation through Hugging Face ``generate`` with the bridge's hooks live.

TransformerLens 4's bridge swaps the HF model's submodules for hooked ones, so HF's own
``generate`` (with its KV cache) fires every ``blocks.{L}.hook_*`` hook. That is faster than the
bridge's Python generation loop, and any steering context active around the call applies: a hook
first sees the prompt ``[batch, prompt_len, d]``, then ``[batch, 1, d]`` per new token.

By default generation runs the wrapped HF modules themselves and fires only the hook points that
have hooks (:func:`ks_lens.hf_path.hf_modules`): the same hook names, tensors and greedy tokens,
without paying for every bridge component; anything it cannot route falls back to the full
bridge. ``full_bridge=True`` always runs the bridge components.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ks_lens.batching import scatter, sorted_batches
from ks_lens.chat import ChatPrompt, TokenBatch, as_prompt_list, check_context, encode_chat
from ks_lens.compat import cache_keyword, check_bridge_cache
from ks_lens.errors import ConfigError
from ks_lens.hf_path import can_bypass, decoder_layers, hf_modules, layer_input, resume_at
from ks_lens.models import model_device, pad_token_id
from ks_lens.types import Model
from ks_lens.utils import check_int, check_seed


@dataclass
class Generation:
    """Results in prompt order. ``output_ids`` exclude padding and the end-of-turn token."""

    prompts: list[ChatPrompt | str]
    texts: list[str]
    prompt_ids: list[list[int]] = field(repr=False)
    output_ids: list[list[int]] = field(repr=False)
    finished: list[bool] = field(repr=False)  # True where the model ended its turn itself

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class BatchGeneration:
    """New token ids per row (end-of-turn and padding removed), whether each row ended its turn,
    and optionally the per-step logits ``[batch, steps, vocab]``."""

    ids: list[list[int]]
    finished: list[bool]
    logits: torch.Tensor | None = None


def _generation_config(
    model: Model,
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
) -> Any:
    from transformers import GenerationConfig

    tok = model.tokenizer
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "pad_token_id": pad_token_id(tok),
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "use_cache": True,
    }
    if do_sample:
        kwargs["temperature"] = temperature
        kwargs["top_p"] = top_p if top_p is not None else 1.0
        kwargs["top_k"] = top_k if top_k is not None else 0
    return GenerationConfig(**kwargs)


def _stack_freeing(steps: list[Any]) -> torch.Tensor:
    """``torch.stack(steps, dim=1)``, dropping each step once copied, so the per-step logits and
    the stacked tensor are never both held whole (half the peak of a plain stack)."""
    first = steps[0]
    out = torch.empty(
        first.shape[0], len(steps), *first.shape[1:], dtype=first.dtype, device=first.device
    )
    for i in range(len(steps)):
        out[:, i] = steps[i]
        steps[i] = None
    return out


@dataclass
class SharedPrefill:
    """The prompt's pass below decoder layer ``layer``, run once per distinct prompt of a batch
    (:func:`shared_prefill`): ``hidden`` ``[distinct, pos, d_model]`` is layer ``layer``'s input,
    ``kv`` the keys and values of each layer below it ``[distinct, heads, pos, d_head]``, and
    ``rows[b]`` the distinct prompt of batch row ``b`` (expanded only when used, so the copies
    for every row are never held)."""

    layer: int
    hidden: torch.Tensor
    as_tuple: bool
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    rows: torch.Tensor


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids Hugging Face ``generate`` gives a left-padded prompt (0 on padding)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def shared_prefill(model: Model, batch: TokenBatch, layer: int | None) -> SharedPrefill | None:
    """Run the layers below ``layer`` once per distinct prompt row of ``batch`` (no hooks: call
    it before any steering is installed), for :func:`generate_from_batch`'s ``prefill=``.

    Steering that writes at ``layer`` or above leaves everything below unchanged, so a batch
    that answers one question under several steering configurations needs that part once.
    ``None`` (nothing to share) for ``layer`` ``None`` or below 1, a batch without repeated
    prompts, a model whose plain HF decoder layers cannot run on their own, or a cache layer
    that does not hold the whole prompt (e.g. a sliding window shorter than it).
    """
    from transformers import DynamicCache

    if layer is None or layer < 1 or not can_bypass(model) or decoder_layers(model) is None:
        return None
    rows = [tuple(r) for r in torch.cat([batch.input_ids, batch.attention_mask], 1).tolist()]
    first: dict[tuple[int, ...], int] = {}
    for r in rows:
        first.setdefault(r, len(first))
    if len(first) == len(rows):
        return None
    uniq = torch.tensor([rows.index(r) for r in first], device=batch.input_ids.device)
    inv = torch.tensor([first[r] for r in rows], device=batch.input_ids.device)
    hf: Any = model.original_model
    cache = DynamicCache(config=hf.config)
    ids, mask = batch.input_ids[uniq], batch.attention_mask[uniq]
    hidden, as_tuple = layer_input(
        model, layer, ids, mask, position_ids=generation_positions(mask), cache=cache
    )
    kv = []
    layers: list[Any] = cache.layers
    for i in range(layer):
        keys, values = getattr(layers[i], "keys", None), getattr(layers[i], "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            return None
        if keys.shape[-2] != ids.shape[1]:
            return None  # this layer keeps less than the whole prompt (a sliding window)
        kv.append((keys, values))
    return SharedPrefill(layer, hidden, as_tuple, kv, inv)


def _prefill_from_shared(
    model: Model, batch: TokenBatch, shared: SharedPrefill
) -> tuple[Any, torch.Tensor]:
    """The prompt pass of generation, resumed at ``shared.layer`` (steering hooks live): the
    filled KV cache and the next-token logits ``[batch, vocab]``."""
    from transformers import DynamicCache

    hf: Any = model.original_model
    cache = DynamicCache(config=hf.config)
    inv = shared.rows
    with resume_at(model, shared.layer, shared.hidden[inv], shared.as_tuple):
        out = hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=generation_positions(batch.attention_mask),
            use_cache=True,
            logits_to_keep=1,
            **{cache_keyword(hf): cache},
        )
    layers: list[Any] = cache.layers
    for i, (keys, values) in enumerate(shared.kv):
        layers[i].update(keys[inv], values[inv])  # the layer keeps its own copy
    return cache, out.logits[:, -1]


def generate_from_batch(
    model: Model,
    batch: TokenBatch,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
    return_logits: bool = False,
    full_bridge: bool = False,
    prefill: SharedPrefill | None = None,
) -> BatchGeneration:
    """Generate for one left-padded batch (greedy unless ``do_sample``).

    With ``return_logits=True`` the raw next-token logits of every step are kept,
    ``[batch, steps, vocab]`` (row ``b``, step ``t`` predicts new token ``t``).
    ``full_bridge=True`` runs every TransformerLens bridge component instead of the plain HF
    modules with only the hooked points routed (see the module docstring). ``prefill`` (from
    :func:`shared_prefill` for this batch, greedy decoding on the plain modules only) starts the
    prompt's pass at its layer; the tokens equal a full pass up to float rounding (tested).
    """
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens")
    check_context(model, int(batch.input_ids.shape[1]), max_new_tokens, what="the batch")
    if prefill is not None and (do_sample or full_bridge):
        raise ConfigError("a shared prefill serves greedy decoding on the plain HF modules only")
    # TransformerBridge types original_model as nn.Module; it is a Hugging Face PreTrainedModel
    hf: Any = model.original_model
    prompt_len = int(batch.input_ids.shape[1])
    steps: list[torch.Tensor] = []  # per-step logits [batch, vocab]
    with torch.random.fork_rng(devices=[batch.input_ids.device] if batch.input_ids.is_cuda else []):
        torch.manual_seed(seed)
        with torch.no_grad(), hf_modules(model, enabled=not full_bridge) as plain:
            if not plain:  # the bridge decodes (asked for, or a hook it cannot route)
                check_bridge_cache()
            kwargs: dict[str, Any] = {}
            if prefill is not None and plain:
                cache, logits0 = _prefill_from_shared(model, batch, prefill)
                token = logits0.argmax(-1, keepdim=True)
                steps = [logits0]
                batch = TokenBatch(
                    torch.cat([batch.input_ids, token], 1),
                    torch.cat([batch.attention_mask, torch.ones_like(token)], 1),
                )
                kwargs[cache_keyword(hf)] = cache
                max_new_tokens -= 1
            out = batch.input_ids
            if max_new_tokens > 0:
                out = hf.generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    generation_config=_generation_config(
                        model,
                        max_new_tokens=max_new_tokens,
                        do_sample=do_sample,
                        temperature=temperature,
                        top_p=top_p,
                        top_k=top_k,
                    ),
                    output_logits=return_logits,
                    return_dict_in_generate=return_logits,
                    **kwargs,
                )
                if return_logits:
                    steps, out = [*steps, *out.logits], out.sequences
    logits = _stack_freeing(steps) if return_logits else None
    return _batch_result(model, out[:, prompt_len:].tolist(), logits)


def _batch_result(
    model: Model, new: list[list[int]], logits: torch.Tensor | None
) -> BatchGeneration:
    """Each row's new tokens up to its end-of-turn token, padding dropped."""
    eos = model.tokenizer.eos_token_id
    pad = pad_token_id(model.tokenizer)
    ids: list[list[int]] = []
    finished: list[bool] = []
    for row in new:
        cut = row.index(eos) if eos in row else len(row)
        finished.append(cut < len(row))
        ids.append([t for t in row[:cut] if t != pad])
    return BatchGeneration(ids, finished, logits)


def generate(
    model: Model,
    prompts: Sequence[ChatPrompt | str] | ChatPrompt | str,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    full_bridge: bool = False,
) -> Generation:
    """Chat-format ``prompts`` and generate answers (greedy by default), in batches.

    Args:
        model: a bridge from :func:`ks_lens.load_model`; any active steering context applies.
        prompts: strings or :class:`~ks_lens.chat.ChatPrompt` (with a system prompt).
        max_new_tokens: at most this many new tokens per prompt.
        do_sample: sample instead of greedy decoding (off by default).
        temperature: sampling temperature.
        top_p: nucleus-sampling mass.
        top_k: sample among this many most likely tokens.
        seed: seed of the sampling.
        batch_size: prompts per forward batch.
        progress: show a progress bar.
        full_bridge: run every TransformerLens bridge component (slower; same tokens) instead of
            the plain HF modules with only the hook points that have hooks routed. Under
            versions whose bridge ignores the KV cache (:func:`ks_lens.compat.check_bridge_cache`)
            generation through the bridge (asked for, or forced by a hook point the plain path
            cannot route) is refused with :class:`~ks_lens.errors.VersionError`.

    Returns:
        :class:`Generation`: ``.texts`` (decoded answers), ``.prompt_ids`` / ``.output_ids``
        (token id lists), ``.finished`` (the model ended its turn), in prompt order.

    Examples:
        >>> gen = ks.generate(model, ["How do I boil an egg?", "Why is the sky blue?"], max_new_tokens=8)
        >>> len(gen.texts), all(len(ids) <= 8 for ids in gen.output_ids)
        (2, True)
        >>> ks.generate(model, "How do I boil an egg?", max_new_tokens=8).texts == gen.texts[:1]
        True

    A single string or :class:`ChatPrompt` is one prompt. Prompts are grouped by length to limit
    padding; results come back in the input order. A prompt that, with ``max_new_tokens``, does
    not fit in the context window is refused before anything runs.
    Sampling is seeded per batch (``seed + batch index``) without touching the caller's RNG
    state, so the same call gives the same texts.
    """
    batch_size = check_int(batch_size, "batch_size")
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens")
    seed = check_seed(seed)
    prompts = as_prompt_list(prompts)
    if not prompts:
        return Generation([], [], [], [], [])
    tok = model.tokenizer
    prompt_ids = [encode_chat(tok, p) for p in prompts]
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    what = "the prompt" if len(prompts) == 1 else f"prompt {longest + 1} of {len(prompts)}"
    check_context(model, len(prompt_ids[longest]), max_new_tokens, what=what)
    out_ids: list[list[int]] = [[] for _ in prompts]
    finished: list[bool] = [False for _ in prompts]
    bar = tqdm(
        total=len(prompts), desc="generating", unit="prompt", disable=not progress, leave=False
    )
    batches = sorted_batches(
        prompt_ids, batch_size, pad_id=pad_token_id(tok), device=model_device(model)
    )
    for b, (idx, batch) in enumerate(batches):
        res = generate_from_batch(
            model,
            batch,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed + b,
            full_bridge=full_bridge,
        )
        scatter(out_ids, idx, res.ids)
        scatter(finished, idx, res.finished)
        bar.update(len(idx))
    bar.close()
    decoded = [tok.decode(ids, skip_special_tokens=True).strip() for ids in out_ids]
    return Generation(prompts, decoded, prompt_ids, out_ids, finished)
