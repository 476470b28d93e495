"""DCT vectors: unsupervised steering vectors mapped to labels (a baseline, after Mack & Turner).

Deep causal transcoding / MELBO learns, without labels, ``K`` directions ``theta_k`` (each of
norm ``R``) that, added at a *source* layer's residual stream (every position), change a
*target* layer a few blocks later as much as possible:

    maximise  f(theta) = mean over prompts and tokens of ||h_t(x + theta) - h_t(x)||_2 ** p
    subject to ||theta_k|| = R and theta_k orthogonal to theta_1 .. theta_{k-1}

by projected gradient ascent (:func:`fit_directions`): a step along each vector's gradient
tangent to its sphere, then Gram-Schmidt in order and rescaling to ``R``. For a linear map
``h_t = W x`` and ``p = 2`` the vectors are ``W``'s top right-singular vectors, in order.

The vectors know nothing of labels. :func:`~ks_lens.evaluation.map_dct_labels` steers
calibration questions with each vector, both signs, at norm ``R`` and reads the held-out
activation evaluator: the gain of a (vector, sign) for a label is the mean rise of that label's
probability over the unsteered pass. Each label gets its best (vector, sign); while vectors
remain, no vector serves two labels (greedy by gain), so the mapped directions of a label set
are orthogonal. :class:`DCT` steers toward a label set like multi-label CAA:
``x' = x + alpha * v / |v|``, ``v = sum(sign_t u_t for targets) - sum(sign_a u_a for avoided
labels)`` (``u``: the unit vectors).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from ks_lens._runtime.batching import sorted_batches
from ks_lens._runtime.hf_path import (
    can_bypass,
    decoder_layers,
    layer_input,
    plain_forward,
    resume_at,
)
from ks_lens.errors import ConfigError, LabelError, StoreError
from ks_lens.hooks import check_layer, resid_hook
from ks_lens.io import load_artifact, save_artifact
from ks_lens.models import check_signature, model_device, model_signature, pad_token_id
from ks_lens.models.chat import ChatPrompt, TokenBatch, encode_chat
from ks_lens.steering.base import Steerer, SteeringSpec, Transform
from ks_lens.types import Model

log = logging.getLogger(__name__)

#: (values ``[K]``, gradient ``[K, d]``) of the objective at ``theta`` ``[K, d]``
ValueAndGrad = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DCTSettings:
    """How DCT vectors are learned, wherever they sit (the ``--dct.*`` options of ``ks-lens
    demo``; validated on construction). The source layer is the method's steering layer.

    ``radius`` is the norm of every vector; ``None`` takes ``radius_fraction`` times the median
    token norm of the source activations on the training prompts. ``lr`` is the step along
    each vector's sphere as a fraction of ``radius``, decaying linearly to 0 over ``steps``.
    ``batch_size`` counts rows per forward pass (``n_vectors`` rows per prompt).
    """

    target_offset: int = 3  # target layer = source layer + this (capped at the last layer)
    n_vectors: int = 8  # orthogonal vectors learned (a comparison raises it to its label count)
    radius: float | None = None  # norm of every vector (None: radius_fraction x median norm)
    radius_fraction: float = 0.5  # radius as a fraction of the median source token norm
    steps: int = 30  # projected gradient ascent steps
    lr: float = 0.3  # step as a fraction of the radius, decaying linearly to 0
    power: float = 2.0  # exponent p of the objective mean ||delta||^p
    batch_size: int = 32  # rows per forward pass while learning

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        ints = {
            "target_offset": 1,
            "n_vectors": 1,
            "steps": 1,
            "batch_size": 1,
            **({"source_layer": 0} if isinstance(self, DCTConfig) else {}),
        }
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{self._prefix}{name} must be an integer >= {low}, got {v!r}")
        positive = ["radius_fraction", "lr", "power"] + ([] if self.radius is None else ["radius"])
        for name in positive:
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v <= 0
            ):
                raise ConfigError(
                    f"{self._prefix}{name} must be a positive finite number, got {v!r}"
                )

    @property
    def _prefix(self) -> str:
        return "dct."  # the option's spelling (--dct.steps)

    def config(
        self, model: Model, source_layer: int, *, seed: int = 0, min_vectors: int = 1
    ) -> DCTConfig:
        """The :class:`DCTConfig` of these settings at ``source_layer`` of ``model``: the target
        offset is capped at the model's last layer, and ``n_vectors`` raised to ``min_vectors``
        (a comparison passes its number of labels, so that :func:`assign_labels` gives every
        label its own vector and no label set's directions can cancel); both logged."""
        room = int(model.cfg.n_layers) - 1 - source_layer
        if room < 1:
            raise ConfigError(
                f"DCT needs a target layer after the source layer {source_layer}; the model's "
                f"last layer is {int(model.cfg.n_layers) - 1}"
            )
        offset = min(self.target_offset, room)
        if offset < self.target_offset:
            log.info(
                f"  DCT target offset {self.target_offset} capped at {offset} (source layer "
                f"{source_layer}, last layer {int(model.cfg.n_layers) - 1})"
            )
        n_vectors = max(self.n_vectors, min_vectors)
        if n_vectors > self.n_vectors:
            log.info(f"  DCT n_vectors {self.n_vectors} raised to {n_vectors} (one per label)")
        kw = {**asdict(self), "target_offset": offset, "n_vectors": n_vectors}
        return DCTConfig(source_layer=source_layer, seed=seed, **kw)


@dataclass(frozen=True, kw_only=True)
class DCTConfig(DCTSettings):
    """:class:`DCTSettings` at a given ``source_layer``, with the ``seed`` of the random start
    (validated here, on construction)."""

    source_layer: int
    seed: int = 0

    def __post_init__(self) -> None:
        self._check()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"DCTConfig.seed must be an integer, got {self.seed!r}")

    @property
    def _prefix(self) -> str:
        return "DCTConfig."

    @property
    def target_layer(self) -> int:
        return self.source_layer + self.target_offset

    def check_model(self, model: Model) -> None:
        """Both layers must exist and the model must be wide enough for ``n_vectors``."""
        n, d = int(model.cfg.n_layers), int(model.cfg.d_model)
        if self.target_layer >= n:
            raise ConfigError(
                f"DCT target layer {self.target_layer} (source {self.source_layer} + offset "
                f"{self.target_offset}) is beyond the model's last layer {n - 1}"
            )
        check_layer(model, self.source_layer)
        if self.n_vectors > d:
            raise ConfigError(f"{self.n_vectors} orthogonal vectors do not fit in d_model={d}")

    @classmethod
    def for_model(cls, model: Model, source_layer: int, **kw: Any) -> DCTConfig:
        """Defaults for ``model`` at ``source_layer``: the offset is capped at the last layer."""
        room = int(model.cfg.n_layers) - 1 - source_layer
        if room < 1:
            raise ConfigError(
                f"DCT needs a target layer after the source layer {source_layer}; the model's "
                f"last layer is {int(model.cfg.n_layers) - 1}"
            )
        kw.setdefault("target_offset", min(DCTSettings().target_offset, room))
        return cls(source_layer=source_layer, **kw)


# ----------------------------------------------------------------------------- the objective


def objective(
    delta: Float[torch.Tensor, "n pos d"], mask: torch.Tensor, power: float
) -> torch.Tensor:
    """Sum over the ``mask``-ed tokens of ``||delta||_2 ** power`` (divide by the token count
    for the mean)."""
    norms = delta.float().norm(dim=-1)
    return (norms.clamp_min(1e-12) ** power * mask.to(norms.dtype)).sum()


def orthonormalise(theta: Float[torch.Tensor, "k d"]) -> Float[torch.Tensor, "k d"]:
    """Gram-Schmidt in row order (row ``k`` keeps its component orthogonal to rows ``< k``)."""
    out: list[torch.Tensor] = []
    for v in theta:
        for u in out:
            v = v - (v @ u) * u
        n = v.norm()
        if n < 1e-12:
            raise ConfigError("DCT vectors became linearly dependent; use fewer n_vectors")
        out.append(v / n)
    return torch.stack(out)


def fit_directions(
    value_and_grad: ValueAndGrad, d: int, config: DCTConfig, radius: float
) -> tuple[Float[torch.Tensor, "k d"], torch.Tensor]:
    """Projected gradient ascent of ``config.n_vectors`` orthogonal vectors of norm ``radius``.

    Returns the vectors ``[K, d]`` and their final objective values ``[K]``. Each step moves
    every vector by ``lr_t * radius`` along its gradient's component tangent to the sphere
    (``lr_t`` decays linearly from ``config.lr``), then re-orthonormalises in order.
    """
    gen = torch.Generator().manual_seed(config.seed)
    theta = radius * orthonormalise(torch.randn(config.n_vectors, d, generator=gen))
    for t in range(config.steps):
        _, g = value_and_grad(theta)
        u = theta / radius
        tangent = g - (g * u).sum(-1, keepdim=True) * u
        norm = tangent.norm(dim=-1, keepdim=True)
        step = torch.where(norm > 0, tangent / norm.clamp_min(1e-30), torch.zeros_like(tangent))
        lr = config.lr * (1 - t / config.steps)
        theta = radius * orthonormalise(theta + lr * radius * step)
    values, _ = value_and_grad(theta)
    return theta, values


class _Reached(Exception):
    """Ends a training pass once the target layer has been read."""


def _prompt_batches(
    model: Model, prompts: Sequence[ChatPrompt | str], batch_size: int
) -> list[TokenBatch]:
    tok = model.tokenizer
    ids = [encode_chat(tok, p) for p in prompts]
    return [
        b
        for _, b in sorted_batches(
            ids, batch_size, pad_id=pad_token_id(tok), device=model_device(model)
        )
    ]


def _run_to(
    model: Model,
    batch: TokenBatch,
    hooks: dict[str, Callable[[torch.Tensor], torch.Tensor | None]],
    resume: tuple[int, torch.Tensor, bool] | None = None,
) -> None:
    """Forward ``batch`` with ``hooks`` (hook name -> fn(act) returning a replacement or None);
    the pass ends when the last hook (the target) has run. ``resume = (layer, hidden,
    as_tuple)`` skips the layers below ``layer``, feeding it ``hidden``
    (:func:`~ks_lens._runtime.hf_path.resume_at`)."""
    last = list(hooks)[-1]

    def wrap(name: str) -> Callable[..., Any]:
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor | None:
            out = hooks[name](act)
            if name == last:
                raise _Reached
            return out

        return hook

    with contextlib.ExitStack() as stack:
        stack.enter_context(model.hooks(fwd_hooks=[(n, wrap(n)) for n in hooks]))
        if resume is not None:
            stack.enter_context(resume_at(model, *resume))
        try:
            plain_forward(
                model, batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=-1
            )
        except _Reached:
            pass


def _keep(box: dict[str, torch.Tensor], key: str) -> Callable[[torch.Tensor], None]:
    """A hook body that keeps the activation in ``box[key]`` (gradient intact)."""

    def keep(act: torch.Tensor) -> None:
        box[key] = act

    return keep


def _adder(add: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A hook body adding ``add`` (``[rows, 1, d]``, gradient intact) at every position."""

    def f(act: torch.Tensor) -> torch.Tensor:
        return act + add.to(act.dtype)

    return f


def _model_objective(
    model: Model, batches: Sequence[TokenBatch], config: DCTConfig, k: int
) -> tuple[ValueAndGrad, float]:
    """The model's objective as a :data:`ValueAndGrad` and the median source token norm."""
    src, tgt = resid_hook(config.source_layer), resid_hook(config.target_layer)
    base: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    with torch.no_grad():
        for b in batches:
            box: dict[str, torch.Tensor] = {}
            _run_to(model, b, {src: _keep(box, "s"), tgt: _keep(box, "t")})
            base.append(box["t"].detach())
            norms.append(box["s"].float().norm(dim=-1)[b.attention_mask.bool()].cpu())
    n_tokens = sum(int(b.attention_mask.sum()) for b in batches)
    # the layers below the source run once: each step resumes at the source layer
    start = config.source_layer
    shared = start >= 1 and can_bypass(model) and decoder_layers(model) is not None
    inputs = (
        [layer_input(model, start, b.input_ids, b.attention_mask) for b in batches]
        if shared
        else []
    )

    def value_and_grad(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.zeros(k)
        grad = torch.zeros_like(theta)
        per = max(1, config.batch_size // k)  # prompts per pass: K rows each
        for i, (b, h0) in enumerate(zip(batches, base, strict=True)):
            for s in range(0, b.input_ids.shape[0], per):
                ids, mask = b.input_ids[s : s + per], b.attention_mask[s : s + per]
                n = ids.shape[0]
                th = theta.detach().clone().requires_grad_(True)
                add = th.to(model_device(model)).repeat_interleave(n, 0)[:, None, :]
                box: dict[str, torch.Tensor] = {}
                resume = None
                if shared:
                    hidden, as_tuple = inputs[i]
                    resume = (start, hidden[s : s + per].repeat(k, 1, 1), as_tuple)
                _run_to(
                    model,
                    TokenBatch(ids.repeat(k, 1), mask.repeat(k, 1)),
                    {src: _adder(add), tgt: _keep(box, "t")},
                    resume,
                )
                delta = box["t"] - h0[s : s + per].repeat(k, 1, 1)
                per_vec = torch.stack(
                    [objective(delta[j * n : (j + 1) * n], mask, config.power) for j in range(k)]
                )
                (g,) = torch.autograd.grad(per_vec.sum(), th)
                values += per_vec.detach().cpu()
                grad += g.float().cpu()
        return values / n_tokens, grad / n_tokens

    return value_and_grad, float(torch.cat(norms).median())


# ----------------------------------------------------------------------------- label mapping


@dataclass(frozen=True)
class LabelMap:
    """Which (vector, sign) steers each label, from the evaluator's probability gains.

    ``gains[k, s, l]``: mean rise of label ``l``'s probability when steering with vector ``k``
    with sign ``+`` (``s = 0``) or ``-`` (``s = 1``), over the unsteered pass.
    """

    label_names: tuple[str, ...]
    gains: torch.Tensor  # [K, 2, L]
    vector: tuple[int, ...]  # per label
    sign: tuple[int, ...]  # per label, +1 or -1

    def table(self) -> list[dict[str, Any]]:
        """One row per label: its vector, sign and gain."""
        return [
            {
                "label": lab,
                "vector": v,
                "sign": s,
                "gain": float(self.gains[v, 0 if s > 0 else 1, i]),
            }
            for i, (lab, v, s) in enumerate(
                zip(self.label_names, self.vector, self.sign, strict=True)
            )
        ]


def assign_labels(gains: torch.Tensor, label_names: Sequence[str]) -> LabelMap:
    """Each label's best (vector, sign) by gain; greedy over all (gain, label, vector, sign) in
    decreasing gain, a vector serving one label only while there are as many vectors as labels
    (ties break by the lower index)."""
    k, two, n = gains.shape
    if two != 2 or n != len(label_names):
        raise ConfigError(f"gains must be [K, 2, {len(label_names)}], got {tuple(gains.shape)}")
    unique = k >= n
    order = sorted(
        ((float(gains[v, s, i]), i, v, s) for v in range(k) for s in range(2) for i in range(n)),
        key=lambda r: (-r[0], r[1], r[2], r[3]),
    )
    vec: dict[int, int] = {}
    sgn: dict[int, int] = {}
    used: set[int] = set()
    for _, i, v, s in order:
        if i in vec or (unique and v in used):
            continue
        vec[i], sgn[i] = v, 1 if s == 0 else -1
        used.add(v)
    return LabelMap(
        tuple(label_names),
        gains.clone(),
        tuple(vec[i] for i in range(n)),
        tuple(sgn[i] for i in range(n)),
    )


# ----------------------------------------------------------------------------- the artefact


class DCTVectors:
    """``K`` orthogonal vectors of norm ``radius`` at a source hook point, and (once mapped) the
    :class:`LabelMap` that gives them labels."""

    def __init__(
        self,
        vectors: Float[torch.Tensor, "k d_model"],
        *,
        config: DCTConfig,
        radius: float,
        values: torch.Tensor,
        model: dict[str, Any],
        mapping: LabelMap | None = None,
    ):
        if vectors.ndim != 2 or vectors.shape[0] != config.n_vectors:
            raise ConfigError(
                f"vectors must be [n_vectors={config.n_vectors}, d_model], "
                f"got {tuple(vectors.shape)}"
            )
        self.vectors = vectors.detach().float()
        self.config = config
        self.radius = float(radius)
        self.values = values.detach().float()
        self.model_info = dict(model)
        self.mapping = mapping
        self.hook_name = resid_hook(config.source_layer)
        self.layer = config.source_layer

    @property
    def n_vectors(self) -> int:
        return int(self.vectors.shape[0])

    def __repr__(self) -> str:
        mapped = list(self.mapping.label_names) if self.mapping else "unmapped"
        return (
            f"DCTVectors(K={self.n_vectors}, {self.hook_name} -> layer {self.config.target_layer}, "
            f"radius={self.radius:.4g}, labels={mapped})"
        )

    @classmethod
    def fit(
        cls, model: Model, prompts: Sequence[ChatPrompt | str], config: DCTConfig
    ) -> DCTVectors:
        """Learn the vectors on ``prompts`` (no labels; see the module docstring)."""
        config.check_model(model)
        if not prompts:
            raise ConfigError("DCT needs at least one training prompt")
        batches = _prompt_batches(model, prompts, config.batch_size)
        vg, median_norm = _model_objective(model, batches, config, config.n_vectors)
        radius = config.radius_fraction * median_norm if config.radius is None else config.radius
        theta, values = fit_directions(vg, int(model.cfg.d_model), config, radius)
        return cls(theta, config=config, radius=radius, values=values, model=model_signature(model))

    def mapped(self, mapping: LabelMap) -> DCTVectors:
        if mapping.gains.shape[0] != self.n_vectors:
            raise ConfigError(
                f"the mapping has {mapping.gains.shape[0]} vectors, not {self.n_vectors}"
            )
        return DCTVectors(
            self.vectors,
            config=self.config,
            radius=self.radius,
            values=self.values,
            model=self.model_info,
            mapping=mapping,
        )

    def check_compatible(self, model: Model | None = None) -> None:
        if model is not None:
            check_signature(self.model_info, model, "DCT vectors")

    def save(self, directory: str | Path) -> Path:
        tensors = {"vectors": self.vectors, "values": self.values}
        meta: dict[str, Any] = {
            "hook_name": self.hook_name,
            "layer": self.layer,
            "target_layer": self.config.target_layer,
            "model": self.model_info,
            "config": asdict(self.config),
            "radius": self.radius,
            "mapping": None,
        }
        if self.mapping is not None:
            tensors["gains"] = self.mapping.gains
            meta["mapping"] = {
                "label_names": list(self.mapping.label_names),
                "table": self.mapping.table(),
            }
        return save_artifact(directory, tensors, meta, artefact="dct_vectors")

    @classmethod
    def load(cls, directory: str | Path, *, model: Model | None = None) -> DCTVectors:
        tensors, meta = load_artifact(directory, artefact="dct_vectors")
        try:
            mapping = None
            if meta["mapping"] is not None:
                table = meta["mapping"]["table"]
                mapping = LabelMap(
                    tuple(meta["mapping"]["label_names"]),
                    tensors["gains"],
                    tuple(int(r["vector"]) for r in table),
                    tuple(int(r["sign"]) for r in table),
                )
            out = cls(
                tensors["vectors"],
                config=DCTConfig(**meta["config"]),
                radius=float(meta["radius"]),
                values=tensors["values"],
                model=meta["model"],
                mapping=mapping,
            )
        except KeyError as e:
            raise StoreError(f"DCT vectors at {directory} are missing {e}") from e
        out.check_compatible(model)
        return out


# ----------------------------------------------------------------------------- the steerer


class DCT(Steerer):
    """Steering with mapped :class:`DCTVectors`: ``x' = x + alpha * v / |v|`` (see the module
    docstring for ``v``); ``alpha`` is the L2 length added, like ``caa_sum``."""

    def __init__(self, vectors: DCTVectors):
        if vectors.mapping is None:
            raise ConfigError(
                "these DCT vectors are not mapped to labels yet "
                "(ks_lens.evaluation.map_dct_labels or fit_dct)"
            )
        self.vectors = vectors
        self.mapping = vectors.mapping
        self.label_names = vectors.mapping.label_names

    def __repr__(self) -> str:
        return f"DCT({self.vectors!r})"

    @property
    def hook_name(self) -> str:
        return self.vectors.hook_name

    @property
    def d_model(self) -> int:
        return int(self.vectors.vectors.shape[1])

    def check_model(self, model: Model) -> None:
        self.vectors.check_compatible(model)

    def direction(self, spec: SteeringSpec) -> Float[torch.Tensor, " d_model"]:
        """The unit steering direction for ``spec``."""
        units = self.vectors.vectors / self.vectors.vectors.norm(dim=-1, keepdim=True)
        v = torch.zeros(units.shape[1])
        for names, sign in ((spec.target, 1.0), (spec.avoid, -1.0)):
            for name in names:
                if name not in self.label_names:
                    raise LabelError(f"unknown label {name!r}; DCT knows {list(self.label_names)}")
                i = self.label_names.index(name)
                v = v + sign * self.mapping.sign[i] * units[self.mapping.vector[i]]
        n = v.norm()
        if n < 1e-6:
            raise ConfigError(
                f"target {list(spec.target)} and avoid {list(spec.avoid)} map to DCT directions "
                "that cancel out (labels sharing a vector with opposite signs); nothing to steer "
                f"with. Learn at least one vector per label (n_vectors >= {len(self.label_names)}) "
                "so that every label gets its own"
            )
        return v / n

    def transform(self, spec: SteeringSpec) -> Transform:
        add = spec.alpha * self.direction(spec)
        cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

        def f(x: Float[torch.Tensor, "n d_model"]) -> Float[torch.Tensor, "n d_model"]:
            key = (x.device, x.dtype)
            if key not in cache:
                cache[key] = add.to(device=x.device, dtype=x.dtype)
            return x + cache[key]

        return f
