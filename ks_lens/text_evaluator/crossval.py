"""Cross-validation of the recipe: validate_text_evaluator by question and by writer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ks_lens.datasets.gold_texts import LabelledText, texts_hash
from ks_lens.errors import DatasetError
from ks_lens.text_evaluator.config import TextEvaluatorConfig
from ks_lens.text_evaluator.model import TextEvaluator
from ks_lens.text_evaluator.validity import TextEvaluatorValidity, held_out_scores


def cross_val_proba(
    texts: Sequence[LabelledText],
    label_names: Sequence[str],
    config: TextEvaluatorConfig | None,
    groups: Sequence[str],
    n_folds: int,
) -> np.ndarray:
    """Out-of-fold probabilities ``[n, K]`` from ``GroupKFold(n_folds)`` over ``groups``."""
    from sklearn.model_selection import GroupKFold

    texts = tuple(texts)
    probs = np.full((len(texts), len(label_names)), np.nan)
    for train_idx, test_idx in GroupKFold(n_splits=n_folds).split(texts, groups=list(groups)):
        ev = TextEvaluator.fit([texts[i] for i in train_idx], label_names, config)
        probs[test_idx] = ev.predict_proba([texts[i].text for i in test_idx])
    return probs


def validate_text_evaluator(
    texts: Sequence[LabelledText],
    label_names: Sequence[str],
    config: TextEvaluatorConfig | None = None,
    n_folds: int = 5,
) -> TextEvaluatorValidity:
    """Held-out validity of the evaluator recipe on labelled texts.

    Two schemes, both scoring every text with a model that did not train on it:

    * **question**: ``GroupKFold(n_folds)`` grouped by ``question_id`` (a text without one is its
      own group), so no question has texts on both sides;
    * **writer**: leave-one-writer-out, ``GroupKFold`` grouped by ``source`` with one fold per
      source: texts by a writer never seen in training (skipped unless every text has a source
      and there are at least two).

    Metrics per scheme (:class:`HeldOutScores`): single-label accuracy (argmax), per-label ROC
    AUC over all texts, and for two- and three-label texts the share whose true labels are
    exactly the top 2 / top 3.

    Args:
        texts: labelled texts (labels within ``label_names``).
        label_names: the ``K`` labels.
        config: the evaluator config (default :class:`TextEvaluatorConfig()`).
        n_folds: folds of the question scheme (capped at the number of questions).

    Raises:
        DatasetError: fewer than two question groups.
    """
    from sklearn.preprocessing import MultiLabelBinarizer

    cfg = config or TextEvaluatorConfig()
    texts = tuple(texts)
    names = tuple(label_names)
    y = MultiLabelBinarizer(classes=list(names)).fit_transform([t.labels for t in texts])
    qgroups = [t.question_id or f"text:{t.id}" for t in texts]
    k = min(n_folds, len(set(qgroups)))
    if k < 2:
        raise DatasetError("validation needs texts of at least two questions")
    qprobs = cross_val_proba(texts, names, cfg, qgroups, k)
    question_cv = held_out_scores(y, qprobs, names, scheme="question", n_folds=k)
    writer_cv = None
    sources = [t.source for t in texts]
    if all(s is not None for s in sources) and len(set(sources)) >= 2:
        wgroups = [str(s) for s in sources]
        nw = len(set(wgroups))
        wprobs = cross_val_proba(texts, names, cfg, wgroups, nw)
        writer_cv = held_out_scores(y, wprobs, names, scheme="writer", n_folds=nw, groups=wgroups)
    return TextEvaluatorValidity(
        label_names=names,
        config=cfg.to_json(),
        texts_hash=texts_hash(texts),
        n_texts=len(texts),
        question_cv=question_cv,
        writer_cv=writer_cv,
    )
