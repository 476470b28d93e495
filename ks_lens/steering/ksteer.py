"""K-Steering: gradient steps on activations against a behaviour probe.

For a probe with raw logits ``f(x)``, the reference objective is

    L(x) = mean_{a in avoid} f_a(x) - mean_{t in target} f_t(x),     x' = x - alpha * grad_x L(x).

**Per-token, per-example gradients.** Every steered token's activation gets its own gradient of
its own loss: the loss is *summed* over tokens and examples, never averaged. The reference code
averaged logits over all positions (padding included) and over the batch, so its effective step
was ``alpha / (batch * seq_len)``: prompts were pushed far less than cached decode steps, and
alpha changed meaning with batch size. Here alpha means the same thing for any batch size,
prompt length or KV-cache step.

Options (all documented in ``docs/steering.md``):

``steps``, ``decay``
    several steps, step ``k`` uses ``alpha * decay**k`` and a fresh gradient (paper Algorithm 1).
``step_norm``
    ``None`` (raw gradient; alpha is in logit-per-activation units), ``"unit"`` (each step has
    L2 norm ``alpha``) or ``"relative"`` (each step has norm ``alpha * |x|``).
``precondition``
    ``None`` (the raw gradient) or ``"diag"``: the step is taken in the probe's input geometry,
    ``Δx = -alpha * Σ grad_x L`` with ``Σ = diag(σ²)`` the variances the probe standardises its
    input by. Through ``(x - μ) / σ`` the raw gradient scales as ``1/σ`` per dimension and tilts
    toward low-variance directions; ``σ² grad_x L = σ grad_h L`` undoes that (the gradient with
    respect to the standardised input ``h``, mapped back to activation units). Applied before
    ``step_norm``.
``max_step``
    a per-token trust region: each token's total change (all steps together) is scaled down, if
    needed, to at most ``max_step * |x|``. Tokens whose probe gradient is unusually large no
    longer get a far larger step than the others at the same alpha.
``objective``
    ``"logits"`` (the reference), ``"logsigmoid"`` (maximise ``log p`` of targets and
    ``log(1 - p)`` of avoids: saturated labels stop pulling), ``"softmin"`` (maximise a smooth
    minimum of the target logits: the weakest target pulls hardest).
``combine``
    ``"sum"`` (the gradient of the total loss), ``"balanced"`` (each label's gradient rescaled to
    the labels' mean gradient norm before summing) or ``"pcgrad"`` (the component of one label's
    gradient that opposes another's is projected out first, PCGrad-style).

All objectives are written as ``grad L = sum_l c_l(x) grad f_l(x)`` with per-token coefficients
``c_l`` (see :func:`label_coefficients`), so per-label gradients come from one batched
vector-Jacobian product.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float

from ks_lens.errors import ConfigError, LabelError, WrongTypeError
from ks_lens.hooks import HOOK_KINDS, check_steerable_kind
from ks_lens.probes import Probe
from ks_lens.steering.base import Steerer, SteeringSpec, Transform
from ks_lens.steering.config import (
    COMBINES,
    OBJECTIVES,
    STEP_NORMS,
    Combine,
    KSteeringConfig,
    Objective,
    Precondition,
    StepNorm,
    resolve_config,
    unknown_choice,
)
from ks_lens.types import Model

Projection = Literal["reflect", "remove"]
PROJECTIONS: tuple[Projection, ...] = get_args(Projection)
_EPS = 1e-12


def label_coefficients(
    logits: Float[torch.Tensor, "n k"],
    target: Sequence[int],
    avoid: Sequence[int],
    objective: Objective = "logits",
    temperature: float = 1.0,
) -> Float[torch.Tensor, "n k"]:
    """Per-token ``c_l`` with ``grad_x L = sum_l c_l * grad_x f_l`` (zero for uninvolved labels)."""
    c = torch.zeros_like(logits)
    t = list(target)
    a = list(avoid)
    if objective == "logits":
        if t:
            c[:, t] = -1.0 / len(t)
        if a:
            c[:, a] = 1.0 / len(a)
    elif objective == "logsigmoid":
        if t:
            c[:, t] = -(1.0 - torch.sigmoid(logits[:, t])) / len(t)
        if a:
            c[:, a] = torch.sigmoid(logits[:, a]) / len(a)
    elif objective == "softmin":
        if t:
            c[:, t] = -torch.softmax(-logits[:, t] / temperature, dim=-1)
        if a:
            c[:, a] = 1.0 / len(a)
    else:
        raise unknown_choice("objective", objective, OBJECTIVES)
    return c


def objective_value(
    logits: Float[torch.Tensor, "n k"],
    target: Sequence[int],
    avoid: Sequence[int],
    objective: Objective = "logits",
    temperature: float = 1.0,
) -> Float[torch.Tensor, " n"]:
    """The per-token loss ``L`` whose gradient :func:`label_coefficients` describes (lower is better)."""
    t = list(target)
    a = list(avoid)
    zero = logits.new_zeros(logits.shape[0])
    if objective == "logits":
        lt = logits[:, t].mean(-1) if t else zero
        la = logits[:, a].mean(-1) if a else zero
        return la - lt
    if objective == "logsigmoid":
        lt = torch.nn.functional.softplus(-logits[:, t]).mean(-1) if t else zero
        la = torch.nn.functional.softplus(logits[:, a]).mean(-1) if a else zero
        return lt + la
    if objective == "softmin":
        lt = temperature * torch.logsumexp(-logits[:, t] / temperature, dim=-1) if t else zero
        la = logits[:, a].mean(-1) if a else zero
        return lt + la
    raise unknown_choice("objective", objective, OBJECTIVES)


def _grad_context():
    """Gradients inside hooks: generation runs under no_grad, maybe inference_mode."""
    return torch.inference_mode(False), torch.enable_grad()


def probe_gradients(
    probe: Probe,
    x: Float[torch.Tensor, "n d_model"],
    labels: Sequence[int],
    weights: Float[torch.Tensor, "n m"] | None = None,
) -> tuple[Float[torch.Tensor, "m n d_model"], Float[torch.Tensor, "n k"]]:
    """Per-token gradients ``w_l * grad_x f_l(x)`` for each label in ``labels`` (one batched VJP).

    Returns the gradients ``[m, n, d]`` and the logits ``[n, K]`` at ``x``.
    """
    inf_off, grad_on = _grad_context()
    with inf_off, grad_on:
        xg = x.detach().clone().requires_grad_(True)
        logits = probe(xg)
        m = len(labels)
        if m == 0:
            return x.new_zeros(0, *x.shape), logits.detach()
        go = logits.new_zeros(m, *logits.shape)
        for i, lab in enumerate(labels):
            go[i, :, lab] = 1.0 if weights is None else weights[:, i]
        (g,) = torch.autograd.grad(logits, xg, grad_outputs=go, is_grads_batched=True)
    return g.detach(), logits.detach()


def combine_gradients(
    per_label: Float[torch.Tensor, "m n d"], how: Combine = "sum"
) -> Float[torch.Tensor, "n d"]:
    """Combine per-label gradient contributions (already multiplied by their coefficients)."""
    if per_label.shape[0] == 0:
        raise ConfigError("no label gradients to combine")
    if how == "sum":
        return per_label.sum(0)
    if how == "balanced":
        norms = per_label.norm(dim=-1, keepdim=True)  # [m, n, 1]
        scale = norms.mean(0, keepdim=True)
        return (per_label / norms.clamp(min=_EPS) * scale).sum(0)
    if how == "pcgrad":
        out = per_label.clone()
        m = per_label.shape[0]
        for i in range(m):
            gi = out[i]
            for j in range(m):
                if i == j:
                    continue
                gj = per_label[j]
                dot = (gi * gj).sum(-1, keepdim=True)
                coef = torch.where(
                    dot < 0,
                    dot / (gj * gj).sum(-1, keepdim=True).clamp(min=_EPS),
                    torch.zeros_like(dot),
                )
                gi = gi - coef * gj
            out[i] = gi
        return out.sum(0)
    raise unknown_choice("combine", how, COMBINES)


def normalise_step(
    g: Float[torch.Tensor, "n d"], x: Float[torch.Tensor, "n d"], how: StepNorm | None
) -> Float[torch.Tensor, "n d"]:
    if how is None:
        return g
    unit = g / g.norm(dim=-1, keepdim=True).clamp(min=_EPS)
    if how == "unit":
        return unit
    if how == "relative":
        return unit * x.norm(dim=-1, keepdim=True)
    raise unknown_choice("step_norm", how, STEP_NORMS)


def clip_step(
    delta: Float[torch.Tensor, "n d"], x: Float[torch.Tensor, "n d"], max_step: float
) -> Float[torch.Tensor, "n d"]:
    """``delta`` scaled down per row, where needed, to norm at most ``max_step * |x|``."""
    cap = max_step * x.norm(dim=-1, keepdim=True)
    norm = delta.norm(dim=-1, keepdim=True)
    return delta * (cap / norm.clamp(min=_EPS)).clamp(max=1.0)


class _ProbeSteerer(Steerer):
    """A steering method driven by a probe: steers at the probe's hook point, knows its labels."""

    def __init__(self, probe: Probe):
        if not isinstance(probe, Probe):
            raise WrongTypeError(
                f"{type(self).__name__} needs a ks_lens Probe, got {type(probe).__name__}"
            )
        if probe.hook_kind not in HOOK_KINDS:
            check_steerable_kind(probe.hook_name)  # raises, listing where steering may write
        self.probe = probe
        self.label_names = probe.label_names

    @property
    def hook_name(self) -> str:
        return self.probe.hook_name

    def check_model(self, model: Model) -> None:
        self.probe.check_compatible(model)

    @property
    def d_model(self) -> int:
        return self.probe.d_model


class KSteering(_ProbeSteerer):
    """K-Steering with a trained :class:`~ks_lens.probes.Probe` (see the module docstring).

    Each steered token's activation ``x`` ``[d_model]`` takes ``steps`` gradient steps on the
    probe's loss: ``x <- x - alpha * decay**k * grad_x L(x)``, with
    ``L = mean_avoid f_a(x) - mean_target f_t(x)`` for raw probe logits ``f``.

    Args:
        probe: the probe; steering happens at ``probe.hook_name`` (``d_model`` must match).
        config: the settings, a :class:`~ks_lens.steering.config.KSteeringConfig`; or give its
            fields as keyword options (``KSteering(probe, steps=3)``), not both:
        steps: gradient steps per token (>= 1); ``decay``: step ``k`` uses ``alpha * decay**k``.
        step_norm: ``None`` (raw gradient), ``"unit"`` (steps of length alpha) or
            ``"relative"`` (steps of length ``alpha * |x|``).
        objective: ``"logits"``, ``"logsigmoid"`` or ``"softmin"`` (with ``temperature``).
        combine: ``"sum"``, ``"balanced"`` or ``"pcgrad"`` for several labels.
        max_step: if set, clip each token's total change to ``max_step * |x|`` (per-token trust
            region, applied after all steps); ``None`` leaves steps unbounded.
        precondition: ``None`` (raw gradient) or ``"diag"`` (the gradient times the probe's input
            variances, ``σ²``: a step in the probe's standardised geometry; module docstring).

    Examples:
        With ``probe = ks.train_probe(acts, 2)``:

        >>> k_steer = ks.KSteering(probe, steps=3, decay=0.95)
        >>> with k_steer.steer(model, target=["casual", "concise"], avoid=["expert"], alpha=4.0):
        ...     answer = ks.generate(model, "How do I boil an egg?", max_new_tokens=8)
        >>> x = acts[2][:3]                                     # [3, d_model]
        >>> x_new = k_steer.apply(x, target="casual", alpha=0.5)
        >>> casual = probe.label_indices(["casual"])
        >>> bool((probe(x_new)[:, casual] > probe(x)[:, casual]).all())   # the probe agrees
        True
    """

    def __init__(self, probe: Probe, config: KSteeringConfig | None = None, **options: Any):
        super().__init__(probe)
        #: the method's settings (validated on construction)
        self.config = resolve_config(KSteeringConfig, config, options, "KSteering")

    @property
    def steps(self) -> int:
        return self.config.steps

    @property
    def decay(self) -> float:
        return self.config.decay

    @property
    def step_norm(self) -> StepNorm | None:
        return self.config.step_norm

    @property
    def objective(self) -> Objective:
        return self.config.objective

    @property
    def combine(self) -> Combine:
        return self.config.combine

    @property
    def temperature(self) -> float:
        return self.config.temperature

    @property
    def max_step(self) -> float | None:
        return self.config.max_step

    @property
    def precondition(self) -> Precondition | None:
        return self.config.precondition

    def __repr__(self) -> str:
        return (
            f"KSteering(hook={self.hook_name!r}, steps={self.steps}, decay={self.decay}, "
            f"step_norm={self.step_norm!r}, objective={self.objective!r}, combine={self.combine!r}, "
            f"max_step={self.max_step!r}, precondition={self.precondition!r})"
        )

    def step(
        self, x: Float[torch.Tensor, "n d_model"], spec: SteeringSpec
    ) -> Float[torch.Tensor, "n d_model"]:
        """One step's direction at ``x`` (before ``alpha``): :meth:`direction`, preconditioned
        and normalised as configured; the step is ``x - alpha * decay**k * step(x)``."""
        g = self.direction(x, spec)
        if self.precondition == "diag":
            g = g * self.probe.std.to(g.dtype) ** 2
        return normalise_step(g, x, self.step_norm)

    def direction(
        self, x: Float[torch.Tensor, "n d_model"], spec: SteeringSpec
    ) -> Float[torch.Tensor, "n d_model"]:
        """``grad_x L`` at ``x`` as combined by ``self.combine`` (before step normalisation)."""
        t = self.probe.label_indices(spec.target)
        a = self.probe.label_indices(spec.avoid)
        labels = t + a
        if self.combine == "sum":
            with torch.no_grad():
                logits = self.probe(x)
            c = label_coefficients(logits, t, a, self.objective, self.temperature)
            inf_off, grad_on = _grad_context()
            with inf_off, grad_on:
                xg = x.detach().clone().requires_grad_(True)
                (g,) = torch.autograd.grad(self.probe(xg), xg, grad_outputs=c)
            return g.detach()
        with torch.no_grad():
            logits = self.probe(x)
        c = label_coefficients(logits, t, a, self.objective, self.temperature)[:, labels]
        per_label, _ = probe_gradients(self.probe, x, labels, weights=c)
        return combine_gradients(per_label, self.combine)

    def trajectory(
        self, x: Float[torch.Tensor, "n d_model"], spec: SteeringSpec
    ) -> list[Float[torch.Tensor, "n d_model"]]:
        """``[x_0, x_1, ..., x_steps]``: the activation after each step (for analysis)."""
        p = self.probe.mean
        xs = [x.detach().to(device=p.device, dtype=p.dtype)]
        for k in range(self.steps):
            cur = xs[-1]
            xs.append(cur - spec.alpha * self.decay**k * self.step(cur, spec))
        if self.max_step is not None:  # the trust region bounds the total change
            x0 = xs[0]
            xs = [x0 + clip_step(xi - x0, x0, self.max_step) for xi in xs]
        return xs

    def transform(self, spec: SteeringSpec) -> Transform:
        probe_ref = self.probe.mean

        def f(x: Float[torch.Tensor, "n d_model"]) -> Float[torch.Tensor, "n d_model"]:
            xf = x.detach().to(device=probe_ref.device, dtype=probe_ref.dtype)
            cur = xf
            for k in range(self.steps):
                cur = cur - spec.alpha * self.decay**k * self.step(cur, spec)
            delta = cur - xf
            if self.max_step is not None:
                delta = clip_step(delta, xf, self.max_step)
            return x + delta.to(device=x.device, dtype=x.dtype)

        return f


class KProjection(_ProbeSteerer):
    """Avoid-only projection removal (paper Algorithm 2).

    ``g = grad_x mean_{a in avoid} f_a(x)``; ``x' = x - c * (x . g / |g|^2) g`` with
    ``c = 2 * alpha`` for ``how="reflect"`` and ``c = alpha`` for ``how="remove"``: at
    ``alpha = 1`` a reflection across, or a projection onto, the hyperplane orthogonal to the
    avoid gradient. Targets are not allowed.
    """

    def __init__(self, probe: Probe, *, how: Projection = "reflect"):
        super().__init__(probe)
        if how not in PROJECTIONS:
            raise ConfigError("how must be 'reflect' or 'remove'")
        self.how = how

    def spec(
        self,
        target: Sequence[str] | str | None = None,
        avoid: Sequence[str] | str | None = None,
        alpha: float = 1.0,
    ) -> SteeringSpec:
        s = super().spec(target, avoid, alpha)
        if s.target:
            raise LabelError("projection removal is avoid-only: pass avoid labels and no target")
        return s

    def transform(self, spec: SteeringSpec) -> Transform:
        a = self.probe.label_indices(spec.avoid)
        coef = spec.alpha * (2.0 if self.how == "reflect" else 1.0)
        probe_ref = self.probe.mean

        def f(x: Float[torch.Tensor, "n d_model"]) -> Float[torch.Tensor, "n d_model"]:
            xf = x.detach().to(device=probe_ref.device, dtype=probe_ref.dtype)
            w = xf.new_full((xf.shape[0], len(a)), 1.0 / len(a))
            per, _ = probe_gradients(self.probe, xf, a, weights=w)
            g = per.sum(0)
            proj = (xf * g).sum(-1, keepdim=True) / (g * g).sum(-1, keepdim=True).clamp(min=_EPS)
            delta = (-coef * proj * g).to(device=x.device, dtype=x.dtype)
            return x + delta

        return f
