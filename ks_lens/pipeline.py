"""The standard setup every study starts from: model, splits, activations, probes, vectors, evaluators.

:func:`prepare` collects (or reuses, from ``work_dir``) the activation stores, trains the steering
probe and CAA vectors on the ``train`` split, and the held-out evaluators on the ``evaluator``
split, and returns them in a :class:`Setup`. ``ks-lens demo`` and the studies in ``analysis/``
share it, so a second study pointed at the same ``work_dir`` reuses the first one's activations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ks_lens.activations import ActivationStore, collect_to_store
from ks_lens.comparison import REFERENCE_METHODS, ComparisonConfig, run_comparison
from ks_lens.datasets import BehaviourDataset, Splits, load_dataset, load_questions, make_splits
from ks_lens.models import load_model
from ks_lens.probes import Probe, ProbeConfig, train_probe, train_probes
from ks_lens.steering import SteeringVectors


@dataclass
class PipelineConfig:
    """Sizes of each stage. The defaults are the full demo run (about 10 minutes on 2 CPU cores)."""

    model: str = "default"
    dataset: str = "tones"
    questions: str | None = None  # external evaluation questions (.jsonl/.json/.csv)
    layer: int | None = None  # steering layer; None = 60 % depth
    eval_layer: int | None = None  # activation evaluator layer; None = steering layer + 4 (capped)
    n_train: int = 120  # questions for the steering probe and CAA vectors (x 6 tones)
    n_evaluator: int = 80  # questions for the activation evaluator (x 6 tones)
    n_response: int = 36  # questions whose generated answers train the response evaluator
    response_tokens: int = 32
    n_calib: int = 12
    n_eval: int = 32  # activation-level evaluation questions
    n_gen: int = 10  # generation-level evaluation questions
    act_combos_per_size: int | None = None
    gen_combos_per_size: int | None = 6
    max_new_tokens: int = 32
    kl_budget: float | None = None  # None: ComparisonConfig's default
    calibration_metric: str = "generation_kl"
    calib_tokens: int = 12
    calib_bisect_steps: int = 4
    methods: tuple[str, ...] = REFERENCE_METHODS
    batch_size: int = 16
    seed: int = 0
    device: str | None = None
    dtype: str | None = None

    @classmethod
    def fast(cls, **kw: Any) -> PipelineConfig:
        """A smoke run for CI: every stage on a handful of questions (about a minute)."""
        base = cls(
            n_train=16,
            n_evaluator=12,
            n_response=6,
            response_tokens=8,
            n_calib=4,
            n_eval=6,
            n_gen=4,
            act_combos_per_size=2,
            gen_combos_per_size=1,
            max_new_tokens=8,
            calib_tokens=6,
            calib_bisect_steps=2,
        )
        return replace(base, **kw)


def default_layers(
    n_layers: int, layer: int | None = None, eval_layer: int | None = None
) -> tuple[int, int]:
    """Steering layer (default 60 % depth) and evaluator layer (default 4 layers later, capped)."""
    ls = round(0.6 * n_layers) if layer is None else layer
    if not 0 <= ls < n_layers:
        raise ValueError(f"layer {ls} is out of range for a model with {n_layers} layers")
    le = min(n_layers - 1, ls + 4) if eval_layer is None else eval_layer
    if not ls <= le < n_layers:
        raise ValueError(
            f"the evaluator layer must be between the steering layer {ls} and {n_layers - 1}"
        )
    return ls, le


@dataclass
class Setup:
    config: PipelineConfig
    model: Any
    dataset: BehaviourDataset
    splits: Splits
    layer: int
    eval_layer: int
    train_store: ActivationStore
    evaluator_store: ActivationStore
    response_store: ActivationStore
    probe: Probe
    vectors: SteeringVectors
    evaluator: Probe
    response_evaluator: Probe
    response_probes: dict[int, Probe]
    external_questions: list[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def part(self, split: str, n: int | None) -> BehaviourDataset:
        return self.dataset.subset(self.splits.ids(split)).head(n)

    def questions(self, split: str, n: int | None) -> list[str]:
        return [q.text for q in self.part(split, n).questions]

    def eval_questions(self, n: int) -> tuple[list[str], str]:
        """The evaluation questions (external file if given, else the test split) and their source."""
        if self.external_questions is not None:
            return self.external_questions[:n], f"external file {self.config.questions}"
        return self.questions("test", n), "test split"

    def compare(
        self, config: ComparisonConfig, *, progress: bool = True, log: Any = print
    ) -> dict[str, Any]:
        """:func:`~ks_lens.comparison.run_comparison` with this setup's probe, vectors and evaluators,
        calibrated on the calibration split and evaluated on :meth:`eval_questions`."""
        cfg = self.config
        return run_comparison(
            self.model,
            probe=self.probe,
            vectors=self.vectors,
            evaluator=self.evaluator,
            response_evaluator=self.response_evaluator,
            calib_questions=self.questions("calibration", cfg.n_calib),
            eval_questions=self.eval_questions(cfg.n_eval)[0],
            gen_questions=self.eval_questions(cfg.n_gen)[0],
            config=config,
            progress=progress,
            log=log,
        )


def prepare(
    cfg: PipelineConfig, work_dir: str | Path, *, log: Any = print, progress: bool = True
) -> Setup:
    """Collect activations (resumable) and train the probe, vectors and evaluators."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    external = (
        [q.text for q in load_questions(cfg.questions)] if cfg.questions else None
    )  # fail early
    t0 = time.perf_counter()
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    timings["load_model_s"] = time.perf_counter() - t0
    ds = load_dataset(cfg.dataset)
    splits = make_splits(ds, seed=cfg.seed)
    n_layers = int(model.cfg.n_layers)
    ls, le = default_layers(n_layers, cfg.layer, cfg.eval_layer)
    log(
        f"[ks-lens] model {model.cfg.model_name} ({n_layers} layers); steering layer {ls}, evaluator layer {le}"
    )

    def part(split: str, n: int) -> BehaviourDataset:
        return ds.subset(splits.ids(split)).head(n)

    kw: dict[str, Any] = dict(batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    t0 = time.perf_counter()
    train_ds = part("train", cfg.n_train)
    st_train = collect_to_store(
        model,
        train_ds,
        work / "acts" / f"train-prompt-{len(train_ds.questions)}q",
        split="train",
        **kw,
    )
    eval_ds = part("evaluator", cfg.n_evaluator)
    st_eval = collect_to_store(
        model,
        eval_ds,
        work / "acts" / f"evaluator-prompt-{len(eval_ds.questions)}q",
        split="evaluator",
        **kw,
    )
    resp_ds = part("evaluator", cfg.n_response)
    st_resp = collect_to_store(
        model,
        resp_ds,
        work / "acts" / f"evaluator-response-only-{len(resp_ds.questions)}q",
        mode="response-only",
        max_new_tokens=cfg.response_tokens,
        split="evaluator",
        **kw,
    )
    timings["collect_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    acts = st_train.load(layers=[ls])
    probe = train_probe(acts, ls, config=ProbeConfig(seed=cfg.seed))
    probe.save(work / "probes" / "steering")
    vectors = SteeringVectors.fit(acts, ls)
    vectors.save(work / "vectors")
    evaluator = train_probe(
        st_eval.load(layers=[le]), le, config=ProbeConfig(hidden=256, seed=cfg.seed + 1)
    )
    evaluator.save(work / "probes" / "evaluator")
    resp_probes = train_probes(
        st_resp.load(), config=ProbeConfig(hidden=256, seed=cfg.seed + 1), progress=False
    )
    best = max(
        resp_probes,
        key=lambda L: (resp_probes[L].metrics["val_accuracy"], -resp_probes[L].metrics["val_loss"]),
    )
    response_evaluator = resp_probes[best]
    response_evaluator.save(work / "probes" / "response-evaluator")
    timings["train_s"] = time.perf_counter() - t0
    log(
        f"  steering probe val acc {probe.metrics['val_accuracy']:.3f}; evaluator (layer {le}) "
        f"{evaluator.metrics['val_accuracy']:.3f}; response evaluator (layer {best}) "
        f"{response_evaluator.metrics['val_accuracy']:.3f} (chance {1 / len(ds.labels):.3f})"
    )
    return Setup(
        cfg,
        model,
        ds,
        splits,
        ls,
        le,
        st_train,
        st_eval,
        st_resp,
        probe,
        vectors,
        evaluator,
        response_evaluator,
        resp_probes,
        external,
        timings,
    )
