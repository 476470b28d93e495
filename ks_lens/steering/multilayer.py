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

A ``MultiLayer`` is a :class:`~ks_lens.steering.base.SteeringMethod` (``steer()``, ``hooks()``,
``transforms()``, :func:`~ks_lens.steering.base.steer_groups`, the comparison), not a
:class:`~ks_lens.steering.base.Steerer`: it has no single hook point, transform or
``apply()`` on one tensor (steer a member's tensor with ``ml.members[i].apply``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from ks_lens.errors import ConfigError, LabelError, WrongTypeError
from ks_lens.steering.base import Steerer, SteeringMethod, SteeringSpec, Transform
from ks_lens.types import Model


class MultiLayer(SteeringMethod):
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
            if not isinstance(m, Steerer):
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
    def hook_names(self) -> tuple[str, ...]:
        """Each member's hook point, in the members' order."""
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
