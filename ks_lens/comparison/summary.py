"""Summary rows: each method's means, intervals and paired tests against the baseline."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ks_lens.comparison.config import ComparisonConfig
from ks_lens.comparison.records import (
    ActivationEvaluation,
    Answer,
    CombinationRow,
    SummaryRow,
    TextEvaluation,
)
from ks_lens.errors import ConfigError
from ks_lens.evaluation.instructed import INSTRUCTED, instructed_fraction
from ks_lens.evaluation.stats import (
    bootstrap_mean,
    clustered_paired_test,
    mcnemar,
    paired_difference,
)


@dataclass
class _CellScores:
    """Per-cell arrays for one method (or unsteered) under one lens, aligned with a cell list."""

    question: np.ndarray  # [c] question index of each cell
    target: np.ndarray  # [c, k] target probabilities
    base: np.ndarray  # [c, k] unsteered target probabilities
    kl: np.ndarray | None = None  # [c]
    degenerate: np.ndarray | None = None  # [c] bool


def _per_question(values: np.ndarray, question: np.ndarray, n: int) -> np.ndarray:
    """Mean of ``values`` (one per cell) per question; NaN for questions without cells."""
    out = np.full(n, np.nan)
    for q in range(n):
        sel = question == q
        if sel.any():
            v = values[sel]
            v = v[np.isfinite(v)]
            out[q] = v.mean() if len(v) else np.nan
    return out


def normalised_gain(p: np.ndarray, p0: np.ndarray) -> np.ndarray:
    """Share of the available room moved: ``(p - p0) / (1 - p0)`` for a rise and
    ``(p - p0) / p0`` for a fall, so the gain lies in [-1, 1] (0 where ``p == p0``)."""
    p, p0 = np.asarray(p, dtype=float), np.asarray(p0, dtype=float)
    up = (p - p0) / np.clip(1 - p0, 1e-9, None)
    down = (p - p0) / np.clip(p0, 1e-9, None)
    return np.where(p >= p0, up, down)


def _summary_row(
    lens: str,
    method: str,
    k: int,
    alpha: float,
    cs: _CellScores,
    n: int,
    config: ComparisonConfig,
    baseline: _CellScores | None,
) -> SummaryRow:
    seed = config.seed
    nr = config.n_resamples
    mean_t = cs.target.mean(1)
    min_t = cs.target.min(1)
    gain = normalised_gain(cs.target, cs.base).mean(1)
    pq = _per_question(mean_t, cs.question, n)
    row = SummaryRow(
        lens,
        method,
        k,
        alpha,
        int(np.isfinite(pq).sum()),
        len(mean_t),
        bootstrap_mean(pq, seed=seed, n_resamples=nr),
        bootstrap_mean(_per_question(min_t, cs.question, n), seed=seed, n_resamples=nr),
        bootstrap_mean(_per_question(gain, cs.question, n), seed=seed, n_resamples=nr),
    )
    vanished: np.ndarray | None = (
        np.asarray(config.vanish.vanished(cs.target).any(1), dtype=bool) if k >= 2 else None
    )
    if vanished is not None and method != "unsteered":
        row.vanish_rate = bootstrap_mean(
            _per_question(vanished.astype(float), cs.question, n), seed=seed, n_resamples=nr
        )
        row.n_vanished = int(vanished.sum())
    if baseline is not None and method not in ("unsteered", config.baseline):
        row.diff_vs_baseline = paired_difference(
            pq,
            _per_question(baseline.target.mean(1), baseline.question, n),
            seed=seed,
            n_resamples=nr,
        )
        _check_paired(cs, baseline)
        row.diff_test = clustered_paired_test(
            mean_t, baseline.target.mean(1), cs.question, seed=seed, n_resamples=nr
        )
        if vanished is not None:
            base_gone = np.asarray(config.vanish.vanished(baseline.target).any(1), dtype=bool)
            row.vanish_test = mcnemar(vanished, base_gone)
            row.vanish_cluster_test = clustered_paired_test(
                vanished, base_gone, cs.question, seed=seed, n_resamples=nr
            )
    if cs.kl is not None:
        row.kl = bootstrap_mean(_per_question(cs.kl, cs.question, n), seed=seed, n_resamples=nr)
    if cs.degenerate is not None:
        row.n_degenerate = int(cs.degenerate.sum())
        row.degenerate_rate = float(cs.degenerate.mean()) if len(cs.degenerate) else float("nan")
    return row


def _check_paired(cs: _CellScores, baseline: _CellScores) -> None:
    """Paired tests need the method's and the baseline's cells in the same (question) order."""
    if cs.question.shape != baseline.question.shape or not np.array_equal(
        cs.question, baseline.question
    ):
        raise ConfigError(
            f"cannot pair {len(cs.question)} cells with the baseline's {len(baseline.question)}: "
            "they answer other questions or combinations"
        )


def _activation_cells(
    ev: ActivationEvaluation, idx: Sequence[int], probs: Sequence[np.ndarray] | None
) -> _CellScores:
    """Cells (question x combination ``idx``) of one method (``None``: unsteered)."""
    labels = list(ev.labels)
    n = ev.base.shape[0]
    q, t, b = [], [], []
    for j in idx:
        ti = [labels.index(x) for x in ev.combos[j]]
        p = ev.base if probs is None else probs[j]
        q.append(np.arange(n))
        t.append(p[:, ti])
        b.append(ev.base[:, ti])
    return _CellScores(np.concatenate(q), np.concatenate(t), np.concatenate(b))


def summarise_activations(ev: ActivationEvaluation, config: ComparisonConfig) -> list[SummaryRow]:
    """Summary rows of the activation-level evaluation (lens ``"activation"``)."""
    n = ev.base.shape[0]
    out: list[SummaryRow] = []
    for k in config.sizes:
        idx = [j for j, c in enumerate(ev.combos) if len(c) == k]
        if not idx:
            continue

        base_p = ev.probs.get(config.baseline)
        base_cs = _activation_cells(ev, idx, base_p) if base_p is not None else None
        out.append(
            _summary_row(
                "activation", "unsteered", k, 0.0, _activation_cells(ev, idx, None), n, config, None
            )
        )
        ins = _activation_cells(ev, idx, ev.instructed) if ev.instructed is not None else None
        if ins is not None:
            out.append(_summary_row("activation", INSTRUCTED, k, 0.0, ins, n, config, base_cs))
        for m in ev.probs:
            cs = _activation_cells(ev, idx, ev.probs[m])
            row = _summary_row("activation", m, k, ev.alphas[m][k], cs, n, config, base_cs)
            _add_instructed_fraction(row, cs, ins, n, config)
            out.append(row)
    return out


def _add_instructed_fraction(
    row: SummaryRow,
    cs: _CellScores,
    instructed: _CellScores | None,
    n: int,
    config: ComparisonConfig,
) -> None:
    """Set ``row``'s share of the instructed gain, on the questions both rows answered."""
    if instructed is None:
        return
    _check_paired(cs, instructed)
    pm = _per_question(cs.target.mean(1), cs.question, n)
    pu = _per_question(cs.base.mean(1), cs.question, n)
    pi = _per_question(instructed.target.mean(1), instructed.question, n)
    ok = np.isfinite(pm) & np.isfinite(pu) & np.isfinite(pi)
    pm_ok = pm[ok]
    row.instructed_fraction, row.instructed_note = instructed_fraction(
        lambda idx: float(pm_ok[idx].mean()),
        pu[ok],
        pi[ok],
        seed=config.seed,
        n_resamples=config.n_resamples,
    )


def _text_cells(
    te: TextEvaluation,
    lens: str,
    method: str,
    factor: float,
    k: int,
    only: set[tuple[int, tuple[str, ...]]] | None = None,
) -> _CellScores | None:
    """The ``k``-target cells of one method at one alpha factor under one text lens (``only``:
    just these ``(question, targets)`` cells); for ``"unsteered"``, each cell is scored on its
    question's unsteered answer."""
    labels = list(te.labels)
    key = "text_probs" if lens == "text" else "act_probs"
    unsteered = {a.question: a for a in te.answers if a.method == "unsteered"}
    if method == "unsteered":
        cells = [(unsteered[c.question], c.targets) for c in te.cells if len(c.targets) == k]
    else:
        cells = [
            (a, a.targets)
            for a in te.answers
            if a.method == method
            and a.factor == factor
            and len(a.targets) == k
            and (only is None or (a.question, a.targets) in only)
        ]
        if not cells:
            return None

    def probs(a: Answer, targets: tuple[str, ...]) -> list[float]:
        p = getattr(a, key)
        return [p[labels.index(t)] for t in targets]

    return _CellScores(
        np.array([a.question for a, _ in cells], dtype=int),
        np.array([probs(a, t) for a, t in cells], dtype=float),
        np.array([probs(unsteered[a.question], t) for a, t in cells], dtype=float),
        np.array([a.kl for a, _ in cells], dtype=float),
        np.array([a.degenerate is not None for a, _ in cells]),
    )


def curve_cells(te: TextEvaluation, method: str) -> set[tuple[int, tuple[str, ...]]]:
    """The ``(question, targets)`` cells ``method`` answered at every alpha factor (its
    trade-off curve's cells; the other cells are answered at the calibrated alpha only)."""
    per_factor = [
        {(a.question, a.targets) for a in te.answers if a.method == method and a.factor == f}
        for f in te.factors
    ]
    return set.intersection(*per_factor) if per_factor else set()


def summarise_text(te: TextEvaluation, config: ComparisonConfig) -> list[SummaryRow]:
    """Summary rows at the calibrated alpha (factor 1) for each text lens."""
    n = len(te.questions)
    out: list[SummaryRow] = []
    for lens in te.lenses:
        for k in config.sizes:
            base_cs = _text_cells(te, lens, config.baseline, 1.0, k)
            un = _text_cells(te, lens, "unsteered", 1.0, k)
            if un is None or base_cs is None:
                continue
            out.append(_summary_row(lens, "unsteered", k, 0.0, un, n, config, None))
            ins = _text_cells(te, lens, INSTRUCTED, 0.0, k)
            if ins is not None:
                row = _summary_row(lens, INSTRUCTED, k, 0.0, ins, n, config, base_cs)
                row.perplexity = _perplexity(
                    [a for a in te.answers if a.method == INSTRUCTED and len(a.targets) == k]
                )
                out.append(row)
            for m in te.alphas:
                cs = _text_cells(te, lens, m, 1.0, k)
                if cs is None:
                    continue
                row = _summary_row(lens, m, k, te.alphas[m][k], cs, n, config, base_cs)
                row.perplexity = _perplexity(
                    [
                        a
                        for a in te.answers
                        if a.method == m and a.factor == 1.0 and len(a.targets) == k
                    ]
                )
                _add_instructed_fraction(row, cs, ins, n, config)
                out.append(row)
    return out


def summarise_combinations(
    te: TextEvaluation, config: ComparisonConfig, lens: str = "text"
) -> list[CombinationRow]:
    """:class:`CombinationRow` per method (unsteered first) and combination of ``te.cells``
    under one text lens, at the calibrated alpha (factor 1)."""
    labels = list(te.labels)
    key = "text_probs" if lens == "text" else "act_probs"
    unsteered = {a.question: a for a in te.answers if a.method == "unsteered"}
    groups: dict[tuple[str, tuple[str, ...]], list[Answer]] = {}
    for c in te.cells:
        groups.setdefault(("unsteered", c.targets), []).append(unsteered[c.question])
    for a in te.answers:
        if a.method == INSTRUCTED or (a.method != "unsteered" and a.factor == 1.0):
            groups.setdefault((a.method, a.targets), []).append(a)
    order = {m: i for i, m in enumerate(["unsteered", INSTRUCTED, *te.alphas])}

    def rank(g: tuple[tuple[str, tuple[str, ...]], list[Answer]]) -> tuple[int, int, list[int]]:
        m, t = g[0]
        return order[m], len(t), [labels.index(x) for x in t]

    rows = []
    for (m, t), answers in sorted(groups.items(), key=rank):
        p = np.array([[getattr(a, key)[labels.index(x)] for x in t] for a in answers], dtype=float)
        row = CombinationRow(
            lens,
            m,
            t,
            len({a.question for a in answers}),
            len(answers),
            float(p.mean(1).mean()),
            float(p.min(1).mean()),
        )
        if len(t) >= 2:
            gone = config.vanish.vanished(p).any(1)
            row.vanish_rate, row.n_vanished = float(gone.mean()), int(gone.sum())
        rows.append(row)
    return rows


def _perplexity(answers: Sequence[Answer]) -> float:
    tot = sum(a.nll * a.n_tokens for a in answers if a.n_tokens)
    cnt = sum(a.n_tokens for a in answers)
    return math.exp(tot / cnt) if cnt else float("nan")
