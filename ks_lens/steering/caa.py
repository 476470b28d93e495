"""Contrastive activation addition (CAA) and its variants, under the same hooks as K-Steering.

Per-label vectors come from labelled activations at one hook point (last token):

``mean_diff`` (CAA)
    ``v_k = mean(x | label k) - mean(x | label != k)`` over the same questions;
``mean_centring``
    ``v_k = mean(x | label k) - mean(x)``.

Several labels combine into one vector (:meth:`SteeringVectors.combine`):

``combine="mean"``
    ``mean(v_target) - mean(v_avoid)``: the reference multi-label baseline (it "washes out" as
    labels are added);
``combine="sum"``
    ``sum(v_target) - sum(v_avoid)`` (usually with ``normalize=True``: unit L2 norm).

Steering adds ``alpha * v`` to each selected token: ``x' = x + alpha * v``. With
``avoid_mode="ablate"`` the avoid directions are instead projected out of ``x`` (directional
ablation) before the target vector is added.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float

from ks_lens.activations import Activations
from ks_lens.errors import ConfigError, DatasetError, LabelError, MetadataMismatchError, StoreError
from ks_lens.hooks import (
    HOOK_KINDS,
    check_steerable_kind,
    ks_hook_name,
    parse_hook,
    resid_hook,
    same_hook_point,
)
from ks_lens.io import load_artifact, save_artifact
from ks_lens.models import check_signature
from ks_lens.steering.base import Steerer, SteeringSpec, Transform
from ks_lens.steering.config import (
    CAA_COMBINES,
    AvoidMode,
    CaaCombine,
    CAAConfig,
    check_choice,
    resolve_config,
)
from ks_lens.types import Model

VectorMethod = Literal["mean_diff", "mean_centring"]
VECTOR_METHODS: tuple[VectorMethod, ...] = get_args(VectorMethod)
#: how a :class:`SteeringVectors` was made: :meth:`SteeringVectors.fit`'s methods, or trained
#: (``"likelihood"``: :func:`ks_lens.steering.likelihood.train_likelihood_vectors`)
VectorSource = Literal["mean_diff", "mean_centring", "likelihood"]


class SteeringVectors:
    """One steering vector per label at one hook point (``vectors[k]`` is label ``k``'s)."""

    def __init__(
        self,
        vectors: Float[torch.Tensor, "k d_model"],
        *,
        label_names: Sequence[str],
        hook_name: str,
        model: dict[str, Any],
        method: VectorSource = "mean_diff",
        source: dict[str, Any] | None = None,
    ):
        if parse_hook(hook_name)[1] not in HOOK_KINDS:
            check_steerable_kind(hook_name)  # raises, listing where steering may write
        if vectors.ndim != 2 or vectors.shape[0] != len(label_names):
            raise ConfigError(
                f"vectors must be [n_labels={len(label_names)}, d_model], got {tuple(vectors.shape)}"
            )
        d = model.get("d_model") if isinstance(model, dict) else None
        if isinstance(d, int):
            from ks_lens.utils import check_d_model

            check_d_model(vectors, d, "vectors", f"the model {model.get('model')!r}")
        self.vectors = vectors.detach().float()
        self.label_names = tuple(label_names)
        self.hook_name = ks_hook_name(hook_name)  # an alias and its canonical name are one point
        self.layer, self.hook_kind = parse_hook(self.hook_name)
        self.model_info = dict(model)
        self.method = method
        self.source = dict(source or {})

    def __repr__(self) -> str:
        return (
            f"SteeringVectors({self.method}, hook={self.hook_name!r}, labels={list(self.label_names)}, "
            f"model={self.model_info.get('model')!r})"
        )

    @classmethod
    def fit(
        cls,
        acts: Activations,
        layer: int,
        *,
        kind: str = "resid_post",
        method: VectorMethod = "mean_diff",
    ) -> SteeringVectors:
        """Per-label vectors from labelled activations (rows with label ``-1`` are ignored).

        Args:
            acts: :class:`~ks_lens.activations.Activations` collected at ``layer``.
            layer: model layer index (negative counts from the model's last layer).
            kind: the collected hook kind (``"resid_post"``, ``"resid_pre"``, ``"attn_out"``,
                ``"mlp_out"``, ``"resid_mid"``).
            method: ``"mean_diff"`` (``mean(x | k) - mean(x | not k)``) or ``"mean_centring"``
                (``mean(x | k) - mean(x)``).

        Returns:
            :class:`SteeringVectors` with ``.vectors`` ``[n_labels, d_model]`` at
            ``blocks.{layer}.hook_{kind}``.

        Examples:
            >>> vecs = ks.SteeringVectors.fit(acts, 2)
            >>> vecs.hook_name, vecs.vectors.shape == (6, model.cfg.d_model)   # [n_labels, d_model]
            ('blocks.2.hook_resid_post', True)
        """
        check_choice("method", method, VECTOR_METHODS)
        x = acts.at(layer, kind).float()
        n_model = acts.meta.get("model", {}).get("n_layers")
        if isinstance(layer, int) and layer < 0 and isinstance(n_model, int):
            layer = n_model + layer  # as acts.at did
        labels = acts.labels
        keep = labels >= 0
        x, labels = x[keep], labels[keep]
        if len(labels) == 0:
            raise DatasetError("no labelled rows to compute steering vectors from")
        vecs = []
        overall = x.mean(0)
        for k, name in enumerate(acts.label_names):
            sel = labels == k
            if not sel.any():
                raise DatasetError(f"label {name!r} has no rows; cannot compute its vector")
            if method == "mean_diff":
                if (~sel).sum() == 0:
                    raise DatasetError("mean_diff needs rows of at least two labels")
                vecs.append(x[sel].mean(0) - x[~sel].mean(0))
            else:
                vecs.append(x[sel].mean(0) - overall)
        source = {
            "dataset": acts.meta.get("dataset"),
            "split": acts.meta.get("split"),
            "mode": acts.meta.get("collect", {}).get("mode"),
            "n_rows": len(labels),
        }
        return cls(
            torch.stack(vecs),
            label_names=acts.label_names,
            hook_name=resid_hook(layer, kind),
            model=acts.meta.get("model", {}),
            method=method,
            source=source,
        )

    def indices(self, names: Sequence[str]) -> list[int]:
        unknown = [n for n in names if n not in self.label_names]
        if unknown:
            raise LabelError(
                f"unknown label(s) {unknown}; these vectors know {list(self.label_names)}"
            )
        return [self.label_names.index(n) for n in names]

    def combine(
        self,
        target: Sequence[str] = (),
        avoid: Sequence[str] = (),
        *,
        how: CaaCombine = "mean",
        normalize: bool = False,
    ) -> Float[torch.Tensor, " d_model"]:
        """One vector for a target/avoid combination (see the module docstring)."""
        check_choice("combine", how, CAA_COMBINES)
        t = self.indices(target)
        a = self.indices(avoid)
        v = torch.zeros(self.vectors.shape[1])
        reduce = torch.mean if how == "mean" else torch.sum
        if t:
            v = v + reduce(self.vectors[t], dim=0)
        if a:
            v = v - reduce(self.vectors[a], dim=0)
        if normalize:
            n = v.norm()
            if n == 0:
                raise ConfigError("cannot normalise a zero steering vector")
            v = v / n
        return v

    def check_compatible(self, model: Model | None = None) -> None:
        if model is not None:
            check_signature(self.model_info, model, "steering vectors")

    def save(self, directory: str | Path) -> Path:
        meta = {
            "label_names": list(self.label_names),
            "hook_name": self.hook_name,
            "layer": self.layer,
            "model": self.model_info,
            "method": self.method,
            "source": self.source,
            "weights_processed": False,
        }
        return save_artifact(
            directory, {"vectors": self.vectors}, meta, artefact="steering_vectors"
        )

    @classmethod
    def load(
        cls, directory: str | Path, *, model: Model | None = None, hook_name: str | None = None
    ) -> SteeringVectors:
        tensors, meta = load_artifact(directory, artefact="steering_vectors")
        try:
            out = cls(
                tensors["vectors"],
                label_names=meta["label_names"],
                hook_name=meta["hook_name"],
                model=meta["model"],
                method=meta.get("method", "mean_diff"),
                source=meta.get("source"),
            )
        except KeyError as e:
            raise StoreError(f"steering vectors at {directory} are missing {e}") from e
        out.check_compatible(model)
        if hook_name is not None and not same_hook_point(hook_name, out.hook_name):
            raise MetadataMismatchError(
                f"vectors were made at {out.hook_name!r}, not {hook_name!r}"
            )
        return out


class CAA(Steerer):
    """Activation addition with :class:`SteeringVectors`: ``x' = x + alpha * v``.

    ``v`` ``[d_model]`` combines the target (and avoid) labels' vectors; it is added at every
    selected position of the vectors' hook point.

    Examples:
        >>> caa = ks.CAA(ks.SteeringVectors.fit(acts, 2))
        >>> batch = ks.tokenize_chat(model, "How do I boil an egg?")
        >>> with caa.steer(model, target=["casual"], alpha=1.5):
        ...     steered = model(**batch)
        ...     answer = ks.generate(model, "How do I boil an egg?", max_new_tokens=8)
        >>> torch.equal(steered, model(**batch))                # hooks are gone after the block
        False
        >>> x = acts[2][:3]                                     # [3, d_model]
        >>> v = caa.vectors.combine(["casual"])                 # [d_model]
        >>> torch.equal(caa.apply(x, target="casual", alpha=1.5), x + 1.5 * v)
        True

    Args:
        vectors: the per-label vectors; steering happens at ``vectors.hook_name``.
        config: the settings, a :class:`~ks_lens.steering.config.CAAConfig`; or give its fields
            as keyword options (``CAA(vectors, combine="sum")``), not both:
        combine: ``"mean"`` (reference baseline) or ``"sum"`` of the per-label vectors.
        normalize: rescale the combined vector to unit L2 norm (alpha is then the L2 length added).
        avoid_mode: ``"subtract"`` (avoid vectors enter the combination with a minus sign) or
            ``"ablate"`` (project the avoid directions out of ``x``).
    """

    def __init__(self, vectors: SteeringVectors, config: CAAConfig | None = None, **options: Any):
        self.vectors = vectors
        #: the method's settings (validated on construction)
        self.config = resolve_config(CAAConfig, config, options, "CAA")
        self.label_names = vectors.label_names

    @property
    def combine(self) -> CaaCombine:
        return self.config.combine

    @property
    def normalize(self) -> bool:
        return self.config.normalize

    @property
    def avoid_mode(self) -> AvoidMode:
        return self.config.avoid_mode

    def __repr__(self) -> str:
        return f"CAA(hook={self.hook_name!r}, combine={self.combine!r}, normalize={self.normalize}, avoid_mode={self.avoid_mode!r})"

    @property
    def hook_name(self) -> str:
        return self.vectors.hook_name

    def check_model(self, model: Model) -> None:
        self.vectors.check_compatible(model)

    @property
    def d_model(self) -> int:
        return int(self.vectors.vectors.shape[1])

    def vector(self, spec: SteeringSpec) -> Float[torch.Tensor, " d_model"]:
        avoid = spec.avoid if self.avoid_mode == "subtract" else ()
        if not spec.target and not avoid:
            return torch.zeros(self.vectors.vectors.shape[1])
        return self.vectors.combine(spec.target, avoid, how=self.combine, normalize=self.normalize)

    def transform(self, spec: SteeringSpec) -> Transform:
        v = self.vector(spec)
        basis = None
        if self.avoid_mode == "ablate" and spec.avoid:
            a = self.vectors.vectors[self.vectors.indices(spec.avoid)]
            basis, _ = torch.linalg.qr(a.T)  # [d, m] orthonormal columns
        alpha = spec.alpha
        cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]] = {}

        def f(x: Float[torch.Tensor, "n d_model"]) -> Float[torch.Tensor, "n d_model"]:
            key = (x.device, x.dtype)
            if key not in cache:
                cache[key] = (
                    (alpha * v).to(device=x.device, dtype=x.dtype),
                    None if basis is None else basis.to(device=x.device, dtype=torch.float32),
                )
            add, q = cache[key]
            if q is not None:
                xf = x.float()
                x = (xf - (xf @ q) @ q.T).to(x.dtype)
            return x + add

        return f
