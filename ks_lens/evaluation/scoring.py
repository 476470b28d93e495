"""Generation level: steered greedy answers, scored under the unsteered model (probe, NLL, KL)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from ks_lens._runtime.batching import sorted_batches
from ks_lens.errors import ConfigError
from ks_lens.evaluation.answers import QuestionPasses, _AnswerScorer
from ks_lens.evaluation.readouts import _shared_start
from ks_lens.generation import BatchGeneration, LayerInputs, generate_from_batch, shared_prefill
from ks_lens.models import model_device, pad_token_id
from ks_lens.models.chat import ChatPrompt, TokenBatch, encode_chat
from ks_lens.probes import Probe
from ks_lens.steering.base import Steering
from ks_lens.steering.positions import Positions
from ks_lens.types import Model


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
    passes: QuestionPasses | None = None,
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

    All rows share batches: one generation call carries several methods side by side
    (:func:`~ks_lens.steering.steer_groups`). Each answer is then re-encoded (question + answer,
    no instruction) in an unsteered forward pass that gives the response evaluator's probabilities at the answer's last
    token, the answer's per-token NLL, and the unsteered next-token distributions that the steered
    generation's logits are compared with (KL per generated token). With ``share_prefix`` the
    question's tokens run once per question (once in all for the questions ``passes`` already
    holds: :class:`QuestionPasses`) and every answer only runs its own tokens, attending to
    its cached question, in chunks that mix questions
    (:class:`~ks_lens.evaluation.answers.QuestionPasses`); and an answer generated under the
    default prompt with steering only at layer ``L`` or above (or none) starts that pass at
    ``L``, from the hidden states its generation computed below ``L`` (unsteered there;
    :class:`~ks_lens.generation.LayerInputs`). Both equal whole-row passes up to float rounding
    (tested).
    """
    _check_rows(questions, steerings, rows, systems)
    tok = model.tokenizer
    heads = [encode_chat(tok, ChatPrompt(q)) for q in questions]
    answers: list[list[int]] = [[] for _ in rows]
    scorer = _AnswerScorer(
        model, heads, answers, [i for _, i in rows], [None] * len(rows), response_probe,
        batch_size=batch_size, passes=passes,
    )  # fmt: skip
    # each batch's answers are scored right after it is generated and their steered next-token
    # logits (views of the batch's) dropped with it, so memory holds one batch, not every row
    batches = sorted_batches(
        _row_prompts(tok, questions, heads, rows, systems),
        batch_size,
        pad_id=pad_token_id(tok),
        device=model_device(model),
        # same length: by question, then configuration (a batch shares its questions' prefill)
        tiebreak=lambda r: (rows[r][1], rows[r][0]),
    )
    for b, (idx, batch) in enumerate(batches):
        res = _generate_batch(
            model, steerings, [rows[r][0] for r in idx], batch, positions=positions,
            max_new_tokens=max_new_tokens, seed=seed + b, share_prefix=share_prefix,
        )  # fmt: skip
        resumable = [systems is None or systems[r] is None for r in idx]
        scorer.take(idx, res, views=share_prefix, resumable=resumable)
        del res
        if share_prefix:
            scorer.batch(idx)
            scorer.release(idx)
    scorer.whole(scorer.unshared if share_prefix else range(len(rows)))
    probs, nll, kl, kl_steps = scorer.result()
    texts = [tok.decode(a, skip_special_tokens=True).strip() for a in answers]
    return GenerationScores(
        texts, answers, probs, nll, kl, kl_steps, [distinct_n(t) for t in texts]
    )


def _check_rows(
    questions: Sequence[str],
    steerings: Sequence[Steering | None],
    rows: Sequence[tuple[int, int]],
    systems: Sequence[str | None] | None,
) -> None:
    if not questions or not rows:
        raise ConfigError("no questions to generate for")
    for g, i in rows:
        if not (0 <= g < len(steerings) and 0 <= i < len(questions)):
            raise ConfigError(f"row {(g, i)} is out of range")
    if systems is not None and len(systems) != len(rows):
        raise ConfigError(f"{len(systems)} system prompts for {len(rows)} rows")


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
    ``steerings[row_group[b]]``. Rows of a DAC method (whose weights change per step:
    :class:`~ks_lens.steering.dac.DynamicComposition`) decode in their own loop
    (:func:`~ks_lens.steering.dac.generate_composed`); the others in one ``generate`` call."""
    dynamic = [j for j, g in enumerate(row_group) if _is_dynamic(steerings[g])]
    if not dynamic:
        return _generate_static(
            model, steerings, row_group, batch, positions=positions,
            max_new_tokens=max_new_tokens, seed=seed, share_prefix=share_prefix,
        )  # fmt: skip
    if positions != "all":
        raise ConfigError(
            f"DAC (DynamicComposition) steers every position of the prompt and the answer; "
            f"positions={positions!r} is not supported for it"
        )
    from ks_lens.steering.dac import generate_composed

    is_dynamic = set(dynamic)
    static = [j for j in range(len(row_group)) if j not in is_dynamic]
    dyn_steerings: list[Any] = [steerings[row_group[j]] for j in dynamic]
    dyn = generate_composed(
        model, _batch_rows(batch, dynamic), dyn_steerings, max_new_tokens=max_new_tokens
    ).generation
    stat = None
    if static:
        stat = _generate_static(
            model, steerings, [row_group[j] for j in static], _batch_rows(batch, static),
            positions=positions, max_new_tokens=max_new_tokens, seed=seed,
            share_prefix=share_prefix,
        )  # fmt: skip
    return _merge_rows(len(row_group), [(dynamic, dyn), (static, stat)])


def _is_dynamic(steering: Steering | None) -> bool:
    from ks_lens.steering.dac import DynamicComposition

    return steering is not None and isinstance(steering[0], DynamicComposition)


def _batch_rows(batch: TokenBatch, rows: Sequence[int]) -> TokenBatch:
    """Rows ``rows`` of a left-padded batch, without the columns that are padding in all of them."""
    mask = batch.attention_mask[list(rows)]
    first = int(mask.any(0).long().argmax())
    return TokenBatch(batch.input_ids[list(rows), first:], mask[:, first:])


def _merge_rows(
    n: int, parts: Sequence[tuple[Sequence[int], BatchGeneration | None]]
) -> BatchGeneration:
    """One :class:`BatchGeneration` of ``n`` rows from parts that each hold some of them (logits
    zero-padded to the longest part's steps; recorded layer inputs ``None`` for rows without)."""
    ids: list[list[int]] = [[] for _ in range(n)]
    finished = [False] * n
    held = [(rows, g) for rows, g in parts if g is not None and rows]
    steps = max(int(g.logits.shape[1]) for _, g in held if g.logits is not None)
    first = next(g.logits for _, g in held if g.logits is not None)
    logits = first.new_zeros(n, steps, first.shape[-1])
    hidden: list[torch.Tensor | None] = [None] * n
    inputs = next((g.layer_inputs for _, g in held if g.layer_inputs is not None), None)
    for rows, g in held:
        assert g.logits is not None
        for j, r in enumerate(rows):
            ids[r], finished[r] = g.ids[j], g.finished[j]
            logits[r, : g.logits.shape[1]] = g.logits[j]
            if g.layer_inputs is not None:
                hidden[r] = g.layer_inputs.hidden[j]
    layer_inputs = None
    if inputs is not None:
        layer_inputs = LayerInputs(inputs.layer, hidden, inputs.as_tuple)
    return BatchGeneration(ids, finished, logits, layer_inputs)


def _generate_static(
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
    """Rows steered by fixed hooks, in one ``generate`` call, with the layers below the lowest
    steered one run once per distinct prompt (``share_prefix``;
    :func:`~ks_lens.generation.shared_prefill`)."""
    from ks_lens.steering.base import steer_groups

    start = _shared_start(model, steerings, None, row_group) if share_prefix else None
    prefill = shared_prefill(model, batch, start)  # before any hook is installed
    with steer_groups(model, steerings, row_group, positions=positions):
        return generate_from_batch(
            model,
            batch,
            max_new_tokens=max_new_tokens,
            seed=seed,
            return_logits=True,
            prefill=prefill,
            record_inputs=start,
        )
