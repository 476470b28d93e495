"""Per-token activation rows of labelled texts (:func:`collect_token_activations`).

The default text-grounded steering probe learns one row per gold text: its final token. Steering
writes to every position, each generated token included. Per-token rows teacher-force each gold
answer after its question (no instruction, as ``mode="response-only"``) and keep the activation
at every answer token, the first ``max_tokens`` of them, each row labelled with its text's
labels and grouped by its text, so that a probe trained on them
(:func:`~ks_lens.probes.train_token_probe`) learns at the positions it will steer and holds out
whole questions in validation. The prompt and chat-template tokens never become rows.

The rows come back as an ordinary :class:`~ks_lens.activations.Activations` of one layer
(``acts.labels`` the text's label index, ``acts.question_ids`` the text's row id), with
``meta["collect"]["position"] == "tokens"`` and ``meta["token_rows"]``: for every row, the index
of its text in ``plan_rows(dataset, "response-only")`` and the token's index in the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ks_lens._runtime.batching import sorted_batches
from ks_lens.activations.capture import capture_tokens
from ks_lens.activations.collect import (
    CollectSpec,
    _answer_rows,
    _collect_kind,
    _encode_rows,
    _source_meta,
    plan_rows,
)
from ks_lens.activations.container import Activations
from ks_lens.datasets import BehaviourDataset
from ks_lens.errors import ConfigError, DatasetError
from ks_lens.hooks import check_layer, resid_hook
from ks_lens.models import model_device, pad_token_id
from ks_lens.models.chat import check_context
from ks_lens.types import Model
from ks_lens.utils import check_int

#: answer tokens per text that become rows by default (the comparison's answers are 32 tokens)
DEFAULT_MAX_TOKENS = 32
#: ``meta["collect"]["position"]`` of per-token rows (the pooled collections say last/mean)
TOKEN_POSITION = "tokens"


def token_positions(starts: Sequence[int], lengths: Sequence[int], max_tokens: int) -> list[int]:
    """How many answer tokens of each text become rows: ``min(max_tokens, answer length)``,
    the answer being the tokens from ``starts[i]`` to ``lengths[i]`` (its whole sequence)."""
    return [max(0, min(max_tokens, n - s)) for s, n in zip(starts, lengths, strict=True)]


def _check_args(model: Model, layer: int, kind: str, max_tokens: int, batch_size: int) -> str:
    """ConfigError for a bad layer, hook kind, ``max_tokens`` or ``batch_size``; the kind."""
    check_int(max_tokens, "max_tokens", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    check_layer(model, layer)
    return _collect_kind(kind)


def collect_token_activations(
    model: Model,
    dataset: BehaviourDataset,
    *,
    layer: int,
    kind: str = "resid_post",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 16,
    split: str | None = None,
    progress: bool = False,
) -> Activations:
    """One row per answer token (the first ``max_tokens``) of every labelled text of ``dataset``.

    Args:
        model: a bridge from :func:`ks_lens.load_model`.
        dataset: labelled texts as a dataset: every question carries its fixed ``answer`` and a
            pinned ``label`` (:func:`ks_lens.pipeline.texts_dataset` builds one from gold texts).
        layer: the model layer to read (the steering layer; negative counts from the end).
        kind: the hook kind (``"resid_post"`` by default, as the steering probe's).
        max_tokens: answer tokens per text that become rows (from the first; shorter answers
            give all theirs). Bounds memory: at most ``n_texts * max_tokens`` rows of ``d_model``
            floats (fp32).
        batch_size: texts per forward pass (one pass per batch; each text is cut after its last
            kept token, which a causal model never reads).
        split: a dataset split name to record in the metadata.
        progress: show a progress bar.

    Returns:
        :class:`Activations` at ``(layer,)``: ``acts.at(layer)`` is ``[n_rows, d_model]``, rows in
        text order and, within a text, token order; ``labels`` and ``question_ids`` repeat the
        text's; ``meta["token_rows"]`` holds each row's ``text`` index and answer ``token`` index.

    Raises :class:`~ks_lens.errors.ConfigError` for a question without a fixed answer (per-token
    rows are teacher-forced gold answers) and :class:`~ks_lens.errors.DatasetError` when no text
    has an answer token.
    """
    k = _check_args(model, layer, kind, max_tokens, batch_size)
    layer = check_layer(model, layer)
    spec = CollectSpec(
        mode="response-only", layers=(layer,), hook_kinds=(k,), batch_size=batch_size
    )
    rows = plan_rows(dataset, "response-only")
    missing = [r.question_id for r in rows if r.answer is None]
    if missing:
        raise ConfigError(
            f"per-token rows teacher-force a fixed answer per question; {len(missing)} of "
            f"dataset {dataset.name!r}'s rows have none (e.g. {missing[:3]}): build the dataset "
            "from labelled texts (ks_lens.pipeline.texts_dataset)"
        )
    answers, _ = _answer_rows(model, rows, spec, None, 0)  # tokenised, nothing generated
    enc = _encode_rows(model.tokenizer, rows, spec, answers)
    counts = token_positions(enc.starts, [len(s) for s in enc.seqs], max_tokens)
    if sum(counts) == 0:
        raise DatasetError(f"dataset {dataset.name!r} has no answer tokens to make rows of")
    seqs = [s[: start + n] for s, start, n in zip(enc.seqs, enc.starts, counts, strict=True)]
    for r, s in zip(rows, seqs, strict=True):
        check_context(model, len(s), what=f"text {r.question_id!r}")
    per_text = _capture_texts(model, spec, seqs, enc.starts, counts, progress)
    hook = resid_hook(layer, k)
    text_of = [i for i, n in enumerate(counts) for _ in range(n)]
    meta = _token_meta(model, dataset, spec, max_tokens, split, hook, counts)
    return Activations(
        {k: torch.cat([t for t in per_text if t is not None])[:, None]},
        (layer,),
        torch.tensor([rows[i].label for i in text_of], dtype=torch.long),
        tuple(dataset.labels),
        tuple(rows[i].question_id for i in text_of),
        None,
        meta,
    )


def _capture_texts(
    model: Model,
    spec: CollectSpec,
    seqs: Sequence[Sequence[int]],
    starts: Sequence[int],
    counts: Sequence[int],
    progress: bool,
) -> list[torch.Tensor | None]:
    """Each text's rows ``[counts[i], *feature]`` (None for a text without answer tokens): the
    texts in sorted, left-padded batches, one forward pass per batch."""
    out: list[torch.Tensor | None] = [None] * len(seqs)
    todo = [i for i, n in enumerate(counts) if n > 0]
    names = spec.hook_names()
    pad = pad_token_id(model.tokenizer)
    batches = sorted_batches(
        seqs, spec.batch_size, pad_id=pad, device=model_device(model), rows=todo
    )
    with tqdm(total=len(todo), desc="per-token rows", unit="text", disable=not progress) as bar:
        for idx, batch in batches:
            width = max(counts[i] for i in idx)
            # a row with fewer tokens repeats its last one; the extra columns are dropped below
            pos = torch.tensor(
                [[starts[i] + min(j, counts[i] - 1) for j in range(width)] for i in idx]
            )
            (feats,) = capture_tokens(model, batch, names, pos)
            for j, i in enumerate(idx):
                out[i] = feats[j, : counts[i]].clone()
            bar.update(len(idx))
    return out


def _token_meta(
    model: Model,
    dataset: BehaviourDataset,
    spec: CollectSpec,
    max_tokens: int,
    split: str | None,
    hook: str,
    counts: Sequence[int],
) -> dict[str, Any]:
    """The metadata of per-token rows: what a pooled collection records, and where each row
    comes from (``token_rows``)."""
    collect = spec.to_json()
    collect["position"] = TOKEN_POSITION
    collect["max_tokens"] = max_tokens
    return {
        **_source_meta(model, dataset, split),
        "collect": collect,
        "hook_names": [hook],
        "n_rows": int(sum(counts)),
        "n_texts": sum(1 for n in counts if n > 0),
        "token_rows": {
            "text": [i for i, n in enumerate(counts) for _ in range(n)],
            "token": [j for n in counts for j in range(n)],
        },
    }
