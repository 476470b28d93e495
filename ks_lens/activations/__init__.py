"""Residual-stream activations at every layer, collected in one forward pass per batch.

Four collection modes (``mode=``):

``prompt``
    behaviour instruction as system prompt + question; last prompt token (the reference code's
    choice: fast, no generation). A probe on these can learn "which instruction is present".
``response``
    the model answers under the instruction (greedy); activation of its final generated token,
    with the instruction still in context (the original post's description).
``response-only``
    the same answer re-encoded WITHOUT the instruction (question + answer only), so a probe must
    read the tone from the text itself. Generated texts are kept.
``neutral``
    the question alone (no instruction): the inputs that get steered in evaluation.

Pooling (``pooling=``, type :data:`Pooling`): which tokens' activations are *read* for each
row: ``last`` (last real token) or ``mean_response`` (mean over the answer's tokens; response modes
only). Not to be confused with steering's ``positions=`` (:data:`ks_lens.steering.positions.Positions`:
which tokens are *written to*). Before 0.2.0 the keyword was ``position=``, now refused with a
:class:`~ks_lens.errors.RenamedError` naming ``pooling=``.

One forward pass per batch captures every requested hook point (``blocks.{L}.hook_resid_post`` by
default; any kind of :func:`ks_lens.hooks.block_kind`, e.g. ``hook_kinds=("attn.hook_z",)``); the
pass stops right after the last requested hook fires, so no unembedding is computed. Batches are left padded with attention masks and position ids derived
from them, so a row's activation equals that of the prompt run alone.

Prefix sharing (``share_prefix=True``, the default): rows encoded with the same system prompt
start with the same tokens (the chat header and the behaviour instruction, often most of a
prompt-mode row). Those are run once per system prompt and chunk (:func:`prefix_cache`); each
batch then runs only its rows' remaining tokens, right padded after the cached keys and values,
through the same bridge forward, so every hook fires under its usual name. The result equals the
whole-row pass within float rounding (bitwise on the CPU in our tests) and does not depend on how
rows are batched or chunked.

:func:`collect_token_activations` makes one row per answer token of labelled texts (the first
``max_tokens``; :mod:`ks_lens.activations.tokens`), for per-token steering probes.

:func:`collect_activations` returns an in-memory :class:`Activations`; :func:`collect_to_store`
streams shards to disk (:class:`ActivationStore`): memory stays at one shard, every file is
written atomically, a rerun resumes after the last complete shard, and loading checks sizes and
checksums and refuses a store made for another model.
"""

from ks_lens._runtime.prefix import PrefixCache, prefix_cache, prefix_pass, stacked_cache
from ks_lens.activations.capture import capture_batch, capture_features, capture_tokens
from ks_lens.activations.collect import (
    MIN_SHARED_PREFIX,
    CollectSpec,
    Responses,
    Row,
    collect_activations,
    feature_shapes,
    plan_rows,
    system_prefix,
)
from ks_lens.activations.container import (
    MODES,
    POOLINGS,
    Activations,
    Mode,
    Pooling,
)
from ks_lens.activations.store import STORE_FORMAT, ActivationStore, collect_to_store
from ks_lens.activations.tokens import (
    DEFAULT_MAX_TOKENS,
    TOKEN_POSITION,
    collect_token_activations,
    token_positions,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MIN_SHARED_PREFIX",
    "MODES",
    "POOLINGS",
    "STORE_FORMAT",
    "TOKEN_POSITION",
    "ActivationStore",
    "Activations",
    "CollectSpec",
    "Mode",
    "Pooling",
    "PrefixCache",
    "Responses",
    "Row",
    "capture_batch",
    "capture_features",
    "capture_tokens",
    "collect_activations",
    "collect_to_store",
    "collect_token_activations",
    "feature_shapes",
    "plan_rows",
    "prefix_cache",
    "prefix_pass",
    "stacked_cache",
    "system_prefix",
    "token_positions",
]


def __getattr__(name: str) -> object:
    """Names removed in 0.2.0 fail with a message saying what replaced them (PEP 562)."""
    if name == "POSITIONS":
        raise AttributeError(
            "ks_lens.activations.POSITIONS was renamed POOLINGS in 0.2.0 (which tokens a "
            "collection reads); ks_lens.steering.POSITIONS is another thing: which tokens "
            "steering writes to"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
