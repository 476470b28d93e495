"""The steering method registry: the trained artefacts methods are built from, and every method
a comparison can name.

:class:`SteeringKit` holds what a setup trained at the steering layer (probe, CAA vectors,
probes at other layers, a linear probe, mapped DCT vectors); :data:`METHODS` maps each method's
name to its :class:`MethodDef` (display label, description, how it is built from a kit, the
alpha the calibration search starts from, and the steerer's settings: a
:class:`~ks_lens.steering.config.KSteeringConfig` or :class:`~ks_lens.steering.config.CAAConfig`,
from which :func:`ksteer_method` and :func:`caa_method` build it). :data:`REFERENCE_METHODS` is the default set of a
comparison (``ks_lens.comparison.ComparisonConfig.methods``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ks_lens.errors import ConfigError
from ks_lens.probes import Probe
from ks_lens.steering.base import SteeringMethod
from ks_lens.steering.caa import CAA, SteeringVectors
from ks_lens.steering.config import CAAConfig, KSteeringConfig
from ks_lens.steering.dac import DynamicComposition
from ks_lens.steering.dct import DCT, DCTVectors
from ks_lens.steering.dense import DENSE_BELOW, DenseSteering
from ks_lens.steering.ksteer import KSteering
from ks_lens.steering.multilayer import MultiLayer


@dataclass(frozen=True)
class SteeringKit:
    """The trained artefacts methods are built from.

    ``probe`` and ``vectors`` sit at the steering layer; ``layer_probes`` (probes of the same
    source at several layers, by model layer) serve the multi-layer method; ``linear_probe`` (a
    linear probe of the same source and layer as ``probe``) serves ``ksteer_linear``;
    ``token_probe`` (a probe of the same layer trained on every answer token of the gold texts,
    :func:`~ks_lens.probes.train_token_probe`) serves ``ksteer_token``.
    """

    probe: Probe
    vectors: SteeringVectors
    layer_probes: Mapping[int, Probe] = field(default_factory=dict)
    dct: DCTVectors | None = None  # mapped DCT vectors (run_comparison fits them when needed)
    linear_probe: Probe | None = None
    token_probe: Probe | None = None
    # per-label vectors trained on gold answers' likelihood (ks_lens.steering.likelihood)
    likelihood_vectors: SteeringVectors | None = None

    def likelihood(self) -> SteeringVectors:
        if self.likelihood_vectors is None:
            raise ConfigError(
                "the likelihood method needs likelihood-trained vectors "
                "(SteeringKit.likelihood_vectors; ks_lens.pipeline.prepare trains them on the "
                "steering half of the gold texts when a method needs them, or train them with "
                "ks_lens.steering.likelihood.train_likelihood_vectors)"
            )
        return self.likelihood_vectors

    def linear(self) -> Probe:
        if self.linear_probe is None:
            raise ConfigError(
                "the ksteer_linear method needs a linear steering probe (SteeringKit.linear_probe; "
                "ks_lens.pipeline.prepare trains one when a method needs it)"
            )
        return self.linear_probe

    def token(self) -> Probe:
        if self.token_probe is None:
            raise ConfigError(
                "the ksteer_token method needs a per-token steering probe (SteeringKit.token_probe, "
                "ks_lens.probes.train_token_probe; ks_lens.pipeline.prepare trains one when a "
                "method needs it)"
            )
        return self.token_probe

    def dct_vectors(self) -> DCTVectors:
        if self.dct is None:
            raise ConfigError("the dct method needs mapped DCT vectors (SteeringKit.dct)")
        return self.dct

    def multilayer_probes(self) -> list[Probe]:
        if len(self.layer_probes) < 2:
            raise ConfigError(
                "the multi-layer method needs probes at two or more layers (layer_probes; "
                "PipelineConfig.multilayer_layers), got "
                f"{sorted(self.layer_probes) or 'none'}"
            )
        return [self.layer_probes[L] for L in sorted(self.layer_probes)]


@dataclass(frozen=True)
class MethodDef:
    label: str  # short name for tables and plots
    description: str
    build: Callable[[SteeringKit], SteeringMethod]
    alpha0: float  # starting point of the calibration search
    config: KSteeringConfig | CAAConfig | None = None  # the steerer's settings (DCT has none)


def caa_method(label: str, description: str, config: CAAConfig, alpha0: float) -> MethodDef:
    """A CAA method on the kit's vectors, with ``config``."""
    return MethodDef(label, description, lambda kit: CAA(kit.vectors, config), alpha0, config)


def ksteer_method(
    label: str,
    description: str,
    config: KSteeringConfig,
    alpha0: float,
    probe: Callable[[SteeringKit], Probe] = lambda kit: kit.probe,
) -> MethodDef:
    """A K-Steering method with ``config`` on the kit's steering probe (or ``probe(kit)``)."""
    return MethodDef(label, description, lambda kit: KSteering(probe(kit), config), alpha0, config)


def _multilayer(kit: SteeringKit, config: KSteeringConfig) -> MultiLayer:
    return MultiLayer([KSteering(p, config) for p in kit.multilayer_probes()])


CLIP_FRACTION = 0.25  # ksteer_clip: per-token trust region, as a fraction of |x|
_MULTILAYER = KSteeringConfig()
#: ksteer_dense: ksteer_precond's settings at every hook of the band (issue 24, lever 4)
_DENSE = KSteeringConfig(precondition="diag")
_LIKELIHOOD = CAAConfig(combine="mean")  # the vectors were trained combined by their mean

METHODS: dict[str, MethodDef] = {
    "caa_mean": caa_method(
        "CAA (mean)",
        "CAA, mean of per-label vectors (reference baseline)",
        CAAConfig(combine="mean"),
        1.0,
    ),
    "caa_sum": caa_method(
        "CAA (sum)",
        "CAA, sum of per-label vectors, unit norm",
        CAAConfig(combine="sum", normalize=True),
        20.0,
    ),
    "ksteer": ksteer_method(
        "K-Steering", "K-Steering, 1 gradient step", KSteeringConfig(steps=1), 30.0
    ),
    "ksteer_multistep": ksteer_method(
        "K-Steering (3 steps)",
        "K-Steering, 3 steps with decay 0.95",
        KSteeringConfig(steps=3, decay=0.95),
        10.0,
    ),
    "ksteer_linear": ksteer_method(
        "K-Steer linear probe",
        "K-Steering, 1 gradient step, with a linear probe (same source and layer as the MLP probe)",
        KSteeringConfig(steps=1),
        30.0,
        probe=SteeringKit.linear,
    ),
    "ksteer_balanced": ksteer_method(
        "K-Steer balanced",
        "K-Steering, per-label gradients balanced to equal norm",
        KSteeringConfig(combine="balanced"),
        30.0,
    ),
    "ksteer_pcgrad": ksteer_method(
        "K-Steer PCGrad",
        "K-Steering, conflicting label gradients projected out (PCGrad)",
        KSteeringConfig(combine="pcgrad"),
        30.0,
    ),
    "ksteer_logsigmoid": ksteer_method(
        "K-Steer log-sigmoid",
        "K-Steering, log-sigmoid objective (saturated targets stop pulling)",
        KSteeringConfig(objective="logsigmoid", steps=3, decay=0.95),
        30.0,
    ),
    "ksteer_softmin": ksteer_method(
        "K-Steer soft-min",
        "K-Steering, soft-min objective (weakest target pulls hardest)",
        KSteeringConfig(objective="softmin", steps=3, decay=0.95),
        30.0,
    ),
    "ksteer_unit": ksteer_method(
        "K-Steer unit step",
        "K-Steering, each token's step normalised to length alpha",
        KSteeringConfig(step_norm="unit"),
        4.0,
    ),
    "ksteer_relative": ksteer_method(
        "K-Steer relative step",
        "K-Steering, each token's step normalised to alpha x |x|",
        KSteeringConfig(step_norm="relative"),
        0.1,
    ),
    "ksteer_precond": ksteer_method(
        "K-Steer preconditioned",
        "K-Steering, 1 step in the probe's input geometry (gradient x the input variances)",
        KSteeringConfig(precondition="diag"),
        3.0,
    ),
    "ksteer_token": ksteer_method(
        "K-Steer per-token probe",
        "K-Steering as ksteer_precond, with a probe trained on every answer token of the gold "
        "texts (the first N: per-token probe)",
        KSteeringConfig(precondition="diag"),
        3.0,
        probe=SteeringKit.token,
    ),
    "ksteer_clip": ksteer_method(
        "K-Steer clipped",
        f"K-Steering, each token's step clipped to {CLIP_FRACTION:g} x |x| (trust region)",
        KSteeringConfig(max_step=CLIP_FRACTION),
        30.0,
    ),
    "ksteer_multilayer": MethodDef(
        "K-Steer multi-layer",
        "K-Steering at several layers (probes at each), alpha split equally",
        lambda kit: _multilayer(kit, _MULTILAYER),
        30.0,
        _MULTILAYER,
    ),
    # one probe (kit.probe, at blocks.L.hook_resid_post) stepped at resid_post of L-6 .. L, alpha
    # split equally (ks_lens.steering.dense): the hooks share one alpha, so a step's total is on
    # ksteer_precond's scale and the search starts at its alpha0, as ksteer_multilayer's does at
    # ksteer's
    "ksteer_dense": MethodDef(
        "K-Steer dense",
        f"K-Steering preconditioned, the steering probe's step at resid_post of its layer and the "
        f"{DENSE_BELOW} below (one probe, used off its layer), alpha split equally",
        lambda kit: DenseSteering(kit.probe, config=_DENSE),
        3.0,
        _DENSE,
    ),
    "likelihood": MethodDef(
        "Likelihood-trained",
        "CAA (mean) with per-label vectors trained to raise the likelihood of gold answers in "
        "the target labels over the same question's other answers (BiPO-style)",
        lambda kit: CAA(kit.likelihood(), _LIKELIHOOD),
        1.0,
        _LIKELIHOOD,
    ),
    "dac": MethodDef(
        "DAC",
        "CAA (mean) with each label's term weighted per generation step by min(1, KL of the "
        "label alone vs unsteered) (Dynamic Activation Composition); full weight outside "
        "generation",
        lambda kit: DynamicComposition(kit.vectors),
        1.0,
        CAAConfig(combine="mean"),  # its full-weight step

    ),
    "dct": MethodDef(
        "DCT",
        "DCT vectors (unsupervised, mapped to labels by the evaluator), unit sum",
        lambda kit: DCT(kit.dct_vectors()),
        20.0,
    ),
}
#: the default comparison's methods. ``caa_sum`` is not among them (from issue 23): under an
#: alpha calibrated per number of targets it differs from ``caa_mean`` only in each
#: combination's vector length, and no demo found a difference in text (docs/evaluation.md)
REFERENCE_METHODS: tuple[str, ...] = (
    "caa_mean",
    "ksteer",
    "ksteer_precond",
    "ksteer_linear",
)
#: methods built from ``SteeringKit.linear_probe`` (prepare trains it only when one is requested)
LINEAR_PROBE_METHODS: frozenset[str] = frozenset({"ksteer_linear"})
#: methods built from ``SteeringKit.token_probe`` (prepare trains it only when one is requested)
TOKEN_PROBE_METHODS: frozenset[str] = frozenset({"ksteer_token"})
#: methods built from ``SteeringKit.likelihood_vectors`` (prepare trains them only when requested)
LIKELIHOOD_METHODS: frozenset[str] = frozenset({"likelihood"})


__all__ = [
    "CLIP_FRACTION",
    "LIKELIHOOD_METHODS",
    "LINEAR_PROBE_METHODS",
    "METHODS",
    "REFERENCE_METHODS",
    "TOKEN_PROBE_METHODS",
    "MethodDef",
    "SteeringKit",
    "caa_method",
    "ksteer_method",
]
