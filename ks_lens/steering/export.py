"""Export CAA steering to other runtimes: llama.cpp control vectors (GGUF) and ``steering-vectors``.

CAA's change is one fixed vector per block: ``x' = x + alpha * v`` at
``blocks.{L}.hook_resid_post``, the **output of decoder layer** ``L`` (0-based; HF's
``model.model.layers[L]``). Both export targets number layers the same way:

llama.cpp control vectors (``--control-vector FILE`` / ``--control-vector-scaled FILE S``)
    a GGUF file with ``general.architecture = "controlvector"``, metadata
    ``controlvector.model_hint`` (the model family, e.g. ``"llama"``) and
    ``controlvector.layer_count`` (the number of directions), and one F32 tensor
    ``direction.{L}`` ``[d_model]`` per layer. llama.cpp adds ``S * direction.{L}`` to the
    output of block ``L`` (right after its last residual addition), at every position, prompt
    included. repeng writes the same files (its layer ``i`` is ``model.layers[i]``'s output).
    llama.cpp never steers block 0's output and rejects a file holding ``direction.0``, so a
    vector at layer 0 is refused when writing GGUF.
steering-vectors (``steering_vectors.SteeringVector``)
    ``layer_activations={L: v}`` with ``layer_type="decoder_block"`` adds ``v`` to the output of
    ``model.layers[L]`` (a forward hook), at every position unless ``min_token_index`` /
    ``token_indices`` say otherwise.

So both equal ks-lens's CAA with ``positions="all"`` (the default). Vectors made at any other hook
kind (``resid_pre``, ``attn_out``, ``mlp_out``) have no counterpart in these formats and are
refused with :class:`~ks_lens.errors.HookPointError` (``blocks.{L}.hook_resid_pre`` is the same
point as ``blocks.{L-1}.hook_resid_post``: fit the vectors there instead). K-Steering is not a
fixed vector (its change is a gradient step that depends on the activation), so it cannot be a
control vector; its probes are plain safetensors + JSON (see ``docs/steering.md``).

The exported vector is ``alpha * v`` exactly as CAA adds it (``alpha = 1`` by default, so the
runtime's own scale plays the role of alpha). A :class:`~ks_lens.steering.MultiLayer` of CAA
members exports one direction per member, each with its share of alpha.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from ks_lens.errors import ConfigError, HookPointError, MissingDependencyError, StoreError
from ks_lens.hooks import resid_hook
from ks_lens.steering.base import Steerer, SteeringSpec
from ks_lens.steering.caa import CAA, SteeringVectors
from ks_lens.steering.multilayer import MultiLayer

#: ``general.architecture`` of a llama.cpp control-vector file
CONTROL_VECTOR_ARCH = "controlvector"
#: metadata key holding ks-lens's provenance record (JSON) in an exported GGUF file
PROVENANCE_KEY = "ks_lens.provenance"
_DIRECTION = "direction."


@dataclass(frozen=True, eq=False)
class ControlVector:
    """Per-layer vectors added to the output of decoder block ``L`` (``blocks.{L}.hook_resid_post``).

    Attributes:
        directions: ``{L: vector}``, each a float32 ``[d_model]`` tensor, added as is (already
            multiplied by alpha) at every position.
        model_hint: the model family for llama.cpp's ``controlvector.model_hint`` (e.g.
            ``"llama"``; informational, llama.cpp does not check it).
        provenance: what the vectors were made from (method, labels, alpha, hook points, model);
            stored in the GGUF file under ``ks_lens.provenance``.

    Examples:
        >>> cv = ks.control_vector(ks.SteeringVectors.fit(acts, 2), target=["casual"], alpha=2.0)
        >>> cv.layers, cv.hook_names
        ((2,), ('blocks.2.hook_resid_post',))
        >>> path = cv.save_gguf(tmp / "casual.gguf")       # llama-cli --control-vector casual.gguf
        >>> back = ks.ControlVector.load_gguf(path)
        >>> torch.equal(back.directions[2], cv.directions[2]), back.model_hint
        (True, 'llama')
    """

    directions: Mapping[int, Float[torch.Tensor, " d_model"]]
    model_hint: str = ""
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.directions:
            raise ConfigError("a control vector needs at least one layer's direction")
        clean: dict[int, torch.Tensor] = {}
        width: int | None = None
        for layer, vec in sorted(self.directions.items()):
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ConfigError(f"control-vector layers must be ints >= 0, got {layer!r}")
            if not isinstance(vec, torch.Tensor) or vec.ndim != 1:
                raise ConfigError(
                    f"the direction of layer {layer} must be a 1-D [d_model] tensor, got "
                    f"{tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__}"
                )
            if width is not None and vec.shape[0] != width:
                raise ConfigError(
                    f"the direction of layer {layer} has {vec.shape[0]} entries, the others {width}"
                )
            width = int(vec.shape[0])
            v = vec.detach().to(device="cpu", dtype=torch.float32)
            if not bool(torch.isfinite(v).all()):
                raise ConfigError(f"the direction of layer {layer} has NaN or infinite entries")
            clean[layer] = v
        if not isinstance(self.model_hint, str):
            raise ConfigError(f"model_hint must be a string, got {self.model_hint!r}")
        object.__setattr__(self, "directions", clean)
        object.__setattr__(self, "provenance", dict(self.provenance))

    @property
    def layers(self) -> tuple[int, ...]:
        """The steered blocks, ascending."""
        return tuple(self.directions)

    @property
    def hook_names(self) -> tuple[str, ...]:
        """ks-lens's name for each steered point: ``blocks.{L}.hook_resid_post``."""
        return tuple(resid_hook(layer) for layer in self.layers)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])

    def __repr__(self) -> str:
        return (
            f"ControlVector(layers={list(self.layers)}, d_model={self.d_model}, "
            f"model_hint={self.model_hint!r})"
        )

    # -- llama.cpp ---------------------------------------------------------------------------
    def save_gguf(self, path: str | Path) -> Path:
        """Write a llama.cpp control-vector GGUF file (atomically); returns its path.

        Raises :class:`~ks_lens.errors.HookPointError` for a direction at layer 0, which
        llama.cpp cannot apply (it rejects the whole file).
        """
        if 0 in self.directions:
            raise HookPointError(
                "llama.cpp control vectors cannot steer the output of block 0 (a file with "
                "direction.0 is rejected); use vectors at layer >= 1"
            )
        import gguf

        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a directory; give the .gguf file to write")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            writer = gguf.GGUFWriter(tmp, CONTROL_VECTOR_ARCH)
            writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", self.model_hint)
            writer.add_uint32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(self.directions))
            writer.add_string(PROVENANCE_KEY, json.dumps(self.provenance, sort_keys=True))
            for layer, vec in self.directions.items():
                writer.add_tensor(f"{_DIRECTION}{layer}", vec.numpy().copy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load_gguf(cls, path: str | Path) -> ControlVector:
        """Read a control-vector GGUF file (written by ks-lens, repeng or llama.cpp's
        ``cvector-generator``); raises :class:`~ks_lens.errors.StoreError` if it is not one."""
        import gguf
        import numpy as np

        path = Path(path)
        if not path.is_file():
            raise StoreError(f"no control-vector file at {path}")
        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises ValueError, struct.error, ... on bad bytes
            raise StoreError(f"{path} is not a readable GGUF file ({e})") from e
        arch = _gguf_field(reader, "general.architecture")
        if arch != CONTROL_VECTOR_ARCH:
            raise StoreError(
                f"{path} is a GGUF file of architecture {arch!r}, not a {CONTROL_VECTOR_ARCH!r} file"
            )
        hint = _gguf_field(reader, f"{CONTROL_VECTOR_ARCH}.model_hint")
        raw = _gguf_field(reader, PROVENANCE_KEY)
        try:
            provenance = json.loads(raw) if isinstance(raw, str) else {}
        except json.JSONDecodeError as e:
            raise StoreError(f"{path}: unreadable {PROVENANCE_KEY} ({e})") from e
        directions: dict[int, torch.Tensor] = {}
        for t in reader.tensors:
            suffix = t.name.removeprefix(_DIRECTION)
            if suffix == t.name or not suffix.isdigit():
                raise StoreError(f"{path}: unexpected tensor {t.name!r} (want direction.<layer>)")
            if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
                raise StoreError(f"{path}: tensor {t.name!r} is not a 1-D F32 vector")
            if int(suffix) in directions:
                raise StoreError(f"{path}: tensor {t.name!r} appears twice")
            directions[int(suffix)] = torch.from_numpy(np.array(t.data, dtype=np.float32))
        if not directions:
            raise StoreError(f"{path} holds no direction tensors")
        try:
            return cls(directions, hint if isinstance(hint, str) else "", provenance)
        except ConfigError as e:
            raise StoreError(f"{path}: {e}") from e

    # -- steering-vectors --------------------------------------------------------------------
    def to_steering_vector(self) -> Any:
        """A ``steering_vectors.SteeringVector`` adding the same vectors to the same layers
        (``layer_type="decoder_block"``); apply it with ``with sv.apply(hf_model): ...``.

        Needs the optional ``steering-vectors`` package
        (:class:`~ks_lens.errors.MissingDependencyError` otherwise).
        """
        steering_vector_cls = _steering_vector_class()
        return steering_vector_cls(
            layer_activations={layer: v.clone() for layer, v in self.directions.items()},
            layer_type="decoder_block",
        )


def _gguf_field(reader: Any, key: str) -> str | int | None:
    """A scalar GGUF metadata value (string or integer), or ``None`` if absent or another type."""
    import gguf

    f = reader.fields.get(key)
    if f is None or not f.data or len(f.types) != 1:
        return None
    part = f.parts[f.data[0]]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    if f.types[0] in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
        return None
    return int(part[0])


def _steering_vector_class() -> Any:
    try:
        from steering_vectors import SteeringVector
    except ImportError as e:
        raise MissingDependencyError(
            "exporting to steering-vectors needs the optional package 'steering-vectors'. "
            "Its releases up to 0.12.2 pin transformers<5, which ks-lens cannot use; its other "
            "requirements (torch, tqdm, scikit-learn) are already ks-lens's, so install it with "
            "`pip install --no-deps steering-vectors`"
        ) from e
    return SteeringVector


def model_family(model_info: Mapping[str, Any]) -> str:
    """A llama.cpp-style model family from recorded model metadata: the HF architecture with its
    head suffix removed, lower-cased (``"LlamaForCausalLM"`` -> ``"llama"``); ``""`` if unknown."""
    arch = str(model_info.get("architecture") or "")
    for suffix in ("ForCausalLM", "ForConditionalGeneration", "Model"):
        if arch.endswith(suffix) and len(arch) > len(suffix):
            arch = arch[: -len(suffix)]
            break
    return arch.lower()


def _members(method: Any) -> list[tuple[CAA, float]]:
    """``[(caa, alpha share)]`` of an exportable method; refuses the others clearly."""
    if isinstance(method, SteeringVectors):
        return [(CAA(method), 1.0)]
    if isinstance(method, CAA):
        return [(method, 1.0)]
    if isinstance(method, MultiLayer):
        bad = [type(m).__name__ for m in method.members if not isinstance(m, CAA)]
        if bad:
            raise ConfigError(
                f"only MultiLayer methods made of CAA members export as fixed vectors; this one "
                f"has {bad}"
            )
        return [
            (m, w)
            for m, w in zip(method.members, method.weights, strict=True)
            if isinstance(m, CAA)
        ]
    if isinstance(method, Steerer):
        raise ConfigError(
            f"{type(method).__name__} does not add a fixed vector (its change depends on each "
            "activation), so it has no control-vector form; export SteeringVectors, CAA or a "
            "MultiLayer of CAA (probes save as safetensors + JSON, see docs/steering.md)"
        )
    raise ConfigError(
        f"expected SteeringVectors, CAA or a MultiLayer of CAA, got {type(method).__name__}"
    )


def _check_exportable(caa: CAA, spec: SteeringSpec) -> None:
    if caa.vectors.hook_kind != "resid_post":
        raise HookPointError(
            f"vectors at {caa.hook_name!r} cannot be exported: llama.cpp control vectors and "
            "steering-vectors' decoder_block vectors are added to a block's output, which is "
            "ks-lens's blocks.{L}.hook_resid_post. Fit the vectors at resid_post (the input of "
            "block L, hook_resid_pre, is the output of block L-1)"
        )
    if caa.avoid_mode == "ablate" and spec.avoid:
        raise ConfigError(
            "CAA with avoid_mode='ablate' projects the avoid directions out of each activation, "
            "which a fixed added vector cannot express; export with avoid_mode='subtract' or "
            "without avoid labels"
        )


def control_vector(
    method: SteeringVectors | CAA | MultiLayer,
    target: Sequence[str] | str | None = None,
    avoid: Sequence[str] | str | None = None,
    alpha: float = 1.0,
    *,
    model_hint: str | None = None,
) -> ControlVector:
    """The fixed per-layer vectors ``method`` adds for a target/avoid/alpha spec.

    Args:
        method: :class:`SteeringVectors` (combined as ``CAA(vectors)`` does: the mean of the
            target vectors minus the mean of the avoid vectors), a :class:`CAA` (its
            ``combine`` and ``normalize`` apply), or a :class:`MultiLayer` of CAA members (each
            layer gets ``alpha`` times its weight). Vectors must sit at ``hook_resid_post``.
        target: labels to steer toward, as for ``method.steer``.
        avoid: labels to steer away from, as for ``method.steer``.
        alpha: strength baked into the vectors (``1.0``: leave the scale to the runtime).
        model_hint: overrides ``controlvector.model_hint`` (default: from the model metadata,
            e.g. ``"llama"``).

    Returns:
        :class:`ControlVector` with ``directions[L] = alpha * v`` ``[d_model]``, exactly what
        ``method.steer(model, target, avoid, alpha)`` adds at ``blocks.{L}.hook_resid_post``.

    Examples:
        >>> caa = ks.CAA(ks.SteeringVectors.fit(acts, 2), combine="sum", normalize=True)
        >>> cv = ks.control_vector(caa, target=["casual"], avoid=["expert"], alpha=3.0)
        >>> round(float(cv.directions[2].norm()), 4)              # alpha * unit vector
        3.0
    """
    members = _members(method)
    spec = members[0][0].spec(target, avoid, alpha)  # validates labels and alpha
    directions: dict[int, torch.Tensor] = {}
    for caa, weight in members:
        _check_exportable(caa, spec)
        share = spec.alpha * weight
        directions[caa.vectors.layer] = share * caa.vector(spec)
    info = members[0][0].vectors.model_info
    provenance = {
        "method": type(method).__name__,
        "target": list(spec.target),
        "avoid": list(spec.avoid),
        "alpha": spec.alpha,
        "hook_names": [caa.hook_name for caa, _ in members],
        "members": [
            {
                "hook_name": caa.hook_name,
                "alpha_share": weight,
                "vectors_method": caa.vectors.method,
                "combine": caa.combine,
                "normalize": caa.normalize,
            }
            for caa, weight in members
        ],
        "model": dict(info),
        "weights_processed": False,
        "positions": "all",
    }
    hint = model_family(info) if model_hint is None else model_hint
    return ControlVector(directions, hint, provenance)


def export_gguf(
    method: SteeringVectors | CAA | MultiLayer,
    path: str | Path,
    target: Sequence[str] | str | None = None,
    avoid: Sequence[str] | str | None = None,
    alpha: float = 1.0,
    *,
    model_hint: str | None = None,
) -> Path:
    """Write ``method``'s vectors for a spec as a llama.cpp control-vector GGUF file.

    Same arguments as :func:`control_vector`; returns the path written. llama.cpp's
    ``--control-vector-scaled FILE S`` then adds ``S * alpha * v`` to the output of each layer.

    Examples:
        >>> vecs = ks.SteeringVectors.fit(acts, 2)
        >>> ks.export_gguf(vecs, tmp / "casual.gguf", target="casual").name
        'casual.gguf'
    """
    return control_vector(method, target, avoid, alpha, model_hint=model_hint).save_gguf(path)


def to_steering_vector(
    method: SteeringVectors | CAA | MultiLayer,
    target: Sequence[str] | str | None = None,
    avoid: Sequence[str] | str | None = None,
    alpha: float = 1.0,
) -> Any:
    """``method``'s vectors for a spec as a ``steering_vectors.SteeringVector``.

    ``with sv.apply(hf_model):`` then steers a plain HF model as ``method.steer(model, target,
    avoid, alpha)`` steers the ks-lens model (all positions; ``multiplier`` scales on top).
    Needs the optional ``steering-vectors`` package (see :meth:`ControlVector.to_steering_vector`).
    """
    return control_vector(method, target, avoid, alpha).to_steering_vector()
