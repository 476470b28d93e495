"""Analysis tools: layer sweeps, gradient geometry, vanishing-tone diagnosis, token views.

Functions return plain data (dataclasses, tensors, dict records) for notebooks; the runnable
studies in the repository's ``analysis/`` folder call them and write JSON, PNG and HTML. The
modules are named for what they hold, not after those studies: :mod:`~ks_lens.analysis.directions`
(K-Steering step directions against CAA vectors; ``analysis/geometry.py``),
:mod:`~ks_lens.analysis.diagnosis` (the vanishing-tone diagnosis; ``analysis/vanishing.py``),
:mod:`~ks_lens.analysis.sweep` and :mod:`~ks_lens.analysis.viz`.
"""

from ks_lens.analysis.diagnosis import (
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
from ks_lens.analysis.directions import (
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
