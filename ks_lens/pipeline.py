"""The standard setup every study starts from: model, splits, activations, probes, vectors, evaluators.

:func:`prepare` collects (or reuses, from ``work_dir``) the activation stores, trains the steering
probe and CAA vectors on the ``train`` split, and the held-out evaluators on the ``evaluator``
split, and returns them in a :class:`Setup`. ``ks-lens demo`` and the studies in ``analysis/``
share it, so a second study pointed at the same ``work_dir`` reuses the first one's activations.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from ks_lens.activations import POOLINGS, Activations, ActivationStore, Pooling, collect_to_store
from ks_lens.chat import check_context, encode_chat
from ks_lens.comparison import (
    LINEAR_PROBE_METHODS,
    ComparisonConfig,
    ComparisonResult,
    SteeringKit,
    fit_comparison_dct,
    run_comparison,
    spread,
    uses_dct,
)
from ks_lens.datasets import (
    Behaviour,
    BehaviourDataset,
    Question,
    Splits,
    load_dataset,
    load_questions,
    make_splits,
)
from ks_lens.errors import ConfigError, DatasetError
from ks_lens.gold_texts import (
    LabelledText,
    load_gold_texts,
    load_labelled_texts,
    normalise_text,
    split_by_question,
)
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
from ks_lens.models import ModelOptions, load_model
from ks_lens.probes import Probe, ProbeConfig, train_probe, train_probes
from ks_lens.steering import SteeringVectors
from ks_lens.steering.dct import DCTVectors
from ks_lens.text_evaluator import TextEvaluator, default_text_evaluator
from ks_lens.types import Model

log = logging.getLogger(__name__)

ProbeSource = Literal["prompt", "text"]
PROBE_SOURCES: tuple[ProbeSource, ...] = get_args(ProbeSource)
"""Where the steering probe and CAA vectors learn the behaviours from:

``prompt``  the last prompt token of behaviour instruction + question (``train`` split; the
            reference code's choice: the probe may learn "which instruction is present");
``text``    gold tone texts re-encoded without any instruction (response-only), on the gold
            questions set aside for steering (the evaluators use the other gold questions).
"""


def full_comparison() -> ComparisonConfig:
    """The full demo's comparison: every combination answered in text (else the defaults)."""
    return ComparisonConfig(text_coverage="all-combinations")


@dataclass
class PipelineConfig(ModelOptions):
    """The model (:class:`~ks_lens.models.ModelOptions`: ``model``, ``device``, ``dtype``), the
    sizes of each stage, and the comparison's settings (``comparison``).

    The defaults are the full demo run; :meth:`fast` is a one-minute smoke run. ``ks-lens demo``
    and the studies in ``analysis/`` take every field as an option (:mod:`ks_lens.options`).
    """

    dataset: str = "tones"  # a shipped family (tones, concepts, debates) or a behaviours JSON
    questions: str | None = None  # external test questions, .jsonl/.json/.csv (None: test split)
    texts: str | None = None  # labelled texts for the text evaluators (None: the family's gold)
    layer: int | None = None  # steering layer (None: 60 % depth)
    eval_layer: int | None = None  # activation evaluator layer (None: steering layer + 4, capped)
    n_train: int = 120  # questions for the steering probe and CAA vectors (x 6 tones)
    n_evaluator: int = 80  # questions for the activation evaluator (x 6 tones + combinations)
    evaluator_combos_per_question: int = 3  # two-tone instructions per evaluator question
    n_gold: int | None = None  # gold texts re-encoded for the response evaluator (None: all)
    n_calib: int = 12  # calibration questions
    n_eval: int = 32  # test questions, activation level
    n_gen: int = 16  # test questions, generated text (every combination on >= 2 of them)
    # what the steering probe and vectors learn from: gold texts (text) or instruction prompts
    probe_source: ProbeSource = "text"
    text_position: Pooling = "last"  # text source: last answer token or "mean_response"
    gold_steer_fraction: float = 0.5  # share of gold questions for text-grounded steering
    multilayer_offsets: tuple[int, ...] = (-6, -3, 0)  # multi-layer method: layers around `layer`
    batch_size: int = 16  # rows per forward pass when collecting activations
    # splits, probes, evaluators and tiny-model weights (ks-lens demo: also the comparison)
    seed: int = 0
    comparison: ComparisonConfig = field(default_factory=full_comparison)  # fast: per-size

    @classmethod
    def fast(cls, **kw: Any) -> PipelineConfig:
        """A smoke run for CI: every stage on a handful of questions (about a minute)."""
        comparison = kw.pop("comparison", None) or ComparisonConfig(text_coverage="per-size")
        base = cls(
            n_train=16,
            n_evaluator=12,
            evaluator_combos_per_question=2,
            n_gold=160,
            n_calib=4,
            n_eval=6,
            n_gen=4,
            comparison=replace(
                comparison,
                act_combos_per_size=2,
                max_new_tokens=8,
                calib_tokens=6,
                calib_bisect_steps=2,
                n_resamples=200,
                capability_questions=12,
                capability_instructed=False,
                dct=replace(comparison.dct, steps=8),
            ),
        )
        return replace(base, **kw)

    def validate(self) -> PipelineConfig:
        """Check every setting before any compute (model-dependent checks come later)."""
        if self.n_gold is not None and self.n_gold < 2:
            raise ConfigError(f"n_gold must be at least 2 (or None for all), got {self.n_gold}")
        for name in ("n_train", "n_evaluator", "n_calib", "n_eval", "n_gen", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.probe_source not in PROBE_SOURCES:
            raise ConfigError(f"unknown probe_source {self.probe_source!r}; use {PROBE_SOURCES}")
        if self.text_position not in POOLINGS:
            raise ConfigError(f"text_position must be in {POOLINGS}, got {self.text_position!r}")
        if not 0 < self.gold_steer_fraction < 1:
            raise ConfigError("gold_steer_fraction must be strictly between 0 and 1")
        if len(set(self.multilayer_offsets)) < 2 or max(self.multilayer_offsets) > 0:
            raise ConfigError(
                "multilayer_offsets must name at least two distinct layers at or before the "
                f"steering layer (offsets <= 0), got {self.multilayer_offsets}"
            )
        if self.evaluator_combos_per_question < 0:
            raise ConfigError("evaluator_combos_per_question must be >= 0")
        for name in ("layer", "eval_layer"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"{name} must be a non-negative layer index, got {v}")
        if self.layer is not None and self.eval_layer is not None and self.eval_layer <= self.layer:
            raise ConfigError(
                f"the evaluator layer ({self.eval_layer}) must be above the steering layer "
                f"({self.layer}): an evaluator at the steered hook point reads the push itself, "
                "not its effect"
            )
        c = self.comparison.validate()
        if c.text_coverage == "all-combinations" and self.n_gen < c.min_questions_per_combination:
            raise ConfigError(
                f"text_coverage 'all-combinations' answers every combination on at least "
                f"{c.min_questions_per_combination} test questions, but n_gen is {self.n_gen}; "
                "raise n_gen or lower min_questions_per_combination"
            )
        return self


EVAL_GAP = 4
"""Layers between the steering layer and the default evaluator layer (fewer at the top)."""


def default_layers(
    n_layers: int, layer: int | None = None, eval_layer: int | None = None
) -> tuple[int, int]:
    """Steering layer (default 60 % depth) and evaluator layer (default :data:`EVAL_GAP` layers
    later, capped at the last layer). The evaluator must read above the steering layer: at the
    steered hook point it would read the push itself."""
    ls = round(0.6 * n_layers) if layer is None else layer
    if not 0 <= ls < n_layers:
        raise ConfigError(f"layer {ls} is out of range for a model with {n_layers} layers")
    if ls == n_layers - 1 and eval_layer is None:
        raise ConfigError(
            f"steering layer {ls} is the model's last layer ({n_layers} layers): the activation "
            "evaluator must read above the steering layer, and nothing is above it. Steer at a "
            f"layer below {ls}"
        )
    le = min(n_layers - 1, ls + EVAL_GAP) if eval_layer is None else eval_layer
    if not ls < le < n_layers:
        raise ConfigError(
            f"the evaluator layer {le} must be above the steering layer {ls} and at most "
            f"{n_layers - 1} (an evaluator at the steered hook point reads the push itself)"
        )
    return ls, le


def eval_gap_note(cfg: PipelineConfig, layer: int, eval_layer: int) -> str | None:
    """A warning for reports when the default evaluator sits fewer than :data:`EVAL_GAP` layers
    above the steering layer (capped at the top of the model); None otherwise."""
    gap = eval_layer - layer
    if cfg.eval_layer is not None or gap >= EVAL_GAP:
        return None
    return (
        f"the activation evaluator reads {gap} layer{'s' if gap > 1 else ''} above the steering "
        f"layer, not the default {EVAL_GAP} (capped at the model's last layer): it sits close to "
        "the push, so its figures say more about the push than about what the model makes of it"
    )


def probe_source_text(cfg: PipelineConfig) -> str:
    """What the steering probe and CAA vectors were trained on, in words (for reports)."""
    if cfg.probe_source == "prompt":
        return (
            "last prompt token of behaviour instruction + question, train split "
            f"({cfg.n_train} questions)"
        )
    where = "last answer token" if cfg.text_position == "last" else "mean over the answer tokens"
    return (
        f"gold texts re-encoded without instruction ({where}), on the gold questions set "
        f"aside for steering ({cfg.gold_steer_fraction:.0%})"
    )


StudyLayers = Sequence[int] | Literal["all"] | Callable[[int], Sequence[int]] | None
"""Layers a study asks every store to hold besides the run's own: model layer indices, ``"all"``
(every layer, as the studies in ``analysis/`` use), a function of the model's number of layers
(for a study that picks them from the model's depth) or ``None`` (only what the run reads)."""


@dataclass(frozen=True)
class RunLayers:
    """The layers a run reads, in one place: each store collects only these (plus any a study
    asks for), and each stage loads only its own.

    * steering probe and CAA vectors: the steering layer and the multi-layer method's layers
      (the prompt-mode train split, or the steering half of the gold texts);
    * activation evaluator: its layer;
    * response-activation evaluator: every layer from the steering layer on (it picks the best),
      on the other (judging) half of the gold texts only.
    """

    n_layers: int
    steering: int
    evaluator: int
    multilayer: tuple[int, ...]
    study: tuple[int, ...] = ()

    @classmethod
    def of(cls, cfg: PipelineConfig, n_layers: int, study: StudyLayers = None) -> RunLayers:
        ls, le = default_layers(n_layers, cfg.layer, cfg.eval_layer)
        ml = tuple(sorted({ls + o for o in cfg.multilayer_offsets if ls + o >= 0}))
        if callable(study):
            study = study(n_layers)
        extra = range(n_layers) if study == "all" else (study or ())
        for layer in extra:
            if not 0 <= layer < n_layers:
                raise ConfigError(
                    f"study layer {layer} is out of range for a model with {n_layers} layers"
                )
        return cls(n_layers, ls, le, ml, tuple(sorted(set(extra))))

    @property
    def steering_probes(self) -> list[int]:
        """Layers of the steering probe and the multi-layer method's probes."""
        return sorted({self.steering, *self.multilayer})

    @property
    def response(self) -> list[int]:
        """Layers the response-activation evaluator chooses from (at or after the steering)."""
        return list(range(self.steering, self.n_layers))

    def _with_study(self, layers: Sequence[int]) -> list[int]:
        return sorted({*layers, *self.study})

    @property
    def train_store(self) -> list[int]:
        return self._with_study(self.steering_probes)

    @property
    def evaluator_store(self) -> list[int]:
        return self._with_study([self.evaluator])

    @property
    def judge_store(self) -> list[int]:
        """The judging half of the gold texts: the response evaluator's layers."""
        return self._with_study(self.response)

    @property
    def gold_steer_store(self) -> list[int]:
        """The steering half of the gold texts (the ``text`` source): the probes' layers, so
        its forward passes stop at the steering layer."""
        return self.train_store

    @property
    def widest_store(self) -> int:
        """The most layers any store of the run keeps (the memory estimate's store width)."""
        return max(len(self.train_store), len(self.evaluator_store), len(self.judge_store))


def _layer_tag(layers: Sequence[int], n_layers: int) -> str:
    """A store directory's suffix naming its layers (none for all layers): ``-L12.15.18-29``."""
    if list(layers) == list(range(n_layers)):
        return ""
    runs: list[str] = []
    start = prev = layers[0]
    for x in [*layers[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return "-L" + ".".join(runs)


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


def needs_linear_probe(config: ComparisonConfig) -> bool:
    """Whether a method of ``config`` steers with a linear probe (``ksteer_linear``)."""
    return any(m.partition("@")[0] in LINEAR_PROBE_METHODS for m in config.methods)


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
    a linear probe (``ProbeConfig(kind="linear")``, otherwise the MLP probe's settings) learns
    the same rows at ``layer``.
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
        train_probe(acts, layer, config=replace(pcfg, kind="linear"), groups=g)
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


def check_texts_cover_labels(
    texts: Sequence[LabelledText], labels: Sequence[str], source: str
) -> None:
    """Refuse labelled texts (``--texts``) that leave a label without a single-label text: the
    steering vectors and evaluators need examples of every label."""
    have = {t.labels[0] for t in texts if len(t.labels) == 1}
    missing = [lab for lab in labels if lab not in have]
    if missing:
        raise DatasetError(
            f"{source}: no single-label text for {missing}; the texts must cover every label of "
            f"the dataset {list(labels)} (the steering vectors and evaluators learn each label)"
        )


def check_held_out(
    questions: Sequence[Question],
    cfg: PipelineConfig,
    ds: BehaviourDataset,
    splits: Splits,
    gold: Sequence[LabelledText],
    *,
    prompt_source: bool,
) -> None:
    """Refuse external test questions (the first ``max(n_eval, n_gen)``, those the run asks)
    that the run also learns or calibrates from (matched by text, ignoring case and spacing):
    the probe's training prompts, the evaluators' questions, the calibration questions and the
    gold texts' questions. Test figures on them would not be held out, and the report could not
    tell."""
    used: dict[str, str] = {}
    parts = [("evaluator", cfg.n_evaluator), ("calibration", cfg.n_calib)]
    if prompt_source:
        parts.insert(0, ("train", cfg.n_train))
    for split, n in parts:
        for q in ds.subset(splits.ids(split)).head(n).questions:
            used.setdefault(
                normalise_text(q.text), f"a {split}-split question of dataset {ds.name!r}"
            )
    for t in gold:
        if t.question:
            used.setdefault(normalise_text(t.question), f"the question of gold text {t.id!r}")
    asked = questions[: max(cfg.n_eval, cfg.n_gen)]  # the questions the run asks
    hits = [
        (i, q, used[key]) for i, q in enumerate(asked) if (key := normalise_text(q.text)) in used
    ]
    if hits:
        i, q, where = hits[0]
        raise DatasetError(
            f"{cfg.questions}: {len(hits)} of {len(asked)} test questions are not held out: "
            f"question {i + 1} ({q.text[:60]!r}) is {where} (seed {cfg.seed}). The probes, "
            "evaluators or calibration learn from those; remove them from the file"
        )


def check_question_lengths(
    model: Model, questions: Sequence[Question], cfg: PipelineConfig
) -> None:
    """Refuse external test questions that do not fit in the model's context window (with the
    answer length for the ones answered in text), before any activation is collected."""
    n_test = max(cfg.n_eval, cfg.n_gen)
    for i, q in enumerate(questions[:n_test]):
        new = cfg.comparison.max_new_tokens if i < cfg.n_gen else 0
        what = f"{cfg.questions}: question {i + 1} ({q.id})"
        check_context(model, len(encode_chat(model.tokenizer, q.text)), new, what=what)


@dataclass
class Setup:
    """Everything a comparison needs: model, data, steering probe/vectors and the evaluators."""

    config: PipelineConfig
    model: Model
    dataset: BehaviourDataset
    splits: Splits
    layer: int
    eval_layer: int
    train_store: ActivationStore | None  # prompt-mode train split (only with the prompt source)
    evaluator_store: ActivationStore
    response_store: ActivationStore  # the judging half of the gold texts (response evaluator)
    kits: dict[str, SteeringKit]  # steering probe + vectors (+ layer probes) per probe source
    evaluator: Probe
    response_evaluator: Probe
    response_probes: dict[int, Probe]
    text_evaluator: TextEvaluator
    gold_texts: tuple[LabelledText, ...]
    gold_steer: tuple[LabelledText, ...]  # gold texts text-grounded probes learn from
    gold_judge: tuple[LabelledText, ...]  # gold texts the evaluators learn from (other questions)
    external_questions: list[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # the text source's store (gold texts, steering half; None without the text source)
    steer_store: ActivationStore | None = None
    # where prepare saved the artefacts (compare saves the DCT vectors there too)
    work_dir: Path | None = None

    @property
    def kit(self) -> SteeringKit:
        """The steering artefacts of the configured ``probe_source``."""
        return self.kits[self.config.probe_source]

    def kit_of(self, source: str) -> SteeringKit:
        """The steering artefacts of ``source`` (one of the sources :func:`prepare` built)."""
        if source not in self.kits:
            raise ConfigError(
                f"no {source!r} steering kit: this setup was prepared with sources "
                f"{sorted(self.kits)} (prepare(..., sources=...))"
            )
        return self.kits[source]

    @property
    def probe(self) -> Probe:
        return self.kit.probe

    @property
    def vectors(self) -> SteeringVectors:
        return self.kit.vectors

    def part(self, split: str, n: int | None) -> BehaviourDataset:
        return self.dataset.subset(self.splits.ids(split)).head(n)

    def questions(self, split: str, n: int | None) -> list[str]:
        return [q.text for q in self.part(split, n).questions]

    def eval_questions(self, n: int) -> tuple[list[str], str]:
        """The test questions (external file if given, else the test split) and their source."""
        if self.external_questions is not None:
            return self.external_questions[:n], f"external file {self.config.questions}"
        return self.questions("test", n), "test split"

    def compare(
        self,
        config: ComparisonConfig | None = None,
        *,
        progress: bool = True,
        text: bool = True,
        source: str | None = None,
        calib_questions: Sequence[str] | None = None,
        test_questions: Sequence[str] | None = None,
        kit: SteeringKit | None = None,
        evaluator: Probe | None = None,
    ) -> ComparisonResult:
        """:func:`~ks_lens.comparison.run_comparison` with this setup's steering kit (of
        ``source``, default the configured ``probe_source``) and evaluators, calibrated on the
        calibration split and evaluated on :meth:`eval_questions` (activation level on
        ``n_eval`` of them, text on the first ``n_gen``). ``calib_questions`` /
        ``test_questions`` replace those question lists (e.g. validation questions in a study
        that makes choices); ``kit`` and ``evaluator`` replace the kit and activation evaluator
        (the paper protocol's at a swept layer, :mod:`ks_lens.paper`)."""
        cfg = self.config
        source = source or cfg.probe_source
        kit = kit if kit is not None else self.kit_of(source)
        ev = self.evaluator if evaluator is None else evaluator
        n_test = max(cfg.n_eval, cfg.n_gen)
        test = list(self.eval_questions(n_test)[0] if test_questions is None else test_questions)
        calib_split = self.questions("calibration", cfg.n_calib)
        calib = list(calib_split if calib_questions is None else calib_questions)
        config = config or cfg.comparison
        dct = self.dct_vectors(kit.probe.layer, calib, config, source, evaluator=ev, learned=kit.dct)
        return run_comparison(
            self.model,
            probe=kit.probe,
            vectors=kit.vectors,
            layer_probes=kit.layer_probes,
            evaluator=ev,
            linear_probe=kit.linear_probe,
            instructions=self.dataset.instructions,
            text_evaluator=self.text_evaluator if text else None,
            response_evaluator=self.response_evaluator if text else None,
            calib_questions=calib,
            test_questions=test[: cfg.n_eval],
            text_questions=test[: cfg.n_gen],
            config=config,
            progress=progress,
            dct=dct,
        )

    def dct_vectors(
        self,
        layer: int,
        calib: Sequence[str],
        config: ComparisonConfig,
        source: str,
        evaluator: Probe | None = None,
        learned: DCTVectors | None = None,
    ) -> DCTVectors | None:
        """The ``dct`` method's mapped vectors at ``layer`` (None when ``config`` does not
        compare it), learned on ``calib`` (or ``learned`` there already) and mapped by
        ``evaluator`` (default the setup's; :func:`~ks_lens.comparison.fit_comparison_dct`),
        saved to ``work_dir/vectors/dct-{source}-L{layer}`` with the other artefacts."""
        if not uses_dct(config):
            return None
        ev = self.evaluator if evaluator is None else evaluator
        dct = fit_comparison_dct(self.model, layer, calib, ev, config, learned=learned)
        if self.work_dir is not None:
            dct.save(self.work_dir / "vectors" / f"dct-{source}-L{layer}")
        return dct


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
    paper protocol's layer sweep, :mod:`ks_lens.paper`); ``on_estimate`` receives the estimate
    before any activation is collected (``ks-lens demo --preset paper`` prints it).
    """
    cfg.validate()
    wanted = tuple(dict.fromkeys(sources if sources is not None else (cfg.probe_source,)))
    for src in wanted:
        if src not in PROBE_SOURCES:
            raise ConfigError(f"unknown probe source {src!r}; use one of {PROBE_SOURCES}")
    if cfg.probe_source not in wanted:
        raise ConfigError(
            f"sources {list(wanted)} must include the configured probe_source {cfg.probe_source!r}"
        )
    timings: dict[str, float] = {}
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
    t0 = time.perf_counter()
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    timings["load_model_s"] = time.perf_counter() - t0
    n_layers = int(model.cfg.n_layers)
    run_layers = RunLayers.of(cfg, n_layers, study_layers)
    ls, le = run_layers.steering, run_layers.evaluator
    external = None
    if questions is not None:
        check_question_lengths(model, questions, cfg)
        external = [q.text for q in questions]
    work = Path(work_dir)
    log.info(
        f"[ks-lens] model {model.cfg.model_name} ({n_layers} layers); steering layer {ls}, evaluator layer {le}"
    )
    shape = run_shape(cfg, model, ds.labels, len(gold), run_layers.widest_store)
    est = estimate_run(shape if extra_work is None else extra_work(model, shape))
    if on_estimate is not None:
        on_estimate(est)
    log.info(
        f"[ks-lens] estimated peak memory {est.peak_mb / 1024:.1f} GiB, time {est.seconds / 60:.0f} "
        "min on 2 CPU cores (docs/performance.md)"
    )
    if memory_check:
        check_memory(est, available_mb=available_memory_mb(), held_mb=rss_mb())
    work.mkdir(parents=True, exist_ok=True)

    def part(split: str, n: int) -> BehaviourDataset:
        return ds.subset(splits.ids(split)).head(n)

    kw: dict[str, Any] = dict(batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    acts_dir = work / "acts"
    t0 = time.perf_counter()
    st_train = None
    if "prompt" in wanted:  # the text source needs no instruction prompts
        train_ds = part("train", cfg.n_train)
        st_train = _collect(
            model,
            train_ds,
            acts_dir,
            f"train-prompt-{len(train_ds.questions)}q",
            run_layers.train_store,
            split="train",
            **kw,
        )
    timings["collect_train_s"] = time.perf_counter() - t0
    eval_ds = part("evaluator", cfg.n_evaluator)
    if cfg.evaluator_combos_per_question:
        eval_ds = eval_ds.with_combinations((2,), per_question=cfg.evaluator_combos_per_question)
    st_eval = _collect(
        model,
        eval_ds,
        acts_dir,
        f"evaluator-prompt-{len(eval_ds.questions)}q-c{cfg.evaluator_combos_per_question}",
        run_layers.evaluator_store,
        split="evaluator",
        **kw,
    )
    timings["collect_evaluator_s"] = time.perf_counter() - t0 - timings["collect_train_s"]
    gold_steer, gold_judge = split_by_question(gold, cfg.gold_steer_fraction, cfg.seed)
    steer_ids = {t.id for t in gold_steer}
    gold_enc = spread(list(gold), cfg.n_gold)
    judge_enc = [t for t in gold_enc if t.id not in steer_ids]
    # the judging half runs through every response layer, the steering half only up to the
    # steering probes' layers (and only when the text source is built)
    st_resp = _collect(
        model,
        texts_dataset(judge_enc, ds.labels),
        acts_dir,
        f"gold-judge-{len(judge_enc)}t",
        run_layers.judge_store,
        mode="response-only",
        split="gold-judge",
        **kw,
    )
    st_text = None
    if "text" in wanted:
        steer_enc = [t for t in gold_enc if t.id in steer_ids]
        st_text = _collect(
            model,
            texts_dataset(steer_enc, ds.labels),
            acts_dir,
            f"gold-steer-{cfg.text_position}-{len(steer_enc)}t",
            run_layers.gold_steer_store,
            mode="response-only",
            position=cfg.text_position,
            split="gold-steer",
            **kw,
        )
    timings["collect_s"] = time.perf_counter() - t0
    timings["collect_gold_s"] = (
        timings["collect_s"] - timings["collect_train_s"] - timings["collect_evaluator_s"]
    )
    record_memory(timings, "collect")

    t0 = time.perf_counter()
    ml_layers = list(run_layers.multilayer)
    question_of = {t.id: t.question_id or t.id for t in gold}
    kits: dict[str, SteeringKit] = {}
    for src in wanted:
        if src == "prompt":
            assert st_train is not None
            kits[src] = steering_kit(
                st_train.load(layers=run_layers.steering_probes), ls, ml_layers, cfg
            )
        else:
            assert st_text is not None
            kits[src] = steering_kit(
                st_text.load(layers=run_layers.steering_probes),
                ls,
                ml_layers,
                cfg,
                groups=question_of,
            )
    for source, kit in kits.items():
        kit.probe.save(work / "probes" / f"steering-{source}")
        if kit.linear_probe is not None:
            kit.linear_probe.save(work / "probes" / f"steering-{source}-linear")
        kit.vectors.save(work / "vectors" / source)
    evaluator = train_probe(
        st_eval.load(layers=[le]), le, config=ProbeConfig(hidden=256, seed=cfg.seed + 1)
    )
    evaluator.save(work / "probes" / "evaluator")
    # read the text at or after the steering layer
    resp_acts = st_resp.load(layers=run_layers.response)
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
    response_evaluator = resp_probes[best]
    response_evaluator.save(work / "probes" / "response-evaluator")
    del resp_acts  # stage-local: the probes keep what they need
    timings["train_s"] = time.perf_counter() - t0
    record_memory(timings, "train")
    t0 = time.perf_counter()
    text_evaluator = (
        TextEvaluator.fit(gold_judge, ds.labels)
        if cfg.texts
        else default_text_evaluator(texts=gold_judge, family=cfg.dataset)
    )
    timings["text_evaluator_s"] = time.perf_counter() - t0
    probe = kits[cfg.probe_source].probe
    log.info(
        f"  steering probe ({cfg.probe_source}) val acc {probe.metrics['val_accuracy']:.3f}; "
        f"evaluator (layer {le}) "
        f"{evaluator.metrics['val_accuracy']:.3f} single / "
        f"{evaluator.metrics.get('val_multi_topk_rate', float('nan')):.3f} two-tone top-2; "
        f"response evaluator (layer {best}) {response_evaluator.metrics['val_accuracy']:.3f} "
        f"(chance {1 / len(ds.labels):.3f}); gold texts {len(gold_steer)} steering / "
        f"{len(gold_judge)} evaluators"
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
        kits,
        evaluator,
        response_evaluator,
        resp_probes,
        text_evaluator,
        gold,
        gold_steer,
        gold_judge,
        external,
        timings,
        steer_store=st_text,
        work_dir=work,
    )
