"""The pipeline's settings (:class:`PipelineConfig`), the probe sources and the default
layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from ks_lens.activations import DEFAULT_MAX_TOKENS, POOLINGS, Pooling
from ks_lens.comparison import (
    ComparisonConfig,
)
from ks_lens.errors import ConfigError
from ks_lens.models import ModelOptions
from ks_lens.utils import renamed_fields

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


@renamed_fields(text_position="text_pooling")
@dataclass
class PipelineConfig(ModelOptions):
    """The model (:class:`~ks_lens.models.ModelOptions`: ``model``, ``device``, ``dtype``), the
    sizes of each stage, and the comparison's settings (``comparison``).

    ``seed`` and ``batch_size`` are set here once for the whole run: a PipelineConfig sets its
    comparison's ``seed`` and ``batch_size`` to them (``--seed``, ``--batch-size``; there is no
    separate comparison seed or batch size).

    The defaults are the full demo run; :meth:`fast` is a one-minute smoke run. ``ks-lens demo``
    and the studies in ``analysis/`` take every field as an option (:mod:`ks_lens.cli.options`).
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
    text_pooling: Pooling = "last"  # text source: last answer token or "mean_response"
    gold_steer_fraction: float = 0.5  # share of gold questions for text-grounded steering
    # per-token probe (ksteer_token): answer tokens per steering-half gold text that become rows
    token_probe_tokens: int = DEFAULT_MAX_TOKENS
    multilayer_offsets: tuple[int, ...] = (-6, -3, 0)  # multi-layer method: layers around `layer`
    # rows per forward pass: collection, and the comparison's activation level and calibration
    batch_size: int = 16
    # splits, probes, evaluators, tiny-model weights and the comparison (cell sampling, bootstrap)
    seed: int = 0
    comparison: ComparisonConfig = field(default_factory=full_comparison)  # fast: per-size

    def __post_init__(self) -> None:
        # one seed and one batch size per run: the comparison takes the pipeline's
        if isinstance(self.comparison, ComparisonConfig):
            self.comparison = replace(self.comparison, seed=self.seed, batch_size=self.batch_size)

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
        if self.text_pooling not in POOLINGS:
            raise ConfigError(f"text_pooling must be in {POOLINGS}, got {self.text_pooling!r}")
        if not 0 < self.gold_steer_fraction < 1:
            raise ConfigError("gold_steer_fraction must be strictly between 0 and 1")
        if isinstance(self.token_probe_tokens, bool) or not (
            isinstance(self.token_probe_tokens, int) and self.token_probe_tokens >= 1
        ):
            raise ConfigError(
                "token_probe_tokens (answer tokens per gold text of the per-token probe) must be "
                f"a positive integer, got {self.token_probe_tokens!r}"
            )
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
        if c.alpha_per == "combination" and self.n_calib < c.calib_questions_per_combination:
            raise ConfigError(
                f"alpha_per 'combination' calibrates every combination on at least "
                f"{c.calib_questions_per_combination} calibration questions, but n_calib is "
                f"{self.n_calib}; raise n_calib or lower calib_questions_per_combination"
            )
        if c.text_coverage == "all-combinations" and self.n_gen < c.min_questions_per_combination:
            raise ConfigError(
                f"text_coverage 'all-combinations' answers every combination on at least "
                f"{c.min_questions_per_combination} test questions, but n_gen is {self.n_gen}; "
                "raise n_gen or lower min_questions_per_combination"
            )
        return self


EVAL_GAP = 4
"""Layers between the steering layer and the default evaluator layer (fewer at the top)."""

STEER_DEPTH = 0.6
"""The default steering layer's depth, as a fraction of the model's layers."""


def default_layers(
    n_layers: int, layer: int | None = None, eval_layer: int | None = None
) -> tuple[int, int]:
    """Steering layer (default :data:`STEER_DEPTH` of the depth) and evaluator layer (default
    :data:`EVAL_GAP` layers later, capped at the last layer). The evaluator must read above the steering layer: at the
    steered hook point it would read the push itself."""
    ls = round(STEER_DEPTH * n_layers) if layer is None else layer
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
    where = "last answer token" if cfg.text_pooling == "last" else "mean over the answer tokens"
    return (
        f"gold texts re-encoded without instruction ({where}), on the gold questions set "
        f"aside for steering ({cfg.gold_steer_fraction:.0%})"
    )
