"""Stage by stage, :func:`prepare`: inputs, activation stores, steering kits and evaluators."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ks_lens.activations import ActivationStore, collect_to_store
from ks_lens.comparison import SteeringKit, spread
from ks_lens.datasets import (
    BehaviourDataset,
    Question,
    Splits,
    load_dataset,
    load_questions,
    make_splits,
)
from ks_lens.datasets.gold_texts import (
    LabelledText,
    load_gold_texts,
    load_labelled_texts,
    split_by_question,
)
from ks_lens.errors import ConfigError
from ks_lens.memory import (
    Estimate,
    RunShape,
    available_memory_mb,
    check_memory,
    estimate_run,
    record_memory,
    rss_mb,
    run_shape,
)
from ks_lens.models import load_model
from ks_lens.pipeline.checks import check_held_out, check_question_lengths, check_texts_cover_labels
from ks_lens.pipeline.config import PROBE_SOURCES, PipelineConfig, ProbeSource
from ks_lens.pipeline.kits import (
    needs_likelihood_vectors,
    needs_token_probe,
    steering_kit,
    texts_dataset,
    token_steering_probe,
)
from ks_lens.pipeline.layers import RunLayers, StudyLayers, _layer_tag
from ks_lens.pipeline.setup import Setup
from ks_lens.probes import Probe, ProbeConfig, train_probe, train_probes
from ks_lens.text_evaluator import TextEvaluator, default_text_evaluator
from ks_lens.types import Model

log = logging.getLogger("ks_lens.pipeline")


def _collect(
    model: Model,
    dataset: BehaviourDataset,
    acts_dir: Path,
    name: str,
    layers: Sequence[int],
    **kw: Any,
) -> ActivationStore:
    """:func:`collect_to_store` of ``layers`` into ``acts_dir/name`` + a tag naming the layers.
    A store of every layer under the plain name (an earlier study's, same settings) is reused."""
    n = int(model.cfg.n_layers)
    full = acts_dir / name
    if (full / "meta.json").is_file():
        return collect_to_store(model, dataset, full, **kw)
    wanted = None if list(layers) == list(range(n)) else list(layers)
    return collect_to_store(
        model, dataset, acts_dir / (name + _layer_tag(layers, n)), layers=wanted, **kw
    )


@dataclass
class _Inputs:
    """What a run reads before it loads the model, checked: the dataset and its splits, the gold
    texts and their two halves, and the external test questions (``None``: the test split)."""

    ds: BehaviourDataset
    splits: Splits
    gold: tuple[LabelledText, ...]
    gold_steer: tuple[LabelledText, ...]
    gold_judge: tuple[LabelledText, ...]
    questions: Sequence[Question] | None


@dataclass
class _Stores:
    """The run's activation stores (:class:`RunLayers` says which layers each holds)."""

    train: ActivationStore | None  # prompt-mode train split (prompt source only)
    evaluator: ActivationStore  # evaluator split, single and combined instructions
    judge: ActivationStore  # the judging half of the gold texts (response evaluator)
    steer: ActivationStore | None  # the steering half of the gold texts (text source only)


def _sources(cfg: PipelineConfig, sources: Sequence[ProbeSource] | None) -> tuple[str, ...]:
    """The probe sources to build (default: the configured one), checked."""
    wanted = tuple(dict.fromkeys(sources if sources is not None else (cfg.probe_source,)))
    for src in wanted:
        if src not in PROBE_SOURCES:
            raise ConfigError(f"unknown probe source {src!r}; use one of {PROBE_SOURCES}")
    if cfg.probe_source not in wanted:
        raise ConfigError(
            f"sources {list(wanted)} must include the configured probe_source {cfg.probe_source!r}"
        )
    return wanted


def _read_inputs(cfg: PipelineConfig, wanted: Sequence[str]) -> _Inputs:
    """Load and check everything the run reads from files, before any compute."""
    questions = load_questions(cfg.questions) if cfg.questions else None  # fail early
    ds = load_dataset(cfg.dataset)
    gold = (
        load_labelled_texts(cfg.texts, labels=ds.labels)
        if cfg.texts
        else load_gold_texts(cfg.dataset)
    )
    if cfg.texts:
        check_texts_cover_labels(gold, ds.labels, cfg.texts)
    cfg.comparison.validate(ds.labels)
    splits = make_splits(ds, seed=cfg.seed)
    if questions is not None:
        check_held_out(questions, cfg, ds, splits, gold, prompt_source="prompt" in wanted)
    gold_steer, gold_judge = split_by_question(gold, cfg.gold_steer_fraction, cfg.seed)
    return _Inputs(ds, splits, tuple(gold), gold_steer, gold_judge, questions)


def _load(
    cfg: PipelineConfig, inputs: _Inputs, study_layers: StudyLayers, timings: dict[str, float]
) -> tuple[Model, RunLayers, list[str] | None]:
    """Load the model (timed), fix the run's layers, check the external questions' lengths:
    the model, the layers and the external questions' texts (``None``: the test split)."""
    t0 = time.perf_counter()
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    timings["load_model_s"] = time.perf_counter() - t0
    n_layers = int(model.cfg.n_layers)
    run_layers = RunLayers.of(cfg, n_layers, study_layers)
    external = None
    if inputs.questions is not None:
        check_question_lengths(model, inputs.questions, cfg)
        external = [q.text for q in inputs.questions]
    log.info(
        f"[ks-lens] model {model.cfg.model_name} ({n_layers} layers); steering layer "
        f"{run_layers.steering}, evaluator layer {run_layers.evaluator}"
    )
    return model, run_layers, external


def _text_evaluator(
    cfg: PipelineConfig, inputs: _Inputs, timings: dict[str, float]
) -> TextEvaluator:
    """The text evaluator, on the judging half of the gold texts (the family's shipped
    settings, or fitted afresh on ``--texts``)."""
    t0 = time.perf_counter()
    text_evaluator = (
        TextEvaluator.fit(inputs.gold_judge, inputs.ds.labels)
        if cfg.texts
        else default_text_evaluator(texts=inputs.gold_judge, family=cfg.dataset)
    )
    timings["text_evaluator_s"] = time.perf_counter() - t0
    return text_evaluator


def _estimate(
    cfg: PipelineConfig,
    model: Model,
    inputs: _Inputs,
    run_layers: RunLayers,
    extra_work: Callable[[Model, RunShape], RunShape] | None,
    on_estimate: Callable[[Estimate], None] | None,
    memory_check: bool,
) -> None:
    """Log the run's estimated peak memory and time; refuse it (``memory_check``) when the
    estimate exceeds the available memory."""
    shape = run_shape(cfg, model, inputs.ds.labels, len(inputs.gold), run_layers.widest_store)
    est = estimate_run(shape if extra_work is None else extra_work(model, shape))
    if on_estimate is not None:
        on_estimate(est)
    log.info(
        f"[ks-lens] estimated peak memory {est.peak_mb / 1024:.1f} GiB, time {est.seconds / 60:.0f} "
        "min on 2 CPU cores (docs/performance.md)"
    )
    if memory_check:
        check_memory(est, available_mb=available_memory_mb(), held_mb=rss_mb())


def _collect_stores(
    cfg: PipelineConfig,
    model: Model,
    inputs: _Inputs,
    run_layers: RunLayers,
    wanted: Sequence[str],
    acts_dir: Path,
    *,
    progress: bool,
    timings: dict[str, float],
) -> _Stores:
    """Collect (or reuse) every store the run reads, timing each part into ``timings``."""
    ds, splits = inputs.ds, inputs.splits

    def part(split: str, n: int) -> BehaviourDataset:
        return ds.subset(splits.ids(split)).head(n)

    kw: dict[str, Any] = dict(batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    t0 = time.perf_counter()
    st_train = None
    if "prompt" in wanted:  # the text source needs no instruction prompts
        train_ds = part("train", cfg.n_train)
        name = f"train-prompt-{len(train_ds.questions)}q"
        st_train = _collect(
            model, train_ds, acts_dir, name, run_layers.train_store, split="train", **kw
        )
    timings["collect_train_s"] = time.perf_counter() - t0
    eval_ds = part("evaluator", cfg.n_evaluator)
    if cfg.evaluator_combos_per_question:
        eval_ds = eval_ds.with_combinations((2,), per_question=cfg.evaluator_combos_per_question)
    name = f"evaluator-prompt-{len(eval_ds.questions)}q-c{cfg.evaluator_combos_per_question}"
    st_eval = _collect(
        model, eval_ds, acts_dir, name, run_layers.evaluator_store, split="evaluator", **kw
    )
    timings["collect_evaluator_s"] = time.perf_counter() - t0 - timings["collect_train_s"]
    steer_ids = {t.id for t in inputs.gold_steer}
    gold_enc = spread(list(inputs.gold), cfg.n_gold)
    judge_enc = [t for t in gold_enc if t.id not in steer_ids]
    # the judging half runs through every response layer, the steering half only up to the
    # steering probes' layers (and only when the text source is built)
    st_judge = _collect(
        model,
        texts_dataset(judge_enc, ds.labels),
        acts_dir,
        f"gold-judge-{len(judge_enc)}t",
        run_layers.judge_store,
        mode="response-only",
        split="gold-judge",
        **kw,
    )
    st_steer = None
    if "text" in wanted:
        steer_enc = [t for t in gold_enc if t.id in steer_ids]
        st_steer = _collect(
            model,
            texts_dataset(steer_enc, ds.labels),
            acts_dir,
            f"gold-steer-{cfg.text_pooling}-{len(steer_enc)}t",
            run_layers.gold_steer_store,
            mode="response-only",
            pooling=cfg.text_pooling,
            split="gold-steer",
            **kw,
        )
    timings["collect_s"] = time.perf_counter() - t0
    timings["collect_gold_s"] = (
        timings["collect_s"] - timings["collect_train_s"] - timings["collect_evaluator_s"]
    )
    record_memory(timings, "collect")
    return _Stores(st_train, st_eval, st_judge, st_steer)


def _train_kits(
    cfg: PipelineConfig,
    stores: _Stores,
    run_layers: RunLayers,
    wanted: Sequence[str],
    question_of: Mapping[str, str],
    work: Path,
    token_probe: Probe | None = None,
) -> dict[str, SteeringKit]:
    """The steering probe, CAA vectors (and linear and multi-layer probes) of each source,
    saved under ``work/probes`` and ``work/vectors``. ``token_probe`` (the per-token probe,
    learned from the gold texts whatever the source) joins every kit."""
    kits: dict[str, SteeringKit] = {}
    layers, ml = run_layers.steering_probes, list(run_layers.multilayer)
    for src in wanted:
        if src == "prompt":
            assert stores.train is not None
            acts = stores.train.load(layers=layers)
            kits[src] = steering_kit(acts, run_layers.steering, ml, cfg)
        else:
            assert stores.steer is not None
            acts = stores.steer.load(layers=layers)
            kits[src] = steering_kit(acts, run_layers.steering, ml, cfg, groups=question_of)
        kits[src] = replace(kits[src], token_probe=token_probe)
    for source, kit in kits.items():
        kit.probe.save(work / "probes" / f"steering-{source}")
        if kit.linear_probe is not None:
            kit.linear_probe.save(work / "probes" / f"steering-{source}-linear")
        if kit.token_probe is not None:
            kit.token_probe.save(work / "probes" / f"steering-{source}-token")
        kit.vectors.save(work / "vectors" / source)
    return kits


def _token_probe(
    cfg: PipelineConfig,
    model: Model,
    inputs: _Inputs,
    run_layers: RunLayers,
    question_of: Mapping[str, str],
    work: Path,
    progress: bool,
    timings: dict[str, float],
) -> Probe | None:
    """The per-token steering probe (:func:`token_steering_probe`) on the steering half of the
    gold texts that the run encodes, when a method needs it (:func:`needs_token_probe`), reused
    from ``work/probes/token-cache`` when it was made for the same inputs; timed into
    ``timings["token_probe_s"]``."""
    if not needs_token_probe(cfg.comparison):
        return None
    t0 = time.perf_counter()
    steer_ids = {t.id for t in inputs.gold_steer}
    texts = [t for t in spread(list(inputs.gold), cfg.n_gold) if t.id in steer_ids]
    probe = token_steering_probe(
        model,
        texts,
        inputs.ds.labels,
        run_layers.steering,
        cfg,
        groups=question_of,
        directory=work / "probes" / "token-cache",
        progress=progress,
    )
    timings["token_probe_s"] = time.perf_counter() - t0
    return probe


def _train_evaluators(
    cfg: PipelineConfig,
    stores: _Stores,
    run_layers: RunLayers,
    question_of: Mapping[str, str],
    work: Path,
) -> tuple[Probe, Probe, dict[int, Probe]]:
    """The activation evaluator (at the evaluator layer) and the response evaluator (at its best
    layer at or above the steering layer, on held-out gold questions), with the response probes
    of every layer; saved under ``work/probes``."""
    le = run_layers.evaluator
    evaluator = train_probe(
        stores.evaluator.load(layers=[le]), le, config=ProbeConfig(hidden=256, seed=cfg.seed + 1)
    )
    evaluator.save(work / "probes" / "evaluator")
    resp_acts = stores.judge.load(layers=run_layers.response)
    resp_probes = train_probes(
        resp_acts,
        config=ProbeConfig(hidden=256, seed=cfg.seed + 1),
        groups=[question_of[i] for i in resp_acts.question_ids],  # hold out whole questions
        progress=False,
    )
    best = max(
        resp_probes,
        key=lambda L: (resp_probes[L].metrics["val_accuracy"], -resp_probes[L].metrics["val_loss"]),
    )
    resp_probes[best].save(work / "probes" / "response-evaluator")
    return evaluator, resp_probes[best], resp_probes


def _log_summary(
    cfg: PipelineConfig, inputs: _Inputs, probe: Probe, evaluator: Probe, response: Probe
) -> None:
    m = evaluator.metrics
    log.info(
        f"  steering probe ({cfg.probe_source}) val acc {probe.metrics['val_accuracy']:.3f}; "
        f"evaluator (layer {evaluator.layer}) {m['val_accuracy']:.3f} single / "
        f"{m.get('val_multi_topk_rate', float('nan')):.3f} two-tone top-2; "
        f"response evaluator (layer {response.layer}) {response.metrics['val_accuracy']:.3f} "
        f"(chance {1 / len(inputs.ds.labels):.3f}); gold texts {len(inputs.gold_steer)} "
        f"steering / {len(inputs.gold_judge)} evaluators"
    )


def prepare(
    cfg: PipelineConfig,
    work_dir: str | Path,
    *,
    progress: bool = True,
    sources: Sequence[ProbeSource] | None = None,
    study_layers: StudyLayers = None,
    memory_check: bool = True,
    extra_work: Callable[[Model, RunShape], RunShape] | None = None,
    on_estimate: Callable[[Estimate], None] | None = None,
) -> Setup:
    """Collect activations (resumable) and train the probe, vectors and evaluators.

    * steering probe + CAA vectors of each of ``sources`` (default: only the configured
      ``probe_source``; see :data:`PROBE_SOURCES`): ``prompt`` from the ``train`` split in
      prompt mode (instruction + question), ``text`` from the steering half of the gold texts;
    * activation evaluator: ``evaluator`` split, prompt mode with single **and combined**
      (two-tone) instructions, multi-label, at the evaluator layer;
    * text evaluator: TF-IDF + logistic regression on the gold texts (model-independent);
    * response-activation evaluator: the gold texts re-encoded through the model without any
      instruction, multi-label, at the best layer on held-out gold questions.

    Each store holds only the layers the run reads (:class:`RunLayers`) plus ``study_layers``.
    Once the model is loaded, the run's peak memory and time are estimated and logged; with
    ``memory_check`` a run whose estimate exceeds the available memory is refused.
    ``extra_work`` adds a study's own work to the run's shape before the estimate (e.g. the
    paper protocol's layer sweep, :mod:`ks_lens.cli.paper`); ``on_estimate`` receives the estimate
    before any activation is collected (``ks-lens demo --preset paper`` prints it).
    """
    cfg.validate()
    wanted = _sources(cfg, sources)
    inputs = _read_inputs(cfg, wanted)
    timings: dict[str, float] = {}
    model, run_layers, external = _load(cfg, inputs, study_layers, timings)
    _estimate(cfg, model, inputs, run_layers, extra_work, on_estimate, memory_check)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stores = _collect_stores(
        cfg, model, inputs, run_layers, wanted, work / "acts", progress=progress, timings=timings
    )
    question_of = {t.id: t.question_id or t.id for t in inputs.gold}
    token = _token_probe(cfg, model, inputs, run_layers, question_of, work, progress, timings)
    t0 = time.perf_counter()
    kits = _train_kits(cfg, stores, run_layers, wanted, question_of, work, token)
    evaluator, response, resp_probes = _train_evaluators(cfg, stores, run_layers, question_of, work)
    timings["train_s"] = time.perf_counter() - t0
    record_memory(timings, "train")
    text_evaluator = _text_evaluator(cfg, inputs, timings)
    _log_summary(cfg, inputs, kits[cfg.probe_source].probe, evaluator, response)
    setup = Setup(
        cfg,
        model,
        inputs.ds,
        inputs.splits,
        run_layers.steering,
        run_layers.evaluator,
        stores.train,
        stores.evaluator,
        stores.judge,
        kits,
        evaluator,
        response,
        resp_probes,
        text_evaluator,
        inputs.gold,
        inputs.gold_steer,
        inputs.gold_judge,
        external,
        timings,
        steer_store=stores.steer,
        work_dir=work,
    )
    if needs_likelihood_vectors(cfg.comparison):
        setup.train_likelihood(progress=progress)  # cached under work/vectors/likelihood
    return setup
