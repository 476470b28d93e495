"""Capability retention: multiple-choice accuracy by option log-likelihood, steered or not.

Steering buys a behaviour; this module measures what it costs the model's abilities. A
multiple-choice set (the shipped one, ``ks_lens/data/capability_mc.jsonl``, is 312 easy
questions over 12 subjects written for ks-lens; see :func:`load_mc_questions`) is scored by
**option log-likelihood**: each option's text is the assistant's answer to the chat-formatted
question, and its score is the log-probability of its tokens,

.. math:: \\log p(\\text{option} \\mid \\text{question}) = \\sum_t \\log p(o_t \\mid
   \\text{question}, o_{<t}),

the prediction is the option with the highest score, and a question counts as correct when that
is the answer key. The question is given **bare** (the "cloze" formulation, as in the small-model
MMLU/ARC evaluations of OLMES and lm-evaluation-harness), not with the options listed and a
letter to pick: models this small are near chance at mapping letters to listed options (OLMES
reports that the lettered format only works from larger models on), while the likelihood of a
correct answer to a question is exactly the ability steering may damage. Every option is scored
in the same context, so options never see each other.

Three ways to compare options are recorded for every question (all from the same forward pass):
``"sum"`` (the total log-probability; favours short options), ``"token"`` (per option token) and
``"char"`` (per character of the option text, lm-evaluation-harness's ``acc_norm``; the default,
since it does not depend on the tokenizer). :class:`CapabilityResult` keeps every option's
summed log-probability, token and character count, so any rule can be re-applied later, and
per-question correctness for paired comparisons (:func:`paired_accuracy_difference`, a paired
bootstrap over questions).

Steering: wrap the call in any steering context, and give the system prompt of an instructed
run as ``system``::

    base = evaluate_capability(model)
    with method.steer(model, target=["casual"], alpha=4.0):
        steered = evaluate_capability(model, label="ksteer casual")
    print(paired_accuracy_difference(steered, base).fmt())   # steered - unsteered, 95 % CI

Options are scored as if the model were generating them: each question runs once (many
questions per pass, left padded, :func:`~ks_lens._runtime.batching.sorted_batches`) and its options
continue it from the KV cache (all options of those questions in one more pass, right padded),
through :func:`~ks_lens._runtime.hf_path.plain_forward`. A steering context's ``positions``
therefore mean what they mean when answering: ``"all"`` (default) steers question and option tokens,
``"generated"`` only the option tokens, ``"prompt"`` and ``"last"`` only the question. Scores
equal a plain whole-sequence forward pass and do not depend on the batch (within float
rounding); they are deterministic: no sampling, fixed order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import numpy as np
import torch

from ks_lens._runtime.batching import scatter, sorted_batches
from ks_lens._runtime.hf_path import hf_modules, plain_forward
from ks_lens.errors import ConfigError, DatasetError, WrongTypeError
from ks_lens.evaluation.readouts import _shared_start
from ks_lens.evaluation.stats import N_RESAMPLES, Interval, bootstrap_mean, paired_difference
from ks_lens.generation import SharedPrefill, resume_prefill, shared_prefill
from ks_lens.io import iter_jsonl
from ks_lens.models import model_device, pad_token_id
from ks_lens.models.chat import ChatPrompt, TokenBatch, check_context, encode_chat
from ks_lens.steering.positions import Positions, PositionTracker
from ks_lens.types import Model

if TYPE_CHECKING:
    from ks_lens.steering.base import Steering

#: the shipped multiple-choice set (package data)
CAPABILITY_FILE = "capability_mc.jsonl"
#: how options are compared: total log-probability, per option token, per option character
Rule = Literal["sum", "token", "char"]
RULES: tuple[Rule, ...] = get_args(Rule)
DEFAULT_RULE: Rule = "char"


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question: ``options[answer]`` is the correct one."""

    id: str
    subject: str
    question: str
    options: tuple[str, ...]
    answer: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subject": self.subject,
            "question": self.question,
            "options": list(self.options),
            "answer": self.answer,
        }


def _mc_question(d: Any, where: str) -> MCQuestion:
    """Check one parsed record (``where`` names it in errors) and build the question."""
    if not isinstance(d, Mapping):
        raise DatasetError(f"{where}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in ("id", "subject", "question", "options", "answer") if k not in d]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {', '.join(missing)}")
    for k in ("id", "subject", "question"):
        if not isinstance(d[k], str) or not d[k].strip():
            raise DatasetError(f"{where}: {k!r} must be a non-empty string, got {d[k]!r}")
    opts = d["options"]
    if not isinstance(opts, list) or not all(isinstance(o, str) and o.strip() for o in opts):
        raise DatasetError(f"{where}: 'options' must be a list of non-empty strings")
    if len(opts) < 2:
        raise DatasetError(f"{where}: a question needs at least 2 options, got {len(opts)}")
    if len({o.strip() for o in opts}) != len(opts):
        raise DatasetError(f"{where}: the options repeat one another: {opts}")
    ans = d["answer"]
    if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(opts):
        raise DatasetError(
            f"{where}: 'answer' must be an option index from 0 to {len(opts) - 1}, got {ans!r}"
        )
    return MCQuestion(d["id"], d["subject"], d["question"], tuple(opts), ans)


def check_mc_questions(questions: Sequence[MCQuestion]) -> list[MCQuestion]:
    """``questions`` as a list, after checking it is a usable set: not empty, each an
    :class:`MCQuestion` that follows :func:`load_mc_questions`'s rules, ids unique."""
    if isinstance(questions, (str, MCQuestion)) or len(questions) == 0:
        raise DatasetError("the multiple-choice set is empty or not a sequence of questions")
    seen: set[str] = set()
    for i, q in enumerate(questions):
        if not isinstance(q, MCQuestion):
            raise WrongTypeError(f"question {i} is a {type(q).__name__}, not an MCQuestion")
        _mc_question(q.to_json(), f"question {q.id!r}")
        if q.id in seen:
            raise DatasetError(f"question id {q.id!r} occurs twice")
        seen.add(q.id)
    return list(questions)


def load_mc_questions(path: str | Path | None = None) -> list[MCQuestion]:
    """A multiple-choice set from JSONL (one ``{"id", "subject", "question", "options",
    "answer"}`` per line; ``answer`` is the 0-based index of the correct option); ``None``: the
    shipped set. Errors name the file and line."""
    if path is None:
        ref = resources.files("ks_lens.data").joinpath(CAPABILITY_FILE)
        with resources.as_file(ref) as p:
            return load_mc_questions(p)
    rows = [_mc_question(d, loc) for loc, d in iter_jsonl(path, "multiple-choice JSONL file")]
    if not rows:
        raise DatasetError(f"{path}: no questions in the file")
    return check_mc_questions(rows)


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class OptionScores:
    """Per question, per option: the summed log-probability of the option's tokens, and its
    token and character counts."""

    logprob: list[list[float]]
    n_tokens: list[list[int]]
    n_chars: list[list[int]]


def _tokenize(
    tok: Any, questions: Sequence[MCQuestion], system: str | None
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Per question, the chat-formatted question's token ids (ending where the assistant
    speaks), and per option the tokens that follow them when the option is the answer."""
    heads: list[list[int]] = []
    options: list[list[list[int]]] = []
    for q in questions:
        head = encode_chat(tok, ChatPrompt(q.question, system=system))
        opts = []
        for o in q.options:
            full = encode_chat(tok, ChatPrompt(q.question, system=system, assistant=o))
            if full[: len(head)] != head or len(full) == len(head):
                raise ConfigError(
                    f"question {q.id!r}: option {o!r} does not tokenize as the prompt followed by "
                    "its own tokens under this model's chat template"
                )
            opts.append(full[len(head) :])
        heads.append(head)
        options.append(opts)
    return heads, options


def _question_pass(
    model: Model, batch: TokenBatch, prefill: SharedPrefill | None
) -> tuple[Any, torch.Tensor]:
    """The questions' pass: a KV cache holding them and the next-token logits ``[batch,
    vocab]``; with ``prefill`` (:func:`~ks_lens.generation.shared_prefill` of this batch) it
    resumes above the layers each distinct question ran once."""
    from transformers import DynamicCache

    if prefill is not None:
        with hf_modules(model) as plain:
            if plain:
                return resume_prefill(model, batch, prefill)
    hf: Any = model.original_model
    cache = DynamicCache(config=hf.config)
    last = plain_forward(
        model,
        batch.input_ids,
        attention_mask=batch.attention_mask,
        cache=cache,
        logits_to_keep=1,
    )
    assert last is not None
    return cache, last[:, -1]


def _score_batch(
    model: Model,
    batch: TokenBatch,
    options: Sequence[Sequence[Sequence[int]]],
    pad: int,
    tracker: PositionTracker | None = None,
    prefill: SharedPrefill | None = None,
) -> list[list[float]]:
    """The summed log-probabilities of ``options[j]`` after row ``j`` of ``batch`` (left-padded
    questions): one pass over the questions with a KV cache, whose last logits predict each
    option's first token, then one pass over all their options' tokens (right padded) on the
    cache, which the steering position tracker sees as generated tokens (``tracker``: the one of
    a :func:`~ks_lens.steering.steer_groups` context, told which question each option row
    continues; ``prefill``: see :func:`_question_pass`)."""
    cache, last = _question_pass(model, batch, prefill)
    first = torch.log_softmax(last.float(), dim=-1)
    rows = [(j, list(o)) for j, opts in enumerate(options) for o in opts]
    m = max(len(o) for _, o in rows) - 1  # the last token of an option predicts nothing
    scores = [float(first[j, o[0]]) for j, o in rows]
    if m > 0:
        device = batch.input_ids.device
        sel = torch.tensor([j for j, _ in rows], device=device)
        cache.batch_select_indices(sel)
        if tracker is not None:
            tracker.reindex(sel)
        ids = torch.full((len(rows), m), pad, dtype=torch.long)
        tail = torch.zeros((len(rows), m), dtype=torch.long)
        for r, (_, o) in enumerate(rows):
            ids[r, : len(o) - 1] = torch.tensor(o[:-1])
            tail[r, : len(o) - 1] = 1
        mask = torch.cat([batch.attention_mask[sel], tail.to(device)], dim=1)
        logits = plain_forward(model, ids.to(device), attention_mask=mask, cache=cache)
        assert logits is not None
        logp = torch.log_softmax(logits.float(), dim=-1)
        for r, (_, o) in enumerate(rows):
            target = torch.tensor(o[1:], device=device)
            scores[r] += float(logp[r, : len(o) - 1].gather(-1, target[:, None]).sum())
    it = iter(scores)
    return [[next(it) for _ in opts] for opts in options]


def score_options(
    model: Model,
    questions: Sequence[MCQuestion],
    *,
    system: str | None = None,
    batch_size: int = 64,
) -> OptionScores:
    """The log-probability of every option of every question as the assistant's answer to the
    bare question (after ``system`` as the system prompt; ``None``: the model's default).

    Runs under whatever hooks are on ``model`` (e.g. inside ``method.steer(...)``). Questions are
    batched shortest first, as many as give at most ``batch_size`` option rows per pass. Each
    question runs once; its options continue it from the KV cache, exactly as if the model
    were generating them, so a steering context's ``positions`` mean what they mean in
    generation (``"generated"``: the option tokens; ``"prompt"``, ``"last"``: the question).
    """
    rows = [(0, i) for i in range(len(questions))]  # score_option_rows checks the questions
    systems = [system] * len(rows)
    return score_option_rows(model, questions, [None], rows, systems=systems, batch_size=batch_size)


def score_option_rows(
    model: Model,
    questions: Sequence[MCQuestion],
    steerings: Sequence[Steering | None],
    rows: Sequence[tuple[int, int]],
    *,
    systems: Sequence[str | None] | None = None,
    positions: Positions = "all",
    batch_size: int = 64,
) -> OptionScores:
    """:func:`score_options` for many runs in shared batches: row ``r = (g, i)`` scores
    question ``i``'s options under ``steerings[g]`` (``None``: unsteered;
    :func:`~ks_lens.steering.steer_groups`, steering ``positions``) after ``systems[r]`` as the
    system prompt; returns one entry per row, in ``rows`` order. Any hooks already on the model
    apply to every row. Scores equal one :func:`score_options` call per run (float rounding)."""
    from ks_lens.steering.base import steer_groups

    qs = check_mc_questions(questions)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if not rows:
        raise ConfigError("no rows to score")
    for g, i in rows:
        if not (0 <= g < len(steerings) and 0 <= i < len(qs)):
            raise ConfigError(f"row {(g, i)} is out of range")
    sys_of = list(systems) if systems is not None else [None] * len(rows)
    if len(sys_of) != len(rows):
        raise ConfigError(f"{len(sys_of)} system prompts for {len(rows)} rows")
    tok = model.tokenizer
    encoded: dict[tuple[int, str | None], tuple[list[int], list[list[int]]]] = {}
    for (_, i), system in zip(rows, sys_of, strict=True):
        if (i, system) not in encoded:
            h, o = _tokenize(tok, [qs[i]], system)
            encoded[(i, system)] = (h[0], o[0])
    heads = [encoded[(i, system)][0] for (_, i), system in zip(rows, sys_of, strict=True)]
    options = [encoded[(i, system)][1] for (_, i), system in zip(rows, sys_of, strict=True)]
    longest = max(range(len(rows)), key=lambda r: len(heads[r]) + max(map(len, options[r])))
    n_longest = len(heads[longest]) + max(map(len, options[longest]))
    what = f"question {qs[rows[longest][1]].id!r} with its longest option"
    check_context(model, n_longest, what=what)
    per_batch = max(1, batch_size // max(len(q.options) for q in qs))
    logprob: list[list[float]] = [[] for _ in rows]
    pad = pad_token_id(tok)
    steered = any(s is not None for s in steerings)
    # same length: by question, then run, so that a batch's runs share their questions' pass
    batches = sorted_batches(
        heads,
        per_batch,
        pad_id=pad,
        device=model_device(model),
        tiebreak=lambda r: (rows[r][1], rows[r][0]),
    )
    with torch.no_grad():
        for idx, batch in batches:
            opts = [options[r] for r in idx]
            if not steered:
                scatter(logprob, idx, _score_batch(model, batch, opts, pad))
                continue
            groups = [rows[r][0] for r in idx]
            # the layers below the lowest steered one, once per distinct question (no hooks yet)
            # (positions 0..n-1 in every row, as the options' pass continues at the cache length)
            pos = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
            prefill = shared_prefill(
                model,
                batch,
                _shared_start(model, steerings, None, groups),
                position_ids=pos.expand_as(batch.input_ids),
            )
            with steer_groups(model, steerings, groups, positions=positions) as t:
                scatter(logprob, idx, _score_batch(model, batch, opts, pad, t, prefill))
    return OptionScores(
        logprob,
        [[len(o) for o in opts] for opts in options],
        [[len(o) for o in qs[i].options] for _, i in rows],
    )


# ----------------------------------------------------------------------------- results


def check_rule(rule: str) -> Rule:
    if rule not in RULES:
        raise ConfigError(f"unknown rule {rule!r}; use one of {RULES}")
    return cast(Rule, rule)


@dataclass
class CapabilityResult:
    """One scoring run: every question's options' log-probabilities, the answer keys, and what
    was run (``label``, ``settings``: model, steering, system prompt, free-form)."""

    ids: list[str]
    subjects: list[str]
    answers: list[int]
    logprob: list[list[float]]
    n_tokens: list[list[int]]
    n_chars: list[list[int]]
    rule: Rule = DEFAULT_RULE
    label: str = "unsteered"
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_rule(self.rule)
        n = len(self.ids)
        for name in ("subjects", "answers", "logprob", "n_tokens", "n_chars"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"{name} has {len(getattr(self, name))} entries for {n} ids")

    def __len__(self) -> int:
        return len(self.ids)

    def option_scores(self, rule: Rule | None = None) -> list[list[float]]:
        """Every option's score under ``rule`` (default: the result's own)."""
        r = check_rule(rule or self.rule)
        if r == "sum":
            return [list(lp) for lp in self.logprob]
        div = self.n_tokens if r == "token" else self.n_chars
        return [
            [x / n for x, n in zip(lp, d, strict=True)]
            for lp, d in zip(self.logprob, div, strict=True)
        ]

    def predictions(self, rule: Rule | None = None) -> list[int]:
        """The predicted option per question (highest score; the first on a tie)."""
        return [int(np.argmax(s)) for s in self.option_scores(rule)]

    def correct(self, rule: Rule | None = None) -> np.ndarray:
        """Per question: 1.0 where the prediction is the answer key, else 0.0."""
        pred = self.predictions(rule)
        return np.array([float(p == a) for p, a in zip(pred, self.answers, strict=True)])

    def accuracy(self, rule: Rule | None = None) -> float:
        return float(self.correct(rule).mean()) if len(self) else float("nan")

    def interval(self, rule: Rule | None = None, *, seed: int = 0) -> Interval:
        """Accuracy with its 95 % bootstrap interval over questions."""
        return bootstrap_mean(self.correct(rule), seed=seed)

    @property
    def chance(self) -> float:
        """The expected accuracy of guessing uniformly among each question's options."""
        return float(np.mean([1 / len(lp) for lp in self.logprob])) if len(self) else math.nan

    def by_subject(self, rule: Rule | None = None) -> dict[str, float]:
        """Accuracy per subject, in order of first appearance."""
        ok = self.correct(rule)
        subj = np.array(self.subjects)
        return {s: float(ok[subj == s].mean()) for s in dict.fromkeys(self.subjects)}

    def to_json(self) -> dict[str, Any]:
        iv = self.interval()
        return {
            "label": self.label,
            "settings": self.settings,
            "rule": self.rule,
            "n_questions": len(self),
            "chance": self.chance,
            "accuracy": iv.to_json(),
            "accuracy_by_rule": {r: self.accuracy(r) for r in RULES},
            "accuracy_by_subject": self.by_subject(),
            "questions": [
                {
                    "id": i,
                    "subject": s,
                    "answer": a,
                    "correct": bool(c),
                    "logprob": lp,
                    "n_tokens": nt,
                    "n_chars": nc,
                }
                for i, s, a, c, lp, nt, nc in zip(
                    self.ids,
                    self.subjects,
                    self.answers,
                    self.correct(),
                    self.logprob,
                    self.n_tokens,
                    self.n_chars,
                    strict=True,
                )
            ],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CapabilityResult:
        """Inverse of :meth:`to_json` (the derived figures are recomputed)."""
        qs = d["questions"]
        return cls(
            [str(q["id"]) for q in qs],
            [str(q["subject"]) for q in qs],
            [int(q["answer"]) for q in qs],
            [[float(x) for x in q["logprob"]] for q in qs],
            [[int(x) for x in q["n_tokens"]] for q in qs],
            [[int(x) for x in q["n_chars"]] for q in qs],
            check_rule(str(d.get("rule", DEFAULT_RULE))),
            str(d.get("label", "")),
            dict(d.get("settings", {})),
        )


def evaluate_capability(
    model: Model,
    questions: Sequence[MCQuestion] | None = None,
    *,
    system: str | None = None,
    batch_size: int = 64,
    rule: Rule = DEFAULT_RULE,
    label: str = "unsteered",
    settings: Mapping[str, Any] | None = None,
) -> CapabilityResult:
    """Score ``model`` (under any hooks in place, e.g. inside ``method.steer(...)``) on
    ``questions`` (default: the shipped set) by option log-likelihood; see the module docs."""
    qs = load_mc_questions() if questions is None else check_mc_questions(questions)
    check_rule(rule)
    sc = score_options(model, qs, system=system, batch_size=batch_size)
    info = {"model": str(getattr(model.cfg, "model_name", "")), "system": system}
    return CapabilityResult(
        [q.id for q in qs],
        [q.subject for q in qs],
        [q.answer for q in qs],
        sc.logprob,
        sc.n_tokens,
        sc.n_chars,
        rule,
        label,
        {**info, **dict(settings or {})},
    )


def paired_accuracy_difference(
    a: CapabilityResult,
    b: CapabilityResult,
    *,
    rule: Rule | None = None,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
) -> Interval:
    """Accuracy of ``a`` minus that of ``b`` on the same questions, with a paired bootstrap
    interval over questions (each resample keeps a question's two outcomes together)."""
    if a.ids != b.ids:
        raise ConfigError(
            f"the two runs scored different questions ({len(a)} and {len(b)}, or another order); "
            "a paired comparison needs the same questions in the same order"
        )
    return paired_difference(
        a.correct(rule or a.rule), b.correct(rule or b.rule), seed=seed, n_resamples=n_resamples
    )


__all__ = [
    "CAPABILITY_FILE",
    "DEFAULT_RULE",
    "RULES",
    "CapabilityResult",
    "MCQuestion",
    "OptionScores",
    "Rule",
    "check_mc_questions",
    "evaluate_capability",
    "load_mc_questions",
    "paired_accuracy_difference",
    "score_option_rows",
    "score_options",
]
