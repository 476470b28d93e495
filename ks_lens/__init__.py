"""ks-lens: multi-direction activation steering on TransformerLens hook points.

Quick tour::

    import ks_lens as ks
    model = ks.load_model()                        # SmolLM2-135M-Instruct, offline
    batch = ks.tokenize_chat(model, [ks.ChatPrompt("How do I boil an egg?", system="Be brief.")])
    logits = model(**batch)                        # = model(batch.input_ids, attention_mask=...)

``load_model`` changes no TransformerLens default: ``model("text")``, ``run_with_cache`` and
``model.generate`` behave as in plain TL. Hook-name aliases (``blocks.L.hook_resid_post``) and
TL's canonical names (``blocks.L.hook_out``, what ``hook.name`` shows) are one hook point.
"""

from __future__ import annotations

from ks_lens.chat import ChatPrompt, TokenBatch, format_chat, tokenize_chat, tokenize_texts
from ks_lens.errors import (
    ConfigError,
    ContextLengthError,
    DatasetError,
    HookPointError,
    KsLensError,
    LabelError,
    MetadataMismatchError,
    ModelLoadError,
    StoreError,
    TrainingError,
    UnknownModelError,
)
from ks_lens.generation import Generation, generate
from ks_lens.hooks import (
    canonical_hook_name,
    check_hook_name,
    check_layer,
    parse_hook,
    parse_resid_hook,
    resid_hook,
    same_hook_point,
)
from ks_lens.models import NAMED_MODELS, load_model, model_signature
from ks_lens.utils import package_version

__version__: str = package_version()

__all__ = [
    "NAMED_MODELS",
    "ChatPrompt",
    "ConfigError",
    "ContextLengthError",
    "DatasetError",
    "Generation",
    "HookPointError",
    "KsLensError",
    "LabelError",
    "MetadataMismatchError",
    "ModelLoadError",
    "StoreError",
    "TokenBatch",
    "TrainingError",
    "UnknownModelError",
    "__version__",
    "canonical_hook_name",
    "check_hook_name",
    "check_layer",
    "format_chat",
    "generate",
    "load_model",
    "model_signature",
    "parse_hook",
    "parse_resid_hook",
    "resid_hook",
    "same_hook_point",
    "tokenize_chat",
    "tokenize_texts",
]
