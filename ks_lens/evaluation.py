"""Honest evaluation of steering: held-out evaluators, coherence, vanished targets, alpha calibration.

Principles (see ``docs/evaluation.md``):

* **Evaluators are never optimised against.** They are probes trained on the ``evaluator``
  split (questions the steering probe never saw), with another seed and width than the steering
  probe, at a layer at or after the steering layer.
* **Real forward passes.** The activation-level metric steers neutral prompts with hooks and
  reads the evaluator's layer in the same pass (no feeding the steering layer's vector to a
  classifier trained elsewhere).
* **Generated text.** Steered greedy answers are re-encoded (question + answer, no instruction)
  under the *unsteered* model; a response-level evaluator reads the text's behaviour, and the
  same pass gives perplexity and the per-token KL divergence steered vs unsteered.
* **Matched coherence.** Each method's alpha is the largest whose next-token KL divergence stays
  within a budget on the calibration split (:func:`calibrate_alpha`); results are reported on the
  test split.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from ks_lens.batching import record_activations, scatter, sorted_batches
from ks_lens.chat import ChatPrompt, TokenBatch, check_context, encode_chat
from ks_lens.errors import ConfigError
from ks_lens.generation import BatchGeneration, generate_from_batch, shared_prefill
from ks_lens.hf_path import can_bypass, decoder_layers, forward, layer_input, resume_at
from ks_lens.hooks import hook_layer
from ks_lens.models import model_device, pad_token_id
from ks_lens.probes import Probe
from ks_lens.spill import SpillList
from ks_lens.steering.base import Steerer, Steering, SteeringSpec
from ks_lens.steering.caa import CAA, SteeringVectors
from ks_lens.steering.dct import DCTConfig, DCTVectors, LabelMap, assign_labels
from ks_lens.steering.positions import Positions
from ks_lens.types import Model

# ----------------------------------------------------------------------------- activation level


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
    pass resumes there (:func:`~ks_lens.hf_path.resume_at`). With 4 methods steering layer 18
    and an evaluator at layer 22, a steered row then costs 5 decoder layers instead of 23. The
    numbers equal separate full passes up to float rounding (tested); it falls back to full
    passes where the plain HF modules cannot run or a hook point is outside the blocks.
    """
    from ks_lens.steering.base import steer_groups

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
    logps: torch.Tensor | None = None
    names = [probe.hook_name] if probe is not None else []
    start = _shared_start(model, steerings, probe) if share_lower_layers else None

    def only(groups: list[int]) -> list[Steering | None]:
        present = set(groups)  # hooks only for the configurations in this batch
        return [st if g in present else None for g, st in enumerate(steerings)]

    def run(batch: TokenBatch, out_rows: list[int], groups: list[int], resume: Any) -> None:
        nonlocal logps
        with (
            torch.no_grad(),
            steer_groups(model, only(groups), groups, positions=positions),
            # without next_token the pass ends right after the probe's hook
            record_activations(model, names, last_token=True, stop=not next_token) as rec,
        ):
            if resume is None:
                logits = forward(
                    model, batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1
                )
            else:
                with resume_at(model, start or 0, *resume):
                    logits = forward(
                        model,
                        batch.input_ids,
                        attention_mask=batch.attention_mask,
                        logits_to_keep=1,
                    )
            assert logits is not None
            lp = torch.log_softmax(logits[:, -1].float(), -1).cpu()
            if logps is None:
                logps = torch.empty(n * len(steerings), lp.shape[-1])
            scatter(logps, out_rows, lp)
        if probe is not None:
            x = rec[probe.hook_name].to(probe.mean.device, probe.mean.dtype)
            scatter(probs, out_rows, probe.predict_proba(x).cpu())

    pad, device = pad_token_id(tok), model_device(model)
    total = n * len(steerings)
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        if start is None:
            rows = [(g, i) for g in range(len(steerings)) for i in range(n)]
            for idx, batch in sorted_batches(
                [ids[i] for _, i in rows], batch_size, pad_id=pad, device=device
            ):
                run(batch, idx, [rows[r][0] for r in idx], None)
                bar.update(len(idx))
        else:
            for idx, batch in sorted_batches(ids, batch_size, pad_id=pad, device=device):
                hidden, as_tuple = layer_input(model, start, batch.input_ids, batch.attention_mask)
                pairs = [(g, j) for g in range(len(steerings)) for j in range(len(idx))]
                for c in range(0, len(pairs), batch_size):
                    chunk = pairs[c : c + batch_size]
                    js = [j for _, j in chunk]
                    sub = TokenBatch(batch.input_ids[js], batch.attention_mask[js])
                    rows_out = [g * n + idx[j] for g, j in chunk]
                    run(sub, rows_out, [g for g, _ in chunk], (hidden[js], as_tuple))
                    bar.update(len(chunk))
    return [
        Readout(probs[g * n : (g + 1) * n], None if logps is None else logps[g * n : (g + 1) * n])
        for g in range(len(steerings))
    ]


def _shared_start(
    model: Model, steerings: Sequence[Steering | None], probe: Probe | None
) -> int | None:
    """The lowest decoder layer any of ``steerings`` writes to, when the layers below it can be
    run once and shared (see :func:`readout_groups`); ``None`` when they cannot."""
    from ks_lens.steering.base import group_transforms

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


# ----------------------------------------------------------------------------- vanished targets


def _check_fraction(name: str, value: Any) -> None:
    """Refuse a rule threshold that is not a number in [0, 1] (NaN would silently never fire)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 <= value <= 1:
        raise ConfigError(f"{name} must be a number between 0 and 1, got {value!r}")


@dataclass(frozen=True)
class VanishRule:
    """A target *vanished* on a question when its probability stays below ``floor`` while the
    combination's best target reaches at least ``reach`` (2+ targets only).

    Judged per question on levels, not on question-averaged changes: a target that starts high
    and stays high is not vanished, and a method that moves nothing never triggers the rule.
    """

    floor: float = 0.1  # a target below this probability may have vanished
    reach: float = 0.5  # ... if the combination's best target reaches this probability

    def __post_init__(self) -> None:
        for name in ("floor", "reach"):
            _check_fraction(f"vanish.{name}", getattr(self, name))
        if self.floor > self.reach:
            raise ConfigError(
                f"vanish.floor ({self.floor}) must not exceed vanish.reach ({self.reach}): the "
                "combination's best target would count as vanished itself"
            )

    def vanished(self, target_probs: np.ndarray) -> np.ndarray:
        """``[n, k]`` probabilities of the ``k`` targets -> ``[n, k]`` vanished flags."""
        p = np.asarray(target_probs, dtype=float)
        if p.ndim != 2:
            raise ConfigError(f"target_probs must be [n, k], got shape {p.shape}")
        if p.shape[1] < 2:
            return np.zeros(p.shape, dtype=bool)
        return (p < self.floor) & (p.max(1, keepdims=True) >= self.reach)

    def to_json(self) -> dict[str, Any]:
        return {
            "floor": self.floor,
            "reach": self.reach,
            "definition": f"a target vanished on a question if its probability stayed below {self.floor} "
            f"while the combination's best target reached at least {self.reach} (2+ targets only); "
            "the rate is over question x combination cells",
        }


@dataclass(frozen=True)
class DegenerateRule:
    """An answer is *degenerate* if it is empty, mostly not letters, or heavily repetitive.

    * empty: fewer than ``min_letters`` letters;
    * mostly non-letters: letters are less than ``min_letter_share`` of its non-space characters;
    * repetitive: with at least ``min_words`` words, distinct word bigrams / bigrams below
      ``min_distinct2``, or (at least ``min_chars`` characters) a zlib compression ratio below
      ``min_compression`` (a repeated phrase compresses far better than prose).
    """

    min_letters: int = 2
    min_letter_share: float = 0.5
    min_words: int = 8
    min_distinct2: float = 0.5
    min_chars: int = 60
    min_compression: float = 0.3

    def __post_init__(self) -> None:
        for name in ("min_letters", "min_words", "min_chars"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(
                    f"degenerate.{name} must be a non-negative whole number, got {v!r}"
                )
        for name in ("min_letter_share", "min_distinct2", "min_compression"):
            _check_fraction(f"degenerate.{name}", getattr(self, name))

    def reason(self, text: str) -> str | None:
        """Why ``text`` is degenerate (``"empty"``, ``"non-letters"``, ``"repetition"``), or None."""
        chars = [c for c in text if not c.isspace()]
        letters = sum(c.isalpha() for c in chars)
        if letters < self.min_letters:
            return "empty"
        if letters < self.min_letter_share * len(chars):
            return "non-letters"
        if len(text.split()) >= self.min_words and distinct_n(text) < self.min_distinct2:
            return "repetition"
        raw = text.encode()
        if (
            len(raw) >= self.min_chars
            and len(zlib.compress(raw, 9)) / len(raw) < self.min_compression
        ):
            return "repetition"
        return None

    def is_degenerate(self, text: str) -> bool:
        return self.reason(text) is not None

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: getattr(self, k) for k in self.__dataclass_fields__},
            "definition": f"empty (< {self.min_letters} letters), mostly non-letters (letters < "
            f"{self.min_letter_share:.0%} of non-space characters), or repetitive (distinct word bigrams < "
            f"{self.min_distinct2} with >= {self.min_words} words, or zlib compression ratio < "
            f"{self.min_compression} with >= {self.min_chars} characters)",
        }


# ----------------------------------------------------------------------------- generation level


@dataclass
class GenerationScores:
    """Per-answer scores of steered (or unsteered) generations."""

    texts: list[str]
    answer_ids: list[list[int]]
    probs: Float[torch.Tensor, "n k"]  # response-level evaluator, re-encoded without instruction
    #: mean negative log-likelihood per answer token under the unsteered model (nan if empty)
    nll: list[float]
    #: mean KL(steered || unsteered) over the answer's generation steps, including the step that
    #: ended the turn: an answer cut short by steering still pays for that choice
    kl: list[float]
    kl_steps: list[int]  # how many steps each KL mean covers
    distinct2: list[float]  # distinct word bigrams / word bigrams per answer (nan if < 2 words)

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, index: Iterable[int]) -> GenerationScores:
        """The scores of the answers at ``index``, in that order."""
        idx = list(index)
        return GenerationScores(
            [self.texts[i] for i in idx],
            [self.answer_ids[i] for i in idx],
            self.probs[idx],
            [self.nll[i] for i in idx],
            [self.kl[i] for i in idx],
            [self.kl_steps[i] for i in idx],
            [self.distinct2[i] for i in idx],
        )

    @property
    def perplexity(self) -> float:
        """Corpus perplexity of the answers under the unsteered model (token-weighted)."""
        tot = sum(n * len(ids) for n, ids in zip(self.nll, self.answer_ids, strict=True) if ids)
        cnt = sum(len(ids) for ids in self.answer_ids)
        return math.exp(tot / cnt) if cnt else float("nan")

    @property
    def mean_kl(self) -> float:
        """Step-weighted mean KL over all answers (nan if no step was generated)."""
        tot = sum(k * n for k, n in zip(self.kl, self.kl_steps, strict=True) if n)
        cnt = sum(self.kl_steps)
        return tot / cnt if cnt else float("nan")

    @property
    def n_empty(self) -> int:
        return sum(1 for ids in self.answer_ids if not ids)


def distinct_n(text: str, n: int = 2) -> float:
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def generate_and_score_groups(
    model: Model,
    questions: Sequence[str],
    steerings: Sequence[Steering | None],
    *,
    response_probe: Probe | None,
    positions: Positions = "all",
    max_new_tokens: int = 32,
    batch_size: int = 32,
    seed: int = 0,
) -> list[GenerationScores]:
    """Answer every question under every steering configuration (``None`` = unsteered); one
    :class:`GenerationScores` per configuration (see :func:`generate_and_score_rows`)."""
    rows = [(g, i) for g in range(len(steerings)) for i in range(len(questions))]
    scores = generate_and_score_rows(
        model,
        questions,
        steerings,
        rows,
        response_probe=response_probe,
        positions=positions,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    n = len(questions)
    return [scores.select(range(g * n, (g + 1) * n)) for g in range(len(steerings))]


def generate_and_score_rows(
    model: Model,
    questions: Sequence[str],
    steerings: Sequence[Steering | None],
    rows: Sequence[tuple[int, int]],
    *,
    response_probe: Probe | None,
    positions: Positions = "all",
    max_new_tokens: int = 32,
    batch_size: int = 32,
    seed: int = 0,
    share_prefix: bool = True,
    systems: Sequence[str | None] | None = None,
) -> GenerationScores:
    """Answer each row ``(configuration index, question index)`` greedily (configuration
    ``None`` = unsteered) and score the answers; returns one :class:`GenerationScores` over
    ``rows``, in their order.

    ``systems`` (one per row, or ``None`` for all rows) is the system prompt a row's answer is
    *generated* under (``None``: the model's default, as for every steered row): the
    ``instructed`` reference row asks for the targets this way. Scoring ignores it: every
    answer is re-encoded after its question without any system prompt, so an instructed
    answer's KL compares the instructed next-token distributions with the unsteered model's
    on the same answer tokens, exactly as a steered answer's does.

    All rows share batches: one generation call carries several
    methods side by side (:func:`~ks_lens.steering.steer_groups`), which matters because decoding
    is memory-bound. Each answer is then re-encoded (question + answer, no instruction) in an
    unsteered forward pass that gives the response evaluator's probabilities at the answer's last
    token, the answer's per-token NLL, and the unsteered next-token distributions that the steered
    generation's logits are compared with (KL per generated token). With ``share_prefix`` the
    question's tokens run once per question and every answer to it only runs its own tokens,
    attending to the cached question (:func:`_score_answers`).
    """

    if not questions or not rows:
        raise ConfigError("no questions to generate for")
    for g, i in rows:
        if not (0 <= g < len(steerings) and 0 <= i < len(questions)):
            raise ConfigError(f"row {(g, i)} is out of range")
    if systems is not None and len(systems) != len(rows):
        raise ConfigError(f"{len(systems)} system prompts for {len(rows)} rows")
    tok = model.tokenizer
    device = model_device(model)
    pad = pad_token_id(tok)
    heads = [encode_chat(tok, ChatPrompt(q)) for q in questions]
    prompts = _row_prompts(tok, questions, heads, rows, systems)
    answers: list[list[int]] = [[] for _ in rows]
    step_logps = SpillList(len(rows))  # steered log-probs wait on disk until scored (spill.py)
    question_of = [i for _, i in rows]
    scorer = _AnswerScorer(
        model, heads, answers, question_of, step_logps, response_probe, batch_size=batch_size
    )
    # each question is scored as soon as all of its answers exist, and its rows' steered
    # next-token distributions ([steps, vocab] each) are dropped then, so memory holds only the
    # questions in flight, not every row (the numbers do not depend on when a question is scored)
    pending: dict[int, list[int]] = {}
    for r, q in enumerate(question_of):
        pending.setdefault(q, []).append(r)
    left = {q: len(rs) for q, rs in pending.items()}
    batches = sorted_batches(
        prompts,
        batch_size,
        pad_id=pad,
        device=device,
        # same length: by question, then configuration (a batch shares its questions' prefill)
        tiebreak=lambda r: (rows[r][1], rows[r][0]),
    )
    for b, (idx, batch) in enumerate(batches):
        res = _generate_batch(
            model,
            steerings,
            [rows[r][0] for r in idx],
            batch,
            positions=positions,
            max_new_tokens=max_new_tokens,
            seed=seed + b,
            share_prefix=share_prefix,
        )
        assert res.logits is not None
        for j, r in enumerate(idx):
            answers[r] = res.ids[j]
            steps = len(res.ids[j]) + (1 if res.finished[j] else 0)  # + the end-of-turn step
            step_logps[r] = torch.log_softmax(res.logits[j, :steps].float(), -1).cpu()
        del res
        if not share_prefix:
            continue
        for q in dict.fromkeys(question_of[r] for r in idx):
            left[q] -= sum(1 for r in idx if question_of[r] == q)
            if left[q] == 0:
                scorer.question(q, pending[q])
    scorer.whole(scorer.unshared if share_prefix else range(len(rows)))
    probs, nll, kl, kl_steps = scorer.result()
    step_logps.close()
    texts = [tok.decode(a, skip_special_tokens=True).strip() for a in answers]
    return GenerationScores(
        texts, answers, probs, nll, kl, kl_steps, [distinct_n(t) for t in texts]
    )


def _row_prompts(
    tok: Any,
    questions: Sequence[str],
    heads: list[list[int]],
    rows: Sequence[tuple[int, int]],
    systems: Sequence[str | None] | None,
) -> list[list[int]]:
    """The token ids each row is generated from: its question (``heads``), under the row's
    system prompt where ``systems`` gives one (each question and system encoded once)."""
    prompts = [heads[i] for _, i in rows]
    encoded: dict[tuple[int, str], list[int]] = {}
    for r, ((_, i), system) in enumerate(zip(rows, systems or [None] * len(rows), strict=True)):
        if system is not None:
            if (i, system) not in encoded:
                encoded[(i, system)] = encode_chat(tok, ChatPrompt(questions[i], system))
            prompts[r] = encoded[(i, system)]
    return prompts


def _generate_batch(
    model: Model,
    steerings: Sequence[Steering | None],
    row_group: list[int],
    batch: TokenBatch,
    *,
    positions: Positions,
    max_new_tokens: int,
    seed: int,
    share_prefix: bool,
) -> BatchGeneration:
    """One batch of :func:`generate_and_score_rows`: row ``b`` steered by
    ``steerings[row_group[b]]``, with the layers below the lowest steered one run once per
    distinct prompt (``share_prefix``; :func:`~ks_lens.generation.shared_prefill`)."""
    from ks_lens.steering.base import steer_groups

    present = set(row_group)
    here = [st if g in present else None for g, st in enumerate(steerings)]
    start = _shared_start(model, here, None) if share_prefix else None
    prefill = shared_prefill(model, batch, start)  # before any hook is installed
    with steer_groups(model, steerings, row_group, positions=positions):
        return generate_from_batch(
            model,
            batch,
            max_new_tokens=max_new_tokens,
            seed=seed,
            return_logits=True,
            prefill=prefill,
        )


class _AnswerScorer:
    """Re-encodes answers after their question's tokens under the unsteered model and scores
    them (see :func:`_score_answers`), one question at a time so that a caller can score each
    question as soon as all of its answers exist and drop their steered log-probs
    (``step_logps[r]`` is set to ``None`` once row ``r`` is scored; a list or a
    :class:`~ks_lens.spill.SpillList`)."""

    def __init__(
        self,
        model: Model,
        heads: Sequence[Sequence[int]],
        answers: Sequence[Sequence[int]],
        question_of: Sequence[int],
        step_logps: list[torch.Tensor | None] | SpillList,
        probe: Probe | None,
        *,
        batch_size: int,
    ) -> None:
        n = len(answers)
        self.model, self.heads, self.answers = model, heads, answers
        self.question_of, self.step_logps, self.probe = question_of, step_logps, probe
        self.batch_size = batch_size
        self.probs = torch.empty(n, probe.n_labels if probe is not None else 0)
        self.nll = [float("nan")] * n
        self.kl = [float("nan")] * n
        self.kl_steps = [0] * n
        self.names = [probe.hook_name] if probe is not None else []
        self.device = model_device(model)
        self.pad = pad_token_id(model.tokenizer)
        self.unshared: list[int] = []  # rows whose question's cache cannot be shared

    def score(self, r: int, pred: torch.Tensor) -> None:
        """``pred`` [t + 1, vocab]: log-probs of answer tokens 0..t-1, then of the token after."""
        t = len(self.answers[r])
        if t:
            target = torch.tensor(list(self.answers[r]))
            self.nll[r] = float(-pred[:t].gather(-1, target[:, None]).mean())
        steered = self.step_logps[r]
        assert steered is not None
        if len(steered):
            self.kl[r] = float(kl_divergence(steered, pred[: len(steered)]).mean())
            self.kl_steps[r] = len(steered)
        self.step_logps[r] = None  # scored: free the steered distributions

    def read(self, rows: Sequence[int], x: torch.Tensor) -> None:
        probe = self.probe
        if probe is not None:
            scatter(
                self.probs,
                rows,
                probe.predict_proba(x.to(probe.mean.device, probe.mean.dtype)).cpu(),
            )

    def question(self, q: int, rows: Sequence[int]) -> None:
        """Score ``rows`` (all the answers to question ``q``) after one cached pass of the
        question; rows of a question whose cache cannot be shared wait for :meth:`whole`."""
        from ks_lens.activations import prefix_pass

        prefix, last_logits, last_acts = prefix_pass(self.model, self.heads[q], self.names)
        if prefix is None:
            self.unshared.extend(rows)
            return
        first = torch.log_softmax(last_logits.float(), -1).cpu()
        empty = [r for r in rows if not self.answers[r]]
        for r in empty:
            self.score(r, first[None])
        if empty and self.probe is not None:
            self.read(empty, last_acts[self.probe.hook_name][None].expand(len(empty), -1))
        todo = sorted((r for r in rows if self.answers[r]), key=lambda r: (len(self.answers[r]), r))
        n_chunks = math.ceil(len(todo) / self.batch_size)
        for c in range(n_chunks):  # near-equal chunks of at most batch_size rows
            chunk = todo[c * len(todo) // n_chunks : (c + 1) * len(todo) // n_chunks]
            self._after_prefix(prefix, first, chunk)

    def _after_prefix(self, prefix: Any, first: torch.Tensor, chunk: Sequence[int]) -> None:
        answers, device = self.answers, self.device
        lengths = torch.tensor([len(answers[r]) for r in chunk])
        width = int(lengths.max())
        ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), len(prefix) + width, dtype=torch.long)
        mask[:, : len(prefix)] = 1
        for j, r in enumerate(chunk):
            ids[j, : len(answers[r])] = torch.tensor(list(answers[r]))
            mask[j, len(prefix) : len(prefix) + len(answers[r])] = 1
        last = (lengths - 1).to(device)

        def at_last(act: torch.Tensor, name: str, last: torch.Tensor = last) -> torch.Tensor:
            return act[torch.arange(act.shape[0], device=act.device), last].float()

        with torch.no_grad(), record_activations(self.model, self.names, reduce=at_last) as rec:
            logits = forward(
                self.model,
                ids.to(device),
                attention_mask=mask.to(device),
                cache=prefix.cache_for(self.model, len(chunk)),
            )
        assert logits is not None
        if self.probe is not None:
            self.read(chunk, rec[self.probe.hook_name])
        for j, r in enumerate(chunk):
            t = len(answers[r])
            suffix = torch.log_softmax(logits[j, :t].float(), -1).cpu()
            self.score(r, torch.cat([first[None], suffix]))
        del logits

    def whole(self, rows: Sequence[int]) -> None:
        """Score ``rows`` as whole rows (question + answer), batched together."""
        answers = self.answers
        seqs = [
            list(self.heads[self.question_of[r]]) + list(answers[r]) for r in range(len(answers))
        ]
        for idx, batch in sorted_batches(
            seqs, self.batch_size, pad_id=self.pad, device=self.device, rows=rows
        ):
            tmax = max(len(answers[r]) for r in idx)
            with (
                torch.no_grad(),
                record_activations(self.model, self.names, last_token=True) as rec,
            ):
                logits = forward(
                    self.model,
                    batch.input_ids,
                    attention_mask=batch.attention_mask,
                    logits_to_keep=tmax + 1,
                )
            assert logits is not None
            if self.probe is not None:
                self.read(idx, rec[self.probe.hook_name])
            for j, r in enumerate(idx):
                t = len(answers[r])
                # positions tmax-t .. tmax predict answer tokens 0..t-1, then the token after
                self.score(r, torch.log_softmax(logits[j, tmax - t : tmax + 1].float(), -1).cpu())
            del logits

    def result(self) -> tuple[torch.Tensor, list[float], list[float], list[int]]:
        return self.probs, self.nll, self.kl, self.kl_steps


def _score_answers(
    model: Model,
    heads: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    question_of: Sequence[int],
    step_logps: Sequence[torch.Tensor | None],
    probe: Probe | None,
    *,
    batch_size: int,
    share_prefix: bool = True,
) -> tuple[torch.Tensor, list[float], list[float], list[int]]:
    """Re-encode every answer after its question's tokens under the unsteered model: the
    response ``probe``'s probabilities at the last token, the answer's mean NLL, and the mean
    KL of the steered steps ``step_logps`` against the unsteered next-token distributions.

    With ``share_prefix`` each question's tokens ``heads[q]`` run once (batch 1, KV cache kept)
    and the answers to it run only their own tokens, right padded after the cached question, so
    a row's numbers do not depend on its batch; the prediction of an answer's first token is the
    question pass's last logits. Equal to whole-row passes within float rounding (tested).
    Questions whose cache cannot be shared (see :func:`~ks_lens.activations.prefix_pass`) run
    whole rows.
    """
    scorer = _AnswerScorer(
        model, heads, answers, question_of, list(step_logps), probe, batch_size=batch_size
    )
    if share_prefix:
        by_question: dict[int, list[int]] = {}
        for r, q in enumerate(question_of):
            by_question.setdefault(q, []).append(r)
        for q, rows in by_question.items():
            scorer.question(q, rows)
        scorer.whole(scorer.unshared)
    else:
        scorer.whole(range(len(answers)))
    return scorer.result()


def first_token_kl(
    model: Model,
    prompts: Sequence[ChatPrompt | str],
    steerings: Sequence[Steering | None],
    *,
    positions: Positions = "all",
    batch_size: int = 16,
    base: Readout | None = None,
) -> list[float]:
    """Mean KL(steered || unsteered) of the next-token distribution at the last prompt token."""
    base = base or readout(model, prompts, next_token=True, batch_size=batch_size)
    assert base.next_logprobs is not None
    outs = readout_groups(
        model, prompts, steerings, next_token=True, positions=positions, batch_size=batch_size
    )
    res = []
    for r in outs:
        assert r.next_logprobs is not None
        res.append(float(kl_divergence(r.next_logprobs, base.next_logprobs).mean()))
    return res


def generation_kl(
    model: Model,
    questions: Sequence[str],
    steerings: Sequence[Steering | None],
    *,
    positions: Positions = "all",
    max_new_tokens: int = 12,
    batch_size: int = 48,
) -> list[float]:
    """Mean per-token KL(steered || unsteered) along each configuration's greedy continuation.

    The unsteered model's distributions are computed on the steered text itself, so this measures
    how far the steered model's next-token choices stray from what the unmodified model would
    predict in the same context: a coherence cost for generated text.
    """
    scores = generate_and_score_groups(
        model,
        questions,
        steerings,
        response_probe=None,
        positions=positions,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    return [s.mean_kl if not math.isnan(s.mean_kl) else 0.0 for s in scores]


CalibrationMetric = Literal["generation_kl", "first_token_kl"]
CALIBRATION_METRICS: tuple[CalibrationMetric, ...] = get_args(CalibrationMetric)


def kl_metric(
    model: Model,
    method: Steerer,
    specs: Sequence[SteeringSpec],
    prompts: Sequence[ChatPrompt | str],
    *,
    positions: Positions = "all",
    batch_size: int = 16,
    base: Readout | None = None,
) -> Callable[[float], float]:
    """``alpha -> mean first-token KL(steered || unsteered)`` over prompts and specs (one method).

    Example:
        >>> k_steer = ks.KSteering(probe)
        >>> kl = ks.kl_metric(model, k_steer, [k_steer.spec(target="casual")], ["Why is the sky blue?"])
        >>> kl(0.0) < 1e-6 < kl(0.01)                   # nats; feed it to calibrate_alpha
        True
    """
    base = base or readout(model, prompts, next_token=True, batch_size=batch_size)

    def metric(alpha: float) -> float:
        vals = first_token_kl(
            model,
            prompts,
            [(method, SteeringSpec(s.target, s.avoid, alpha)) for s in specs],
            positions=positions,
            batch_size=batch_size,
            base=base,
        )
        return sum(vals) / len(vals)

    return metric


# ----------------------------------------------------------------------------- DCT labels


def map_dct_labels(
    model: Model,
    vectors: DCTVectors,
    prompts: Sequence[ChatPrompt | str],
    evaluator: Probe,
    *,
    batch_size: int = 16,
) -> LabelMap:
    """Map DCT vectors to labels: the gain of every (vector, sign) on ``evaluator``'s labels
    over ``prompts``, each steered at the vectors' norm (see
    :class:`~ks_lens.steering.dct.LabelMap`), and the label assignment
    (:func:`~ks_lens.steering.dct.assign_labels`)."""
    if evaluator.layer < vectors.layer:
        raise ConfigError(
            f"the evaluator (layer {evaluator.layer}) must read at or after the DCT source layer "
            f"({vectors.layer})"
        )
    evaluator.check_compatible(model)
    names = [f"dct{j}" for j in range(vectors.n_vectors)]
    raw = CAA(
        SteeringVectors(
            vectors.vectors,
            label_names=names,
            hook_name=vectors.hook_name,
            model=vectors.model_info,
        ),
        combine="sum",
    )
    steerings = [None] + [
        (raw, SteeringSpec((n,), (), 1.0) if s == 0 else SteeringSpec((), (n,), 1.0))
        for n in names
        for s in range(2)
    ]
    outs = readout_groups(model, prompts, steerings, probe=evaluator, batch_size=batch_size)
    base = outs[0].probs.mean(0)
    gains = torch.stack([o.probs.mean(0) - base for o in outs[1:]]).reshape(
        vectors.n_vectors, 2, evaluator.n_labels
    )
    return assign_labels(gains, evaluator.label_names)


def fit_dct(
    model: Model,
    prompts: Sequence[ChatPrompt | str],
    evaluator: Probe,
    config: DCTConfig,
    *,
    map_prompts: Sequence[ChatPrompt | str] | None = None,
    batch_size: int = 16,
) -> DCTVectors:
    """Learn DCT vectors on ``prompts`` and map them to ``evaluator``'s labels on
    ``map_prompts`` (default the same prompts: the vectors never saw a label)."""
    vecs = DCTVectors.fit(model, prompts, config)
    mapping = map_dct_labels(
        model,
        vecs,
        prompts if map_prompts is None else map_prompts,
        evaluator,
        batch_size=batch_size,
    )
    return vecs.mapped(mapping)
