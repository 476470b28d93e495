"""The ``instructed`` reference row: the model asked for the targets by system prompt, not steered.

A comparison (:mod:`ks_lens.comparison`, ``ComparisonConfig.instructed``) adds this row beside
the steering methods, scored by the same evaluators:

* **system prompt**: the dataset's instruction for each target, several targets' instructions
  joined in label order by :func:`~ks_lens.datasets.join_instructions`, exactly as
  :meth:`~ks_lens.datasets.BehaviourDataset.with_combinations` builds a combined behaviour
  (:func:`instructed_system`);
* **activation level**: the held-out evaluator at the last prompt token of instruction +
  question, no steering (:func:`instructed_readout`). The evaluator was trained on exactly such
  prompts (other questions), so this row is that lens's ceiling by construction;
* **text level**: one greedy answer per text-level cell, generated under the system prompt in
  the same batches as the steered answers, then re-encoded after the question *without* the
  instruction, like every steered answer: the text and response-activation evaluators read the
  answer alone, and its KL/token is KL(instructed || unsteered) of the next-token distributions
  along the answer, the instructed side given instruction + question + answer so far, the
  unsteered side given the question (the model's default system prompt) + answer so far
  (:func:`~ks_lens.evaluation.generate_and_score_rows` with ``systems``).

Every method's gain is also shown as a share of the instructed gain,
``(p_method - p_unsteered) / (p_instructed - p_unsteered)`` over the same cells
(:func:`instructed_fraction`); it is withheld, with a note, where the instructed gain is not
clearly above zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ks_lens._runtime.batching import sorted_batches
from ks_lens.activations import MIN_SHARED_PREFIX, capture_features, prefix_cache, system_prefix
from ks_lens.datasets import join_instructions
from ks_lens.errors import ConfigError
from ks_lens.evaluation.stats import Interval, bootstrap_statistic, paired_difference
from ks_lens.models import model_device, pad_token_id
from ks_lens.models.chat import ChatPrompt, check_context, encode_chat
from ks_lens.probes import Probe
from ks_lens.types import Model

INSTRUCTED = "instructed"  # the row's method name in every record
INSTRUCTED_LABEL = "Instructed (system prompt)"
INSTRUCTED_DESCRIPTION = (
    "the model asked for the targets by system prompt (the dataset's instructions), no steering"
)
#: the instructed gain over unsteered (mean target probability) below which no share of it is shown
MIN_INSTRUCTED_GAIN = 0.02


def check_instructions(instructions: Mapping[str, str], labels: Sequence[str]) -> None:
    """Refuse instructions that leave a label without a non-empty instruction."""
    missing = [lab for lab in labels if not str(instructions.get(lab, "")).strip()]
    if missing:
        raise ConfigError(
            f"the instructed reference row needs an instruction for every label; none for "
            f"{missing} (instructions name {list(instructions)})"
        )


def instructed_system(instructions: Mapping[str, str], targets: Sequence[str]) -> str:
    """The system prompt that asks for ``targets``: their instructions joined in the label order
    of ``instructions`` (dataset order), as a combined behaviour's instruction is.

    >>> instructed_system({"a": "Be brief.", "b": "Be kind."}, ("b", "a"))
    'Be brief. Be kind.'
    """
    if not targets:
        raise ConfigError("the instructed row needs at least one target")
    order = list(instructions)
    unknown = [t for t in targets if t not in instructions]
    if unknown:
        raise ConfigError(f"no instruction for target(s) {unknown}; labels are {order}")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"targets {list(targets)} repeat a label")
    return join_instructions(instructions[t] for t in sorted(targets, key=order.index))


def instructed_readout(
    model: Model,
    questions: Sequence[str],
    systems: Sequence[str],
    probe: Probe,
    *,
    batch_size: int = 16,
) -> list[np.ndarray]:
    """``probe`` at the last prompt token of every question asked under each system prompt, no
    steering: one ``[len(questions), n_labels]`` array per system prompt.

    The tokens that a system prompt's rows share (chat header and instruction) run once per
    system prompt (:func:`~ks_lens.activations.prefix_cache`), as in prompt-mode collection;
    equal to whole-prompt passes within float rounding (tested).
    """
    if not questions or not systems:
        raise ConfigError("no questions or system prompts to read out")
    tok = model.tokenizer
    pad, device, hook = pad_token_id(tok), model_device(model), probe.hook_name
    out = []
    for system in systems:
        seqs = [encode_chat(tok, ChatPrompt(q, system)) for q in questions]
        longest = max(range(len(seqs)), key=lambda i: len(seqs[i]))
        check_context(model, len(seqs[longest]), what=f"instructed prompt {longest + 1}")
        common = system_prefix(tok, system)
        n = len(common)
        shared = n >= MIN_SHARED_PREFIX and all(len(s) > n and tuple(s[:n]) == common for s in seqs)
        prefix = prefix_cache(model, common, [hook]) if shared else None
        cut = len(prefix) if prefix is not None else 0
        probs = np.empty((len(questions), probe.n_labels))
        for idx, batch in sorted_batches(
            [s[cut:] for s in seqs], batch_size, pad_id=pad, device=device
        ):
            x = capture_features(model, batch, [hook], prefix=prefix)[0]
            p = probe.predict_proba(x.to(probe.mean.device, probe.mean.dtype))
            probs[idx] = p.double().cpu().numpy()
        out.append(probs)
    return out


def instructed_fraction(
    method_at: Callable[[np.ndarray], float],
    unsteered: np.ndarray,
    instructed: np.ndarray,
    *,
    seed: int,
    n_resamples: int,
) -> tuple[Interval | None, str | None]:
    """A method's gain over unsteered as a share of the instructed gain, with a bootstrap
    interval over questions: ``(method_at(idx) - mean(unsteered[idx])) / mean(instructed[idx] -
    unsteered[idx])`` where ``idx`` resamples the questions (units) that ``unsteered`` and
    ``instructed`` hold, one value each, aligned; ``method_at(idx)`` is the method's mean target
    probability on those questions.

    Returns ``(None, note)`` when the instructed gain is not clearly positive (its estimate or
    the low end of its 95-percent interval below :data:`MIN_INSTRUCTED_GAIN`): a share of a gain
    that is not there would be a meaningless number, and resampled gains near 0 would blow the
    share's interval up (a ratio over a denominator near 0).
    """
    pu, pi = np.asarray(unsteered, dtype=float), np.asarray(instructed, dtype=float)
    if pu.shape != pi.shape or pu.ndim != 1:
        raise ConfigError(f"unsteered and instructed must be aligned 1-D: {pu.shape} vs {pi.shape}")
    gain = paired_difference(pi, pu, seed=seed, n_resamples=n_resamples)
    if not (gain.estimate >= MIN_INSTRUCTED_GAIN and gain.low >= MIN_INSTRUCTED_GAIN):
        why = (
            "not above 0"
            if not gain.estimate > 0
            else (
                f"below {MIN_INSTRUCTED_GAIN}"
                if gain.estimate < MIN_INSTRUCTED_GAIN
                else f"not clearly above {MIN_INSTRUCTED_GAIN} (its interval reaches below it)"
            )
        )
        return None, f"instructed gain {gain.fmt()} is {why}: no share of it is shown"

    def share(idx: np.ndarray) -> float:
        den = float(np.nanmean(pi[idx] - pu[idx]))
        return (method_at(idx) - float(np.nanmean(pu[idx]))) / den if den > 0 else float("nan")

    return bootstrap_statistic(len(pu), share, seed=seed, n_resamples=n_resamples), None


__all__ = [
    "INSTRUCTED",
    "INSTRUCTED_DESCRIPTION",
    "INSTRUCTED_LABEL",
    "MIN_INSTRUCTED_GAIN",
    "check_instructions",
    "instructed_fraction",
    "instructed_readout",
    "instructed_system",
]
