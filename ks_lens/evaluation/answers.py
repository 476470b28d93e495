"""Scoring answers under the unsteered model: each answer re-encoded after its question's cached
pass (:class:`QuestionPasses`), giving the response probe, the answer's NLL and the KL of the
steered steps (used by :func:`~ks_lens.evaluation.generate_and_score_rows`)."""

from __future__ import annotations

import collections
import contextlib
import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from ks_lens._runtime.batching import record_activations, scatter, sorted_batches
from ks_lens._runtime.hf_path import can_bypass, plain_forward, resume_at
from ks_lens.errors import ConfigError
from ks_lens.evaluation.readouts import kl_divergence
from ks_lens.generation import BatchGeneration, LayerInputs
from ks_lens.hooks import hook_layer
from ks_lens.models import model_device, pad_token_id
from ks_lens.probes import Probe
from ks_lens.types import Model

#: the most logits (numbers) one scoring pass holds: 2**25 float32 values are 128 MiB
LOGITS_BUDGET = 2**25

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

    def discard(self, ids: Sequence[int], names: Sequence[str]) -> None:
        """Drop the pass of the question tokens ``ids`` reading ``names``, if it is held."""
        self._passes.pop((tuple(ids), tuple(names)), None)

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
        # a store of the caller's keeps every pass; one of our own drops each question's pass
        # once its last answer is scored (forget)
        self.own_store = passes is None
        self.store = passes if passes is not None else QuestionPasses()
        self.left = collections.Counter(question_of)  # answers not yet scored, per question
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

    def take(
        self, idx: Sequence[int], res: BatchGeneration, *, views: bool, resumable: Sequence[bool]
    ) -> None:
        """Record the answers of one generation batch (answer rows ``idx``) and their steered
        next-token logits (``views`` of the batch's, else copies); the hidden states its
        generation kept are kept for the rows asked as the scoring pass asks (``resumable``)."""
        assert res.logits is not None and isinstance(self.answers, list)
        for j, r in enumerate(idx):
            self.answers[r] = res.ids[j]
            steps = len(res.ids[j]) + (1 if res.finished[j] else 0)  # + the end-of-turn step
            logits = res.logits[j, :steps]
            self.step_logits[r] = logits if views else logits.clone()
            if resumable[j]:
                self.keep_inputs(r, res.layer_inputs, j)

    def release(self, rows: Sequence[int]) -> None:
        """``rows`` are scored: drop the cached pass of each question with no answer left."""
        for r in rows:
            q = self.question_of[r]
            self.left[q] -= 1
            if self.left[q] == 0:
                self.forget(q)

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
                for chunk in _near_equal_chunks(part, self._chunk_rows(part)):
                    self._after_prefix(chunk, start)
        for r in rows:
            self.inputs.pop(r, None)

    def _chunk_rows(self, rows: Sequence[int]) -> int:
        """Rows per scoring pass: at most ``batch_size``, and few enough that the pass's logits
        (rows x longest answer x vocabulary) stay within :data:`LOGITS_BUDGET` numbers."""
        width = max(len(self.answers[r]) for r in rows)
        vocab = int(getattr(self.model.cfg, "d_vocab", 0) or 1)
        return max(1, min(self.batch_size, LOGITS_BUDGET // (width * vocab)))

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
        """Drop question ``q``'s cached pass (all of its answers are scored), also from the
        store when the store is the scorer's own."""
        self.passes.pop(q, None)
        if self.own_store:
            self.store.discard(self.heads[q], self.names)

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
