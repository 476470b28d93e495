"""Likelihood-trained steering vectors: per-label vectors learned so that adding them raises the
likelihood of gold answers written in the target labels over the same question's other answers
(in the spirit of BiPO: Cao et al. 2024, "Personalized Steering of LLMs via Bi-directional
Preference Optimization").

**Data.** Labelled texts (:class:`~ks_lens.datasets.gold_texts.LabelledText`) with their question:
for each question, a pair ``(y_w, y_l)`` of two of its answers where ``y_w`` is written in the
labels ``T`` and ``y_l`` is not written in all of them (``T`` is not a subset of ``y_l``'s
labels). Two- and three-label answers are direct multi-target examples. Each answer is encoded as
the chat prompt of its question (the model's default system prompt, as ``response-only``
collection does) followed by its first ``max_tokens`` tokens.

**Steering.** One vector ``v_l`` per label at one hook point (``blocks.L.hook_resid_post`` by
default); a pair steers with ``v_T = mean(v_l for l in T)`` (CAA (mean)'s convention) added at
every position, through the library's own hooks (:func:`~ks_lens.steering.base.installed`).

**Loss** (per pair, ``log p`` summed over the answer tokens, teacher forcing, reference log-probs
``log p_0`` computed once without steering)::

    m = (log p_v(y_w|x) - log p_0(y_w|x)) - (log p_v(y_l|x) - log p_0(y_l|x))
    loss = -log sigmoid(d * beta * m) + kl_weight * KL(p_0 || p_v)[prompt tokens]

With ``bidirectional`` (BiPO's trick) each pair draws ``d`` in ``{+1, -1}`` and steers with
``d * v_T``: minus the vector must prefer ``y_l``, so subtracting a vector (CAA's avoid) means
"away from the label". The KL penalty is on the tone-neutral text the model reads: the next-token
distributions at the prompt's positions (system prompt, template and question; not the last one,
which predicts the answer), KL binned to ``p_0``'s ``kl_top_k`` most likely tokens plus one bin for
the rest (a lower bound of the full KL, exact when the rest is empty), at no extra forward pass.

Only the vectors are parameters: the model is frozen (``requires_grad`` off and eval mode while
training, both restored after), fp32 vectors, Adam, seeded batches and signs. The result is a
:class:`~ks_lens.steering.caa.SteeringVectors` (``method="likelihood"``; ``source`` records the
config, the texts' hash and the loss curve) that :class:`~ks_lens.steering.caa.CAA` steers with
(the registry's ``likelihood`` method: CAA (mean) on these vectors).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from ks_lens.datasets.gold_texts import LabelledText, texts_hash
from ks_lens.errors import ConfigError, DatasetError, LabelError
from ks_lens.hooks import canonical_hook_name, check_layer, check_steerable, resid_hook
from ks_lens.models.chat import ChatPrompt, encode_chat, left_pad
from ks_lens.models.loading import model_device, model_signature, pad_token_id
from ks_lens.steering.base import Transform, grouped_steering_hook, installed
from ks_lens.steering.caa import SteeringVectors
from ks_lens.steering.positions import PositionTracker
from ks_lens.types import Model

_TINY = 1e-30  # floor of a rest bin's probability (its log stays finite)


@dataclass(frozen=True)
class LikelihoodConfig:
    """How :func:`train_likelihood_vectors` trains (validated on construction).

    The defaults are sized for the default model (135M parameters) on 2 CPU cores: ``steps *
    batch_size`` = 320 pairs, each seen once, answers cut to 32 tokens, one unsteered pass over the
    ~460 texts they use; about 2.5 minutes estimated from the model's forward/backward speed
    (``docs/steering.md``).
    """

    steps: int = 160  # optimiser steps (>= 1)
    batch_size: int = 2  # pairs per step (each pair runs two sequences)
    lr: float = 0.03  # Adam learning rate on the vectors (raw activation units)
    beta: float = 0.1  # DPO temperature (> 0)
    kl_weight: float = 1.0  # weight of KL(p_0 || p_v) on the prompt tokens (>= 0; 0: off)
    kl_top_k: int = 32  # p_0's most likely tokens kept per position for the binned KL (>= 1)
    max_tokens: int = 32  # answer tokens kept per text (>= 1)
    max_pairs: int = 320  # pairs drawn (seeded) from all valid pairs (>= 1)
    bidirectional: bool = True  # BiPO: a random sign per pair, +v prefers y_w and -v y_l
    seed: int = 0  # pair sampling, order and signs
    ref_batch_size: int = 16  # texts per reference (unsteered) forward pass (>= 1)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "kl_top_k", "max_tokens", "max_pairs", "ref_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        for name, low_ok in (("lr", False), ("beta", False), ("kl_weight", True)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")
            if v < 0 or (v == 0 and not low_ok):
                allowed = ">= 0" if low_ok else "> 0"
                raise ConfigError(f"{name} must be {allowed}, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not isinstance(self.bidirectional, bool):
            raise ConfigError(f"bidirectional must be True or False, got {self.bidirectional!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- the loss


def preference_loss(
    policy_w: Float[torch.Tensor, " n"],
    policy_l: Float[torch.Tensor, " n"],
    ref_w: Float[torch.Tensor, " n"],
    ref_l: Float[torch.Tensor, " n"],
    beta: float,
    sign: Float[torch.Tensor, " n"] | None = None,
) -> Float[torch.Tensor, " n"]:
    """Per-pair DPO/BiPO loss ``-log sigmoid(sign * beta * m)`` with
    ``m = (policy_w - ref_w) - (policy_l - ref_l)`` (sequence log-probs; ``sign`` default +1)."""
    margin = (policy_w - ref_w) - (policy_l - ref_l)
    if sign is not None:
        margin = sign * margin
    return F.softplus(-beta * margin)  # = -log sigmoid(beta * margin), stable


def binned_kl(
    ref_logp: Float[torch.Tensor, "n k"], logp: Float[torch.Tensor, "n k"]
) -> Float[torch.Tensor, " n"]:
    """``KL(p_0 || p)`` per row over ``k`` kept tokens plus one bin holding the rest of each
    distribution (``ref_logp``: ``log p_0`` of the kept tokens, ``logp``: ``log p`` of the same
    tokens). Exact when the kept tokens hold all of ``p_0`` and ``p``; a lower bound otherwise."""
    p0 = ref_logp.exp()
    kept = (p0 * (ref_logp - logp)).sum(-1)
    tail0 = (1 - p0.sum(-1)).clamp_min(0)  # 0 when the kept tokens hold all of p_0
    tail = (1 - logp.exp().sum(-1)).clamp_min(_TINY)
    return kept + tail0 * (tail0.clamp_min(_TINY).log() - tail.log())


def answer_logprobs(
    logits: Float[torch.Tensor, "batch pos vocab"],
    input_ids: Int[torch.Tensor, "batch pos"],
    answer_mask: Bool[torch.Tensor, "batch pos"],
) -> Float[torch.Tensor, " batch"]:
    """``sum_t log p(input_ids[t] | input_ids[:t])`` over the positions ``t`` where
    ``answer_mask`` is set (teacher forcing; the logits at ``t - 1`` predict token ``t``)."""
    logits = logits[:, :-1].float()
    tok = input_ids[:, 1:]
    lp = logits.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (lp * answer_mask[:, 1:].to(lp.dtype)).sum(-1)


# ----------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class _Row:
    """One text as the model reads it: prompt + answer token ids, where the answer starts."""

    ids: tuple[int, ...]
    start: int


@dataclass(frozen=True)
class _Batch:
    input_ids: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    answer: Bool[torch.Tensor, "batch pos"]  # answer tokens
    prompt: Bool[torch.Tensor, "batch pos"]  # positions whose next token is a prompt token


def _question_key(t: LabelledText) -> str:
    if not t.question:
        raise ConfigError(
            f"labelled text {t.id!r} has no question; likelihood training needs each text's "
            "question (the prompt the answer is scored after)"
        )
    return t.question_id or t.question


def preference_pairs(
    texts: Sequence[LabelledText], label_names: Sequence[str]
) -> list[tuple[int, int]]:
    """Every ``(w, l)`` pair of indices into ``texts``: two answers of the same question where
    ``texts[w]``'s labels are not all among ``texts[l]``'s (so ``w`` is preferred under ``w``'s
    labels). Texts need a question; their labels must be in ``label_names``."""
    by_q: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        unknown = [x for x in t.labels if x not in label_names]
        if unknown:
            raise LabelError(
                f"text {t.id!r} has unknown label(s) {unknown}; known labels are {list(label_names)}"
            )
        by_q.setdefault(_question_key(t), []).append(i)
    pairs = []
    for idx in by_q.values():
        for w in idx:
            for lo in idx:
                if lo != w and not set(texts[w].labels) <= set(texts[lo].labels):
                    pairs.append((w, lo))
    return pairs


def _encode(tok: Any, text: LabelledText, max_tokens: int) -> _Row:
    head = encode_chat(tok, ChatPrompt(text.question or ""))
    answer = list(tok(text.text, add_special_tokens=False)["input_ids"])[:max_tokens]
    return _Row(tuple(head + answer), len(head))


def _make_batch(rows: Sequence[_Row], pad_id: int, device: torch.device) -> _Batch:
    b = left_pad([r.ids for r in rows], pad_id, device)
    width = b.input_ids.shape[1]
    answer = torch.zeros(b.input_ids.shape, dtype=torch.bool, device=device)
    prompt = torch.zeros_like(answer)
    for i, r in enumerate(rows):
        pad = width - len(r.ids)
        answer[i, pad + r.start :] = True
        prompt[i, pad : pad + r.start - 1] = True  # predicts prompt tokens 1 .. start - 1
    return _Batch(b.input_ids, b.attention_mask, answer, prompt)


# ----------------------------------------------------------------------------- training


@contextmanager
def frozen(model: Model) -> Iterator[None]:
    """The model in eval mode with ``requires_grad`` off on every weight; both restored on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


def _adder(delta: Float[torch.Tensor, " d_model"]) -> Transform:
    def add(x: Float[torch.Tensor, "n d_model"]) -> Float[torch.Tensor, "n d_model"]:
        return x + delta.to(x.dtype)

    return add


@contextmanager
def _steered(
    model: Model, hook_name: str, deltas: Float[torch.Tensor, "batch d_model"]
) -> Iterator[None]:
    """Add ``deltas[b]`` at every position of batch row ``b`` at ``hook_name`` (gradients flow)."""
    n = deltas.shape[0]
    transforms: list[Transform | None] = [_adder(deltas[r]) for r in range(n)]
    tracker = PositionTracker()
    hook = grouped_steering_hook(transforms, torch.arange(n), "all", tracker)
    with installed(model, [(hook_name, hook)], tracker):
        yield


@dataclass
class _Reference:
    """Unsteered quantities per text: answer log-prob, top-k log-probs at the prompt positions."""

    answer: dict[int, float]
    top_ids: dict[int, torch.Tensor]  # [prompt positions, k]
    top_logp: dict[int, torch.Tensor]  # [prompt positions, k]


@torch.no_grad()
def _reference(
    model: Model, rows: dict[int, _Row], cfg: LikelihoodConfig, pad_id: int, progress: bool
) -> _Reference:
    ref = _Reference({}, {}, {})
    order = sorted(rows, key=lambda i: (len(rows[i].ids), i))
    device = model_device(model)
    chunks = [order[j : j + cfg.ref_batch_size] for j in range(0, len(order), cfg.ref_batch_size)]
    for chunk in tqdm(chunks, desc="likelihood: reference", disable=not progress, leave=False):
        b = _make_batch([rows[i] for i in chunk], pad_id, device)
        logits = model(b.input_ids, attention_mask=b.attention_mask).float()
        lp = answer_logprobs(logits, b.input_ids, b.answer)
        k = min(cfg.kl_top_k, logits.shape[-1])
        for j, i in enumerate(chunk):
            ref.answer[i] = float(lp[j])
            top = logits[j][b.prompt[j]].log_softmax(-1).topk(k, dim=-1)
            ref.top_ids[i], ref.top_logp[i] = top.indices, top.values
    return ref


def _schedule(
    pairs: list[tuple[int, int]], cfg: LikelihoodConfig
) -> list[list[tuple[int, int, float]]]:
    """The seeded plan: ``steps`` batches of ``(w, l, sign)`` from ``max_pairs`` drawn pairs,
    reshuffled every pass over them."""
    rng = random.Random(cfg.seed)
    pool = list(pairs)
    rng.shuffle(pool)
    pool = pool[: cfg.max_pairs]
    plan: list[list[tuple[int, int, float]]] = []
    stream: list[tuple[int, int]] = []
    for _ in range(cfg.steps):
        batch = []
        for _ in range(min(cfg.batch_size, len(pool))):
            if not stream:
                stream = list(pool)
                rng.shuffle(stream)
            w, lo = stream.pop()
            sign = rng.choice((1.0, -1.0)) if cfg.bidirectional else 1.0
            batch.append((w, lo, sign))
        plan.append(batch)
    return plan


@dataclass
class _TrainData:
    rows: dict[int, _Row]
    mix: Float[torch.Tensor, "n_texts k"]
    ref: _Reference
    pad_id: int
    cfg: LikelihoodConfig


def _step_loss(
    model: Model,
    hook_name: str,
    vectors: Float[torch.Tensor, "k d_model"],
    step: list[tuple[int, int, float]],
    data: _TrainData,
) -> tuple[torch.Tensor, float, float]:
    """The loss of one batch of pairs (and its DPO and KL parts, as floats)."""
    n = len(step)
    w = [s[0] for s in step]
    lo = [s[1] for s in step]
    sign = torch.tensor([s[2] for s in step], device=vectors.device)
    mix = data.mix[w].to(vectors.device)  # [n, k]: 1/|T| on each target label of y_w
    deltas = sign[:, None] * (mix @ vectors)
    b = _make_batch([data.rows[i] for i in w + lo], data.pad_id, vectors.device)
    with _steered(model, hook_name, torch.cat([deltas, deltas])):
        logits = model(b.input_ids, attention_mask=b.attention_mask).float()
    pol = answer_logprobs(logits, b.input_ids, b.answer)
    ref = torch.tensor([data.ref.answer[i] for i in w + lo], device=pol.device)
    dpo = preference_loss(pol[:n], pol[n:], ref[:n], ref[n:], data.cfg.beta, sign).mean()
    kl = torch.zeros((), device=pol.device)
    if data.cfg.kl_weight > 0:
        parts = []
        for j, i in enumerate(w):
            x = logits[j][b.prompt[j]]  # [prompt positions, vocab]
            ids = data.ref.top_ids[i].to(x.device)
            logp = x.gather(-1, ids) - x.logsumexp(-1, keepdim=True)
            parts.append(binned_kl(data.ref.top_logp[i].to(x.device), logp).mean())
        kl = torch.stack(parts).mean()
    return dpo + data.cfg.kl_weight * kl, float(dpo.detach()), float(kl.detach())


def _label_mix(
    texts: Sequence[LabelledText], label_names: Sequence[str]
) -> Float[torch.Tensor, "n_texts k"]:
    """Row ``i``: the weights of the label vectors ``texts[i]`` steers with (their mean)."""
    mix = torch.zeros(len(texts), len(label_names))
    for i, t in enumerate(texts):
        for x in t.labels:
            mix[i, label_names.index(x)] = 1.0 / len(t.labels)
    return mix


def train_likelihood_vectors(
    model: Model,
    texts: Sequence[LabelledText],
    layer: int,
    label_names: Sequence[str],
    config: LikelihoodConfig | None = None,
    *,
    kind: str = "resid_post",
    progress: bool = True,
) -> SteeringVectors:
    """Learn one steering vector per label at ``blocks.{layer}.hook_{kind}`` from ``texts``
    (gold answers with their questions; see the module docstring for the pairs and the loss).

    Returns:
        :class:`~ks_lens.steering.caa.SteeringVectors` with ``method="likelihood"``; ``source``
        records the config, the texts' hash (:func:`~ks_lens.datasets.gold_texts.texts_hash`), the
        number of texts and pairs, the loss per step and the training time.
    """
    cfg = config or LikelihoodConfig()
    labels = tuple(label_names)
    layer = check_layer(model, layer)
    hook_name = resid_hook(layer, kind)
    check_steerable(model, hook_name)
    pairs = preference_pairs(texts, labels)
    if not pairs:
        raise DatasetError(
            "no preference pairs: likelihood training needs two or more answers of one question "
            "with different labels"
        )
    t0 = time.perf_counter()
    plan = _schedule(pairs, cfg)
    used = sorted({i for step in plan for w, lo, _ in step for i in (w, lo)})
    tok, pad_id = model.tokenizer, pad_token_id(model.tokenizer)
    rows = {i: _encode(tok, texts[i], cfg.max_tokens) for i in used}
    device = model_device(model)
    vectors = torch.zeros(len(labels), int(model.cfg.d_model), device=device, requires_grad=True)
    opt = torch.optim.Adam([vectors], lr=cfg.lr)
    history: list[list[float]] = []
    with frozen(model):
        ref = _reference(model, rows, cfg, pad_id, progress)
        data = _TrainData(rows, _label_mix(texts, labels), ref, pad_id, cfg)
        bar = tqdm(plan, desc="likelihood: train", disable=not progress, leave=False)
        for step in bar:
            opt.zero_grad()
            loss, dpo, kl = _step_loss(
                model, canonical_hook_name(hook_name, model), vectors, step, data
            )
            loss.backward()
            opt.step()
            value = float(loss.detach())
            history.append([value, dpo, kl])
            bar.set_postfix(loss=f"{value:.3f}", kl=f"{kl:.3f}")
    source = {
        "trained": "likelihood",
        "objective": "BiPO-style preference optimisation (ks_lens.steering.likelihood)",
        "config": cfg.to_json(),
        "dataset_hash": texts_hash(texts),
        "n_texts": len(texts),
        "n_pairs": min(len(pairs), cfg.max_pairs),
        "n_texts_used": len(used),
        "loss": history,  # per step: [loss, dpo part, kl part]
        "train_s": round(time.perf_counter() - t0, 3),
    }
    return SteeringVectors(
        vectors.detach().cpu(),
        label_names=labels,
        hook_name=hook_name,
        model=model_signature(model),
        method="likelihood",
        source=source,
    )


__all__ = [
    "LikelihoodConfig",
    "answer_logprobs",
    "binned_kl",
    "frozen",
    "preference_loss",
    "preference_pairs",
    "train_likelihood_vectors",
]
