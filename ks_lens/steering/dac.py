"""Dynamic Activation Composition (DAC; Scalena, Sarti and Nissim, 2024): CAA (mean) whose label
terms are re-weighted at every generation step by how much each label alone would move the
next-token distribution there.

At step ``t`` of a greedy answer, for each term ``j`` of the spec (a target label with sign +1, an
avoid label with sign -1), the model is run once unsteered and once with that label's CAA vector
alone at full strength (``x + alpha * s_j * v_j``), both on the answer so far. Their next-token
distributions, each cut to its top-``p`` nucleus and renormalised over the union of the two
nuclei, give ``KL_j = KL(p_unsteered || p_label)`` (the reference code's direction). The label's
weight at that step is ``w_j = min(1, KL_j / kl_scale)``: a label whose vector no longer changes
what comes next is steered less. The answer itself is generated with::

    x' = x + alpha * (mean_{j in target} w_j v_j - mean_{j in avoid} w_j v_j)

so with every weight at 1 it is exactly CAA (mean) at the same ``alpha``. The reference code clips
the KL to ``[0, alpha_max]`` and uses it as the term's alpha; here alpha stays the calibrated
scale (so the comparison can hold KL fixed) and the KL sets each term's share of it.

The weights exist only in generation (:func:`generate_composed`, which
:func:`~ks_lens.evaluation.generate_and_score_rows` uses for these rows). In a plain forward
pass (readouts, ``with method.steer(...)``) the method steers at full weight, as CAA (mean).
Each generation step runs ``1 + n_terms`` probe rows besides the answer row, so it costs about
``2 + n_terms`` times an unsteered step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float

from ks_lens._runtime.hf_path import plain_forward
from ks_lens.errors import ConfigError
from ks_lens.generation import BatchGeneration, batch_result, generation_positions
from ks_lens.hooks import check_steerable
from ks_lens.models import pad_token_id
from ks_lens.models.chat import TokenBatch, check_context
from ks_lens.steering.base import SteeringSpec
from ks_lens.steering.caa import CAA, SteeringVectors
from ks_lens.steering.config import CAAConfig
from ks_lens.types import Model
from ks_lens.utils import check_int


@dataclass(frozen=True)
class DACConfig:
    """The settings of :class:`DynamicComposition`."""

    top_p: float = 0.95  # nucleus of each distribution kept for the KL (the reference's 0.95)
    kl_scale: float = 1.0  # KL (nats) at which a term's weight reaches 1

    def __post_init__(self) -> None:
        for name, value in (("top_p", self.top_p), ("kl_scale", self.kl_scale)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if self.top_p > 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "kl_scale", float(self.kl_scale))


def nucleus(logits: Float[torch.Tensor, "n vocab"], top_p: float) -> Bool[torch.Tensor, "n vocab"]:
    """The smallest set of most likely tokens whose probability reaches ``top_p`` (the most likely
    token always included), per row."""
    probs, order = torch.softmax(logits.float(), -1).sort(-1, descending=True)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    keep_sorted = before < top_p
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def truncated_kl(
    p_logits: Float[torch.Tensor, "n vocab"],
    q_logits: Float[torch.Tensor, "n vocab"],
    top_p: float,
) -> Float[torch.Tensor, " n"]:
    """``KL(p || q)`` per row over the union of the two top-``p`` nuclei, each distribution
    renormalised over that union."""
    keep = nucleus(p_logits, top_p) | nucleus(q_logits, top_p)
    neg = torch.tensor(float("-inf"))
    lp = torch.log_softmax(torch.where(keep, p_logits.float(), neg), -1)
    lq = torch.log_softmax(torch.where(keep, q_logits.float(), neg), -1)
    terms = torch.where(keep, lp.exp() * (lp - lq), torch.zeros(()))
    return terms.sum(-1).clamp_min(0.0)


def term_weights(
    base_logits: Float[torch.Tensor, "n vocab"],
    label_logits: Float[torch.Tensor, "n vocab"],
    config: DACConfig,
) -> Float[torch.Tensor, " n"]:
    """``min(1, KL(base || label) / kl_scale)`` per row (:func:`truncated_kl`)."""
    kl = truncated_kl(base_logits, label_logits, config.top_p)
    return (kl / config.kl_scale).clamp(0.0, 1.0)


class DynamicComposition(CAA):
    """DAC: CAA (mean) with each label's term weighted per generation step (module docstring).

    Examples:
        >>> dac = ks.DynamicComposition(ks.SteeringVectors.fit(acts, 2))
        >>> x = acts[2][:3]
        >>> torch.equal(dac.apply(x, target="casual", alpha=1.5), ks.CAA(dac.vectors).apply(x, target="casual", alpha=1.5))
        True

    Args:
        vectors: the per-label CAA vectors; steering happens at ``vectors.hook_name``.
        config: a :class:`DACConfig` (default ``top_p=0.95``, ``kl_scale=1.0``).
    """

    def __init__(self, vectors: SteeringVectors, config: DACConfig | None = None):
        super().__init__(vectors, CAAConfig(combine="mean"))
        if config is not None and not isinstance(config, DACConfig):
            raise ConfigError(f"DynamicComposition takes config=DACConfig(...), got {config!r}")
        self.dac = config or DACConfig()

    def __repr__(self) -> str:
        return f"DynamicComposition(hook={self.hook_name!r}, {self.dac})"

    def terms(self, spec: SteeringSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors [n_terms, d_model], signs [n_terms])``: the spec's labels, targets first;
        the full-weight step is ``alpha * sum_j coef_j v_j`` with ``coef`` from :meth:`coefs`."""
        labels = (*spec.target, *spec.avoid)
        vecs = self.vectors.vectors[self.vectors.indices(labels)]
        signs = torch.tensor([1.0] * len(spec.target) + [-1.0] * len(spec.avoid))
        return vecs, signs

    @staticmethod
    def coefs(spec: SteeringSpec) -> torch.Tensor:
        """Each term's share in CAA (mean): ``+1/|target|`` for targets, ``-1/|avoid|`` for
        avoid labels."""
        t, a = len(spec.target), len(spec.avoid)
        return torch.tensor([1.0 / max(t, 1)] * t + [-1.0 / max(a, 1)] * a)


@dataclass
class ComposedGeneration:
    """:func:`generate_composed`'s answers (a :class:`~ks_lens.generation.BatchGeneration`, with
    the answer rows' per-step logits) and each row's term weights ``[steps, n_terms]`` (one row
    per step that ran, terms in the spec's order: targets, then avoid labels)."""

    generation: BatchGeneration
    weights: list[torch.Tensor]

    def answer_weights(self) -> list[torch.Tensor]:
        """Each row's weights at the steps that produced its answer: one per kept token, plus
        the step that ended the turn (the steps after it only fed padding)."""
        g = self.generation
        return [
            w[: len(ids) + int(done)]
            for w, ids, done in zip(self.weights, g.ids, g.finished, strict=True)
        ]


@dataclass(frozen=True)
class WeightSummary:
    """How far DAC's weights sat below full strength over a set of answers (:func:`summarize_weights`)."""

    mean: float  # over every (answer, step, label)
    first_step: float  # mean at the first step (the prompt's pass)
    later_steps: float  # mean over the steps after it (nan if none)
    at_one: float  # share of (step, label) weights clipped at 1
    below_half: float  # share below 0.5
    n_weights: int
    n_answers: int


def summarize_weights(weights: Sequence[torch.Tensor]) -> WeightSummary:
    """A :class:`WeightSummary` of per-answer weights ``[steps, n_terms]`` (e.g.
    :meth:`ComposedGeneration.answer_weights`)."""
    used = [w for w in weights if w.shape[0] > 0]
    if not used:
        raise ConfigError("no DAC weights to summarise (no answer ran a step)")
    flat = torch.cat([w.flatten() for w in used]).float()
    later = torch.cat([w[1:].flatten() for w in used]).float()
    return WeightSummary(
        mean=float(flat.mean()),
        first_step=float(torch.cat([w[0] for w in used]).float().mean()),
        later_steps=float(later.mean()) if later.numel() else math.nan,
        at_one=float((flat >= 1).float().mean()),
        below_half=float((flat < 0.5).float().mean()),
        n_weights=int(flat.numel()),
        n_answers=len(used),
    )


class _Rows:
    """The rows one batch runs: answer row ``b`` and its probe rows (one unsteered, one per term
    at full strength), with the vector each probe row adds."""

    def __init__(
        self, steerings: Sequence[tuple[DynamicComposition, SteeringSpec]], d_model: int
    ) -> None:
        owner: list[int] = []
        probe_add: list[torch.Tensor] = []
        self.terms: list[torch.Tensor] = []  # per answer row: alpha * coef_j * v_j [n_terms, d]
        self.first: list[int] = []  # index of row b's first term probe row
        for b, (method, spec) in enumerate(steerings):
            vecs, signs = method.terms(spec)
            owner += [b] * (1 + len(signs))
            probe_add.append(torch.zeros(d_model))
            self.first.append(len(probe_add))
            probe_add += list(spec.alpha * signs[:, None] * vecs)
            self.terms.append(spec.alpha * DynamicComposition.coefs(spec)[:, None] * vecs)
        self.owner = torch.tensor(owner)
        self.probe_add = torch.stack(probe_add)
        self.configs = [m.dac for m, _ in steerings]

    def weights(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Each answer row's term weights from the probe rows' next-token logits."""
        out = []
        for b, start in enumerate(self.first):
            n = len(self.terms[b])
            base = logits[start - 1 : start].expand(n, -1)
            out.append(term_weights(base, logits[start : start + n], self.configs[b]))
        return out

    def answer_add(self, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([w @ t.to(w.device) for w, t in zip(weights, self.terms, strict=True)])


@contextmanager
def _adding(model: Model, hook_name: str, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """One hook at ``hook_name`` adding ``state["add"][row]`` at positions where ``state["keep"]``
    ``[rows, pos]`` is true; the dict is read at each call, so one hook serves every pass."""

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        add = state["add"].to(act.device, act.dtype)[:, None, :] * state["keep"][..., None]
        return act + add.to(act.dtype)

    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        yield


def generate_composed(
    model: Model,
    batch: TokenBatch,
    steerings: Sequence[tuple[DynamicComposition, SteeringSpec]],
    *,
    max_new_tokens: int = 64,
) -> ComposedGeneration:
    """Greedy answers for the left-padded ``batch``, row ``b`` steered by ``steerings[b]`` with
    per-step DAC weights (module docstring); every position of the prompt and the answer is
    steered, the prompt's with the weights of the first step.

    The probe rows read the answer row's tokens and keep their own KV cache, so each step costs
    one pass of the probe rows and one of the answer rows, one token each.
    """
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens")
    check_context(model, int(batch.input_ids.shape[1]), max_new_tokens, what="the batch")
    if len(steerings) != batch.input_ids.shape[0]:
        raise ConfigError(f"{len(steerings)} steerings for a batch of {batch.input_ids.shape[0]}")
    hooks = {m.hook_name for m, _ in steerings}
    if len(hooks) != 1:
        raise ConfigError(
            f"one batch of DAC rows must steer at one hook point, got {sorted(hooks)}"
        )
    for method, spec in steerings:
        method.check_model(model)
        SteeringSpec.make(spec.target, spec.avoid, spec.alpha, method.label_names)
    hook_name = hooks.pop()
    check_steerable(model, hook_name)
    rows = _Rows(steerings, int(model.cfg.d_model))
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad(), _adding(model, hook_name, state):
        return _decode(model, batch, rows, state, max_new_tokens)


def _decode(
    model: Model,
    batch: TokenBatch,
    rows: _Rows,
    state: dict[str, torch.Tensor],
    max_new_tokens: int,
) -> ComposedGeneration:
    from transformers import DynamicCache

    hf: Any = model.original_model
    caches = (DynamicCache(config=hf.config), DynamicCache(config=hf.config))
    eos = model.tokenizer.eos_token_id
    eos = -1 if eos is None else int(eos)  # -1: no token ends the turn
    pad = pad_token_id(model.tokenizer)
    mask = batch.attention_mask
    pos = generation_positions(mask)
    ids = batch.input_ids
    owner = rows.owner.to(ids.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    steps: list[torch.Tensor] = []
    weights: list[list[torch.Tensor]] = []
    for _ in range(max_new_tokens):
        # the prompt's pass steers its real tokens; each later pass feeds one real token per row
        keep = mask.bool() if not steps else torch.ones_like(ids, dtype=torch.bool)
        state.update(add=rows.probe_add, keep=keep[owner])
        probe = plain_forward(
            model, ids[owner], attention_mask=mask[owner], position_ids=pos[owner],
            cache=caches[0], logits_to_keep=1,
        )  # fmt: skip
        assert probe is not None
        w = rows.weights(probe[:, -1])
        weights.append(w)
        state.update(add=rows.answer_add(w), keep=keep)
        out = plain_forward(
            model, ids, attention_mask=mask, position_ids=pos, cache=caches[1], logits_to_keep=1
        )
        assert out is not None
        steps.append(out[:, -1])
        token = out[:, -1].argmax(-1).masked_fill(done, pad)
        new.append(token)
        done |= token == eos
        if bool(done.all()):
            break
        ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(ids)], 1)
        pos = pos[:, -1:] + 1
    return _result(model, new, steps, weights)


def _result(
    model: Model,
    new: list[torch.Tensor],
    steps: list[torch.Tensor],
    weights: list[list[torch.Tensor]],
) -> ComposedGeneration:
    tokens = torch.stack(new, 1).tolist()
    per_row = [torch.stack([w[b] for w in weights]) for b in range(len(tokens))]
    return ComposedGeneration(batch_result(model, tokens, torch.stack(steps, 1)), per_row)


__all__ = [
    "ComposedGeneration",
    "DACConfig",
    "DynamicComposition",
    "WeightSummary",
    "generate_composed",
    "nucleus",
    "summarize_weights",
    "term_weights",
    "truncated_kl",
]
