"""The standard setup every study starts from: model, splits, activations, probes, vectors, evaluators.

:func:`prepare` collects (or reuses, from ``work_dir``) the activation stores, trains the steering
probe and CAA vectors on the ``train`` split, and the held-out evaluators on the ``evaluator``
split, and returns them in a :class:`Setup`. ``ks-lens demo`` and the studies in ``analysis/``
share it, so a second study pointed at the same ``work_dir`` reuses the first one's activations.

Where things live:

* :mod:`~ks_lens.pipeline.config`: :class:`PipelineConfig`, the probe sources
  (:data:`PROBE_SOURCES`) and the default steering and evaluator layers (:func:`default_layers`);
* :mod:`~ks_lens.pipeline.layers`: :class:`RunLayers`, the layers each store holds;
* :mod:`~ks_lens.pipeline.checks`: the input checks run before any compute;
* :mod:`~ks_lens.pipeline.kits`: :func:`steering_kit` (steering probe, CAA vectors, linear and
  multi-layer probes) and :func:`texts_dataset`;
* :mod:`~ks_lens.pipeline.setup`: :class:`Setup`, with :meth:`Setup.compare`;
* :mod:`~ks_lens.pipeline.steps`: :func:`prepare`, step by step.
"""

from ks_lens.pipeline.checks import check_held_out, check_question_lengths, check_texts_cover_labels
from ks_lens.pipeline.config import (
    EVAL_GAP,
    PROBE_SOURCES,
    STEER_DEPTH,
    PipelineConfig,
    ProbeSource,
    default_layers,
    eval_gap_note,
    full_comparison,
    probe_source_text,
)
from ks_lens.pipeline.kits import (
    likelihood_vectors,
    needs_likelihood_vectors,
    needs_linear_probe,
    needs_token_probe,
    steering_kit,
    texts_dataset,
    token_steering_probe,
)
from ks_lens.pipeline.layers import RunLayers, StudyLayers
from ks_lens.pipeline.setup import Setup
from ks_lens.pipeline.steps import prepare

__all__ = [
    "EVAL_GAP",
    "PROBE_SOURCES",
    "STEER_DEPTH",
    "PipelineConfig",
    "ProbeSource",
    "RunLayers",
    "Setup",
    "StudyLayers",
    "check_held_out",
    "check_question_lengths",
    "check_texts_cover_labels",
    "default_layers",
    "eval_gap_note",
    "full_comparison",
    "likelihood_vectors",
    "needs_likelihood_vectors",
    "needs_linear_probe",
    "needs_token_probe",
    "prepare",
    "probe_source_text",
    "steering_kit",
    "texts_dataset",
    "token_steering_probe",
]
