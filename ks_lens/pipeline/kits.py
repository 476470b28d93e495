"""The steering artefacts a run trains (:func:`steering_kit`), and labelled texts as a dataset."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from ks_lens.activations import Activations, collect_token_activations
from ks_lens.comparison import (
    LINEAR_PROBE_METHODS,
    TOKEN_PROBE_METHODS,
    ComparisonConfig,
    SteeringKit,
)
from ks_lens.comparison.config import split_method
from ks_lens.datasets import (
    Behaviour,
    BehaviourDataset,
    Question,
)
from ks_lens.datasets.gold_texts import (
    LabelledText,
    texts_hash,
)
from ks_lens.errors import ConfigError, KsLensError
from ks_lens.io import META_FILE, TENSORS_FILE
from ks_lens.pipeline.config import PipelineConfig
from ks_lens.probes import Probe, ProbeConfig, train_probe, train_probes, train_token_probe
from ks_lens.steering import SteeringVectors
from ks_lens.steering.likelihood import LikelihoodConfig, train_likelihood_vectors
from ks_lens.steering.registry import LIKELIHOOD_METHODS
from ks_lens.types import Model

log = logging.getLogger("ks_lens.pipeline")
T = TypeVar("T")


def needs_linear_probe(config: ComparisonConfig) -> bool:
    """Whether a method of ``config`` steers with a linear probe (``ksteer_linear``)."""
    return any(split_method(m)[0] in LINEAR_PROBE_METHODS for m in config.methods)


def needs_token_probe(config: ComparisonConfig) -> bool:
    """Whether a method of ``config`` steers with the per-token probe (``ksteer_token``)."""
    return any(split_method(m)[0] in TOKEN_PROBE_METHODS for m in config.methods)


def token_steering_probe(
    model: Model,
    texts: Sequence[LabelledText],
    labels: Sequence[str],
    layer: int,
    cfg: PipelineConfig,
    *,
    groups: Mapping[str, str] | None = None,
    directory: str | Path | None = None,
    progress: bool = False,
) -> Probe:
    """The per-token steering probe at ``layer``: every answer token (the first
    ``cfg.token_probe_tokens``) of ``texts`` teacher-forced after its question without
    instruction (:func:`~ks_lens.activations.collect_token_activations`), each labelled with its
    text's labels, trained with the steering probe's settings
    (:func:`~ks_lens.probes.train_token_probe`). ``groups`` maps text ids to questions, so that
    validation holds out whole questions (the split of the final-token probe on the same texts).

    With ``directory`` the probe is reused from there when one saved there was made for this
    model, layer, labels, token count, probe settings, texts and grouping (else collected,
    trained and saved there): the per-token rows take minutes to collect.
    """
    pcfg = ProbeConfig(seed=cfg.seed)
    key = {
        "max_tokens": cfg.token_probe_tokens,
        "texts_hash": texts_hash(texts),
        "groups_hash": _groups_hash(texts, groups),
    }
    if directory is not None:
        cached = _cached(
            directory,
            lambda: Probe.load(directory, model=model),
            lambda p: p.source.get("cache_key") == key and p.config == pcfg
            and p.layer == layer and p.label_names == tuple(labels),
            "the per-token probe",
        )  # fmt: skip
        if cached is not None:
            return cached
    acts = collect_token_activations(
        model,
        texts_dataset(texts, labels),
        layer=layer,
        max_tokens=cfg.token_probe_tokens,
        batch_size=cfg.batch_size,
        split="gold-steer",
        progress=progress,
    )
    g = None if groups is None else [groups[i] for i in acts.question_ids]
    probe = train_token_probe(acts, config=pcfg, groups=g)
    probe.source["cache_key"] = key
    if directory is not None:
        probe.save(directory)
    return probe


def _cached(
    directory: str | Path, load: Callable[[], T], fits: Callable[[T], bool], what: str
) -> T | None:
    """The artefact saved in ``directory`` when ``fits`` accepts it, else ``None``. An unusable
    one (``load`` raises) loses its own two files (metadata and tensors), so that a fresh one can
    be saved there; anything else in the directory stays (and saving then refuses the mixed
    directory)."""
    if not (Path(directory) / META_FILE).is_file():
        return None
    try:
        old = load()
    except KsLensError as e:
        log.info(f"[ks-lens] retraining {what}: {directory} unusable ({e})")
        for name in (META_FILE, TENSORS_FILE):
            (Path(directory) / name).unlink(missing_ok=True)
        return None
    if not fits(old):
        return None
    log.info(f"[ks-lens] reusing {what} at {directory}")
    return old


def _groups_hash(texts: Sequence[LabelledText], groups: Mapping[str, str] | None) -> str | None:
    """SHA-256 of the question each text is grouped under (``None``: no grouping)."""
    if groups is None:
        return None
    blob = json.dumps([[t.id, groups.get(t.id)] for t in texts], separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def needs_likelihood_vectors(config: ComparisonConfig) -> bool:
    """Whether a method of ``config`` steers with likelihood-trained vectors (``likelihood``)."""
    return any(split_method(m)[0] in LIKELIHOOD_METHODS for m in config.methods)


def likelihood_vectors(
    model: Model,
    texts: Sequence[LabelledText],
    layer: int,
    labels: Sequence[str],
    config: LikelihoodConfig,
    directory: str | Path,
    *,
    progress: bool = True,
) -> SteeringVectors:
    """Likelihood-trained vectors at ``layer`` (:func:`~ks_lens.steering.likelihood.train_likelihood_vectors`
    on ``texts``), reused from ``directory`` when vectors saved there were trained for this model,
    hook point, labels, config and texts (else trained afresh and saved there)."""
    want = {"config": config.to_json(), "dataset_hash": texts_hash(texts)}
    cached = _cached(
        directory,
        lambda: SteeringVectors.load(directory, model=model),
        lambda v: all(v.source.get(k) == x for k, x in want.items())
        and v.layer == layer and v.label_names == tuple(labels),
        "the likelihood vectors",
    )  # fmt: skip
    if cached is not None:
        return cached
    vecs = train_likelihood_vectors(model, texts, layer, labels, config, progress=progress)
    vecs.save(directory)
    return vecs


def steering_kit(
    acts: Activations,
    layer: int,
    ml_layers: Sequence[int],
    cfg: PipelineConfig,
    *,
    groups: Mapping[str, str] | None = None,
) -> SteeringKit:
    """Steering probe and CAA vectors at ``layer`` (and probes at ``ml_layers``) from ``acts``.

    The probe learns every row (multi-label for combined ones); the CAA vectors are mean
    differences over the single-label rows only. ``groups`` maps row ids to questions, so that
    validation holds out whole questions. When a method needs one (:func:`needs_linear_probe`),
    a linear probe (``ProbeConfig(architecture="linear")``, otherwise the MLP probe's settings)
    learns the same rows at ``layer``.
    """
    if len(acts) == 0:
        raise ConfigError("no activations to train the steering probe and vectors on")
    pcfg = ProbeConfig(seed=cfg.seed)
    g = None if groups is None else [groups[i] for i in acts.question_ids]
    base = acts.base_labels
    single = [i for i, lab in enumerate(acts.labels.tolist()) if 0 <= lab < len(base)]
    singles = replace(acts.select(single), label_names=base)
    vectors = SteeringVectors.fit(singles, layer)
    probes = train_probes(
        acts, layers=sorted({layer, *ml_layers}), config=pcfg, groups=g, progress=False
    )
    linear = (
        train_probe(acts, layer, config=replace(pcfg, architecture="linear"), groups=g)
        if needs_linear_probe(cfg.comparison)
        else None
    )
    layer_probes = {L: probes[L] for L in ml_layers}
    return SteeringKit(probes[layer], vectors, layer_probes, linear_probe=linear)


def texts_dataset(texts: Sequence[LabelledText], labels: Sequence[str]) -> BehaviourDataset:
    """Labelled texts as a dataset for ``response-only`` collection: one row per text, its
    question with the text as a fixed answer, labelled with its (combined) label set."""
    sets = sorted(
        {t.labels for t in texts if len(t.labels) > 1},
        key=lambda ls: (len(ls), [labels.index(x) for x in ls]),
    )
    behaviours = tuple(Behaviour(lab, lab) for lab in labels) + tuple(
        Behaviour("+".join(s), "+".join(s)) for s in sets
    )
    for t in texts:
        if not t.question:
            raise ConfigError(
                f"labelled text {t.id!r} has no question; response encoding needs one"
            )
    qs = tuple(
        Question(t.id, t.question or "", label="+".join(t.labels), answer=t.text) for t in texts
    )
    return BehaviourDataset("labelled-texts", behaviours, qs)
