"""One way to batch token sequences and one way to record activations.

:func:`sorted_batches` sorts rows by token length (ties by row index, or a given key), cuts them
into batches of ``batch_size`` and left pads each (:func:`~ks_lens.models.chat.left_pad`), yielding
every batch with the original indices of its rows; :func:`scatter` writes a batch's per-row
results back at those indices. Sorting by length keeps padding small; a row's numbers do not
depend on its batch (attention masks), and batch ``b`` of a call is always the same rows, so
per-batch seeds reproduce::

    ids = [encode_chat(tok, p) for p in prompts]
    out = torch.empty(len(ids), d)
    for idx, batch in sorted_batches(ids, 16, pad_id=pad_token_id(tok), device=device):
        scatter(out, idx, run(batch))         # out[idx] = ..., rows back in input order

:func:`record_activations` records hook points' activations during the forward passes in its
``with`` block (in the spirit of ``steering_vectors.record_activations``): the whole activation,
the last token only (``last_token=True``) or any summary (``reduce=``); with ``stop=True`` the
forward pass ends as soon as every recorded hook point has fired (nothing after them is
computed, e.g. no unembedding). Its hooks are always removed on leaving the block::

    with torch.no_grad(), record_activations(model, ["blocks.3.hook_resid_post"],
                                             last_token=True, stop=True) as rec:
        model(**batch)                        # ends after block 3
    x = rec["blocks.3.hook_resid_post"]       # [batch, d_model]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, MutableSequence, Sequence
from typing import Any, TypeVar

import torch

from ks_lens.errors import ConfigError, HookPointError
from ks_lens.models.chat import TokenBatch, left_pad
from ks_lens.types import Model

T = TypeVar("T")

# ----------------------------------------------------------------------------- batching


def sorted_batches(
    seqs: Sequence[Sequence[int]],
    batch_size: int,
    *,
    pad_id: int,
    device: torch.device | str | None = None,
    rows: Iterable[int] | None = None,
    tiebreak: Callable[[int], Any] | None = None,
) -> Iterator[tuple[list[int], TokenBatch]]:
    """Batches of the token-id sequences ``seqs``, shortest first, each left padded.

    Yields ``(indices, batch)``: ``batch`` (a :class:`~ks_lens.models.chat.TokenBatch` on
    ``device``) holds ``seqs[i]`` for ``i`` in ``indices``, in that order. Rows are sorted by
    ``(len(seqs[i]), i)``, or ``(len(seqs[i]), tiebreak(i))`` with a ``tiebreak``; ``rows``
    limits the batches to those indices (default all). No rows: no batches.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    todo = range(len(seqs)) if rows is None else rows
    if tiebreak is None:
        order = sorted(todo, key=lambda i: (len(seqs[i]), i))
    else:
        tb = tiebreak
        order = sorted(todo, key=lambda i: (len(seqs[i]), tb(i)))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, left_pad([seqs[i] for i in idx], pad_id, device)


def scatter(
    dest: torch.Tensor | MutableSequence[T],
    indices: Sequence[int],
    values: torch.Tensor | Sequence[T],
) -> None:
    """Put a batch's per-row results back at their rows' places: ``dest[indices[j]] = values[j]``
    for a tensor (rows along the first axis) or a list."""
    if len(values) != len(indices):
        raise ValueError(f"{len(values)} values for {len(indices)} rows")
    if isinstance(dest, torch.Tensor):
        dest[list(indices)] = values if isinstance(values, torch.Tensor) else torch.stack(values)  # type: ignore[arg-type]
        return
    for i, v in zip(indices, values, strict=True):
        dest[i] = v


# ----------------------------------------------------------------------------- recording


class StopForward(Exception):
    """Raised by a :func:`record_activations` hook (``stop=True``) once every recorded hook
    point has fired; that recorder catches it, so the rest of the forward pass never runs."""

    def __init__(self, recording: Recording):
        super().__init__("every recorded hook point has fired")
        self.recording = recording


class Recording(dict[str, torch.Tensor]):
    """Hook name -> its recorded activation (from the latest call of that hook), as
    :func:`record_activations` yields it. ``stopped`` is set once it ended a forward pass."""

    def __init__(self, hook_names: Sequence[str]):
        super().__init__()
        self.hook_names: tuple[str, ...] = tuple(hook_names)
        self.stopped = False

    @property
    def missing(self) -> list[str]:
        """The requested hook names that have not fired (yet)."""
        return [n for n in self.hook_names if n not in self]


@contextlib.contextmanager
def record_activations(
    model: Model,
    hook_names: Sequence[str] | str,
    *,
    last_token: bool = False,
    reduce: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
    stop: bool = False,
) -> Iterator[Recording]:
    """Record the activations at ``hook_names`` during the forward passes in the ``with`` block.

    Yields a :class:`Recording` (hook name -> tensor), filled as the hooks fire: the detached
    activation ``[batch, pos, ...]``, its last position ``[batch, ...]`` (``last_token=True``,
    the last real token of a left-padded batch; a copy) or ``reduce(activation, hook_name)``.

    With ``stop=True`` the forward pass is ended (by :class:`StopForward`, caught here) as soon
    as every hook point has fired: the rest of the ``with`` block after that call is skipped, so
    put the forward pass last. Hooks are added after those already on the model (a steering
    context entered before records the steered activation) and always removed on leaving the
    block, also on an exception. A hook point TransformerLens refuses (gated off by default)
    raises :class:`~ks_lens.errors.HookPointError`.
    """
    names = [hook_names] if isinstance(hook_names, str) else list(dict.fromkeys(hook_names))
    rec = Recording(names)

    def make_hook(name: str) -> Callable[[torch.Tensor, Any], None]:
        def hook(act: torch.Tensor, hook: Any) -> None:
            a = act.detach()
            if reduce is not None:
                rec[name] = reduce(a, name)
            elif last_token:
                rec[name] = a[:, -1].clone()
            else:
                rec[name] = a
            if stop and len(rec) == len(names):
                raise StopForward(rec)

        return hook

    fwd_hooks = [(name, make_hook(name)) for name in names]
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(model.hooks(fwd_hooks=fwd_hooks))
        except ValueError as e:  # TransformerLens refuses hook points gated off by default
            raise HookPointError(f"cannot collect at {names}: {e}") from None
        try:
            yield rec
        except StopForward as e:
            if e.recording is not rec:
                raise  # another recorder's stop: not ours to swallow
            rec.stopped = True
