"""Checks on a run's inputs before any compute: external test questions held out and within
the context window, labelled texts covering every label.
"""

from __future__ import annotations

from collections.abc import Sequence

from ks_lens.datasets import (
    BehaviourDataset,
    Question,
    Splits,
)
from ks_lens.datasets.gold_texts import (
    LabelledText,
    normalise_text,
)
from ks_lens.errors import DatasetError
from ks_lens.models.chat import check_context, encode_chat
from ks_lens.pipeline.config import PipelineConfig
from ks_lens.types import Model


def check_texts_cover_labels(
    texts: Sequence[LabelledText], labels: Sequence[str], source: str
) -> None:
    """Refuse labelled texts (``--texts``) that leave a label without a single-label text: the
    steering vectors and evaluators need examples of every label."""
    have = {t.labels[0] for t in texts if len(t.labels) == 1}
    missing = [lab for lab in labels if lab not in have]
    if missing:
        raise DatasetError(
            f"{source}: no single-label text for {missing}; the texts must cover every label of "
            f"the dataset {list(labels)} (the steering vectors and evaluators learn each label)"
        )


def check_held_out(
    questions: Sequence[Question],
    cfg: PipelineConfig,
    ds: BehaviourDataset,
    splits: Splits,
    gold: Sequence[LabelledText],
    *,
    prompt_source: bool,
) -> None:
    """Refuse external test questions (the first ``max(n_eval, n_gen)``, those the run asks)
    that the run also learns or calibrates from (matched by text, ignoring case and spacing):
    the probe's training prompts, the evaluators' questions, the calibration questions and the
    gold texts' questions. Test figures on them would not be held out, and the report could not
    tell."""
    used: dict[str, str] = {}
    parts = [("evaluator", cfg.n_evaluator), ("calibration", cfg.n_calib)]
    if prompt_source:
        parts.insert(0, ("train", cfg.n_train))
    for split, n in parts:
        for q in ds.subset(splits.ids(split)).head(n).questions:
            used.setdefault(
                normalise_text(q.text), f"a {split}-split question of dataset {ds.name!r}"
            )
    for t in gold:
        if t.question:
            used.setdefault(normalise_text(t.question), f"the question of gold text {t.id!r}")
    asked = questions[: max(cfg.n_eval, cfg.n_gen)]  # the questions the run asks
    hits = [
        (i, q, used[key]) for i, q in enumerate(asked) if (key := normalise_text(q.text)) in used
    ]
    if hits:
        i, q, where = hits[0]
        raise DatasetError(
            f"{cfg.questions}: {len(hits)} of {len(asked)} test questions are not held out: "
            f"question {i + 1} ({q.text[:60]!r}) is {where} (seed {cfg.seed}). The probes, "
            "evaluators or calibration learn from those; remove them from the file"
        )


def check_question_lengths(
    model: Model, questions: Sequence[Question], cfg: PipelineConfig
) -> None:
    """Refuse external test questions that do not fit in the model's context window (with the
    answer length for the ones answered in text), before any activation is collected."""
    n_test = max(cfg.n_eval, cfg.n_gen)
    for i, q in enumerate(questions[:n_test]):
        new = cfg.comparison.max_new_tokens if i < cfg.n_gen else 0
        what = f"{cfg.questions}: question {i + 1} ({q.id})"
        check_context(model, len(encode_chat(model.tokenizer, q.text)), new, what=what)
