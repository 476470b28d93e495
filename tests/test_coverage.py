"""The text-level coverage planner: every combination on at least ``min_questions`` questions,
balanced over questions and combinations, deterministic, clear errors when impossible."""

from __future__ import annotations

from collections import Counter

import pytest

from ks_lens.datasets.coverage import coverage_counts, label_combinations, plan_coverage

SIX = ("casual", "concise", "empathetic", "expert", "cautious", "helpful")


def _check(n_questions: int, min_q: int, labels=SIX, sizes=(1, 2, 3), seed=0) -> None:
    plan = plan_coverage(n_questions, labels, sizes, min_questions=min_q, seed=seed)
    assert len(plan) == len(set(plan))  # no question answers a combination twice
    per_combo, per_question = coverage_counts(plan)
    for k in sizes:
        combos = label_combinations(labels, (k,))
        n_cells = max(len(combos) * min_q, n_questions)
        counts = [per_combo[c] for c in combos]
        assert sum(counts) == n_cells
        assert min(counts) >= min_q  # every combination covered
        assert max(counts) - min(counts) <= 1  # combinations balanced
        q_counts = [per_question[k][q] for q in range(n_questions)]
        assert min(q_counts) >= 1  # every question answers every size
        assert max(q_counts) - min(q_counts) <= 1  # questions balanced
        # each combination on distinct questions (not confounded with one question)
        for c in combos:
            qs = [q for q, t in plan if t == c]
            assert len(set(qs)) == len(qs) >= min_q
    assert all(0 <= q < n_questions for q, _ in plan)
    sizes_in_order = [len(t) for _, t in plan]
    assert sizes_in_order == sorted(sizes_in_order, key=list(sizes).index)


def test_label_combinations_counts():
    assert [len(label_combinations(SIX, (k,))) for k in (1, 2, 3)] == [6, 15, 20]
    with pytest.raises(ValueError, match="size 7 is impossible with 6 labels"):
        label_combinations(SIX, (7,))


def test_sixteen_questions_hand_counted():
    plan = plan_coverage(16, SIX, min_questions=2, seed=0)
    per_combo, per_question = coverage_counts(plan)
    # singles: max(6 x 2, 16) = 16 cells -> four singles on 3 questions, two on 2; one per question
    assert sorted(per_combo[c] for c in label_combinations(SIX, (1,))) == [2, 2, 3, 3, 3, 3]
    assert set(per_question[1].values()) == {1}
    # pairs: 30 cells -> every pair on 2 questions; 14 questions answer 2 pairs, 2 answer 1
    assert {per_combo[c] for c in label_combinations(SIX, (2,))} == {2}
    assert sorted(Counter(per_question[2].values()).items()) == [(1, 2), (2, 14)]
    # triples: 40 cells -> every triple on 2 questions; 8 questions answer 3, 8 answer 2
    assert {per_combo[c] for c in label_combinations(SIX, (3,))} == {2}
    assert sorted(Counter(per_question[3].values()).items()) == [(2, 8), (3, 8)]
    assert len(plan) == 16 + 30 + 40


def test_hundred_questions_one_triple_each():
    plan = plan_coverage(100, SIX, min_questions=2, seed=0)
    per_combo, per_question = coverage_counts(plan)
    assert {per_combo[c] for c in label_combinations(SIX, (3,))} == {5}  # 100 cells / 20
    assert set(per_question[3].values()) == {1} and len(per_question[3]) == 100


@pytest.mark.parametrize("n_questions", [2, 3, 4, 7, 10, 16, 25, 40, 100])
@pytest.mark.parametrize("min_q", [1, 2, 3])
def test_every_combination_covered_and_balanced(n_questions, min_q):
    if n_questions < min_q:
        with pytest.raises(ValueError, match="only"):
            plan_coverage(n_questions, SIX, min_questions=min_q)
        return
    _check(n_questions, min_q)


def test_other_label_sets_and_sizes():
    _check(5, 2, labels=("a", "b", "c", "d"), sizes=(1, 2, 3, 4))
    _check(9, 3, labels=tuple("abcdefgh"), sizes=(2,))
    _check(10, 2, sizes=(3, 1))  # sizes in the given order


def test_deterministic_given_the_seed():
    a = plan_coverage(16, SIX, seed=0)
    assert plan_coverage(16, SIX, seed=0) == a
    b = plan_coverage(16, SIX, seed=1)
    assert b != a and {t for _, t in b} == {t for _, t in a}
    _check(16, 2, seed=1)


def test_impossible_plans_raise_clear_errors():
    with pytest.raises(
        ValueError, match="at least 2 distinct test questions, but there are only 1"
    ):
        plan_coverage(1, SIX, min_questions=2)
    with pytest.raises(ValueError, match="size 4 is impossible with 3 labels"):
        plan_coverage(10, ("a", "b", "c"), (1, 4))
    with pytest.raises(ValueError, match="min_questions must be at least 1"):
        plan_coverage(10, SIX, min_questions=0)
    with pytest.raises(ValueError, match="distinct"):
        plan_coverage(10, ("a", "a", "b"))
    with pytest.raises(ValueError, match="distinct"):
        plan_coverage(10, SIX, (1, 1))


def test_the_full_demo_answers_every_combination_and_fast_one_per_size():
    from ks_lens.comparison import plan_comparison
    from ks_lens.pipeline import PipelineConfig

    full, fast = PipelineConfig(), PipelineConfig.fast()
    assert full.comparison.text_coverage == "all-combinations"
    assert fast.comparison.text_coverage == "per-size"
    assert full.comparison is not PipelineConfig().comparison  # no settings shared between runs
    labels = list("abcdef")
    plan = plan_comparison(labels, full.comparison, n_calib=full.n_calib, n_test=full.n_gen)
    for k, n_combos in ((1, 6), (2, 15), (3, 20)):
        per = Counter(c.targets for c in plan.gen_cells if len(c.targets) == k)
        assert len(per) == n_combos and min(per.values()) >= 2, (k, per)
