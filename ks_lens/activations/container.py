"""The in-memory result (:class:`Activations`), and the collection modes and poolings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from einops import rearrange
from jaxtyping import Float, Int

from ks_lens.datasets import base_labels, multi_hot
from ks_lens.errors import ConfigError, StoreError
from ks_lens.hooks import HOOK_KINDS

Mode = Literal["prompt", "response", "response-only", "neutral"]
Pooling = Literal["last", "mean_response"]
MODES: tuple[Mode, ...] = get_args(Mode)
#: the collection poolings (``pooling=``): which tokens' activations are read for each row
POOLINGS: tuple[Pooling, ...] = get_args(Pooling)


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
