"""Dense K-Steering: one probe's step at a band of layers, alpha split across the hooks.

The K-Steering reference notebooks train one probe at one layer and hook every layer at
``resid_pre``, ``resid_mid`` and ``resid_post``, applying that probe's gradient step everywhere.
:class:`DenseSteering` does the same on a chosen **band**: one
:class:`~ks_lens.steering.KSteering` step of one probe at each hook point
``blocks.{l}.hook_{kind}`` for ``l`` in ``layers`` and ``kind`` in ``kinds``, with ``alpha``
split across the hooks by ``weights`` (equal by default), exactly as
:class:`~ks_lens.steering.multilayer.MultiLayer` splits it (a ``DenseSteering`` *is* a
``MultiLayer`` whose members all share one probe)::

    dense = DenseSteering(probe, layers=range(12, 19), precondition="diag")
    with dense.steer(model, target=["casual", "concise"], alpha=3.0):
        out = ks_lens.generate(model, ["How do I boil an egg?"])

**The probe is used off its training layer, on purpose.** It was trained on activations at
``probe.hook_name`` (``blocks.L.hook_resid_post``); at every other hook point of the band its
gradient is an extrapolation, justified only by the residual stream changing slowly from layer
to layer. (``KSteering.steer(..., hook_names=[...], allow_other_hooks=True)`` also steers one
probe at several hook points, but gives every hook the full alpha; here the hooks share it.)

**What a band means.** ``layers`` are block indices, ``kinds`` residual-stream hook kinds,
``"resid_post"`` (the block's output) and/or ``"resid_pre"`` (its input); hooks are installed
in the model's forward order. ``blocks.{l}.hook_resid_pre`` carries the same residual-stream
value as ``blocks.{l-1}.hook_resid_post`` (nothing runs between them), yet they are two hook
points: with both kinds, each interior layer boundary of the band is stepped twice in a row
(the second step's gradient is taken at the first one's result, like ``steps=2``), each step
with its own share of alpha. ``kinds=("resid_post",)`` (the default) steps every boundary
once; ``("resid_pre", "resid_post")`` is the reference's density.

**No resid_mid.** In TransformerLens 4, and on ks-lens's plain-HF fast path (which routes the
blocks' ``hook_in``/``hook_out`` and ``ln2.hook_in``), a write to ``hook_resid_mid``
(``ln2.hook_in``) reaches only that block's MLP input: the HF decoder layer adds the MLP output
to its own residual variable, so the stream carried forward never sees the change
(:mod:`ks_lens.hooks`). The reference's mid hooks cannot be reproduced by a write there, so a
band takes ``resid_pre`` and ``resid_post`` only (``"resid_mid"`` raises a ``ConfigError``).

**The default band** (:func:`dense_band`): the probe's layer ``L`` and the :data:`DENSE_BELOW`
(6) layers below it, ``resid_post``: ``L-6 .. L`` (clipped at layer 0; 7 hooks). It spans the
same depth as ``ksteer_multilayer`` (layers ``L-6, L-3, L``, a probe at each), so the two differ
in density and in using one probe rather than three. Like it, it writes nowhere above ``L``, so
no hook sits nearer the activation evaluator (4 layers above ``L`` by default) than the
single-layer methods' hook does. It needs no layer count (only the lower end is clipped); a band
reaching past the model's last layer is refused by :meth:`DenseSteering.check_model`, before
any hook is installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

from ks_lens.errors import ConfigError, HookPointError, WrongTypeError
from ks_lens.hooks import n_layers, parse_resid_hook
from ks_lens.probes import Probe
from ks_lens.steering.config import KSteeringConfig, resolve_config
from ks_lens.steering.ksteer import KSteering
from ks_lens.steering.multilayer import MultiLayer
from ks_lens.types import Model

DenseKind = Literal["resid_pre", "resid_post"]
#: the hook kinds a band may take, in forward order within a block
DENSE_KINDS: tuple[DenseKind, ...] = get_args(DenseKind)
#: the default band: the probe's layer and this many layers below it
DENSE_BELOW = 6


def dense_band(layer: int, below: int = DENSE_BELOW) -> tuple[int, ...]:
    """The layers ``max(0, layer - below) .. layer``: the default band of a probe at ``layer``.

    >>> dense_band(18), dense_band(2)
    ((12, 13, 14, 15, 16, 17, 18), (0, 1, 2))
    """
    for name, v in (("layer", layer), ("below", below)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"dense_band: {name} must be a non-negative int, got {v!r}")
    return tuple(range(max(0, layer - below), layer + 1))


class _KSteeringAt(KSteering):
    """A :class:`KSteering` that writes at ``hook_name`` instead of its probe's hook point: the
    probe is deliberately used off the layer it was trained on (see the module docstring)."""

    def __init__(self, probe: Probe, config: KSteeringConfig, hook_name: str):
        super().__init__(probe, config)
        self._hook_name = hook_name

    @property
    def hook_name(self) -> str:
        return self._hook_name


def _check_layers(layers: Sequence[int]) -> tuple[int, ...]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ConfigError(f"layers must be a sequence of block indices, got {layers!r}")
    band = list(layers)
    if not band:
        raise ConfigError("the band is empty: give at least one layer (layers=[...])")
    bad = [x for x in band if isinstance(x, bool) or not isinstance(x, int) or x < 0]
    if bad:
        raise ConfigError(f"layers must be non-negative block indices, got {bad} in {band}")
    if len(set(band)) != len(band):
        raise ConfigError(f"a layer is repeated in the band {band}")
    return tuple(sorted(band))


def _check_kinds(kinds: Sequence[str]) -> tuple[DenseKind, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    names = [k[5:] if isinstance(k, str) and k.startswith("hook_") else k for k in kinds]
    if not names:
        raise ConfigError(f"the band has no hook kinds: give one or more of {DENSE_KINDS}")
    if len(set(names)) != len(names):
        raise ConfigError(f"a hook kind is repeated: {list(kinds)}")
    for k in names:
        if k == "resid_mid":
            raise ConfigError(
                "dense steering cannot write at resid_mid: in TransformerLens 4 a write to "
                "hook_resid_mid changes only that block's MLP input, not the residual stream "
                f"carried forward. Use kinds from {DENSE_KINDS}"
            )
        if k not in DENSE_KINDS:
            raise ConfigError(
                f"unknown hook kind {k!r} for a dense band: the probe reads the residual "
                f"stream, so a band takes kinds from {DENSE_KINDS}"
            )
    return tuple(k for k in DENSE_KINDS if k in names)  # forward order


class DenseSteering(MultiLayer):
    """One probe's K-Steering step at every hook point of a band, ``alpha`` split across them.

    Hook ``i`` gets ``alpha * weights[i]``, i.e. the change a ``KSteering(probe, config)`` with
    that alpha makes to the activation arriving there (see the module docstring for the band,
    the off-layer use of the probe and why there is no ``resid_mid``).

    Args:
        probe: the probe, trained at a residual-stream hook point (usually
            ``blocks.L.hook_resid_post``).
        layers: the band's block indices (distinct, >= 0; default :func:`dense_band` of the
            probe's layer: ``L-6 .. L``). Layers past the model's last one are refused when the
            method meets a model (:meth:`check_model`).
        kinds: ``"resid_post"`` and/or ``"resid_pre"`` (default ``("resid_post",)``; the
            ``hook_`` prefix is accepted).
        weights: each hook's share of alpha, in :attr:`hook_names` order (non-negative, summing
            to 1; default equal).
        config: the K-Steering settings (:class:`~ks_lens.steering.config.KSteeringConfig`), or
            its fields as keyword options, as for :class:`~ks_lens.steering.KSteering`.

    Examples:
        With ``probe`` at ``blocks.2.hook_resid_post``:

        >>> dense = ks.DenseSteering(probe, layers=[1, 2], precondition="diag")
        >>> dense.hook_names, dense.weights
        (('blocks.1.hook_resid_post', 'blocks.2.hook_resid_post'), (0.5, 0.5))
        >>> ks.DenseSteering(probe).layers                       # the default band: L-6 .. L
        (0, 1, 2)
        >>> with dense.steer(model, target=["casual", "concise"], alpha=3.0):
        ...     answer = ks.generate(model, "How do I boil an egg?", max_new_tokens=8)
    """

    def __init__(
        self,
        probe: Probe,
        layers: Sequence[int] | None = None,
        kinds: Sequence[str] = ("resid_post",),
        weights: Sequence[float] | None = None,
        config: KSteeringConfig | None = None,
        **options: Any,
    ):
        if not isinstance(probe, Probe):
            raise WrongTypeError(f"DenseSteering needs a ks_lens Probe, got {type(probe).__name__}")
        try:
            probe_layer, _ = parse_resid_hook(probe.hook_name)
        except HookPointError:
            raise ConfigError(
                f"DenseSteering steps along the residual stream; the probe sits at "
                f"{probe.hook_name!r}, not at a residual-stream hook point"
            ) from None
        cfg = resolve_config(KSteeringConfig, config, options, "DenseSteering")
        band = dense_band(probe_layer) if layers is None else _check_layers(layers)
        kinds_ = _check_kinds(kinds)
        hooks = [f"blocks.{layer}.hook_{kind}" for layer in band for kind in kinds_]
        super().__init__([_KSteeringAt(probe, cfg, h) for h in hooks], weights)
        #: the probe every hook steps against
        self.probe = probe
        #: the K-Steering settings every hook uses
        self.config = cfg
        #: the band's layers (ascending) and kinds (forward order)
        self.layers = band
        self.kinds = kinds_

    def __repr__(self) -> str:
        w = self.weights
        share = f"{w[0]:.3g} each" if len(set(w)) == 1 else ", ".join(f"{x:.3g}" for x in w)
        return (
            f"DenseSteering(probe at {self.probe.hook_name!r}, layers={list(self.layers)}, "
            f"kinds={list(self.kinds)}, alpha shares: {share}, {self.config!r})"
        )

    def check_model(self, model: Model) -> None:
        """The probe's model check, and every layer of the band inside the model."""
        n = n_layers(model)
        over = [layer for layer in self.layers if layer >= n]
        if over:
            raise ConfigError(
                f"the dense band {list(self.layers)} reaches layer(s) {over}, but the model has "
                f"{n} layers (0..{n - 1}); give layers inside that range"
            )
        self.probe.check_compatible(model)


__all__ = ["DENSE_BELOW", "DENSE_KINDS", "DenseKind", "DenseSteering", "dense_band"]
