"""Batched, seeded text generation through Hugging Face ``generate`` with the bridge's hooks live.

TransformerLens 4's bridge swaps the HF model's submodules for hooked ones, so HF's own
``generate`` (with its KV cache) fires every ``blocks.{L}.hook_*`` hook. That is faster than the
bridge's Python generation loop, and any steering context active around the call applies: a hook
first sees the prompt ``[batch, prompt_len, d]``, then ``[batch, 1, d]`` per new token.

By default generation runs the wrapped HF modules themselves and fires only the hook points that
have hooks (:func:`ks_lens._runtime.hf_path.hf_modules`): the same hook names, tensors and greedy
tokens, without paying for every bridge component; anything it cannot route falls back to the full
bridge. ``full_bridge=True`` always runs the bridge components.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ks_lens._runtime.batching import scatter, sorted_batches
from ks_lens._runtime.hf_path import can_bypass, decoder_layers, hf_modules, layer_input, resume_at
from ks_lens.compat import cache_keyword, check_bridge_cache
from ks_lens.errors import ConfigError
from ks_lens.models import model_device, pad_token_id
from ks_lens.models.chat import ChatPrompt, TokenBatch, as_prompt_list, check_context, encode_chat
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
class LayerInputs:
    """The hidden states that entered decoder layer ``layer`` at each row's new tokens during a
    generation (:func:`generate_from_batch`'s ``record_inputs``): ``hidden[b]`` is ``[tokens,
    d_model]`` for row ``b``'s kept tokens (``BatchGeneration.ids[b]``, in order), or ``None``
    where those are not the positions that ran (a padding id inside the answer was dropped).
    ``as_tuple``: whether the layer below returns a tuple (for
    :func:`~ks_lens._runtime.hf_path.resume_at`).

    Steering that writes only at ``layer`` or above leaves these equal to the unsteered model's
    on the same tokens (float rounding aside), so a later unsteered pass over the answers can
    start at ``layer`` (:func:`~ks_lens.evaluation.generate_and_score_rows` does)."""

    layer: int
    hidden: list[torch.Tensor | None]
    as_tuple: bool


@dataclass
class BatchGeneration:
    """New token ids per row (end-of-turn and padding removed), whether each row ended its turn,
    optionally the per-step logits ``[batch, steps, vocab]`` and the hidden states entering one
    decoder layer at the new tokens (:class:`LayerInputs`)."""

    ids: list[list[int]]
    finished: list[bool]
    logits: torch.Tensor | None = None
    layer_inputs: LayerInputs | None = None


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
    for every row are never held); ``positions`` the batch's position ids ``[batch, pos]``."""

    layer: int
    hidden: torch.Tensor
    as_tuple: bool
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    rows: torch.Tensor
    positions: torch.Tensor


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids Hugging Face ``generate`` gives a left-padded prompt (0 on padding)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def shared_prefill(
    model: Model,
    batch: TokenBatch,
    layer: int | None,
    *,
    position_ids: torch.Tensor | None = None,
) -> SharedPrefill | None:
    """Run the layers below ``layer`` once per distinct prompt row of ``batch`` (no hooks: call
    it before any steering is installed), for :func:`generate_from_batch`'s ``prefill=`` (or
    :func:`resume_prefill`).

    ``position_ids`` ``[batch, pos]`` are the prompt's positions: by default those ``generate``
    gives a left-padded prompt (:func:`generation_positions`); a caller whose later tokens
    continue at the cache's length (a plain forward pass) passes ``0 .. pos-1`` for every row.

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
    if position_ids is None:
        position_ids = generation_positions(batch.attention_mask)
    hidden, as_tuple = layer_input(
        model, layer, ids, mask, position_ids=position_ids[uniq], cache=cache
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
    return SharedPrefill(layer, hidden, as_tuple, kv, inv, position_ids)


def resume_prefill(
    model: Model, batch: TokenBatch, shared: SharedPrefill
) -> tuple[Any, torch.Tensor]:
    """The prompt pass of ``batch`` resumed at ``shared.layer`` (from :func:`shared_prefill` for
    the same batch; steering hooks live, inside a :func:`~ks_lens._runtime.hf_path.hf_modules` block
    that runs the plain modules): the filled KV cache and the next-token logits ``[batch,
    vocab]``."""
    from transformers import DynamicCache

    hf: Any = model.original_model
    cache = DynamicCache(config=hf.config)
    inv = shared.rows
    with resume_at(model, shared.layer, shared.hidden[inv], shared.as_tuple):
        out = hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=shared.positions,
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
    record_inputs: int | None = None,
) -> BatchGeneration:
    """Generate for one left-padded batch (greedy unless ``do_sample``).

    With ``return_logits=True`` the raw next-token logits of every step are kept,
    ``[batch, steps, vocab]`` (row ``b``, step ``t`` predicts new token ``t``).
    ``full_bridge=True`` runs every TransformerLens bridge component instead of the plain HF
    modules with only the hooked points routed (see the module docstring). ``prefill`` (from
    :func:`shared_prefill` for this batch, greedy decoding on the plain modules only) starts the
    prompt's pass at its layer; the tokens equal a full pass up to float rounding (tested).
    ``record_inputs`` (a decoder layer, at least 1) also returns the hidden states entering that
    layer at every new token (:class:`LayerInputs`; the last token is run once more through the
    layers below it); ``None`` there when the plain HF modules did not run.
    """
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens")
    check_context(model, int(batch.input_ids.shape[1]), max_new_tokens, what="the batch")
    if prefill is not None and (do_sample or full_bridge):
        raise ConfigError("a shared prefill serves greedy decoding on the plain HF modules only")
    if record_inputs is not None and record_inputs < 1:
        raise ConfigError(f"record_inputs must be a decoder layer >= 1, got {record_inputs}")
    prompt_len = int(batch.input_ids.shape[1])
    fed: list[torch.Tensor] = []  # what entered layer record_inputs, per forward call
    with torch.random.fork_rng(devices=[batch.input_ids.device] if batch.input_ids.is_cuda else []):
        torch.manual_seed(seed)
        with torch.no_grad(), hf_modules(model, enabled=not full_bridge) as plain:
            if not plain:  # the bridge decodes (asked for, or a hook it cannot route)
                check_bridge_cache()
            watch = _watch_input(model, record_inputs, fed) if plain else None
            try:
                out, steps, cache = _decode(
                    model,
                    batch,
                    max_new_tokens,
                    prefill=prefill if plain else None,
                    return_dict=return_logits or watch is not None,
                    sampling=(do_sample, temperature, top_p, top_k),
                )
            finally:
                if watch is not None:
                    watch.remove()
    logits = _stack_freeing(steps) if return_logits else None
    result = batch_result(model, out[:, prompt_len:].tolist(), logits)
    if watch is not None and record_inputs is not None:
        result.layer_inputs = _layer_inputs(model, record_inputs, fed, result, out, batch, cache)
    return result


def _decode(
    model: Model,
    batch: TokenBatch,
    max_new_tokens: int,
    *,
    prefill: SharedPrefill | None,
    return_dict: bool,
    sampling: tuple[bool, float, float | None, int | None],
) -> tuple[torch.Tensor, list[torch.Tensor], Any]:
    """The decoding loop of :func:`generate_from_batch` (inside its ``hf_modules`` block): the
    sequences ``[batch, prompt + new]``, the per-step logits (with ``return_dict``) and the KV
    cache at the end (``None`` without ``return_dict``)."""
    hf: Any = model.original_model
    do_sample, temperature, top_p, top_k = sampling
    steps: list[torch.Tensor] = []  # per-step logits [batch, vocab]
    kwargs: dict[str, Any] = {}
    cache: Any = None
    if prefill is not None:
        cache, logits0 = resume_prefill(model, batch, prefill)
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
        res = hf.generate(
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
            output_logits=return_dict,
            return_dict_in_generate=return_dict,
            **kwargs,
        )
        if return_dict:
            steps, out, cache = [*steps, *res.logits], res.sequences, res.past_key_values
        else:
            out = res
    return out, steps, cache


def _watch_input(model: Model, layer: int | None, fed: list[torch.Tensor]) -> Any:
    """A forward pre-hook (first in line, before any routed steering hook) on the plain decoder
    layer ``layer`` that appends its input hidden states to ``fed``; ``None`` when there is no
    layer to watch."""
    layers = decoder_layers(model) if layer is not None else None
    if layers is None or layer is None or layer >= len(layers):
        return None

    def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        fed.append((args[0] if args else kwargs["hidden_states"]).detach())

    return layers[layer].register_forward_pre_hook(pre, with_kwargs=True, prepend=True)


def _layer_inputs(
    model: Model,
    layer: int,
    fed: list[torch.Tensor],
    result: BatchGeneration,
    out: torch.Tensor,
    batch: TokenBatch,
    cache: Any,
) -> LayerInputs | None:
    """Each row's hidden states entering ``layer`` at its new tokens: the decoding steps fed
    tokens ``0 .. n-2`` one at a time (the last ``n - 1`` single-token calls in ``fed``); the
    last new token, never fed back, runs once through the layers below ``layer`` on ``cache``."""
    n_prompt = int(batch.input_ids.shape[1])
    n_new = int(out.shape[1]) - n_prompt
    singles = [f for f in fed if f.shape[1] == 1]  # the prompt's pass is the only longer call
    if n_new < 1 or cache is None or len(singles) < n_new - 1:
        return None
    steps = singles[len(singles) - (n_new - 1) :]
    mask = torch.cat([batch.attention_mask, torch.ones_like(out[:, n_prompt:])], dim=1)
    last, as_tuple = layer_input(
        model,
        layer,
        out[:, -1:],
        mask,
        position_ids=generation_positions(mask)[:, -1:],
        cache=cache,
    )
    hidden = torch.cat([*steps, last], dim=1)  # [batch, n_new, d_model]
    rows: list[torch.Tensor | None] = []
    for b, ids in enumerate(result.ids):
        ran = out[b, n_prompt : n_prompt + len(ids)].tolist() == ids  # no padding id dropped
        rows.append(hidden[b, : len(ids)].clone() if ran else None)
    return LayerInputs(layer, rows, as_tuple)


def batch_result(
    model: Model, new: list[list[int]], logits: torch.Tensor | None
) -> BatchGeneration:
    """Each row's new tokens ``new`` (lists of ids, one per decoding step) cut before its
    end-of-turn token, padding dropped, with whether the row ended its turn."""
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
        prompts: strings or :class:`~ks_lens.models.chat.ChatPrompt` (with a system prompt).
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
    sampling = _Sampling(max_new_tokens, do_sample, temperature, top_p, top_k, full_bridge)
    out_ids, finished = _generate_sorted(model, prompt_ids, sampling, batch_size, seed, progress)
    decoded = [tok.decode(ids, skip_special_tokens=True).strip() for ids in out_ids]
    return Generation(prompts, decoded, prompt_ids, out_ids, finished)


@dataclass(frozen=True)
class _Sampling:
    """:func:`generate`'s decoding settings, as :func:`generate_from_batch` takes them."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float | None
    top_k: int | None
    full_bridge: bool


def _generate_sorted(
    model: Model,
    prompt_ids: Sequence[list[int]],
    sampling: _Sampling,
    batch_size: int,
    seed: int,
    progress: bool,
) -> tuple[list[list[int]], list[bool]]:
    """Every prompt's answer tokens and whether it finished, in prompt order: the prompts
    grouped by length into batches, batch ``b`` seeded with ``seed + b``."""
    out_ids: list[list[int]] = [[] for _ in prompt_ids]
    finished: list[bool] = [False for _ in prompt_ids]
    bar = tqdm(
        total=len(prompt_ids), desc="generating", unit="prompt", disable=not progress, leave=False
    )
    batches = sorted_batches(
        prompt_ids, batch_size, pad_id=pad_token_id(model.tokenizer), device=model_device(model)
    )
    for b, (idx, batch) in enumerate(batches):
        res = generate_from_batch(
            model,
            batch,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sampling.do_sample,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=seed + b,
            full_bridge=sampling.full_bridge,
        )
        scatter(out_ids, idx, res.ids)
        scatter(finished, idx, res.finished)
        bar.update(len(idx))
    bar.close()
    return out_ids, finished
