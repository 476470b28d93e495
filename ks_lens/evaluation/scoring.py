"""Generation level: steered greedy answers, scored under the unsteered model (probe, NLL, KL)."""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from ks_lens._runtime.batching import record_activations, scatter, sorted_batches
from ks_lens._runtime.hf_path import can_bypass, plain_forward, resume_at
from ks_lens.errors import ConfigError
from ks_lens.evaluation.readouts import _shared_start, kl_divergence
from ks_lens.generation import BatchGeneration, LayerInputs, generate_from_batch, shared_prefill
from ks_lens.hooks import hook_layer
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
    (:func:`~ks_lens.steering.steer_groups`). Each answer is then re-encoded (question + answer, no instruction) in an
    unsteered forward pass that gives the response evaluator's probabilities at the answer's last
    token, the answer's per-token NLL, and the unsteered next-token distributions that the steered
    generation's logits are compared with (KL per generated token). With ``share_prefix`` the
    question's tokens run once per question (once in all for the questions ``passes`` already
    holds: :class:`QuestionPasses`) and every answer only runs its own tokens, attending to
    its cached question, in chunks that mix questions (:func:`_score_answers`); and an answer generated under the
    default prompt with steering only at layer ``L`` or above (or none) starts that pass at
    ``L``, from the hidden states its generation computed below ``L`` (unsteered there;
    :class:`~ks_lens.generation.LayerInputs`). Both equal whole-row passes up to float rounding
    (tested).
    """
    _check_rows(questions, steerings, rows, systems)
    tok = model.tokenizer
    device = model_device(model)
    pad = pad_token_id(tok)
    heads = [encode_chat(tok, ChatPrompt(q)) for q in questions]
    prompts = _row_prompts(tok, questions, heads, rows, systems)
    answers: list[list[int]] = [[] for _ in rows]
    step_logits: list[torch.Tensor | None] = [None] * len(rows)
    question_of = [i for _, i in rows]
    scorer = _AnswerScorer(
        model,
        heads,
        answers,
        question_of,
        step_logits,
        response_probe,
        batch_size=batch_size,
        passes=passes,
    )
    # each batch's answers are scored right after it is generated and their steered next-token
    # logits ([steps, vocab] each, views of the batch's) dropped with it, so memory holds one
    # batch, not every row; each question's pass is kept until its last answer is scored (the
    # numbers do not depend on when an answer is scored)
    left = {q: question_of.count(q) for q in set(question_of)}
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
            step_logits[r] = res.logits[j, :steps] if share_prefix else res.logits[j, :steps].clone()
            if systems is None or systems[r] is None:  # asked as the scoring pass asks
                scorer.keep_inputs(r, res.layer_inputs, j)
        del res
        if not share_prefix:
            continue
        scorer.batch(idx)
        for q in dict.fromkeys(question_of[r] for r in idx):
            left[q] -= sum(1 for r in idx if question_of[r] == q)
            if left[q] == 0:
                scorer.forget(q)
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
    ``steerings[row_group[b]]``, with the layers below the lowest steered one run once per
    distinct prompt (``share_prefix``; :func:`~ks_lens.generation.shared_prefill`)."""
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


#: a question's unsteered pass: its KV cache (``None`` where it cannot be shared), the
#: log-probs of the token after it ``[vocab]``, and the activations read at its last token
QuestionPass = tuple[Any, torch.Tensor, dict[str, torch.Tensor]]


class QuestionPasses:
    """Questions' unsteered passes (:data:`QuestionPass`), each run once and kept, for scoring
    answers after them. :func:`generate_and_score_rows` makes its own; a caller that scores
    answers to the same questions again and again (the alpha search's rounds) passes one
    (``passes=``) so that each question runs once in all. It holds every question's KV cache
    until it is dropped."""

    def __init__(self) -> None:
        self._model: weakref.ref[Any] | None = None
        self._passes: dict[tuple[tuple[int, ...], tuple[str, ...]], QuestionPass] = {}

    def __len__(self) -> int:
        return len(self._passes)

    def get(self, model: Model, ids: Sequence[int], names: Sequence[str]) -> QuestionPass:
        """The pass of the question tokens ``ids`` reading ``names`` (run on first use)."""
        from ks_lens.activations import prefix_pass

        if self._model is None:
            self._model = weakref.ref(model)
        elif self._model() is not model:
            raise ConfigError("these question passes were run with another model")
        key = (tuple(ids), tuple(names))
        if key not in self._passes:
            prefix, logits, acts = prefix_pass(model, ids, names)
            self._passes[key] = (prefix, torch.log_softmax(logits.float(), -1).cpu(), acts)
        return self._passes[key]


class _AnswerScorer:
    """Re-encodes answers after their question's tokens under the unsteered model and scores
    them (see :func:`_score_answers`), a few answers at a time, so that a caller can score each
    generation batch's answers as soon as they exist and drop their steered next-token logits
    (``step_logits[r]``, raw logits or log-probs ``[steps, vocab]``, is set to ``None`` once row
    ``r`` is scored). Each question's cached pass is kept until :meth:`forget`."""

    def __init__(
        self,
        model: Model,
        heads: Sequence[Sequence[int]],
        answers: Sequence[Sequence[int]],
        question_of: Sequence[int],
        step_logits: list[torch.Tensor | None],
        probe: Probe | None,
        *,
        batch_size: int,
        passes: QuestionPasses | None = None,
    ) -> None:
        n = len(answers)
        self.model, self.heads, self.answers = model, heads, answers
        self.question_of, self.step_logits, self.probe = question_of, step_logits, probe
        self.batch_size = batch_size
        self.probs = torch.empty(n, probe.n_labels if probe is not None else 0)
        self.nll = [float("nan")] * n
        self.kl = [float("nan")] * n
        self.kl_steps = [0] * n
        self.names = [probe.hook_name] if probe is not None else []
        self.device = model_device(model)
        self.pad = pad_token_id(model.tokenizer)
        self.unshared: list[int] = []  # rows whose question's cache cannot be shared
        self.store = passes if passes is not None else QuestionPasses()
        self.passes: dict[int, QuestionPass] = {}  # the questions being scored
        # answers to several questions share a pass (left-padded question caches, explicit
        # positions) on the plain HF modules
        self.stack = can_bypass(model)
        # rows whose generation kept the hidden states entering a layer at the answer's tokens
        # (unsteered below it): their scoring pass starts there (keep_inputs)
        self.inputs: dict[int, tuple[int, torch.Tensor]] = {}
        self.as_tuple = False

    def keep_inputs(self, r: int, inputs: LayerInputs | None, b: int) -> None:
        """Keep batch row ``b``'s hidden states entering ``inputs.layer`` for answer row ``r``,
        when the response probe reads at or above that layer (else the pass must run whole)."""
        if inputs is None or inputs.hidden[b] is None:
            return
        read = hook_layer(self.probe.hook_name) if self.probe is not None else None
        if self.probe is not None and (read is None or read < inputs.layer):
            return
        hidden = inputs.hidden[b]
        assert hidden is not None
        self.inputs[r] = (inputs.layer, hidden)
        self.as_tuple = inputs.as_tuple

    def score(self, r: int, pred: torch.Tensor) -> None:
        """``pred`` [t + 1, vocab]: log-probs of answer tokens 0..t-1, then of the token after."""
        t = len(self.answers[r])
        if t:
            target = torch.tensor(list(self.answers[r]))
            self.nll[r] = float(-pred[:t].gather(-1, target[:, None]).mean())
        steered = self.step_logits[r]
        assert steered is not None
        if len(steered):
            steered = torch.log_softmax(steered.float(), -1)  # log-probs stay (within rounding)
            self.kl[r] = float(kl_divergence(steered, pred[: len(steered)]).mean())
            self.kl_steps[r] = len(steered)
        self.step_logits[r] = None  # scored: free the steered distributions

    def read(self, rows: Sequence[int], x: torch.Tensor) -> None:
        probe = self.probe
        if probe is not None:
            scatter(
                self.probs,
                rows,
                probe.predict_proba(x.to(probe.mean.device, probe.mean.dtype)).cpu(),
            )

    def batch(self, rows: Sequence[int]) -> None:
        """Score ``rows`` (say, one generation batch's answers, to any questions) after their
        questions' cached passes (each run once, kept until :meth:`forget`): the answers run
        only their own tokens, in chunks of up to ``batch_size`` rows across questions (each
        row after its own question's cache, left padded: :func:`~ks_lens.activations.stacked_cache`).
        Rows of a question whose cache cannot be shared keep their steered logits (copied) and
        wait for :meth:`whole`."""
        todo: list[int] = []
        for q in dict.fromkeys(self.question_of[r] for r in rows):
            todo += self._open(q, [r for r in rows if self.question_of[r] == q])
        groups: dict[int, list[int]] = {}  # the layer the pass starts at -> rows
        for r in todo:
            groups.setdefault(self.inputs[r][0] if r in self.inputs else 0, []).append(r)
        for start, group in sorted(groups.items()):
            group.sort(key=lambda r: (len(self.answers[r]), self.question_of[r], r))
            if not self.stack:  # one question per chunk
                by_q: dict[int, list[int]] = {}
                for r in group:
                    by_q.setdefault(self.question_of[r], []).append(r)
                parts = list(by_q.values())
            else:
                parts = [group]
            for part in parts:
                for chunk in _near_equal_chunks(part, self.batch_size):
                    self._after_prefix(chunk, start)
        for r in rows:
            self.inputs.pop(r, None)

    def _open(self, q: int, rows: Sequence[int]) -> list[int]:
        """Make sure question ``q``'s cached pass exists; score its empty answers from it and
        set aside the rows that cannot share it; return the rows still to run."""
        if q not in self.passes:
            self.passes[q] = self.store.get(self.model, self.heads[q], self.names)
        prefix, first, last_acts = self.passes[q]
        if prefix is None:
            for r in rows:  # a copy: not a view that keeps the whole generation batch alive
                logits = self.step_logits[r]
                self.step_logits[r] = None if logits is None else logits.clone()
            self.unshared.extend(rows)
            return []
        empty = [r for r in rows if not self.answers[r]]
        for r in empty:
            self.score(r, first[None])
        if empty and self.probe is not None:
            self.read(empty, last_acts[self.probe.hook_name][None].expand(len(empty), -1))
        return [r for r in rows if self.answers[r]]

    def forget(self, q: int) -> None:
        """Drop question ``q``'s cached pass (all of its answers are scored)."""
        self.passes.pop(q, None)

    def _resumed(self, chunk: Sequence[int], start: int, width: int) -> Any:
        """Start the pass at decoder layer ``start`` with the chunk's kept hidden states (right
        padded to ``width``), or run it whole (``start`` 0)."""
        if start == 0:
            return contextlib.nullcontext()
        first = self.inputs[chunk[0]][1]
        hidden = first.new_zeros(len(chunk), width, first.shape[-1])
        for j, r in enumerate(chunk):
            h = self.inputs[r][1]
            hidden[j, : len(h)] = h
        return resume_at(self.model, start, hidden.to(self.device), self.as_tuple)

    def _after_prefix(self, chunk: Sequence[int], start: int = 0) -> None:
        """One pass of the answers ``chunk`` after their questions' cached tokens (started at
        decoder layer ``start`` with the kept hidden states, or whole for 0)."""
        answers, device = self.answers, self.device
        qs = [self.question_of[r] for r in chunk]
        lengths = torch.tensor([len(answers[r]) for r in chunk])
        width = int(lengths.max())
        ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
        answer_mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, : len(answers[r])] = torch.tensor(list(answers[r]))
            answer_mask[j, : len(answers[r])] = 1
        cache, prefix_mask, positions = self._question_caches(qs, start, width)
        mask = torch.cat([prefix_mask, answer_mask], 1)
        last = (lengths - 1).to(device)

        def at_last(act: torch.Tensor, name: str, last: torch.Tensor = last) -> torch.Tensor:
            return act[torch.arange(act.shape[0], device=act.device), last].float()

        with (
            torch.no_grad(),
            record_activations(self.model, self.names, reduce=at_last) as rec,
            self._resumed(chunk, start, width),
        ):
            logits = plain_forward(
                self.model,
                ids.to(device),
                attention_mask=mask.to(device),
                position_ids=None if positions is None else positions.to(device),
                cache=cache,
            )
        assert logits is not None
        if self.probe is not None:
            self.read(chunk, rec[self.probe.hook_name])
        for j, (r, q) in enumerate(zip(chunk, qs, strict=True)):
            t = len(answers[r])
            suffix = torch.log_softmax(logits[j, :t].float(), -1).cpu()
            self.score(r, torch.cat([self.passes[q][1][None], suffix]))
        del logits

    def _question_caches(
        self, qs: Sequence[int], start: int, width: int
    ) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
        """The KV cache of each row's question (``qs``), its attention mask, and the answer
        tokens' positions (``None``: one question, whose answers continue right after it)."""
        prefixes = [self.passes[q][0] for q in qs]
        if len(set(qs)) == 1:
            prefix = prefixes[0]
            assert prefix is not None
            return (
                prefix.cache_for(self.model, len(qs)),
                torch.ones(len(qs), len(prefix), dtype=torch.long),
                None,
            )
        from ks_lens.activations import stacked_cache

        assert all(p is not None for p in prefixes)
        cache, mask = stacked_cache(self.model, prefixes, from_layer=start)
        offsets = torch.tensor([len(p) for p in prefixes])
        return cache, mask, offsets[:, None] + torch.arange(width)

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
                logits = plain_forward(
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
    and the answers run only their own tokens, right padded, each after its own question's
    cache (left padded where a chunk holds answers to several questions); the prediction of an
    answer's first token is the question pass's last logits. Equal to whole-row passes, and to
    answers scored one at a time, within float rounding (tested).
    Questions whose cache cannot be shared (see :func:`~ks_lens.activations.prefix_pass`) run
    whole rows.
    """
    scorer = _AnswerScorer(
        model, heads, answers, question_of, list(step_logps), probe, batch_size=batch_size
    )
    if share_prefix:
        scorer.batch(range(len(answers)))
        scorer.whole(scorer.unshared)
    else:
        scorer.whole(range(len(answers)))
    return scorer.result()


def _near_equal_chunks(rows: Sequence[int], size: int) -> list[list[int]]:
    """``rows`` in order, cut into the fewest chunks of at most ``size`` of near-equal length."""
    n = math.ceil(len(rows) / size)
    return [list(rows[c * len(rows) // n : (c + 1) * len(rows) // n]) for c in range(n)]
