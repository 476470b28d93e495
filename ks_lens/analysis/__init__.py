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
    pca_explained,
    step_directions,
)
from ks_lens.analysis.sweep import (
    DEFAULT_EVAL_GAP,
    EvalPlacement,
    LayerAccuracy,
    LayerChoice,
    LayerRecord,
    Recommendation,
    evaluator_placement,
    layer_sweep,
    probe_accuracy_by_layer,
    recommend,
    recommend_layer,
    train_evaluators,
)
from ks_lens.analysis.vanishing import (
    Diagnosis,
    RemedyRow,
    RemedyVerdict,
    TargetDiagnosis,
    VanishedCase,
    best_remedy,
    classify_cause,
    diagnose,
    diagnose_cases,
    remedy_table,
    vanished_cases,
)

__all__ = [
    "DEFAULT_EVAL_GAP",
    "Diagnosis",
    "DirectionStats",
    "EvalPlacement",
    "LabelGeometry",
    "LayerAccuracy",
    "LayerChoice",
    "LayerRecord",
    "Recommendation",
    "RemedyRow",
    "RemedyVerdict",
    "Rotation",
    "TargetDiagnosis",
    "VanishedCase",
    "best_remedy",
    "classify_cause",
    "cosine",
    "diagnose",
    "diagnose_cases",
    "direction_stats",
    "evaluator_placement",
    "label_gradient_geometry",
    "layer_sweep",
    "multistep_rotation",
    "pca_explained",
    "probe_accuracy_by_layer",
    "recommend",
    "recommend_layer",
    "remedy_table",
    "step_directions",
    "train_evaluators",
    "vanished_cases",
]
