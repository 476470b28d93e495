"""ks-lens: multi-direction activation steering on TransformerLens hook points.

One import gives the whole pipeline (models -> data -> activations -> probes -> steering ->
evaluation)::

    import ks_lens as ks

    model = ks.load_model()                                  # SmolLM2-135M-Instruct, offline
    train = ks.load_dataset("tones").split("train").head(60)
    acts = ks.collect_activations(model, train)              # [rows, layers, d_model]
    probes = ks.train_probes(acts)                           # one MLP probe per layer
    k_steer = ks.KSteering(probes[18], steps=3)
    with k_steer.steer(model, target=["casual"], avoid=["expert"], alpha=40.0):
        print(ks.generate(model, "How do I boil an egg?").texts[0])
    caa = ks.CAA(ks.SteeringVectors.fit(acts, 18))           # the baseline, same hook point
    ks.export_gguf(caa, "casual.gguf", target="casual")      # llama.cpp --control-vector

The main functions and classes carry runnable examples (``>>>``); the test suite runs them on
``ks.load_model("tiny-random-llama")``. Submodules hold the rest: :mod:`ks_lens.models`,
:mod:`ks_lens.datasets`, :mod:`ks_lens.activations`, :mod:`ks_lens.probes`,
:mod:`ks_lens.steering`, :mod:`ks_lens.evaluation`, :mod:`ks_lens.text_evaluator`,
:mod:`ks_lens.capability`, :mod:`ks_lens.comparison`, :mod:`ks_lens.analysis`.

``load_model`` changes no TransformerLens default: ``model("text")``, ``run_with_cache`` and
``model.generate`` behave as in plain TL. Hook-name aliases (``blocks.L.hook_resid_post``) and
TL's canonical names (``blocks.L.hook_out``, what ``hook.name`` shows) are one hook point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ks_lens.activations import Activations, collect_activations
from ks_lens.calibration import calibrate_alpha
from ks_lens.datasets import BehaviourDataset, load_dataset
from ks_lens.errors import (
    ConfigError,
    ContextLengthError,
    DatasetError,
    HookPointError,
    KsLensError,
    LabelError,
    MetadataMismatchError,
    MissingDependencyError,
    MissingKeyError,
    ModelLoadError,
    StoreError,
    TrainingError,
    UnknownModelError,
    VersionError,
    VersionMismatchWarning,
    VersionWarning,
    WrongTypeError,
)
from ks_lens.evaluation import kl_metric
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
from ks_lens.logs import configure_logging
from ks_lens.models import NAMED_MODELS, load_model, model_signature
from ks_lens.models.chat import ChatPrompt, TokenBatch, format_chat, tokenize_chat, tokenize_texts
from ks_lens.probes import Probe, ProbeConfig, load_probes, save_probes, train_probe, train_probes
from ks_lens.steering import (
    CAA,
    ControlVector,
    DenseSteering,
    DynamicComposition,
    KProjection,
    KSteering,
    MultiLayer,
    SteeringVectors,
    control_vector,
    export_gguf,
    to_steering_vector,
)
from ks_lens.utils import package_version

if TYPE_CHECKING:  # imported on first use (scikit-learn and SciPy take a while to import)
    from ks_lens.text_evaluator import TextEvaluator, default_text_evaluator

__version__: str = package_version()

# name -> module of the attributes imported on first access (module __getattr__, PEP 562)
_LAZY = {
    "TextEvaluator": "ks_lens.text_evaluator",
    "default_text_evaluator": "ks_lens.text_evaluator",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ks_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CAA",
    "NAMED_MODELS",
    "Activations",
    "BehaviourDataset",
    "ChatPrompt",
    "ConfigError",
    "ContextLengthError",
    "ControlVector",
    "DatasetError",
    "DenseSteering",
    "DynamicComposition",
    "Generation",
    "HookPointError",
    "KProjection",
    "KSteering",
    "KsLensError",
    "LabelError",
    "MetadataMismatchError",
    "MissingDependencyError",
    "MissingKeyError",
    "ModelLoadError",
    "MultiLayer",
    "Probe",
    "ProbeConfig",
    "SteeringVectors",
    "StoreError",
    "TextEvaluator",
    "TokenBatch",
    "TrainingError",
    "UnknownModelError",
    "VersionError",
    "VersionMismatchWarning",
    "VersionWarning",
    "WrongTypeError",
    "__version__",
    "calibrate_alpha",
    "canonical_hook_name",
    "check_hook_name",
    "check_layer",
    "collect_activations",
    "configure_logging",
    "control_vector",
    "default_text_evaluator",
    "export_gguf",
    "format_chat",
    "generate",
    "kl_metric",
    "load_dataset",
    "load_model",
    "load_probes",
    "model_signature",
    "parse_hook",
    "parse_resid_hook",
    "resid_hook",
    "same_hook_point",
    "save_probes",
    "to_steering_vector",
    "tokenize_chat",
    "tokenize_texts",
    "train_probe",
    "train_probes",
]
