"""Activation level: evaluator and next-token readouts of steered forward passes; KL divergence."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from ks_lens._runtime.batching import record_activations, scatter, sorted_batches
from ks_lens._runtime.hf_path import (
    can_bypass,
    decoder_layers,
    layer_input,
    plain_forward,
    resume_at,
)
from ks_lens.errors import ConfigError
from ks_lens.evaluation.shared_prefix import SteeredPrefix
from ks_lens.hooks import hook_layer
from ks_lens.models import model_device, pad_token_id
from ks_lens.models.chat import ChatPrompt, TokenBatch, check_context, encode_chat
from ks_lens.probes import Probe
from ks_lens.steering.base import Steering
from ks_lens.steering.positions import Positions
from ks_lens.types import Model


@dataclass
class Readout:
    """Evaluator probabilities at the last token ``[n, K]`` and, if asked, next-token log-probs ``[n, V]``."""

    probs: Float[torch.Tensor, "n k"]
    next_logprobs: Float[torch.Tensor, "n vocab"] | None = None


def readout(
    model: Model,
    prompts: Sequence[ChatPrompt | str],
    *,
    probe: Probe | None = None,
    steering: Steering | None = None,
    positions: Positions = "all",
    next_token: bool = False,
    batch_size: int = 16,
) -> Readout:
    """Run ``prompts`` (optionally steered) and read the probe and/or next-token distribution.

    The probe reads its own hook point at the last prompt token in the same forward pass as the
    steering; without ``next_token`` the pass stops right after the probe's hook.
    """
    return readout_groups(
        model,
        prompts,
        [steering],
        probe=probe,
        positions=positions,
        next_token=next_token,
        batch_size=batch_size,
    )[0]


def readout_groups(
    model: Model,
    prompts: Sequence[ChatPrompt | str],
    steerings: Sequence[Steering | None],
    *,
    probe: Probe | None = None,
    positions: Positions = "all",
    next_token: bool = False,
    batch_size: int = 16,
    share_lower_layers: bool = True,
    progress: bool = False,
    desc: str = "readout",
) -> list[Readout]:
    """:func:`readout` for several steering configurations (one row per configuration and
    prompt, ``batch_size`` rows per forward pass; see :func:`~ks_lens.steering.steer_groups`).

    With ``share_lower_layers`` (default) the layers below the lowest steered layer, which
    every configuration leaves unchanged, run once per batch of prompts; each configuration's
    pass resumes there (:func:`~ks_lens._runtime.hf_path.resume_at`). With 4 methods steering
    layer 18 and an evaluator at layer 22, a steered row then costs 5 decoder layers instead of 23.
    With ``positions="all"``, the tokens every prompt starts with (the chat header and system
    prompt) are also run once per configuration, steered, and kept as a KV cache that each
    prompt's own tokens attend to (:class:`~ks_lens.evaluation.shared_prefix.SteeredPrefix`).
    The numbers equal separate full passes up to float rounding (tested); it falls back to full
    passes where the plain HF modules cannot run or a hook point is outside the blocks.
    """
    if probe is None and not next_token:
        raise ConfigError("nothing to read: pass a probe and/or next_token=True")
    if not prompts:
        raise ConfigError("no prompts to read out")
    tok = model.tokenizer
    ids = [encode_chat(tok, p) for p in prompts]
    n = len(prompts)
    longest = max(range(n), key=lambda i: len(ids[i]))
    check_context(
        model, len(ids[longest]), what="the prompt" if n == 1 else f"prompt {longest + 1} of {n}"
    )
    k = probe.n_labels if probe is not None else 0
    probs = torch.empty(n * len(steerings), k)
    start = _shared_start(model, steerings, probe) if share_lower_layers else None
    reader = _Reader(model, steerings, probe, positions, next_token, start, probs)
    pad, device = pad_token_id(tok), model_device(model)
    total = n * len(steerings)
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        if start is None:
            rows = [(g, i) for g in range(len(steerings)) for i in range(n)]
            for idx, batch in sorted_batches(
                [ids[i] for _, i in rows], batch_size, pad_id=pad, device=device
            ):
                reader.run(batch, idx, [rows[r][0] for r in idx], None)
                bar.update(len(idx))
        else:
            shared = SteeredPrefix.build(reader, ids, batch_size) if positions == "all" else None
            cut = len(shared) if shared is not None else 0
            for idx, batch in sorted_batches(
                [r[cut:] for r in ids], batch_size, pad_id=pad, device=device
            ):
                if shared is not None:
                    shared.read(idx, batch, n, batch_size, bar)
                else:
                    _read_shared(reader, model, start, idx, batch, n, batch_size, bar)
    logps = reader.logps
    return [
        Readout(probs[g * n : (g + 1) * n], None if logps is None else logps[g * n : (g + 1) * n])
        for g in range(len(steerings))
    ]


@dataclass
class _Reader:
    """The forward passes of one :func:`readout_groups` call: each batch's probe probabilities
    (into ``probs``) and next-token log-probabilities (into ``logps``, made at the first batch)
    scattered to its output rows."""

    model: Model
    steerings: Sequence[Steering | None]
    probe: Probe | None
    positions: Positions
    next_token: bool
    start: int | None  # the shared lower layers' end (see _shared_start)
    probs: torch.Tensor  # [n_rows, n_labels]
    logps: torch.Tensor | None = None  # [n_rows, vocab]

    def only(self, groups: list[int]) -> list[Steering | None]:
        present = set(groups)  # hooks only for the configurations in this batch
        return [st if g in present else None for g, st in enumerate(self.steerings)]

    def run(
        self,
        batch: TokenBatch,
        out_rows: list[int],
        groups: list[int],
        resume: Any,
        after: tuple[Any, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """One pass over ``batch`` (row ``r`` steered by ``groups[r]``; resumed from the shared
        hidden state ``resume`` at ``start`` when given; after a cached prefix when ``after`` is
        ``(KV cache, position ids, attention mask over prefix and rows)``)."""
        from ks_lens.steering.base import steer_groups

        model, probe = self.model, self.probe
        names = [probe.hook_name] if probe is not None else []
        with (
            torch.no_grad(),
            steer_groups(model, self.only(groups), groups, positions=self.positions),
            # without next_token the pass ends right after the probe's hook
            record_activations(model, names, last_token=True, stop=not self.next_token) as rec,
        ):
            cache, pos, mask = after if after is not None else (None, None, batch.attention_mask)
            with (
                resume_at(model, self.start or 0, *resume) if resume is not None else nullcontext()
            ):
                logits = plain_forward(
                    model,
                    batch.input_ids,
                    attention_mask=mask,
                    position_ids=pos,
                    cache=cache,
                    logits_to_keep=1,
                )
            assert logits is not None
            lp = torch.log_softmax(logits[:, -1].float(), -1).cpu()
            if self.logps is None:
                self.logps = torch.empty(self.probs.shape[0], lp.shape[-1])
            scatter(self.logps, out_rows, lp)
        if probe is not None:
            x = rec[probe.hook_name].to(probe.mean.device, probe.mean.dtype)
            scatter(self.probs, out_rows, probe.predict_proba(x).cpu())


def _read_shared(
    reader: _Reader,
    model: Model,
    start: int,
    idx: list[int],
    batch: TokenBatch,
    n: int,
    batch_size: int,
    bar: Any,
) -> None:
    """One batch of prompts (``idx`` of ``n``): the layers below ``start`` run once, then every
    configuration resumes from them, ``batch_size`` rows per pass."""
    hidden, as_tuple = layer_input(model, start, batch.input_ids, batch.attention_mask)
    pairs = [(g, j) for g in range(len(reader.steerings)) for j in range(len(idx))]
    for c in range(0, len(pairs), batch_size):
        chunk = pairs[c : c + batch_size]
        js = [j for _, j in chunk]
        sub = TokenBatch(batch.input_ids[js], batch.attention_mask[js])
        rows_out = [g * n + idx[j] for g, j in chunk]
        reader.run(sub, rows_out, [g for g, _ in chunk], (hidden[js], as_tuple))
        bar.update(len(chunk))


def _shared_start(
    model: Model,
    steerings: Sequence[Steering | None],
    probe: Probe | None,
    groups: Sequence[int] | None = None,
) -> int | None:
    """The lowest decoder layer any of ``steerings`` writes to (only those a batch uses, when
    ``groups`` lists each row's index into them), when the layers below it can be run once and
    shared (see :func:`readout_groups`); ``None`` when they cannot."""
    from ks_lens.steering.base import group_transforms

    if groups is not None:
        present = set(groups)
        steerings = [st if g in present else None for g, st in enumerate(steerings)]
    layers = [hook_layer(name) for name in group_transforms(model, steerings)]
    if any(layer is None for layer in layers):
        return None  # a hook point outside the blocks
    if not layers:
        return None
    start = min(layer for layer in layers if layer is not None)
    if probe is not None and (hook_layer(probe.hook_name) or 0) < start:
        return None  # the probe reads below the steering: nothing to share it with
    if start < 1 or not can_bypass(model) or decoder_layers(model) is None:
        return None
    return start


def kl_divergence(
    logp: Float[torch.Tensor, "... v"], logq: Float[torch.Tensor, "... v"]
) -> Float[torch.Tensor, "..."]:
    """KL(p || q) from log-probabilities, over the last axis."""
    return (logp.exp() * (logp - logq)).sum(-1)
