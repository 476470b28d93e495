"""DCT vectors mapped to labels by a held-out evaluator (map_dct_labels, fit_dct)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ks_lens.errors import ConfigError
from ks_lens.evaluation.readouts import readout_groups
from ks_lens.models.chat import ChatPrompt
from ks_lens.probes import Probe
from ks_lens.steering.base import SteeringSpec
from ks_lens.steering.caa import CAA, SteeringVectors
from ks_lens.steering.dct import DCTConfig, DCTVectors, LabelMap, assign_labels
from ks_lens.types import Model


def map_dct_labels(
    model: Model,
    vectors: DCTVectors,
    prompts: Sequence[ChatPrompt | str],
    evaluator: Probe,
    *,
    batch_size: int = 16,
) -> LabelMap:
    """Map DCT vectors to labels: the gain of every (vector, sign) on ``evaluator``'s labels
    over ``prompts``, each steered at the vectors' norm (see
    :class:`~ks_lens.steering.dct.LabelMap`), and the label assignment
    (:func:`~ks_lens.steering.dct.assign_labels`)."""
    if evaluator.layer < vectors.layer:
        raise ConfigError(
            f"the evaluator (layer {evaluator.layer}) must read at or after the DCT source layer "
            f"({vectors.layer})"
        )
    evaluator.check_compatible(model)
    names = [f"dct{j}" for j in range(vectors.n_vectors)]
    raw = CAA(
        SteeringVectors(
            vectors.vectors,
            label_names=names,
            hook_name=vectors.hook_name,
            model=vectors.model_info,
        ),
        combine="sum",
    )
    steerings = [None] + [
        (raw, SteeringSpec((n,), (), 1.0) if s == 0 else SteeringSpec((), (n,), 1.0))
        for n in names
        for s in range(2)
    ]
    outs = readout_groups(model, prompts, steerings, probe=evaluator, batch_size=batch_size)
    base = outs[0].probs.mean(0)
    gains = torch.stack([o.probs.mean(0) - base for o in outs[1:]]).reshape(
        vectors.n_vectors, 2, evaluator.n_labels
    )
    return assign_labels(gains, evaluator.label_names)


def fit_dct(
    model: Model,
    prompts: Sequence[ChatPrompt | str],
    evaluator: Probe,
    config: DCTConfig,
    *,
    map_prompts: Sequence[ChatPrompt | str] | None = None,
    batch_size: int = 16,
) -> DCTVectors:
    """Learn DCT vectors on ``prompts`` and map them to ``evaluator``'s labels on
    ``map_prompts`` (default the same prompts: the vectors never saw a label)."""
    vecs = DCTVectors.fit(model, prompts, config)
    mapping = map_dct_labels(
        model,
        vecs,
        prompts if map_prompts is None else map_prompts,
        evaluator,
        batch_size=batch_size,
    )
    return vecs.mapped(mapping)
