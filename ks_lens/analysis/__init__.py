"""Analysis tools: layer sweeps, gradient geometry, vanishing-tone diagnosis, token views.

Functions return plain data (dataclasses, tensors, dict records) for notebooks; the runnable
studies in the repository's ``analysis/`` folder call them and write JSON, PNG and HTML.
"""

from ks_lens.analysis.geometry import (
    DirectionStats,
    LabelGeometry,
    Rotation,
    cosine,
    direction_stats,
    label_gradient_geometry,
    multistep_rotation,
    step_directions,
)
from ks_lens.analysis.sweep import layer_sweep, probe_accuracy_by_layer, recommend_layer
from ks_lens.analysis.vanishing import Diagnosis, TargetDiagnosis, classify_cause, diagnose

__all__ = [
    "Diagnosis",
    "DirectionStats",
    "LabelGeometry",
    "Rotation",
    "TargetDiagnosis",
    "classify_cause",
    "cosine",
    "diagnose",
    "direction_stats",
    "label_gradient_geometry",
    "layer_sweep",
    "multistep_rotation",
    "probe_accuracy_by_layer",
    "recommend_layer",
    "step_directions",
]
