"""The layers a run reads (:class:`RunLayers`): which layers each activation store holds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from ks_lens.errors import ConfigError
from ks_lens.pipeline.config import PipelineConfig, default_layers

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
