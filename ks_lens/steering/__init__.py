"""Steering methods under TransformerLens hooks: K-Steering, projection removal and CAA.

Every method is a :class:`SteeringMethod`: ``with method.steer(model, target=..., avoid=...,
alpha=...)`` installs hooks for the block and removes them on exit; ``method.hooks(...)`` gives
``run_with_hooks``-ready hook functions. The single-hook methods (K-Steering, CAA, DCT) are
:class:`Steerer` instances, and ``method.apply(x, ...)`` steers a tensor directly;
:class:`MultiLayer` steers several hook points at once, :class:`DenseSteering` one probe's step at a band of
layers, :class:`DynamicComposition` (DAC) re-weights CAA's labels at each generation step. Their settings are :class:`KSteeringConfig` and
:class:`CAAConfig` (:mod:`ks_lens.steering.config`). CAA's vectors export to llama.cpp control
vectors and ``steering-vectors`` (:mod:`ks_lens.steering.export`).
"""

from ks_lens.steering.base import (
    Steerer,
    SteeringMethod,
    SteeringSpec,
    grouped_steering_hook,
    steer_groups,
    steering_hook,
)
from ks_lens.steering.caa import CAA, SteeringVectors
from ks_lens.steering.config import CAAConfig, KSteeringConfig
from ks_lens.steering.dac import DACConfig, DynamicComposition, generate_composed
from ks_lens.steering.dct import DCT, DCTConfig, DCTVectors
from ks_lens.steering.dense import DenseSteering, dense_band
from ks_lens.steering.export import (
    ControlVector,
    control_vector,
    export_gguf,
    to_steering_vector,
)
from ks_lens.steering.ksteer import (
    KProjection,
    KSteering,
    clip_step,
    combine_gradients,
    label_coefficients,
    objective_value,
    probe_gradients,
)
from ks_lens.steering.likelihood import LikelihoodConfig, train_likelihood_vectors
from ks_lens.steering.multilayer import MultiLayer
from ks_lens.steering.positions import POSITIONS, PositionTracker

__all__ = [
    "CAA",
    "DCT",
    "POSITIONS",
    "CAAConfig",
    "ControlVector",
    "DACConfig",
    "DCTConfig",
    "DCTVectors",
    "DenseSteering",
    "DynamicComposition",
    "KProjection",
    "KSteering",
    "KSteeringConfig",
    "LikelihoodConfig",
    "MultiLayer",
    "PositionTracker",
    "Steerer",
    "SteeringMethod",
    "SteeringSpec",
    "SteeringVectors",
    "clip_step",
    "combine_gradients",
    "control_vector",
    "dense_band",
    "export_gguf",
    "generate_composed",
    "grouped_steering_hook",
    "label_coefficients",
    "objective_value",
    "probe_gradients",
    "steer_groups",
    "steering_hook",
    "to_steering_vector",
    "train_likelihood_vectors",
]
