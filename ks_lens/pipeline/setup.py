"""What :func:`~ks_lens.pipeline.prepare` returns: the :class:`Setup` every study starts from."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ks_lens.activations import ActivationStore
from ks_lens.comparison import (
    ComparisonConfig,
    ComparisonResult,
    SteeringKit,
    fit_comparison_dct,
    run_comparison,
    uses_dct,
)
from ks_lens.datasets import (
    BehaviourDataset,
    Splits,
)
from ks_lens.datasets.gold_texts import (
    LabelledText,
)
from ks_lens.errors import ConfigError
from ks_lens.pipeline.config import PipelineConfig
from ks_lens.pipeline.kits import likelihood_vectors
from ks_lens.probes import Probe
from ks_lens.steering import SteeringVectors
from ks_lens.steering.dct import DCTVectors
from ks_lens.steering.likelihood import LikelihoodConfig, train_likelihood_vectors
from ks_lens.text_evaluator import TextEvaluator
from ks_lens.types import Model


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

    def train_likelihood(
        self, config: LikelihoodConfig | None = None, *, progress: bool = True
    ) -> SteeringVectors:
        """Likelihood-trained vectors at the steering layer (the ``likelihood`` method's), trained
        on the steering half of the gold texts (``config`` default: ``LikelihoodConfig(seed=
        config.seed)``), cached in ``work_dir/vectors/likelihood`` (a rerun with the same model,
        layer, config and texts reuses them) and put into every steering kit."""
        cfg = config or LikelihoodConfig(seed=self.config.seed)
        t0 = time.perf_counter()
        labels = self.dataset.labels
        if self.work_dir is None:
            vecs = train_likelihood_vectors(
                self.model, self.gold_steer, self.layer, labels, cfg, progress=progress
            )
        else:
            where = self.work_dir / "vectors" / "likelihood"
            vecs = likelihood_vectors(
                self.model, self.gold_steer, self.layer, labels, cfg, where, progress=progress
            )
        self.kits = {s: replace(k, likelihood_vectors=vecs) for s, k in self.kits.items()}
        self.timings["likelihood_s"] = time.perf_counter() - t0
        return vecs

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
        (the paper protocol's at a swept layer, :mod:`ks_lens.cli.paper`)."""
        cfg = self.config
        source = source or cfg.probe_source
        kit = kit if kit is not None else self.kit_of(source)
        ev = self.evaluator if evaluator is None else evaluator
        n_test = max(cfg.n_eval, cfg.n_gen)
        test = list(self.eval_questions(n_test)[0] if test_questions is None else test_questions)
        calib_split = self.questions("calibration", cfg.n_calib)
        calib = list(calib_split if calib_questions is None else calib_questions)
        config = config or cfg.comparison
        dct = self.dct_vectors(
            kit.probe.layer, calib, config, source, evaluator=ev, learned=kit.dct
        )
        return run_comparison(
            self.model,
            probe=kit.probe,
            vectors=kit.vectors,
            layer_probes=kit.layer_probes,
            evaluator=ev,
            linear_probe=kit.linear_probe,
            token_probe=kit.token_probe,
            likelihood_vectors=kit.likelihood_vectors,
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
