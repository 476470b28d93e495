"""Collection in memory: the rows of a dataset, their chunks and :func:`collect_activations`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ks_lens._runtime.batching import scatter, sorted_batches
from ks_lens._runtime.prefix import prefix_cache
from ks_lens.activations.capture import capture_features
from ks_lens.activations.container import MODES, POOLINGS, Activations, Mode, Pooling
from ks_lens.datasets import BehaviourDataset
from ks_lens.errors import ConfigError, DatasetError, HookPointError
from ks_lens.generation import generate_from_batch
from ks_lens.hooks import (
    HOOK_KINDS,
    NO_POSITION_KINDS,
    block_kind,
    canonical_hook_name,
    check_hook_name,
    check_layer,
    resid_hook,
)
from ks_lens.models import (
    model_device,
    model_numerics,
    model_signature,
    pad_token_id,
)
from ks_lens.models.chat import (
    ChatPrompt,
    TokenBatch,
    check_context,
    context_window,
    encode_chat,
)
from ks_lens.types import Model
from ks_lens.utils import check_int, check_seed, renamed, renamed_fields

# ----------------------------------------------------------------------------- planning rows


@dataclass(frozen=True)
class Row:
    question_id: str
    question: str
    label: int  # -1 = none
    system: str | None  # instruction used when generating / encoding
    answer: str | None = None  # a fixed answer to re-encode instead of generating one


def plan_rows(dataset: BehaviourDataset, mode: Mode) -> list[Row]:
    """The rows a collection produces, in a fixed order (question-major, then label)."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; use one of {MODES}")
    if mode == "neutral":
        return [Row(q.id, q.text, -1, None) for q in dataset.questions]
    return [
        Row(q.id, q.text, i, dataset.behaviours[i].instruction, q.answer)
        for q, i in dataset.pairs()
    ]


# ----------------------------------------------------------------------------- collection core


@renamed_fields(position="pooling")
@dataclass(frozen=True)
class CollectSpec:
    """Everything that determines a collection's rows and numbers (recorded in metadata)."""

    mode: Mode = "prompt"
    layers: tuple[int, ...] | None = None  # None = every layer
    hook_kinds: tuple[str, ...] = ("resid_post",)
    pooling: Pooling = "last"
    batch_size: int = 16
    max_new_tokens: int = 48
    seed: int = 0

    def validate(self, model: Model) -> CollectSpec:
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; use one of {MODES}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {self.pooling!r}; use one of {POOLINGS}")
        if self.pooling == "mean_response" and self.mode not in ("response", "response-only"):
            raise ConfigError("pooling='mean_response' needs mode 'response' or 'response-only'")
        if not self.hook_kinds:
            raise ConfigError(f"hook_kinds must name at least one of {HOOK_KINDS}")
        kinds: dict[str, str] = {}  # canonical hook name at block 0 -> kind
        for k in self.hook_kinds:
            kinds.setdefault(canonical_hook_name(resid_hook(0, _collect_kind(k)), model), k)
        hook_kinds = tuple(_collect_kind(k) for k in kinds.values())
        for k in hook_kinds:
            try:
                check_hook_name(model, resid_hook(0, k))
            except HookPointError as e:
                raise ConfigError(
                    f"hook_kinds: unknown hook kind {k!r} ({e}); {_KINDS_HELP}"
                ) from None
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("batch_size and max_new_tokens must be positive")
        check_int(self.batch_size, "batch_size")
        check_int(self.max_new_tokens, "max_new_tokens")
        check_seed(self.seed)
        n = int(model.cfg.n_layers)
        layers = (
            tuple(range(n))
            if self.layers is None
            else tuple(sorted({check_layer(model, int(x)) for x in self.layers}))
        )
        if not layers:
            raise ConfigError("layers must not be empty")
        return CollectSpec(
            self.mode,
            layers,
            hook_kinds,
            self.pooling,
            self.batch_size,
            self.max_new_tokens,
            self.seed,
        )

    def hook_names(self) -> list[str]:
        assert self.layers is not None
        return [resid_hook(layer, kind) for kind in self.hook_kinds for layer in self.layers]

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "layers": list(self.layers or ()),
            "hook_kinds": list(self.hook_kinds),
            # the key of stores saved before the field was renamed (so that they still resume)
            "position": self.pooling,
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
        }


_KINDS_HELP = (
    f"collection reads any of {HOOK_KINDS} or any other per-block hook point with a position "
    "axis, named by its suffix after 'blocks.{L}.' (e.g. 'attn.hook_z' [batch, pos, n_heads, "
    "d_head], 'mlp.hook_post' [batch, pos, d_mlp]; model.hook_dict lists them)"
)


def _collect_kind(kind: str) -> str:
    """:func:`block_kind` for collection: unknown spellings and hooks without a position axis are
    a :class:`ConfigError`."""
    try:
        k = block_kind(kind)
    except HookPointError:
        raise ConfigError(f"hook_kinds: unknown hook kind {kind!r}; {_KINDS_HELP}") from None
    if k in NO_POSITION_KINDS:
        raise ConfigError(
            f"hook_kinds: {k!r} is [batch, head, query, key], with no per-token activation to "
            f"collect; {_KINDS_HELP}"
        )
    return k


def feature_shapes(model: Model, hook_kinds: Sequence[str]) -> dict[str, list[int]]:
    """One row's activation shape at each kind (the same at every layer), read off a 2-token
    forward pass: ``{"resid_post": [d_model], "attn.hook_z": [n_heads, d_head], ...}``."""
    names = [resid_hook(0, k) for k in hook_kinds]
    ids = torch.zeros(2, 2, dtype=torch.long, device=model_device(model))
    feats = capture_features(model, TokenBatch(ids, torch.ones_like(ids)), names)
    return {k: [int(x) for x in f.shape[1:]] for k, f in zip(hook_kinds, feats, strict=True)}


@dataclass
class _Chunk:
    acts: dict[str, torch.Tensor]  # kind -> [n, L, d]
    rows: list[Row]
    texts: list[str | None]
    answer_ids: list[list[int] | None]


Responses = Mapping[tuple[str, int], Sequence[int]]

#: shortest shared prefix (tokens) worth a separate cached pass
MIN_SHARED_PREFIX = 8


def system_prefix(tokenizer: Any, system: str | None) -> tuple[int, ...]:
    """The token ids every chat prompt with this system prompt starts with: the chat template's
    header up to where the user's message begins (found by encoding two different messages).
    Rows whose tokens do not start with it (a tokenizer merge across the boundary) are run whole.
    """
    a = encode_chat(tokenizer, ChatPrompt("A", system))
    b = encode_chat(tokenizer, ChatPrompt("B", system))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return tuple(a[:n])


def _collect_chunk(
    model: Model,
    rows: Sequence[Row],
    spec: CollectSpec,
    *,
    responses: Responses | None,
    seed_offset: int,
    share_prefix: bool = False,
) -> _Chunk:
    tok = model.tokenizer
    answers: list[list[int] | None] = [None] * len(rows)
    texts: list[str | None] = [None] * len(rows)
    if spec.mode in ("response", "response-only"):
        answers, texts = _answer_rows(model, rows, spec, responses, seed_offset)
    enc = _encode_rows(tok, rows, spec, answers)
    # the first token of each row's summary: the last token, or the first answer token
    first_read = [
        min(enc.starts[i], len(enc.seqs[i]) - 1)
        if spec.pooling == "mean_response"
        else len(enc.seqs[i]) - 1
        for i in range(len(rows))
    ]
    groups: list[tuple[tuple[int, ...], list[int]]] = []
    whole: list[int] = list(range(len(rows)))
    if share_prefix:
        groups, whole = _prefix_groups(tok, enc.seqs, enc.systems, first_read)
    if whole:
        groups.append(((), whole))
    out = _capture_groups(model, spec, enc, groups, len(rows))
    n_layers = len(spec.layers or ())
    acts = {
        kind: torch.stack(out[k * n_layers : (k + 1) * n_layers], dim=1)
        for k, kind in enumerate(spec.hook_kinds)
    }
    return _Chunk(acts, list(rows), texts, answers)


def _answer_rows(
    model: Model,
    rows: Sequence[Row],
    spec: CollectSpec,
    responses: Responses | None,
    seed_offset: int,
) -> tuple[list[list[int] | None], list[str | None]]:
    """Every row's answer tokens (its fixed answer, its entry in ``responses``, else generated,
    batch ``b`` with seed ``spec.seed + seed_offset + b``) and decoded answer text."""
    tok = model.tokenizer
    answers: list[list[int] | None] = [None] * len(rows)
    texts: list[str | None] = [None] * len(rows)
    need = [
        i
        for i, r in enumerate(rows)
        if r.answer is None and (responses is None or (r.question_id, r.label) not in responses)
    ]
    for i, r in enumerate(rows):
        if r.answer is not None:
            answers[i] = list(tok(r.answer, add_special_tokens=False)["input_ids"])
        elif responses is not None and (r.question_id, r.label) in responses:
            answers[i] = list(responses[(r.question_id, r.label)])
    to_generate = set(need)
    gen_prompts = [
        encode_chat(tok, ChatPrompt(r.question, r.system)) if i in to_generate else []
        for i, r in enumerate(rows)
    ]
    batches = sorted_batches(
        gen_prompts,
        spec.batch_size,
        pad_id=pad_token_id(tok),
        device=model_device(model),
        rows=need,
    )
    for b, (idx, batch) in enumerate(batches):
        res = generate_from_batch(
            model, batch, max_new_tokens=spec.max_new_tokens, seed=spec.seed + seed_offset + b
        )
        scatter(answers, idx, res.ids)
    for i in range(len(rows)):
        texts[i] = tok.decode(answers[i] or [], skip_special_tokens=True).strip()
    return answers, texts


@dataclass(frozen=True)
class _Encoded:
    seqs: list[list[int]]  # each row's whole token sequence
    starts: list[int]  # where each row's answer starts (its length for prompt-only modes)
    systems: list[str | None]  # the system prompt each row is encoded with


def _encode_rows(
    tok: Any, rows: Sequence[Row], spec: CollectSpec, answers: Sequence[list[int] | None]
) -> _Encoded:
    """Every row's token sequence as ``spec.mode`` reads it: the prompt alone, or the prompt
    (with its system prompt for ``"response"``, without for ``"response-only"``) and answer."""
    enc = _Encoded([], [], [])
    for i, r in enumerate(rows):
        if spec.mode in ("prompt", "neutral"):
            ids = encode_chat(tok, ChatPrompt(r.question, r.system))
            enc.seqs.append(ids)
            enc.starts.append(len(ids))
            enc.systems.append(r.system)
        else:
            system = r.system if spec.mode == "response" else None
            head = encode_chat(tok, ChatPrompt(r.question, system))
            enc.seqs.append(head + list(answers[i] or []))
            enc.starts.append(len(head))
            enc.systems.append(system)
    return enc


def _capture_groups(
    model: Model,
    spec: CollectSpec,
    enc: _Encoded,
    groups: Sequence[tuple[tuple[int, ...], list[int]]],
    n_rows: int,
) -> list[torch.Tensor]:
    """One ``[n_rows, *feature]`` per hook name: each group's rows captured in sorted batches,
    after its shared prefix (cached once) when it has one."""
    device = model_device(model)
    names = spec.hook_names()
    seqs, starts = enc.seqs, enc.starts
    pad = pad_token_id(model.tokenizer)
    out: list[torch.Tensor] = []
    for common, group in groups:
        prefix = prefix_cache(model, common, names) if common else None
        n_prefix = len(prefix) if prefix is not None else 0
        # the group's rows all start with the prefix: sorting the suffixes sorts the rows
        suffixes = [s[n_prefix:] for s in seqs] if n_prefix else seqs
        batches = sorted_batches(suffixes, spec.batch_size, pad_id=pad, device=device, rows=group)
        for idx, batch in batches:
            rs = torch.tensor([min(starts[i], len(seqs[i]) - 1) for i in idx], device=device)
            feats = capture_features(
                model, batch, names, response_start=rs, pooling=spec.pooling, prefix=prefix
            )
            if not out:
                out = [torch.empty(n_rows, *f.shape[1:]) for f in feats]
            for o, f in zip(out, feats, strict=True):
                scatter(o, idx, f)
    return out


def _prefix_groups(
    tok: Any,
    seqs: Sequence[Sequence[int]],
    systems: Sequence[str | None],
    first_read: Sequence[int],
) -> tuple[list[tuple[tuple[int, ...], list[int]]], list[int]]:
    """Rows encoded with the same system prompt share their first tokens (the chat header and
    the instruction, :func:`system_prefix`): the groups that run them once
    (:func:`prefix_cache`) and only each row's remainder, and the rows run whole. The prefix
    depends only on the system prompt, so a row's numbers do not depend on the chunk; it must
    end before the first position a row reads.

    (Grouping the answers re-encoded after one question by the whole question was measured
    slower on the default model: 182 s instead of 132 s for the demo's gold texts, its many
    small groups running below the batch size.)"""
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    prefixes: dict[str | None, tuple[int, ...]] = {}
    whole: list[int] = []
    for i, system in enumerate(systems):
        if system not in prefixes:
            prefixes[system] = system_prefix(tok, system)
        common = prefixes[system]
        n = len(common)
        if n >= MIN_SHARED_PREFIX and first_read[i] >= n and tuple(seqs[i][:n]) == common:
            by_prefix.setdefault(common, []).append(i)
        else:
            whole.append(i)
    return list(by_prefix.items()), whole


def _chunks(
    model: Model,
    rows: Sequence[Row],
    spec: CollectSpec,
    chunk_rows: int,
    starts: Sequence[int],
    responses: Responses | None,
    progress: bool,
    desc: str,
    share_prefix: bool = True,
) -> Iterator[tuple[int, _Chunk]]:
    """Collect the chunks ``rows[lo : lo + chunk_rows]`` for each ``lo`` in ``starts``.

    A chunk's rows and seeds depend only on ``lo``, so any subset of chunks (a resumed run,
    a repair of damaged shards) gives the same numbers as a run that collects them all."""
    todo = sum(len(rows[lo : lo + chunk_rows]) for lo in starts)
    bar = tqdm(
        total=len(rows), initial=len(rows) - todo, desc=desc, unit="row", disable=not progress
    )
    try:
        for lo in starts:
            chunk = _collect_chunk(
                model,
                rows[lo : lo + chunk_rows],
                spec,
                responses=responses,
                seed_offset=lo,
                share_prefix=share_prefix,
            )
            bar.update(len(chunk.rows))
            yield lo, chunk
    finally:
        bar.close()


def _source_meta(model: Model, dataset: BehaviourDataset, split: str | None) -> dict[str, Any]:
    """What every collection records of its model and data (``model``, ``numerics``,
    ``dataset``, ``split``)."""
    return {
        "model": model_signature(model),
        "numerics": model_numerics(model),
        "dataset": {
            "name": dataset.name,
            "hash": dataset.content_hash(),
            "labels": list(dataset.labels),
            "n_questions": len(dataset.questions),
        },
        "split": split,
    }


def _base_meta(
    model: Model,
    dataset: BehaviourDataset,
    spec: CollectSpec,
    split: str | None,
    n_rows: int,
    share_prefix: bool,
) -> dict[str, Any]:
    return {
        **_source_meta(model, dataset, split),
        "collect": spec.to_json(),
        "hook_names": spec.hook_names(),
        "feature_shapes": feature_shapes(model, spec.hook_kinds),
        "n_rows": n_rows,
        # a speed option, not a resume key: it changes activations only at float rounding
        "share_prefix": share_prefix,
    }


def _plan(
    model: Model,
    dataset: BehaviourDataset,
    mode: Mode,
    layers: Sequence[int] | None,
    hook_kinds: Sequence[str],
    pooling: Pooling,
    batch_size: int,
    max_new_tokens: int,
    seed: int,
) -> tuple[CollectSpec, list[Row]]:
    """Validate the collection settings against the model and plan the rows."""
    spec = CollectSpec(
        mode,
        None if layers is None else tuple(layers),
        tuple(hook_kinds),
        pooling,
        batch_size,
        max_new_tokens,
        seed,
    ).validate(model)
    feature_shapes(model, spec.hook_kinds)  # every hook fires with a per-token layout
    rows = plan_rows(dataset, spec.mode)
    if not rows:
        raise DatasetError(f"dataset {dataset.name!r} has no questions: nothing to collect")
    # refuse a question that cannot fit in the context window before any compute
    if context_window(model) is not None:
        extra = spec.max_new_tokens if spec.mode in ("response", "response-only") else 0
        seen: set[tuple[str, str | None]] = set()
        for r in rows:
            key = (r.question, r.system)
            if key not in seen:
                seen.add(key)
                n = len(encode_chat(model.tokenizer, ChatPrompt(*key)))
                check_context(model, n, extra, what=f"question {r.question_id!r} (as prompted)")
    return spec, rows


@renamed(position="pooling")
def collect_activations(
    model: Model,
    dataset: BehaviourDataset,
    *,
    mode: Mode = "prompt",
    layers: Sequence[int] | None = None,
    hook_kinds: Sequence[str] = ("resid_post",),
    pooling: Pooling = "last",
    batch_size: int = 16,
    max_new_tokens: int = 48,
    seed: int = 0,
    split: str | None = None,
    responses: Responses | None = None,
    progress: bool = True,
    share_prefix: bool = True,
) -> Activations:
    """Collect activations for every row of ``dataset`` in memory (see :mod:`ks_lens.activations`).

    Args:
        model: a bridge from :func:`ks_lens.load_model`.
        dataset: a :class:`~ks_lens.datasets.BehaviourDataset` (one row per question and
            behaviour, plus neutral rows in ``mode="neutral"``).
        mode: ``"prompt"``, ``"response"``, ``"response-only"`` or ``"neutral"``.
        layers: model layer indices (negative count from the end); default every layer.
        hook_kinds: any of ``"resid_pre"``, ``"attn_out"``, ``"resid_mid"``, ``"mlp_out"``,
            ``"resid_post"`` (``d_model`` wide), or any other per-block hook point by its suffix
            after ``blocks.{L}.``, e.g. ``"attn.hook_z"`` (kept as ``[n_heads, d_head]``) or
            ``"mlp.hook_post"`` (``[d_mlp]``). Probes train on any kind (flattened); steering
            writes only to ``resid_pre``, ``attn_out``, ``mlp_out`` and ``resid_post``.
        pooling: the pooling (:data:`Pooling`): ``"last"`` token or ``"mean_response"``
            (response modes); which tokens are *read*, unlike steering's ``positions=``.
        batch_size: rows per forward pass.
        max_new_tokens: answer length of the response modes' generation.
        seed: seed of the response modes' generation.
        split: a dataset split name to record in the metadata.
        share_prefix: run the tokens that rows with the same system prompt share (the chat
            header and the behaviour instruction) once per group and reuse their KV cache for
            every row (see :func:`prefix_cache`); ``False`` runs every row whole. Both give the
            same activations within float rounding (measured: at most 1e-6 of the largest
            activation on the default model).

    Returns:
        :class:`Activations`: ``acts.shape == (n_rows, len(layers), d_model)``; ``acts[18]`` is
        ``[n_rows, d_model]`` at ``blocks.18.hook_resid_post``; ``acts.labels`` ``[n_rows]``.

    Examples:
        >>> train = ks.load_dataset("tones").split("train").head(4)    # 4 questions x 6 tones
        >>> acts = ks.collect_activations(model, train, layers=[1, 2], progress=False)
        >>> len(acts), acts.layers
        (24, (1, 2))
        >>> acts[2].shape == (24, model.cfg.d_model)       # at blocks.2.hook_resid_post
        True

    ``responses`` maps ``(question_id, label_index)`` to answer token ids, to reuse answers
    generated earlier (e.g. by a ``response`` collection) for ``response-only``.
    """
    spec, rows = _plan(
        model, dataset, mode, layers, hook_kinds, pooling, batch_size, max_new_tokens, seed
    )
    parts = [
        c
        for _, c in _chunks(
            model,
            rows,
            spec,
            max(256, batch_size),
            range(0, len(rows), max(256, batch_size)),
            responses,
            progress,
            f"collect {spec.mode}",
            share_prefix,
        )
    ]
    return _assemble(
        parts,
        spec,
        dataset.labels,
        _base_meta(model, dataset, spec, split, len(rows), share_prefix),
    )


def _assemble(
    parts: Sequence[_Chunk], spec: CollectSpec, label_names: Sequence[str], meta: dict[str, Any]
) -> Activations:
    rows = [r for p in parts for r in p.rows]
    texts = [t for p in parts for t in p.texts]
    answers = [a for p in parts for a in p.answer_ids]
    meta = dict(meta)
    if any(a is not None for a in answers):
        meta["answer_ids"] = answers
    return Activations(
        {k: torch.cat([p.acts[k] for p in parts]) for k in spec.hook_kinds},
        tuple(spec.layers or ()),
        torch.tensor([r.label for r in rows], dtype=torch.long),
        tuple(label_names),
        tuple(r.question_id for r in rows),
        tuple(texts) if any(t is not None for t in texts) else None,
        meta,
    )
