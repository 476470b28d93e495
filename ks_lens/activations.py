"""Residual-stream activations at every layer, collected in one forward pass per batch.

Four collection modes (``mode=``):

``prompt``
    behaviour instruction as system prompt + question; last prompt token (the reference code's
    choice: fast, no generation). A probe on these can learn "which instruction is present".
``response``
    the model answers under the instruction (greedy); activation of its final generated token,
    with the instruction still in context (the original post's description).
``response-only``
    the same answer re-encoded WITHOUT the instruction (question + answer only), so a probe must
    read the tone from the text itself. Generated texts are kept.
``neutral``
    the question alone (no instruction): the inputs that get steered in evaluation.

Pooling (``position=``, type :data:`Pooling`): which tokens' activations are *read* for each
row: ``last`` (last real token) or ``mean_response`` (mean over the answer's tokens; response modes
only). Not to be confused with steering's ``positions=`` (:data:`ks_lens.steering.positions.Positions`:
which tokens are *written to*); the keyword stays ``position=`` for compatibility.

One forward pass per batch captures every requested hook point (``blocks.{L}.hook_resid_post`` by
default; any kind of :func:`ks_lens.hooks.block_kind`, e.g. ``hook_kinds=("attn.hook_z",)``); the
pass stops right after the last requested hook fires, so no unembedding is computed. Batches are left padded with attention masks and position ids derived
from them, so a row's activation equals that of the prompt run alone.

Prefix sharing (``share_prefix=True``, the default): rows encoded with the same system prompt
start with the same tokens (the chat header and the behaviour instruction, often most of a
prompt-mode row). Those are run once per system prompt and chunk (:func:`prefix_cache`); each
batch then runs only its rows' remaining tokens, right padded after the cached keys and values,
through the same bridge forward, so every hook fires under its usual name. The result equals the
whole-row pass within float rounding (bitwise on the CPU in our tests) and does not depend on how
rows are batched or chunked.

:func:`collect_activations` returns an in-memory :class:`Activations`; :func:`collect_to_store`
streams shards to disk (:class:`ActivationStore`): memory stays at one shard, every file is
written atomically, a rerun resumes after the last complete shard, and loading checks sizes and
checksums and refuses a store made for another model.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from einops import rearrange
from jaxtyping import Float, Int
from safetensors import safe_open
from tqdm.auto import tqdm

from ks_lens.batching import record_activations, scatter, sorted_batches
from ks_lens.chat import (
    ChatPrompt,
    TokenBatch,
    check_context,
    context_window,
    encode_chat,
)
from ks_lens.compat import check_version_match, versions
from ks_lens.datasets import BehaviourDataset, base_labels, multi_hot
from ks_lens.errors import ConfigError, DatasetError, HookPointError, StoreError
from ks_lens.generation import generate_from_batch
from ks_lens.hf_path import forward
from ks_lens.hooks import (
    HOOK_KINDS,
    NO_POSITION_KINDS,
    block_kind,
    canonical_hook_name,
    check_hook_name,
    check_layer,
    n_layers,
    resid_hook,
)
from ks_lens.io import (
    atomic_save_safetensors,
    atomic_write_json,
    check_meta_checksum,
    read_json,
    sha256_file,
    with_meta_checksum,
)
from ks_lens.models import (
    check_signature,
    model_device,
    model_numerics,
    model_signature,
    pad_token_id,
)
from ks_lens.types import Model
from ks_lens.utils import check_int, check_seed

Mode = Literal["prompt", "response", "response-only", "neutral"]
Pooling = Literal["last", "mean_response"]
MODES: tuple[Mode, ...] = get_args(Mode)
#: the collection poolings (``position=``): which tokens' activations are read for each row
POOLINGS: tuple[Pooling, ...] = get_args(Pooling)
POSITIONS = POOLINGS  # deprecated name (steering.positions.POSITIONS is another concept)
STORE_FORMAT = "ks_lens.activation_store"


# ----------------------------------------------------------------------------- in-memory result


@dataclass
class Activations:
    """Activations of ``n`` rows at ``len(layers)`` layers for each hook kind.

    ``acts[kind][i, j]`` is row ``i``'s activation at ``blocks.{layers[j]}.hook_{kind}``
    (``[d_model]`` for the residual-stream kinds; the hook's own feature shape for other kinds,
    e.g. ``[n_heads, d_head]`` for ``"attn.hook_z"``, see :meth:`feature_shape`).
    ``labels[i]`` indexes ``label_names`` (``-1`` for unlabelled, i.e. neutral rows).

    Accessors (layers are MODEL layer indices; negative ones count from the model's last layer)::

        acts.shape                    # (n_rows, n_collected_layers, d_model)
        acts[18]                      # [n, d_model] at blocks.18.hook_resid_post
        acts[-1, "resid_pre"]         # [n, d_model] at the last layer's hook_resid_pre
        acts.tensor()                 # [n, n_collected_layers, d_model], layers as in acts.layers
        acts.tensor(kind="resid_pre") # same for another collected kind
        acts.at(1, "attn.hook_z")     # [n, n_heads, d_head]
        acts.features(1, "attn.hook_z")  # [n, n_heads * d_head], what probes train on
    """

    acts: dict[str, Float[torch.Tensor, "n layer ..."]]
    layers: tuple[int, ...]
    labels: Int[torch.Tensor, " n"]
    label_names: tuple[str, ...]
    question_ids: tuple[str, ...]
    texts: tuple[str | None, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        model = self.meta.get("model", {}).get("model")
        mode = self.meta.get("collect", {}).get("mode")
        n_lab = int((self.labels >= 0).sum())
        other = {k: list(self.feature_shape(k)) for k in self.acts if k not in HOOK_KINDS}
        shapes = f", feature_shapes={other}" if other else ""
        return (
            f"Activations(n={len(self)} ({n_lab} labelled), layers={list(self.layers)}, "
            f"kinds={list(self.acts)}, d_model={self.d_model}{shapes}, "
            f"labels={list(self.label_names)}, model={model!r}, mode={mode!r})"
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """``(n_rows, n_collected_layers, d_model)``: the shape of :meth:`tensor` (for a kind that
        is not ``d_model`` wide, ``(n_rows, n_collected_layers, *feature_shape)``)."""
        return (len(self), len(self.layers), *self.feature_shape(self._default_kind(None)))

    def feature_shape(self, kind: str = "resid_post") -> tuple[int, ...]:
        """One row's activation shape at one layer: ``(d_model,)`` for the residual-stream kinds,
        e.g. ``(n_heads, d_head)`` for ``"attn.hook_z"``, ``(d_mlp,)`` for ``"mlp.hook_post"``."""
        if kind not in self.acts:
            raise StoreError(f"no {kind!r} activations here; available: {sorted(self.acts)}")
        return tuple(int(x) for x in self.acts[kind].shape[2:])

    def _default_kind(self, kind: str | None) -> str:
        if kind is not None:
            return kind
        return "resid_post" if "resid_post" in self.acts else next(iter(self.acts))

    def tensor(
        self, layer: int | None = None, kind: str | None = None
    ) -> Float[torch.Tensor, "n ..."] | Float[torch.Tensor, "n layer ..."]:
        """``[n, d_model]`` at one model layer, or ``[n, n_collected_layers, d_model]`` for
        ``layer=None``; ``kind`` defaults to ``"resid_post"`` (or the only collected kind).
        Other kinds keep their feature shape in place of ``d_model``."""
        kind = self._default_kind(kind)
        if layer is None:
            if kind not in self.acts:
                raise StoreError(f"no {kind!r} activations here; available: {sorted(self.acts)}")
            return self.acts[kind]
        return self.at(layer, kind)

    def __getitem__(self, key: int | tuple[int, str]) -> Float[torch.Tensor, "n d_model"]:
        """``acts[layer]`` or ``acts[layer, kind]``: ``[n, d_model]`` (see :meth:`at`)."""
        if isinstance(key, tuple):
            if len(key) != 2:
                raise ConfigError("index Activations as acts[layer] or acts[layer, kind]")
            return self.at(key[0], key[1])
        return self.at(key, self._default_kind(None))

    @property
    def d_model(self) -> int:
        """The model's residual-stream width (recorded in the metadata, else read off a
        residual-stream kind, else the last dimension of the collected activations)."""
        d = self.meta.get("model", {}).get("d_model")
        if isinstance(d, int):
            return d
        kind = next((k for k in self.acts if k in HOOK_KINDS), next(iter(self.acts)))
        return int(self.acts[kind].shape[-1])

    def at(self, layer: int, kind: str = "resid_post") -> Float[torch.Tensor, "n ..."]:
        """Activations at one layer (``layer`` is a model layer index, not a position in ``layers``):
        ``[n, d_model]``, or ``[n, *feature_shape(kind)]`` for other kinds."""
        if kind not in self.acts:
            raise StoreError(f"no {kind!r} activations here; available: {sorted(self.acts)}")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ConfigError(f"layer must be an int (a model layer index), got {layer!r}")
        if layer < 0:
            n_model = self.meta.get("model", {}).get("n_layers")
            if n_model is None:
                raise StoreError(
                    f"layer {layer}: negative layers count from the model's last layer, but "
                    "these activations do not record the model's n_layers"
                )
            layer = int(n_model) + layer
        if layer not in self.layers:
            raise StoreError(
                f"layer {layer} was not collected; collected layers: {list(self.layers)}"
            )
        return self.acts[kind][:, self.layers.index(layer)]

    def features(self, layer: int, kind: str = "resid_post") -> Float[torch.Tensor, "n feature"]:
        """:meth:`at` flattened to ``[n, prod(feature_shape)]``: the features probes train on."""
        return rearrange(self.at(layer, kind), "n ... -> n (...)")  # e.g. (head d_head)

    @property
    def base_labels(self) -> tuple[str, ...]:
        """The label space of probes trained on these rows: the single labels, without the
        combined behaviours (``"a+b"``) of :meth:`BehaviourDataset.with_combinations`."""
        return base_labels(self.label_names)

    def one_hot(self) -> Float[torch.Tensor, "n k"]:
        """Targets over :attr:`base_labels`: one-hot for single-behaviour rows, multi-hot for
        combined ones (``"a+b"`` sets both), all zero for unlabelled rows."""
        return multi_hot(self.labels, self.label_names)

    def select(self, index: Sequence[int] | torch.Tensor) -> Activations:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Activations(
            {k: v[idx] for k, v in self.acts.items()},
            self.layers,
            self.labels[idx],
            self.label_names,
            tuple(self.question_ids[i] for i in idx.tolist()),
            None if self.texts is None else tuple(self.texts[i] for i in idx.tolist()),
            dict(self.meta),
        )

    def for_questions(self, ids: Sequence[str]) -> Activations:
        keep = set(ids)
        return self.select([i for i, q in enumerate(self.question_ids) if q in keep])

    def to(self, device: torch.device | str) -> Activations:
        return Activations(
            {k: v.to(device) for k, v in self.acts.items()},
            self.layers,
            self.labels.to(device),
            self.label_names,
            self.question_ids,
            self.texts,
            self.meta,
        )


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


# ----------------------------------------------------------------------------- capture


@dataclass
class PrefixCache:
    """The keys and values of a token prefix that several rows share, computed once.

    Made by :func:`prefix_cache`; :func:`capture_features` takes it as ``prefix=`` and then runs
    only each row's remaining (suffix) tokens, attending to the cached prefix. ``kv`` holds, for
    the layers the prefix pass reached, ``(keys, values)`` of shape ``[1, kv_heads, prefix_len,
    d_head]``.
    """

    ids: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    def __len__(self) -> int:
        return len(self.ids)

    def cache_for(self, model: Model, batch_size: int) -> Any:
        """A fresh Hugging Face ``DynamicCache`` holding the prefix for ``batch_size`` rows (the
        suffix pass extends it in place, so every batch needs its own)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=_hf_config(model))
        layers: list[Any] = cache.layers
        for i, (k, v) in enumerate(self.kv):
            layers[i].update(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
        return cache


def _hf_config(model: Model) -> Any:
    """The Hugging Face config of the bridge's model (TransformerBridge types ``original_model``
    as a plain ``nn.Module``, so its ``config`` is untyped)."""
    hf: Any = model.original_model
    return hf.config


def prefix_cache(model: Model, ids: Sequence[int], hook_names: Sequence[str]) -> PrefixCache | None:
    """Run the token prefix ``ids`` once (batch 1, no padding) and keep its KV cache, for the
    layers that a capture of ``hook_names`` reaches (the pass stops once all of them fired, as
    :func:`capture_features` does, so both passes run the same attention layers).

    Returns ``None`` where nothing can be cached: an empty prefix, a capture that stops before
    the first attention layer (``blocks.0.hook_resid_pre`` only), or a cache layer that does not
    hold the whole prefix (e.g. a sliding window shorter than it).
    """
    if not ids or not hook_names:
        return None
    cache = _new_cache(model)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=model_device(model))
    with torch.no_grad(), record_activations(model, hook_names, last_token=True, stop=True):
        forward(model, tokens, cache=cache, logits_to_keep=-1)
    return _as_prefix(cache, ids)


def prefix_pass(
    model: Model, ids: Sequence[int], hook_names: Sequence[str] = ()
) -> tuple[PrefixCache | None, torch.Tensor, dict[str, torch.Tensor]]:
    """Run the token prefix ``ids`` through the whole model once (batch 1): its KV cache for
    every layer (``None`` where it cannot be shared, as in :func:`prefix_cache`), the next-token
    logits at its last token ``[vocab]``, and the activation at each of ``hook_names`` at its
    last token (``[*feature]``)."""
    if not ids:
        raise ConfigError("the prefix is empty")
    cache = _new_cache(model)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=model_device(model))
    with torch.no_grad(), record_activations(model, hook_names, last_token=True) as rec:
        logits = forward(model, tokens, cache=cache, logits_to_keep=1)
    assert logits is not None
    prefix = _as_prefix(cache, ids)
    if prefix is not None and len(prefix.kv) != n_layers(model):
        prefix = None  # some layer's attention left no cache
    return prefix, logits[0, -1], {k: v[0] for k, v in rec.items()}


def _new_cache(model: Model) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=_hf_config(model))


def _as_prefix(cache: Any, ids: Sequence[int]) -> PrefixCache | None:
    from transformers.cache_utils import DynamicLayer

    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.numel() == 0:
            break  # the pass stopped before this layer's attention
        if (
            not isinstance(layer, DynamicLayer)
            or not isinstance(values, torch.Tensor)
            or keys.shape[-2] != len(ids)
        ):
            return None  # another kind of cache layer, or a window shorter than the prefix
        kv.append((keys, values))
    if not kv:
        return None
    return PrefixCache(tuple(int(t) for t in ids), kv)


def capture_features(
    model: Model,
    batch: TokenBatch,
    hook_names: Sequence[str],
    *,
    response_start: Int[torch.Tensor, " batch"] | None = None,
    position: Pooling = "last",
    prefix: PrefixCache | None = None,
) -> list[Float[torch.Tensor, "batch ..."]]:
    """One forward pass; the activation summary at every hook in ``hook_names`` (in that order),
    each ``[batch, *feature]`` (e.g. ``[batch, d_model]``, ``[batch, n_heads, d_head]``).

    ``position="last"`` takes the final (left-padded, hence real) token; ``"mean_response"``
    averages positions ``response_start[b]`` (index within the unpadded row) to the end.
    Hook names are any per-block hook point with a ``[batch, pos, ...]`` activation; the pass
    stops as soon as all of them have fired.

    With ``prefix`` (a :class:`PrefixCache` from :func:`prefix_cache`, made for the same
    ``hook_names``), every row is ``prefix.ids`` followed by its row of ``batch``: only the
    suffix tokens are run, attending to the cached prefix, and the result equals that of the
    whole rows within float rounding. ``batch`` is left padded as everywhere else (it is
    re-padded on the right internally); ``response_start`` still counts from the start of the
    whole row and must not point into the prefix.
    """
    if position not in POOLINGS:
        raise ConfigError(f"unknown position {position!r}; use one of {POOLINGS}")
    if not hook_names:
        raise ConfigError("hook_names must name at least one hook point")
    if position == "mean_response" and response_start is None:
        raise ConfigError("position='mean_response' needs response_start")
    ids, mask = batch.input_ids, batch.attention_mask
    n_rows, width = ids.shape
    pos = torch.arange(width, device=ids.device)
    kwargs: dict[str, Any] = {}
    if prefix is None:
        # left padded: every row ends at the last position
        read_last: torch.Tensor | None = None
        first = batch.n_pad.to(ids.device) + response_start if response_start is not None else None
        end = torch.full((n_rows,), width, device=ids.device)
    else:
        # The suffixes run RIGHT padded after the cached prefix: each row's real tokens then sit
        # at the same key positions whatever the batch's padding, so a row's numbers do not
        # depend on the rows it is batched with (a padding gap between prefix and suffix would
        # shift them and change float rounding).
        lengths = batch.lengths.to(ids.device)
        gather = (pos[None, :] + batch.n_pad.to(ids.device)[:, None]) % width
        ids, mask = ids.gather(1, gather), mask.gather(1, gather)
        n_prefix = len(prefix)
        if response_start is not None and bool((response_start < n_prefix).any()):
            raise ConfigError("response_start points into the shared prefix")
        read_last = lengths - 1
        first = response_start - n_prefix if response_start is not None else None
        end = lengths
        ones = torch.ones(n_rows, n_prefix, dtype=mask.dtype, device=mask.device)
        mask = torch.cat([ones, mask], dim=1)
        kwargs["cache"] = prefix.cache_for(model, n_rows)
    if position == "mean_response":
        assert first is not None
        first = first.to(ids.device)
        weights = ((pos[None, :] >= first[:, None]) & (pos[None, :] < end[:, None])).float()
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)

    def summarise(act: torch.Tensor, name: str) -> torch.Tensor:
        if act.dim() < 3 or tuple(act.shape[:2]) != (n_rows, width):
            raise HookPointError(
                f"{name} gives activations of shape {tuple(act.shape)}, not "
                f"[batch={n_rows}, pos={width}, ...]: ks-lens collects per-token activations "
                "only (attention patterns and scores are [batch, head, query, key])"
            )
        a = act.float()
        if position == "mean_response":
            w = weights.to(a.device)
            return (w.reshape(*w.shape, *([1] * (a.dim() - 2))) * a).sum(1)
        if read_last is None:
            return a[:, -1].clone()
        rows = torch.arange(n_rows, device=a.device)
        return a[rows, read_last.to(a.device)]

    with (
        torch.no_grad(),
        record_activations(model, hook_names, reduce=summarise, stop=True) as rec,
    ):
        forward(model, ids, attention_mask=mask, logits_to_keep=-1, **kwargs)
    if rec.missing:
        raise HookPointError(
            f"hook point(s) {rec.missing} did not fire in a forward pass: this architecture never "
            "calls them (model.hook_dict lists every name TransformerLens defines); collect at "
            "another hook point"
        )
    return [rec[name].cpu() for name in hook_names]


def capture_batch(
    model: Model,
    batch: TokenBatch,
    hook_names: Sequence[str],
    *,
    response_start: Int[torch.Tensor, " batch"] | None = None,
    position: Pooling = "last",
    prefix: PrefixCache | None = None,
) -> Float[torch.Tensor, "batch hook d_model"]:
    """:func:`capture_features` stacked to ``[batch, hook, d_model]``, for hook points that share one
    feature shape (e.g. the residual-stream kinds); otherwise use :func:`capture_features`."""
    feats = capture_features(
        model, batch, hook_names, response_start=response_start, position=position, prefix=prefix
    )
    shapes = {tuple(f.shape[1:]) for f in feats}
    if len(shapes) > 1:
        raise ConfigError(
            f"capture_batch stacks hook points of one feature shape; these have {sorted(shapes)}. "
            "Use capture_features for a list of [batch, *feature] tensors."
        )
    return torch.stack(feats, dim=1)


# ----------------------------------------------------------------------------- collection core


@dataclass(frozen=True)
class CollectSpec:
    """Everything that determines a collection's rows and numbers (recorded in metadata)."""

    mode: Mode = "prompt"
    layers: tuple[int, ...] | None = None  # None = every layer
    hook_kinds: tuple[str, ...] = ("resid_post",)
    position: Pooling = "last"
    batch_size: int = 16
    max_new_tokens: int = 48
    seed: int = 0

    def validate(self, model: Model) -> CollectSpec:
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; use one of {MODES}")
        if self.position not in POOLINGS:
            raise ConfigError(f"unknown position {self.position!r}; use one of {POOLINGS}")
        if self.position == "mean_response" and self.mode not in ("response", "response-only"):
            raise ConfigError("position='mean_response' needs mode 'response' or 'response-only'")
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
            self.position,
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
            "position": self.position,
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
    device = model_device(model)
    names = spec.hook_names()
    answers: list[list[int] | None] = [None] * len(rows)
    texts: list[str | None] = [None] * len(rows)
    if spec.mode in ("response", "response-only"):
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
            gen_prompts, spec.batch_size, pad_id=pad_token_id(tok), device=device, rows=need
        )
        for b, (idx, batch) in enumerate(batches):
            res = generate_from_batch(
                model, batch, max_new_tokens=spec.max_new_tokens, seed=spec.seed + seed_offset + b
            )
            scatter(answers, idx, res.ids)
        for i in range(len(rows)):
            texts[i] = tok.decode(answers[i] or [], skip_special_tokens=True).strip()
    seqs: list[list[int]] = []
    starts: list[int] = []
    systems: list[str | None] = []  # the system prompt each row is encoded with
    for i, r in enumerate(rows):
        if spec.mode in ("prompt", "neutral"):
            ids = encode_chat(tok, ChatPrompt(r.question, r.system))
            seqs.append(ids)
            starts.append(len(ids))
            systems.append(r.system)
        else:
            system = r.system if spec.mode == "response" else None
            head = encode_chat(tok, ChatPrompt(r.question, system))
            seqs.append(head + list(answers[i] or []))
            starts.append(len(head))
            systems.append(system)
    # the first token of each row's summary: the last token, or the first answer token
    first_read = [
        min(starts[i], len(seqs[i]) - 1) if spec.position == "mean_response" else len(seqs[i]) - 1
        for i in range(len(rows))
    ]
    # rows encoded with the same system prompt share their first tokens (the chat header and
    # the instruction): run those once per system prompt and only each row's remainder. The
    # prefix depends only on the system prompt, so a row's numbers do not depend on the chunk.
    groups: list[tuple[tuple[int, ...], list[int]]] = []
    whole: list[int] = []
    if share_prefix:
        by_prefix: dict[tuple[int, ...], list[int]] = {}
        prefixes: dict[str | None, tuple[int, ...]] = {}
        for i, system in enumerate(systems):
            if system not in prefixes:
                prefixes[system] = system_prefix(tok, system)
            common = prefixes[system]
            n = len(common)
            if n >= MIN_SHARED_PREFIX and first_read[i] >= n and tuple(seqs[i][:n]) == common:
                by_prefix.setdefault(common, []).append(i)
            else:
                whole.append(i)
        groups = list(by_prefix.items())
    else:
        whole = list(range(len(rows)))
    if whole:
        groups.append(((), whole))
    pad = pad_token_id(tok)
    out: list[torch.Tensor] = []  # one [n_rows, *feature] per hook name
    for common, group in groups:
        prefix = prefix_cache(model, common, names) if common else None
        n_prefix = len(prefix) if prefix is not None else 0
        # the group's rows all start with the prefix: sorting the suffixes sorts the rows
        suffixes = [s[n_prefix:] for s in seqs] if n_prefix else seqs
        batches = sorted_batches(suffixes, spec.batch_size, pad_id=pad, device=device, rows=group)
        for idx, batch in batches:
            rs = torch.tensor([min(starts[i], len(seqs[i]) - 1) for i in idx], device=device)
            feats = capture_features(
                model, batch, names, response_start=rs, position=spec.position, prefix=prefix
            )
            if not out:
                out = [torch.empty(len(rows), *f.shape[1:]) for f in feats]
            for o, f in zip(out, feats, strict=True):
                scatter(o, idx, f)
    n_layers = len(spec.layers or ())
    acts = {
        kind: torch.stack(out[k * n_layers : (k + 1) * n_layers], dim=1)
        for k, kind in enumerate(spec.hook_kinds)
    }
    return _Chunk(acts, list(rows), texts, answers)


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


def _base_meta(
    model: Model,
    dataset: BehaviourDataset,
    spec: CollectSpec,
    split: str | None,
    n_rows: int,
    share_prefix: bool,
) -> dict[str, Any]:
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
    position: Pooling,
    batch_size: int,
    max_new_tokens: int,
    seed: int,
) -> tuple[CollectSpec, list[Row]]:
    """Validate the collection settings against the model and plan the rows."""
    spec = CollectSpec(
        mode,
        None if layers is None else tuple(layers),
        tuple(hook_kinds),
        position,
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


def collect_activations(
    model: Model,
    dataset: BehaviourDataset,
    *,
    mode: Mode = "prompt",
    layers: Sequence[int] | None = None,
    hook_kinds: Sequence[str] = ("resid_post",),
    position: Pooling = "last",
    batch_size: int = 16,
    max_new_tokens: int = 48,
    seed: int = 0,
    split: str | None = None,
    responses: Responses | None = None,
    progress: bool = True,
    share_prefix: bool = True,
) -> Activations:
    """Collect activations for every row of ``dataset`` in memory (see the module docstring).

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
        position: the pooling (:data:`Pooling`): ``"last"`` token or ``"mean_response"``
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
        model, dataset, mode, layers, hook_kinds, position, batch_size, max_new_tokens, seed
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


# ----------------------------------------------------------------------------- the on-disk store


_RESUME_KEYS = ("model", "numerics", "dataset", "split", "collect", "n_rows", "shard_rows")
_REQUIRED_KEYS = ("status", "model", "dataset", "collect", "n_rows", "shards")


class ActivationStore:
    """A directory of activation shards: ``meta.json`` + ``shards/shard-NNNNN.{safetensors,json}``.

    ``meta.json`` lists the complete shards with their sizes and SHA-256, and a SHA-256 of
    itself; it is rewritten atomically after each shard, and ``status`` becomes ``"complete"``
    at the end.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise StoreError(f"no activation store at {self.path} (missing meta.json)")
        # without a trustworthy index nothing here can be verified or resumed: start over
        fix = f"Delete the directory {self.path} and rerun the collect command to re-create it."
        try:
            meta = read_json(meta_path, what="activation store metadata")
        except StoreError as e:
            raise StoreError(f"{e}. {fix}") from None
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            held = f" (it holds {found!r})" if found else ""
            raise StoreError(f"{self.path} is not a ks-lens activation store{held}")
        try:
            check_meta_checksum(meta, meta_path, "activation store metadata")
        except StoreError as e:
            raise StoreError(f"{e} {fix}") from None
        missing = [k for k in _REQUIRED_KEYS if k not in meta]
        if missing:
            raise StoreError(f"activation store metadata {meta_path} lacks {missing}. {fix}")
        check_version_match(meta.get("versions"), f"activation store {self.path}")
        self.meta: dict[str, Any] = meta

    # -- properties
    @property
    def complete(self) -> bool:
        return self.meta.get("status") == "complete"

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.meta["dataset"]["labels"])

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.meta["collect"]["layers"])

    @property
    def hook_kinds(self) -> tuple[str, ...]:
        return tuple(self.meta["collect"]["hook_kinds"])

    @property
    def feature_shapes(self) -> dict[str, list[int]]:
        """One row's activation shape at each kind (stores made before non-``d_model`` kinds
        existed record none: every kind there is ``[d_model]``)."""
        recorded = self.meta.get("feature_shapes") or {}
        d = int(self.meta["model"]["d_model"])
        return {k: list(recorded.get(k, [d])) for k in self.hook_kinds}

    @property
    def n_rows_done(self) -> int:
        return sum(s["rows"][1] - s["rows"][0] for s in self.meta["shards"])

    def __repr__(self) -> str:
        c = self.meta["collect"]
        return (
            f"ActivationStore({str(self.path)!r}, model={self.meta['model']['model']!r}, mode={c['mode']!r}, "
            f"rows={self.n_rows_done}/{self.meta['n_rows']}, layers={len(self.layers)}, "
            f"status={self.meta.get('status')!r})"
        )

    # -- validation
    def check_model(self, model: Model) -> None:
        """Refuse use with a model other than the one the activations came from."""
        check_signature(self.meta["model"], model, f"activation store {self.path}")

    def problems(self) -> list[str]:
        """What is wrong with each damaged listed shard (missing, truncated, altered files)."""
        return [p for s in self.meta["shards"] if (p := _shard_problem(self.path, s))]

    def verify(self) -> None:
        """Check every listed shard's files, sizes and checksums."""
        problems = self.problems()
        if problems:
            more = f" (and {len(problems) - 1} more damaged shard(s))" if len(problems) > 1 else ""
            raise StoreError(
                f"{problems[0]}{more}; rerun the same collect command to re-collect the damaged "
                "shards (the intact ones are kept)"
            )

    # -- reading
    def load(
        self,
        *,
        layers: Sequence[int] | None = None,
        kinds: Sequence[str] | None = None,
        allow_incomplete: bool = False,
    ) -> Activations:
        """Load (some layers of) the store into memory, verifying every shard."""
        if not self.complete and not allow_incomplete:
            raise StoreError(
                f"activation store {self.path} is incomplete ({self.n_rows_done}/{self.meta['n_rows']} rows); "
                "rerun the same collect command to finish it, or pass allow_incomplete=True"
            )
        self.verify()
        kinds = tuple(kinds or self.hook_kinds)
        for k in kinds:
            if k not in self.hook_kinds:
                raise StoreError(f"store has no {k!r} activations; it has {list(self.hook_kinds)}")
        all_layers = self.layers
        want = tuple(all_layers if layers is None else layers)
        for layer in want:
            if layer not in all_layers:
                raise StoreError(
                    f"layer {layer} is not in the store; it has layers {list(all_layers)}"
                )
        cols = [all_layers.index(x) for x in want]
        spans = _column_spans(cols)
        shapes = self.feature_shapes
        acts: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
        labels: list[int] = []
        qids: list[str] = []
        texts: list[str | None] = []
        for s in self.meta["shards"]:
            with safe_open(str(self.path / s["tensors"]["file"]), framework="pt") as f:
                for k in kinds:
                    sl = f.get_slice(k)
                    n_shard = s["rows"][1] - s["rows"][0]
                    if list(sl.get_shape()) != [n_shard, len(all_layers), *shapes[k]]:
                        raise StoreError(
                            f"{self.path / s['tensors']['file']}: {k!r} has shape "
                            f"{sl.get_shape()}, but the store metadata says "
                            f"[{n_shard}, {len(all_layers)}, *{shapes[k]}]"
                        )
                    # only the wanted layers are read from the file (lazy slices per run of
                    # adjacent columns), never the whole shard
                    acts[k].append(_read_columns(sl, spans, cols, [n_shard, 0, *shapes[k]]))
            rows = json.loads((self.path / s["rows_file"]["file"]).read_text())
            labels.extend(rows["labels"])
            qids.extend(rows["question_ids"])
            texts.extend(rows.get("texts") or [None] * len(rows["labels"]))
        meta = {k: v for k, v in self.meta.items() if k not in ("shards", "meta_sha256")}
        meta["store"] = str(self.path)
        return Activations(
            {
                k: (torch.cat(v) if v else torch.empty(0, len(want), *shapes[k]))
                for k, v in acts.items()
            },
            want,
            torch.tensor(labels, dtype=torch.long),
            self.label_names,
            tuple(qids),
            tuple(texts) if any(t is not None for t in texts) else None,
            meta,
        )

    def responses(self) -> dict[tuple[str, int], list[int]]:
        """``(question_id, label) -> answer token ids`` from a response-mode store, for reuse."""
        out: dict[tuple[str, int], list[int]] = {}
        for s in self.meta["shards"]:
            rows = json.loads((self.path / s["rows_file"]["file"]).read_text())
            if rows.get("answer_ids") is None:
                raise StoreError(
                    f"{self.path} holds no generated answers (mode {self.meta['collect']['mode']!r})"
                )
            for q, lab, ids in zip(
                rows["question_ids"], rows["labels"], rows["answer_ids"], strict=True
            ):
                out[(q, int(lab))] = ids
        return out


def _column_spans(cols: Sequence[int]) -> list[tuple[int, int]]:
    """The sorted distinct ``cols`` as half-open runs of adjacent columns: [3, 4, 5, 9] ->
    [(3, 6), (9, 10)]."""
    spans: list[tuple[int, int]] = []
    for c in sorted(set(cols)):
        if spans and spans[-1][1] == c:
            spans[-1] = (spans[-1][0], c + 1)
        else:
            spans.append((c, c + 1))
    return spans


def _read_columns(
    sl: Any, spans: Sequence[tuple[int, int]], cols: Sequence[int], empty: Sequence[int]
) -> torch.Tensor:
    """Columns ``cols`` (axis 1, in that order) of a safetensors slice, reading only the
    ``spans`` that hold them (:func:`_column_spans`); ``empty`` is the shape when none."""
    if not spans:
        return torch.empty(*empty)
    parts = [sl[:, a:b] for a, b in spans]
    read = [c for a, b in spans for c in range(a, b)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out if read == list(cols) else out[:, [read.index(c) for c in cols]]


def _shard_problem(root: Path, shard: dict[str, Any]) -> str | None:
    """What is wrong with a listed shard's files (missing, truncated, altered), or ``None``."""
    for key in ("tensors", "rows_file"):
        p = root / shard[key]["file"]
        try:
            if not p.is_file():
                return f"shard file missing: {p}"
            size = p.stat().st_size
            if size != shard[key]["bytes"]:
                return f"shard file {p} is truncated or corrupt ({size} bytes, expected {shard[key]['bytes']})"
            if sha256_file(p) != shard[key]["sha256"]:
                return f"shard file {p} does not match its checksum"
        except OSError as e:
            return f"shard file {p} cannot be read ({e})"
    return None


def _shard_record(path: Path, rel: str) -> dict[str, Any]:
    p = path / rel
    return {"file": rel, "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def collect_to_store(
    model: Model,
    dataset: BehaviourDataset,
    out: str | Path,
    *,
    mode: Mode = "prompt",
    layers: Sequence[int] | None = None,
    hook_kinds: Sequence[str] = ("resid_post",),
    position: Pooling = "last",
    batch_size: int = 16,
    max_new_tokens: int = 48,
    seed: int = 0,
    split: str | None = None,
    shard_rows: int = 256,
    responses: Responses | None = None,
    progress: bool = True,
    share_prefix: bool = True,
) -> ActivationStore:
    """Collect to an on-disk store, resuming an interrupted run with the same settings.

    A store with the same settings keeps every shard that verifies and collects the others
    (unfinished, missing or damaged ones, with a warning for damage), so rerunning the same call
    finishes or repairs it; the result equals an uninterrupted run. A store with other settings
    (including the model's dtype and device type) is refused. ``share_prefix`` is as in
    :func:`collect_activations`; it is recorded but, changing numbers only at float rounding,
    does not stop a resume.
    """
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise ConfigError(f"shard_rows must be a positive int, got {shard_rows!r}")
    spec, rows = _plan(
        model, dataset, mode, layers, hook_kinds, position, batch_size, max_new_tokens, seed
    )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out} is an existing file; an activation store is a directory")
    fresh = {
        "format": STORE_FORMAT,
        "format_version": 2,
        "status": "incomplete",
        **_base_meta(model, dataset, spec, split, len(rows), share_prefix),
        "shard_rows": shard_rows,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "shards": [],
    }
    meta_path = out / "meta.json"
    if meta_path.exists():
        store = ActivationStore(out)
        old = store.meta
        diffs = [k for k in _RESUME_KEYS if old.get(k) != fresh.get(k)]
        if diffs:
            detail = "; ".join(
                f"{k}: stored {old.get(k)!r} vs requested {fresh.get(k)!r}" for k in diffs
            )
            hint = ""
            if "numerics" in diffs and isinstance(old.get("numerics"), dict):
                n = old["numerics"]
                hint = f" To finish or reuse it, load the model with dtype={n.get('dtype')!r} on a {n.get('device')} device."
            raise StoreError(
                f"{out} already holds activations collected with other settings ({detail}). "
                f"Use another --out directory or delete this one.{hint}"
            )
        # keep every shard that verifies; re-collect the missing, damaged and unfinished ones
        good, damaged = [], []
        for s in old["shards"]:
            problem = _shard_problem(out, s)
            if problem:
                damaged.append(problem)
            else:
                good.append(s)
        if store.complete and not damaged:
            return store
        if damaged:
            warnings.warn(
                f"activation store {out}: re-collecting {len(damaged)} damaged shard(s) "
                f"({damaged[0]}{', ...' if len(damaged) > 1 else ''})",
                stacklevel=2,
            )
        # temporary files of writes cut short by a hard kill (SIGKILL, power loss)
        for tmp in [*out.glob(".*.tmp"), *(out / "shards").glob(".*.tmp")]:
            tmp.unlink(missing_ok=True)
        meta = dict(old)
        meta["shards"] = good
        if good and old.get("share_prefix") != share_prefix:
            meta["share_prefix"] = "mixed"  # shards of both kinds (equal within float rounding)
        else:
            meta["share_prefix"] = share_prefix
        meta["status"] = "incomplete"
        meta.pop("completed", None)
        _write_store_meta(meta_path, meta)
    else:
        if out.exists() and any(out.iterdir()):
            raise StoreError(
                f"{out} exists and is not an activation store; choose an empty or new directory"
            )
        meta = fresh
        _write_store_meta(meta_path, meta)
    done = {s["rows"][0] for s in meta["shards"]}
    starts = [lo for lo in range(0, len(rows), shard_rows) if lo not in done]
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for lo, chunk in _chunks(
        model,
        rows,
        spec,
        shard_rows,
        starts,
        responses,
        progress,
        f"collect {spec.mode} -> {out.name}",
        share_prefix,
    ):
        idx = lo // shard_rows
        tname = f"shards/shard-{idx:05d}.safetensors"
        rname = f"shards/shard-{idx:05d}.json"
        atomic_save_safetensors(out / tname, chunk.acts)
        rows_json: dict[str, Any] = {
            "rows": [lo, lo + len(chunk.rows)],
            "question_ids": [r.question_id for r in chunk.rows],
            "labels": [r.label for r in chunk.rows],
        }
        if spec.mode in ("response", "response-only"):
            rows_json["texts"] = chunk.texts
            rows_json["answer_ids"] = chunk.answer_ids
        atomic_write_json(out / rname, rows_json)
        meta["shards"].append(
            {
                "rows": [lo, lo + len(chunk.rows)],
                "tensors": _shard_record(out, tname),
                "rows_file": _shard_record(out, rname),
            }
        )
        meta["shards"].sort(key=lambda s: s["rows"][0])
        _write_store_meta(meta_path, meta)
    meta["status"] = "complete"
    meta["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_store_meta(meta_path, meta)
    return ActivationStore(out)


def _write_store_meta(path: Path, meta: dict[str, Any]) -> None:
    atomic_write_json(path, with_meta_checksum(meta))
