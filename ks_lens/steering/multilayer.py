"""Steering at several layers at once, alpha split across them (the K-Steering paper's variant).

``MultiLayer([KSteering(p12), KSteering(p15), KSteering(p18)])`` installs one hook per member
at the member's own hook point; a spec with strength ``alpha`` gives member ``i`` the strength
``alpha * weights[i]`` (default ``1 / n`` each), so ``alpha`` keeps the scale of one member's
alpha and the total push is shared among the layers rather than multiplied by their number::

    ml = MultiLayer([KSteering(probes[12]), KSteering(probes[18])])
    with ml.steer(model, target=["casual", "concise"], alpha=40.0):
        out = ks_lens.generate(model, ["How do I boil an egg?"])

Members steer in the model's order (an earlier layer's change reaches the later member's input,
and the later member's probe reads it). All members must know the same labels and sit at
different hook points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from jaxtyping import Float

from ks_lens.errors import ConfigError, LabelError, WrongTypeError
from ks_lens.hooks import canonical_hook_name
from ks_lens.steering.base import HookList, Steerer, SteeringSpec, Transform
from ks_lens.steering.positions import Positions, PositionTracker
from ks_lens.types import Model


class MultiLayer(Steerer):
    """Several single-hook steerers applied together, with ``alpha`` split by ``weights``.

    Args:
        members: the steerers (e.g. one :class:`~ks_lens.steering.KSteering` per layer);
            same label names, distinct hook points.
        weights: each member's share of alpha (non-negative, summing to 1; default equal).
    """

    def __init__(self, members: Sequence[Steerer], weights: Sequence[float] | None = None):
        members = list(members)
        if not members:
            raise ConfigError("MultiLayer needs at least one member steerer")
        for m in members:
            if not isinstance(m, Steerer) or isinstance(m, MultiLayer):
                raise WrongTypeError(
                    f"MultiLayer members must be single-hook Steerers, got {type(m).__name__}"
                )
        names = members[0].label_names
        for m in members[1:]:
            if tuple(m.label_names) != tuple(names):
                raise LabelError(
                    f"MultiLayer members know different labels: {list(names)} vs {list(m.label_names)}"
                )
        hooks = [m.hook_name for m in members]
        if len(set(hooks)) != len(hooks):
            raise ConfigError(f"MultiLayer members must sit at distinct hook points, got {hooks}")
        if weights is None:
            w = [1.0 / len(members)] * len(members)
        else:
            w = [float(x) for x in weights]
            if len(w) != len(members):
                raise ConfigError(f"{len(w)} weights for {len(members)} members")
            if any(not math.isfinite(x) or x < 0 for x in w) or not math.isclose(sum(w), 1.0):
                raise ConfigError(f"weights must be non-negative and sum to 1, got {w}")
        self.members = members
        self.weights = tuple(w)
        self.label_names = tuple(names)

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{m!r} x {w:.3g}" for m, w in zip(self.members, self.weights, strict=True)
        )
        return f"MultiLayer([{inner}])"

    @property
    def hook_name(self) -> str:
        """The first member's hook point (every member's is in :attr:`hook_names`)."""
        return self.members[0].hook_name

    @property
    def hook_names(self) -> tuple[str, ...]:
        return tuple(m.hook_name for m in self.members)

    @property
    def d_model(self) -> int | None:
        return self.members[0].d_model

    def check_model(self, model: Model) -> None:
        for m in self.members:
            m.check_model(model)

    def transforms(self, spec: SteeringSpec) -> list[tuple[str, Transform]]:
        return [
            (m.hook_name, m.transform(replace(spec, alpha=spec.alpha * w)))
            for m, w in zip(self.members, self.weights, strict=True)
        ]

    def transform(self, spec: SteeringSpec) -> Transform:
        raise ConfigError(
            "a MultiLayer method has one transform per hook point: use transforms(spec), or steer "
            "with steer()/hooks()"
        )

    def apply(
        self,
        x: Float[torch.Tensor, "... d_model"],
        target: Sequence[str] | str | None = None,
        avoid: Sequence[str] | str | None = None,
        alpha: float = 1.0,
    ) -> Float[torch.Tensor, "... d_model"]:
        raise ConfigError(
            "a MultiLayer method steers several layers of a model; apply() to one tensor is "
            "undefined. Apply a member (ml.members[i].apply) or steer the model"
        )

    def hooks(
        self,
        model: Model,
        target: Sequence[str] | str | None = None,
        avoid: Sequence[str] | str | None = None,
        alpha: float = 1.0,
        *,
        positions: Positions = "all",
        hook_names: Sequence[str] | str | None = None,
        allow_other_hooks: bool = False,
        tracker: PositionTracker | None = None,
    ) -> HookList:
        if hook_names is not None:
            wanted = [hook_names] if isinstance(hook_names, str) else list(hook_names)
            own = {canonical_hook_name(h, model) for h in self.hook_names}
            if {canonical_hook_name(h, model) for h in wanted} != own:
                raise ConfigError(
                    f"a MultiLayer method steers at its members' hook points {list(self.hook_names)}; "
                    "other hook_names are not supported"
                )
        return super().hooks(model, target, avoid, alpha, positions=positions, tracker=tracker)
