"""The machinery every steering method shares: target/avoid specs, hook functions, and the
context manager that installs them and always removes them.

A steering method is a function ``x' = f(x)`` on activations ``[n, d_model]`` (one row per
steered token). :func:`steering_hook` turns such a function into a TransformerLens hook that
applies it at the chosen positions; :meth:`SteeringMethod.steer` installs the hooks (and a
:class:`~ks_lens.steering.positions.PositionTracker`) for the duration of a ``with`` block::

    with method.steer(model, target=["casual"], alpha=4.0):
        logits = model(tokens)                  # steered
    logits = model(tokens)                      # bit-identical to never having steered

For ``run_with_hooks`` users, :meth:`SteeringMethod.hooks` returns ``[(hook_name, fn), ...]``.
A :class:`SteeringMethod` writes at one or more hook points; a :class:`Steerer` is one that
writes at a single hook point, and can also steer a tensor directly (:meth:`Steerer.apply`).
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from einops import rearrange
from jaxtyping import Float

from ks_lens.errors import ConfigError, LabelError, MetadataMismatchError
from ks_lens.hooks import canonical_hook_name, check_steerable, same_hook_point
from ks_lens.steering.positions import (
    Positions,
    PositionTracker,
    check_positions,
    select_whole_call,
)
from ks_lens.types import Model
from ks_lens.utils import check_d_model

Transform = Callable[[Float[torch.Tensor, "n d_model"]], Float[torch.Tensor, "n d_model"]]
HookList = list[tuple[str, Callable[..., Any]]]


@dataclass(frozen=True)
class SteeringSpec:
    """What to steer toward (``target``) and away from (``avoid``), and how hard (``alpha``)."""

    target: tuple[str, ...] = ()
    avoid: tuple[str, ...] = ()
    alpha: float = 1.0  # >= 0: see check_alpha

    @classmethod
    def make(
        cls,
        target: Sequence[str] | str | None,
        avoid: Sequence[str] | str | None,
        alpha: float,
        label_names: Sequence[str],
    ) -> SteeringSpec:
        """Validate labels against ``label_names`` and alpha (:func:`check_alpha`); labels are
        lists or comma-separated strings."""
        t = _as_tuple(target)
        a = _as_tuple(avoid)
        unknown = [x for x in (*t, *a) if x not in label_names]
        if unknown:
            raise LabelError(f"unknown label(s) {unknown}; known labels are {list(label_names)}")
        both = sorted(set(t) & set(a))
        if both:
            raise LabelError(
                f"label(s) {both} are both target and avoid; a label can only be one of them"
            )
        if len(set(t)) != len(t) or len(set(a)) != len(a):
            raise LabelError("a label is repeated in target or avoid")
        if not t and not a:
            raise LabelError("nothing to steer: target and avoid are both empty")
        return cls(t, a, check_alpha(alpha))


def check_alpha(alpha: Any) -> float:
    """``alpha`` as a float: a finite number ``>= 0`` (Python, NumPy or a 0-d tensor).

    The direction comes from ``target`` and ``avoid`` alone, for every method: a negative alpha
    would quietly turn "toward casual" into "away from casual", so it is refused; put the label
    in ``avoid`` instead.
    """
    if isinstance(alpha, torch.Tensor):
        if alpha.ndim != 0 or alpha.is_complex() or alpha.dtype == torch.bool:
            raise ConfigError(
                f"alpha must be a real number or a 0-d tensor, got a {alpha.dtype} tensor of "
                f"shape {tuple(alpha.shape)}"
            )
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise ConfigError(f"alpha must be a finite number >= 0, got {alpha!r}")
    value = float(alpha)
    if not math.isfinite(value):
        raise ConfigError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if value < 0:
        raise ConfigError(
            f"alpha must be >= 0, got {value:g}: the direction comes from target and avoid. To "
            "steer away from a label, put it in avoid (a negative alpha would silently reverse "
            "target and avoid)"
        )
    return value


def _as_tuple(x: Sequence[str] | str | None) -> tuple[str, ...]:
    if x is None:
        return ()
    if isinstance(x, str):
        return tuple(s.strip() for s in x.split(",") if s.strip())
    return tuple(x)


def steering_hook(
    transform: Transform, positions: Positions = "all", tracker: PositionTracker | None = None
) -> Callable[..., Any]:
    """A TransformerLens forward hook applying ``transform`` at the selected positions.

    Unselected positions are returned untouched (same values, same dtype). The change is
    added as a constant, so gradients with respect to earlier activations still flow.
    """
    check_positions(positions)

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        b, s, _ = act.shape  # [batch, pos, d_model]
        if tracker is not None:
            sel = tracker.select(positions, b, s, act.device)
        else:
            sel = select_whole_call(positions, b, s, act.device)
        n_sel = int(sel.sum())
        if n_sel == 0:
            return act
        if n_sel == b * s:  # every position: one [tokens, d_model] batch for the transform
            out = transform(rearrange(act, "batch pos d -> (batch pos) d"))
            return rearrange(out, "(batch pos) d -> batch pos d", batch=b)
        out = act.clone()
        out[sel] = transform(act[sel])
        return out

    return hook


def grouped_steering_hook(
    transforms: Sequence[Transform | None],
    row_group: torch.Tensor,
    positions: Positions = "all",
    tracker: PositionTracker | None = None,
) -> Callable[..., Any]:
    """One hook applying a different transform to each group of batch rows.

    ``row_group[b]`` is the index into ``transforms`` of row ``b`` (``-1``: leave the row alone);
    a ``None`` transform also leaves its rows alone. Lets one batched forward pass or generation
    carry several steering configurations side by side (e.g. every method of a comparison).
    After ``tracker.reindex(sel)`` (a re-indexed KV cache), row ``b`` is prompt row ``sel[b]``.
    """
    check_positions(positions)

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        b, s, _ = act.shape
        rows = None if tracker is None else tracker.rows
        row_group_now = row_group if rows is None else row_group[rows]
        if row_group_now.shape[0] != b:
            raise ConfigError(
                f"row_group has {row_group_now.shape[0]} rows but the batch has {b}"
            )
        sel = (
            tracker.select(positions, b, s, act.device)
            if tracker is not None
            else select_whole_call(positions, b, s, act.device)
        )
        groups = row_group_now.to(act.device)
        out = None
        for g, f in enumerate(transforms):
            if f is None:
                continue
            m = sel & (groups == g).unsqueeze(1)
            if not bool(m.any()):
                continue
            if out is None:
                out = act.clone()
            out[m] = f(act[m])
        return act if out is None else out

    return hook


def group_transforms(
    model: Model, groups: Sequence[Steering | None]
) -> dict[str, list[Transform | None]]:
    """Where and how each group steers: canonical hook name -> one transform per group (``None``
    where that group does not steer at the hook point). Checks every method against ``model``
    and every spec against the method's labels; aliases of one hook point share one entry."""
    by_hook: dict[str, list[Transform | None]] = {}
    for g, item in enumerate(groups):
        if item is None:
            continue
        method, spec = item
        method.check_model(model)
        checked = SteeringSpec.make(spec.target, spec.avoid, spec.alpha, method.label_names)
        for name, f in method.transforms(checked):
            check_steerable(model, name)
            key = canonical_hook_name(name, model)  # aliases share one hook
            by_hook.setdefault(key, [None] * len(groups))[g] = f
    return by_hook


@contextmanager
def steer_groups(
    model: Model,
    groups: Sequence[Steering | None],
    row_group: Sequence[int] | torch.Tensor,
    *,
    positions: Positions = "all",
) -> Iterator[PositionTracker]:
    """Steer each group of batch rows with its own ``(method, spec)`` (``None``: unsteered).

    ``row_group`` gives each batch row's group index. Methods may sit at different hook points;
    each hook point gets one hook serving the groups steered there.
    """
    rg = torch.as_tensor(row_group, dtype=torch.long)
    tracker = PositionTracker()
    fwd = [
        (name, grouped_steering_hook(ts, rg, positions, tracker))
        for name, ts in group_transforms(model, groups).items()
    ]
    with installed(model, fwd, tracker):
        yield tracker


@contextmanager
def installed(
    model: Model, fwd_hooks: HookList, tracker: PositionTracker
) -> Iterator[PositionTracker]:
    """Install ``fwd_hooks`` and the position tracker for a ``with`` block; remove both on exit."""
    tracker.install(model)
    try:
        with model.hooks(fwd_hooks=fwd_hooks):
            yield tracker
    finally:
        tracker.remove()


class SteeringMethod(ABC):
    """What every steering method is: where it writes (:attr:`hook_names`) and how
    (:meth:`transforms`), with :meth:`hooks` and :meth:`steer` to install it on a model.

    Single-hook methods are :class:`Steerer` instances (they also steer a tensor directly,
    :meth:`Steerer.apply`); a :class:`~ks_lens.steering.multilayer.MultiLayer` writes at several
    hook points. :func:`steer_groups` and the comparison take any steering method.
    """

    #: label names the method knows (target/avoid must come from these)
    label_names: tuple[str, ...] = ()

    @property
    @abstractmethod
    def hook_names(self) -> tuple[str, ...]:
        """Every hook point the method writes at, in the order of :meth:`transforms`."""

    @abstractmethod
    def transforms(self, spec: SteeringSpec) -> list[tuple[str, Transform]]:
        """``[(hook_name, transform)]``: where and how the method steers for ``spec``; each
        transform is a function ``x -> x'`` applied to each steered token's activation at its
        hook point."""

    def check_model(self, model: Model) -> None:  # noqa: B027 - optional override
        """Raise if the method's artefacts were made for another model."""

    @property
    def d_model(self) -> int | None:
        """The activation width the method was made for (``None``: any)."""
        return None

    def _check_width(self, got: Any, arg: str) -> None:
        if self.d_model is not None:
            where = ", ".join(self.hook_names)
            check_d_model(got, self.d_model, arg, f"{type(self).__name__} (made at {where})")

    def spec(
        self,
        target: Sequence[str] | str | None = None,
        avoid: Sequence[str] | str | None = None,
        alpha: float = 1.0,
    ) -> SteeringSpec:
        return SteeringSpec.make(target, avoid, alpha, self.label_names)

    def _at_hooks(
        self,
        model: Model,
        spec: SteeringSpec,
        hook_names: Sequence[str] | str,
        allow_other_hooks: bool,
    ) -> list[tuple[str, Transform]]:
        """The transforms for ``hooks(..., hook_names=...)``: a method writing at several hook
        points takes only its own (either spelling); :class:`Steerer` also takes others."""
        wanted = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        own = {canonical_hook_name(h, model) for h in self.hook_names}
        if {canonical_hook_name(h, model) for h in wanted} != own:
            raise ConfigError(
                f"a {type(self).__name__} method steers at its members' hook points "
                f"{list(self.hook_names)}; other hook_names are not supported"
            )
        return self.transforms(spec)

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
        """``[(hook_name, fn)]`` for ``model.run_with_hooks`` / ``model.hooks`` / ``model.generate``.

        Same arguments as :meth:`steer`. These bare hooks cannot tell prompt tokens from
        generated ones (in ``model.generate`` every decode step would look like a new prompt),
        so they take only ``positions="all"``; for ``"prompt"``, ``"generated"`` or ``"last"``
        use ``with method.steer(model, ..., positions=...)``, which also works around TL's
        ``model.generate`` and ``run_with_hooks``.

        Examples:
            >>> method = ks.CAA(ks.SteeringVectors.fit(acts, 2))
            >>> hooks = method.hooks(model, target=["casual"], alpha=4.0)
            >>> seen = []
            >>> def spy(act, hook):                   # your own hook runs alongside
            ...     seen.append(hook.name)
            >>> tokens = ks.tokenize_chat(model, "Hi").input_ids
            >>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks + [("blocks.3.hook_resid_post", spy)])
            >>> [name for name, _ in hooks], seen
            (['blocks.2.hook_resid_post'], ['blocks.3.hook_out'])
        """
        check_positions(positions)
        if positions != "all" and tracker is None:
            raise ConfigError(
                f"positions={positions!r} needs to know which tokens are prompt and which are "
                "generated, which bare hooks cannot see (in model.generate each decode step looks "
                "like a new prompt). Use positions='all' here, or wrap the call in "
                f"`with method.steer(model, ..., positions={positions!r}):` instead of passing hooks"
            )
        self.check_model(model)
        self._check_width(int(model.cfg.d_model), "model (its cfg.d_model)")
        spec = self.spec(target, avoid, alpha)
        if hook_names is None:
            pairs = self.transforms(spec)
        else:
            pairs = self._at_hooks(model, spec, hook_names, allow_other_hooks)
        for name, _ in pairs:
            check_steerable(model, name)
        return [(name, steering_hook(f, positions, tracker)) for name, f in pairs]

    @contextmanager
    def steer(
        self,
        model: Model,
        target: Sequence[str] | str | None = None,
        avoid: Sequence[str] | str | None = None,
        alpha: float = 1.0,
        *,
        positions: Positions = "all",
        hook_names: Sequence[str] | str | None = None,
        allow_other_hooks: bool = False,
    ) -> Iterator[PositionTracker]:
        """Steer ``model`` inside a ``with`` block; hooks are removed on exit, even on errors.

        Args:
            target: labels to strengthen (list, or comma-separated string).
            avoid: labels to suppress.
            alpha: step size (see each method for its meaning).
            positions: ``"all"``, ``"prompt"``, ``"generated"`` or ``"last"``.
            hook_names: where to steer; defaults to the method's own hook point (either
                spelling: ``blocks.L.hook_resid_post`` or ``blocks.L.hook_out``). Other hook
                points need ``allow_other_hooks=True``.

        Yields:
            The :class:`~ks_lens.steering.positions.PositionTracker` serving the hooks (what
            ``with method.steer(...) as tracker`` binds). Most code ignores it; it exposes
            ``tracker.prompt_len`` / ``tracker.past_len`` of the last forward call and
            ``tracker.expect_prompt(n)`` to fix the prompt length when inputs are embeddings.
            Any forward inside the block is steered: ``model(...)``, ``run_with_hooks``,
            ``run_with_cache``, TL's ``model.generate`` (with or without KV cache) and
            :func:`ks_lens.generate`.

        Examples:
            >>> tokens = ks.tokenize_chat(model, "How do I boil an egg?").input_ids
            >>> with ks.KSteering(probe).steer(model, target=["casual"], alpha=4.0, positions="generated"):
            ...     out = model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False)
            >>> out.shape == (1, tokens.shape[1] + 4)
            True
        """
        tracker = PositionTracker()
        fwd = self.hooks(
            model,
            target,
            avoid,
            alpha,
            positions=positions,
            hook_names=hook_names,
            allow_other_hooks=allow_other_hooks,
            tracker=tracker,
        )
        with installed(model, fwd, tracker):
            yield tracker


class Steerer(SteeringMethod):
    """Base class of single-hook steering methods: subclasses define :attr:`hook_name` and
    :meth:`transform` for a spec; :meth:`apply` steers a tensor directly."""

    @property
    @abstractmethod
    def hook_name(self) -> str:
        """The hook point the method was made for (its probe's or vectors' hook)."""

    @abstractmethod
    def transform(self, spec: SteeringSpec) -> Transform:
        """The function ``x -> x'`` applied to each steered token's activation."""

    @property
    def hook_names(self) -> tuple[str, ...]:
        """``(hook_name,)``."""
        return (self.hook_name,)

    def transforms(self, spec: SteeringSpec) -> list[tuple[str, Transform]]:
        """``[(hook_name, transform(spec))]``: one pair, at the method's own hook point."""
        return [(self.hook_name, self.transform(spec))]

    def apply(
        self,
        x: Float[torch.Tensor, "... d_model"],
        target: Sequence[str] | str | None = None,
        avoid: Sequence[str] | str | None = None,
        alpha: float = 1.0,
    ) -> Float[torch.Tensor, "... d_model"]:
        """Steer a tensor of activations directly (no model): ``x'`` of the same shape."""
        self._check_width(x, "x")
        f = self.transform(self.spec(target, avoid, alpha))
        shape = x.shape
        return f(x.reshape(-1, shape[-1])).reshape(shape)

    def _at_hooks(
        self,
        model: Model,
        spec: SteeringSpec,
        hook_names: Sequence[str] | str,
        allow_other_hooks: bool,
    ) -> list[tuple[str, Transform]]:
        """The transform at each of ``hook_names``: hook points other than the method's own
        need ``allow_other_hooks``."""
        names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        if not names:
            raise ConfigError("no hook points to steer at")
        for name in names:
            check_steerable(model, name)
            if not same_hook_point(name, self.hook_name, model) and not allow_other_hooks:
                raise MetadataMismatchError(
                    f"{type(self).__name__} was made at {self.hook_name!r}; steering at {name!r} uses it "
                    "outside the hook point it was trained on. Pass allow_other_hooks=True to do so anyway."
                )
        f = self.transform(spec)
        return [(name, f) for name in names]


#: one steering configuration, a plain ``(method, spec)`` tuple (in a sequence of them, ``None``
#: means "unsteered")
Steering: TypeAlias = tuple[SteeringMethod, SteeringSpec]
