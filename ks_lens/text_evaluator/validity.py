"""Held-out validity records (HeldOutScores, TextEvaluatorValidity) and their metrics."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


def _canonical(obj: Any) -> Any:
    """JSON round trip with non-finite floats as ``null`` (how records are stored)."""

    def strict(o: Any) -> Any:
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {k: strict(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [strict(v) for v in o]
        return o

    return json.loads(json.dumps(strict(obj), allow_nan=False))


@dataclass(frozen=True)
class HeldOutScores:
    """Metrics of out-of-fold predictions (every text scored by a model that never saw it).

    Attributes:
        scheme: ``"question"`` (folds grouped by question) or ``"writer"`` (leave one source out).
        n_folds: number of folds.
        n_texts: texts scored.
        n_single: single-label texts.
        single_accuracy: share of single-label texts whose top-scored label is their label.
        single_recall: that share per label.
        per_label_auc: ROC AUC of each label's probability over all texts (NaN if undefined).
        mean_auc: mean of the per-label AUCs.
        n_two / two_tone_top2: two-label texts, and the share whose two labels are the top 2.
        n_three / three_tone_top3: the same for three-label texts (top 3).
        by_group_single_accuracy: single-label accuracy per held-out group (writer scheme only).
    """

    scheme: str
    n_folds: int
    n_texts: int
    n_single: int
    single_accuracy: float
    single_recall: dict[str, float]
    per_label_auc: dict[str, float]
    mean_auc: float
    n_two: int
    two_tone_top2: float | None
    n_three: int
    three_tone_top3: float | None
    by_group_single_accuracy: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return _canonical(asdict(self))

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> HeldOutScores:
        def num(v: Any) -> float:
            return float("nan") if v is None else float(v)

        return cls(
            scheme=str(d["scheme"]),
            n_folds=int(d["n_folds"]),
            n_texts=int(d["n_texts"]),
            n_single=int(d["n_single"]),
            single_accuracy=num(d["single_accuracy"]),
            single_recall={k: num(v) for k, v in d["single_recall"].items()},
            per_label_auc={k: num(v) for k, v in d["per_label_auc"].items()},
            mean_auc=num(d["mean_auc"]),
            n_two=int(d["n_two"]),
            two_tone_top2=None if d["two_tone_top2"] is None else float(d["two_tone_top2"]),
            n_three=int(d["n_three"]),
            three_tone_top3=None if d["three_tone_top3"] is None else float(d["three_tone_top3"]),
            by_group_single_accuracy=(
                None
                if d.get("by_group_single_accuracy") is None
                else {k: num(v) for k, v in d["by_group_single_accuracy"].items()}
            ),
        )


@dataclass(frozen=True)
class TextEvaluatorValidity:
    """Held-out validity of a text-evaluator recipe on a set of labelled texts.

    Attributes:
        label_names: the labels.
        config: the evaluator config (as JSON).
        texts_hash: hash of the texts it was measured on; n_texts: their number.
        question_cv: question-grouped K-fold scores.
        writer_cv: leave-one-writer-out scores (None when the texts have fewer than two
            distinct ``source`` values, or some have none).
    """

    label_names: tuple[str, ...]
    config: dict[str, Any]
    texts_hash: str
    n_texts: int
    question_cv: HeldOutScores
    writer_cv: HeldOutScores | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "label_names": list(self.label_names),
            "config": dict(self.config),
            "texts_hash": self.texts_hash,
            "n_texts": self.n_texts,
            "question_cv": self.question_cv.to_json(),
            "writer_cv": None if self.writer_cv is None else self.writer_cv.to_json(),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TextEvaluatorValidity:
        return cls(
            label_names=tuple(d["label_names"]),
            config=dict(d["config"]),
            texts_hash=str(d["texts_hash"]),
            n_texts=int(d["n_texts"]),
            question_cv=HeldOutScores.from_json(d["question_cv"]),
            writer_cv=None
            if d.get("writer_cv") is None
            else HeldOutScores.from_json(d["writer_cv"]),
        )

    def summary(self) -> str:
        """A small text table of the metrics."""
        rows = [("question-grouped CV", self.question_cv)]
        if self.writer_cv is not None:
            rows.append(("leave-one-writer-out", self.writer_cv))

        def pct(v: float | None) -> str:
            return "  n/a" if v is None or not math.isfinite(v) else f"{100 * v:5.1f}"

        lines = [
            f"held-out validity on {self.n_texts} texts (labels: {', '.join(self.label_names)})",
            f"{'scheme':<22} {'folds':>5} {'single acc':>10} {'mean AUC':>8} "
            f"{'2-tone top2':>11} {'3-tone top3':>11}",
        ]
        for name, s in rows:
            lines.append(
                f"{name:<22} {s.n_folds:5d} {pct(s.single_accuracy):>10} "
                f"{s.mean_auc:8.3f} {pct(s.two_tone_top2):>11} {pct(s.three_tone_top3):>11}"
            )
        for name, s in rows:
            auc = "  ".join(f"{k}={v:.3f}" for k, v in s.per_label_auc.items())
            rec = "  ".join(f"{k}={100 * v:.0f}" for k, v in s.single_recall.items())
            lines.append(f"{name}: per-label AUC  {auc}")
            lines.append(f"{name}: single-tone recall %  {rec}")
            if s.by_group_single_accuracy:
                grp = "  ".join(f"{k}={100 * v:.1f}" for k, v in s.by_group_single_accuracy.items())
                lines.append(f"{name}: single acc % by held-out group  {grp}")
        return "\n".join(lines)


def held_out_scores(
    y: np.ndarray,
    probs: np.ndarray,
    label_names: Sequence[str],
    *,
    scheme: str,
    n_folds: int,
    groups: Sequence[str] | None = None,
) -> HeldOutScores:
    """Score out-of-fold probabilities.

    Args:
        y: multi-hot true labels ``[n, K]`` (0/1).
        probs: predicted probabilities ``[n, K]``.
        label_names: the ``K`` labels.
        scheme: recorded as given (``"question"`` or ``"writer"``).
        n_folds: recorded as given.
        groups: optional held-out group of each text (per-group single accuracy is reported).
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_true = y.sum(axis=1)
    order = np.argsort(-probs, axis=1, kind="stable")

    def topk_rate(k: int) -> tuple[int, float | None]:
        rows = np.flatnonzero(n_true == k)
        if rows.size == 0:
            return 0, None
        hits = [set(order[i, :k].tolist()) == set(np.flatnonzero(y[i]).tolist()) for i in rows]
        return int(rows.size), float(np.mean(hits))

    single = np.flatnonzero(n_true == 1)
    correct = (order[single, 0] == y[single].argmax(axis=1)) if single.size else np.zeros(0, bool)
    recall: dict[str, float] = {}
    for k, name in enumerate(label_names):
        mask = y[single, k] == 1
        recall[name] = float(correct[mask].mean()) if mask.any() else float("nan")
    auc: dict[str, float] = {}
    for k, name in enumerate(label_names):
        if 0 < y[:, k].sum() < len(y):
            auc[name] = float(roc_auc_score(y[:, k], probs[:, k]))
        else:
            auc[name] = float("nan")
    finite = [v for v in auc.values() if math.isfinite(v)]
    by_group: dict[str, float] | None = None
    if groups is not None:
        g = np.asarray(list(groups), dtype=object)[single]
        by_group = {str(k): float(correct[g == k].mean()) for k in sorted(set(g.tolist()))}
    n_two, two = topk_rate(2)
    n_three, three = topk_rate(3)
    return HeldOutScores(
        scheme=scheme,
        n_folds=n_folds,
        n_texts=len(y),
        n_single=int(single.size),
        single_accuracy=float(correct.mean()) if single.size else float("nan"),
        single_recall=recall,
        per_label_auc=auc,
        mean_auc=float(np.mean(finite)) if finite else float("nan"),
        n_two=n_two,
        two_tone_top2=two,
        n_three=n_three,
        three_tone_top3=three,
        by_group_single_accuracy=by_group,
    )
