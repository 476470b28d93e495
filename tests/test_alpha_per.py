"""Per-combination alpha (``ComparisonConfig.alpha_per="combination"``, issue 24 lever 5): the
calibration plan, the lockstep search per (method, combination) against a synthetic metric whose
answer is known, the downstream lookups, the JSON round trip and the settings' checks."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

import numpy as np
import pytest

import ks_lens.capability.stage as capability_stage
import ks_lens.comparison.calibration as calibration
import ks_lens.comparison.stages as stages
from ks_lens.calibration import Calibration
from ks_lens.comparison import (
    ComparisonConfig,
    ComparisonResult,
    alpha_of,
    calibrate_combinations,
    label_combinations,
    merge_results,
    plan_comparison,
    run_comparison,
)
from ks_lens.comparison.plan import Cell
from ks_lens.errors import ConfigError, StoreError, WrongTypeError
from ks_lens.probes import ProbeConfig, train_probe
from ks_lens.steering import SteeringVectors

LABELS = ("a", "b", "c", "d")


def test_plan_calibrates_exactly_the_evaluated_combinations():
    cfg = ComparisonConfig(
        sizes=(1, 2, 3), act_combos_per_size=2, alpha_per="combination", seed=3
    ).validate(LABELS)
    plan = plan_comparison(LABELS, cfg, n_calib=5, n_test=3)
    evaluated = set(plan.act_combos) | {c.targets for c in plan.gen_cells}
    assert set(plan.evaluated_combos()) == evaluated
    assert len(evaluated) < len(label_combinations(LABELS, (1, 2, 3)))  # a true subset here
    per_combo: dict[tuple[str, ...], list[int]] = {}
    for c in plan.calib_cells:
        per_combo.setdefault(c.targets, []).append(c.question)
    assert set(per_combo) == evaluated  # exactly the combinations the test cells use
    for qs in per_combo.values():
        assert len(qs) == len(set(qs)) >= 1  # distinct calibration questions
    for k in (1, 2, 3):
        cells = [c for c in plan.calib_cells if len(c.targets) == k]
        n_combos = len(plan.evaluated_combos(k))
        assert {c.question for c in cells} == set(range(5))  # every question, every size
        assert len(cells) == max(n_combos, 5)  # max(combinations x 1, questions)
    # two questions per combination: each combination on two distinct questions
    two = plan_comparison(
        LABELS, replace(cfg, calib_questions_per_combination=2), n_calib=5, n_test=3
    )
    counts = Counter(c.targets for c in two.calib_cells)
    assert set(counts) == evaluated and min(counts.values()) >= 2
    # the per-size plan is unchanged by the new setting's presence: one cell per question and size
    size = plan_comparison(LABELS, replace(cfg, alpha_per="size"), n_calib=5, n_test=3)
    assert len(size.calib_cells) == 5 * 3
    assert size.act_combos == plan.act_combos and size.gen_cells == plan.gen_cells
    with pytest.raises(ConfigError, match="at least 6 calibration questions, but there are only 5"):
        plan_comparison(
            LABELS, replace(cfg, calib_questions_per_combination=6), n_calib=5, n_test=3
        )


#: the synthetic metric's slope per combination: KL = slope * alpha ** 2 (an "easy" combination
#: has a small slope, so its alpha can be larger)
SLOPES = {("a",): 0.01, ("b",): 0.04, ("c",): 0.0025, ("a", "b"): 0.09, ("b", "c"): 0.01}


class _FakeRounds:
    """Stands in for the model-backed rounds: each cell's KL is its combination's slope x
    alpha ** 2 (times 2 for ``ksteer``); every call is recorded."""

    calls: ClassVar[list[list[tuple[str, tuple[str, ...], int]]]] = []

    def __init__(self, model, methods, plan, questions, config) -> None:
        _FakeRounds.calls = []

    def metrics(self, which, alphas, *, searches):
        chosen = [searches[i] for i in which]
        _FakeRounds.calls.append([(n, cells[0].targets, len(cells)) for n, cells in chosen])
        return [
            float(np.mean([SLOPES[c.targets] * (2 if n == "ksteer" else 1) * a**2 for c in cells]))
            for (n, cells), a in zip(chosen, alphas, strict=True)
        ]


def _synthetic_plan(alpha_per: str):
    labels = ("a", "b", "c")
    cfg = ComparisonConfig(
        methods=("caa_mean", "ksteer"),
        sizes=(1, 2),
        kl_budget=1.0,
        alpha_per=alpha_per,
        calib_questions_per_combination=2,
        calib_bisect_steps=4,
    ).validate(labels)
    plan = plan_comparison(labels, cfg, n_calib=4, n_test=2)
    # the combinations of SLOPES only (a plan with act combos (a), (b), (c), (a, b), (b, c))
    plan.act_combos = list(SLOPES)
    plan.gen_cells = [Cell(0, ("a",)), Cell(1, ("a", "b"))]
    if alpha_per == "combination":
        plan.calib_cells = calibration_cells(plan, cfg)
    return cfg, plan


def calibration_cells(plan, cfg):
    from ks_lens.comparison.plan import combination_calib_cells

    return combination_calib_cells(plan, cfg, 4)


def test_each_combination_gets_its_own_alpha_within_budget(monkeypatch):
    monkeypatch.setattr(calibration, "_Rounds", _FakeRounds)
    methods = {"caa_mean": None, "ksteer": None}
    cfg, plan = _synthetic_plan("combination")
    per_size, combo = calibrate_combinations(None, methods, plan, ["q"] * 4, cfg)  # type: ignore[arg-type]
    assert set(combo) == {"caa_mean", "ksteer"}
    for m, factor in (("caa_mean", 1), ("ksteer", 2)):
        assert set(combo[m]) == set(SLOPES)
        for t, cal in combo[m].items():
            best = math.sqrt(cfg.kl_budget / (SLOPES[t] * factor))  # where KL reaches the budget
            assert SLOPES[t] * factor * cal.alpha**2 == pytest.approx(cal.metric)
            assert cal.metric <= cfg.kl_budget  # within budget
            assert 0.9 * best <= cal.alpha <= best  # the largest alpha within 10 %
        # a hard and an easy combination of one size: alphas in the ratio of sqrt(slopes)
        ratio = combo[m][("b", "c")].alpha / combo[m][("a", "b")].alpha
        assert ratio == pytest.approx(3.0, rel=0.12)
        # a size's entry: the lower median of its combinations, no evaluations of its own
        ones = sorted(combo[m][t].alpha for t in (("a",), ("b",), ("c",)))
        assert per_size[m][1].alpha == ones[1] and per_size[m][1].evaluations == []
        assert per_size[m][2].alpha == min(combo[m][("a", "b")].alpha, combo[m][("b", "c")].alpha)
        assert "median of 3 combinations" in per_size[m][1].note
    # lockstep: one call per round for all (method, combination) searches of a size, each on
    # its own cells (2 distinct calibration questions per combination here)
    calls = _FakeRounds.calls
    assert sorted(calls[0]) == sorted((m, (t,), 2) for m in methods for t in "abc")
    first_pairs = next(c for c in calls if any(len(t) == 2 for _, t, _ in c))
    assert sorted(first_pairs) == sorted(
        (m, t, 2) for m in methods for t in (("a", "b"), ("b", "c"))
    )
    # per size, on the same synthetic metric: one alpha for both combinations of a size
    cfg_s, plan_s = _synthetic_plan("size")
    plan_s.calib_cells = [c for c in plan.calib_cells]  # the same cells, pooled per size
    per_size_s, combo_s = calibrate_combinations(None, methods, plan_s, ["q"] * 4, cfg_s)  # type: ignore[arg-type]
    assert combo_s == {}
    shared = per_size_s["caa_mean"][2].alpha
    assert combo["caa_mean"][("a", "b")].alpha < shared < combo["caa_mean"][("b", "c")].alpha


def test_alpha_of_looks_up_the_combination_then_the_size():
    alphas = {"caa_mean": {1: 1.0, 2: 2.0}, "ksteer": {1: 10.0, 2: 20.0}}
    combos = {"ksteer": {("a",): 7.0, ("a", "b"): 30.0}}
    assert alpha_of(alphas, combos, "caa_mean", ("a", "b")) == 2.0  # not per combination
    assert alpha_of(alphas, combos, "ksteer", ("a", "b")) == 30.0
    assert alpha_of(alphas, None, "ksteer", ("a", "b")) == 20.0
    with pytest.raises(ConfigError, match=r"no alpha calibrated for the combination \['b'\]"):
        alpha_of(alphas, combos, "ksteer", ("b",))


def test_text_rows_use_each_combination_alpha():
    cfg = ComparisonConfig(
        methods=("caa_mean",), sizes=(1, 2), alpha_per="combination", instructed=False
    )
    labels = ("a", "b", "c")
    plan = plan_comparison(labels, cfg, n_calib=2, n_test=3)
    combos = {t: 1.0 + i for i, t in enumerate(plan.evaluated_combos())}
    tr = stages._text_rows(
        {"caa_mean": None},  # type: ignore[dict-item]
        {"caa_mean": {1: 99.0, 2: 99.0}},
        plan,
        3,
        cfg,
        None,
        {"caa_mean": combos},
    )
    steered = [tr.meta[g] for g, _ in tr.rows if tr.meta[g][0] == "caa_mean"]
    assert steered and all(a == pytest.approx(combos[t] * f) for _, f, a, t in steered)
    assert {spec.alpha for _, spec in tr.configs[1:]} == {  # type: ignore[misc]
        combos[t] * f for _, f, _, t in steered
    }


def test_config_round_trip_back_compat_and_bad_values():
    cfg = ComparisonConfig(alpha_per="combination", calib_questions_per_combination=2)
    d = json.loads(json.dumps(cfg.to_json()))
    assert d["alpha_per"] == "combination" and d["calib_questions_per_combination"] == 2
    assert ComparisonConfig.from_json(d) == cfg
    # the defaults are left out, so a per-size result reads as one written before the setting
    plain = ComparisonConfig().to_json()
    assert "alpha_per" not in plain and "calib_questions_per_combination" not in plain
    old = {k: v for k, v in json.loads(json.dumps(plain)).items()}
    loaded = ComparisonConfig.from_json(old)
    assert loaded.alpha_per == "size" and loaded.calib_questions_per_combination == 1
    with pytest.raises(ConfigError, match=r"unknown alpha_per 'triple'; use one of \('size', 'combination'\)"):
        ComparisonConfig(alpha_per="triple").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="calib_questions_per_combination must be at least 1, got 0"):
        ComparisonConfig(calib_questions_per_combination=0).validate()
    with pytest.raises(WrongTypeError, match="alpha_per must be a name"):
        ComparisonConfig.from_json({**old, "alpha_per": 2})


class _FakeTextEvaluator:
    label_names = ("alpha", "beta", "gamma")

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([[len(t) % 7 / 7, len(t.split()) % 5 / 5, 0.5] for t in texts])


def test_run_and_merge_with_per_combination_alphas(monkeypatch, tiny_model, tiny_acts, tiny_probe):
    vec = SteeringVectors.fit(tiny_acts, 2)
    evaluator = train_probe(tiny_acts, 3, config=ProbeConfig(hidden=16, epochs=3, seed=1))
    seen: dict[str, list] = {"act": [], "cap": []}
    groups_fn, options_fn = stages.readout_groups, capability_stage.score_option_rows

    def spy_groups(model, questions, groups, **kw):
        seen["act"].extend(g[1] for g in groups if g is not None)
        return groups_fn(model, questions, groups, **kw)

    def spy_options(model, qs, steerings, rows, **kw):
        seen["cap"].extend(s[1] for s in steerings if s is not None)
        return options_fn(model, qs, steerings, rows, **kw)

    monkeypatch.setattr(stages, "readout_groups", spy_groups)
    monkeypatch.setattr(capability_stage, "score_option_rows", spy_options)
    base = ComparisonConfig(
        methods=("caa_mean", "ksteer"),
        sizes=(1, 2),
        kl_budget=0.05,
        act_combos_per_size=1,
        max_new_tokens=2,
        calib_tokens=2,
        calib_bisect_steps=1,
        n_resamples=50,
        instructed=False,
        capability_questions=6,
        capability_instructed=False,
    )

    def run(cfg):
        return run_comparison(
            tiny_model,
            probe=tiny_probe,
            vectors=vec,
            evaluator=evaluator,
            text_evaluator=_FakeTextEvaluator(),
            calib_questions=["hi?", "yo?"],
            test_questions=["a?", "b?"],
            config=cfg,
            progress=False,
        )

    res = run(replace(base, alpha_per="combination"))
    evaluated = set(res.plan.evaluated_combos())
    assert {c.targets for c in res.plan.calib_cells} == evaluated
    assert set(res.combo_calibration) == {"caa_mean", "ksteer"}
    for m in ("caa_mean", "ksteer"):
        assert set(res.combo_calibration[m]) == evaluated
        for t in evaluated:
            cal = res.combo_calibration[m][t]
            assert cal.alpha == 0 or cal.metric <= base.kl_budget
    # activations: each (method, combination) at its combination's alpha
    assert sorted((s.target, s.alpha) for s in seen["act"]) == sorted(
        (t, res.combo_alphas[m][t]) for t in res.plan.act_combos for m in ("caa_mean", "ksteer")
    )
    te = res.text
    assert te is not None
    steered = [a for a in te.answers if a.method != "unsteered"]
    assert steered
    for a in steered:
        assert a.alpha == pytest.approx(res.alpha(a.method, a.targets) * a.factor)
        assert res.alpha(a.method, a.targets) == res.combo_alphas[a.method][a.targets]
    # capability: a calibrated combination at its own alpha, the others at the size's median
    assert any(s.target not in evaluated for s in seen["cap"])  # the fallback is exercised
    for spec in seen["cap"]:
        own = [res.combo_alphas[m].get(spec.target) for m in ("caa_mean", "ksteer")]
        sizes = [res.alphas[m][len(spec.target)] for m in ("caa_mean", "ksteer")]
        assert spec.alpha in (own if spec.target in evaluated else sizes)
    # JSON round trip (report.json) and an edited record refused
    doc = json.loads(json.dumps(res.to_json()))
    assert doc["comparison_config"]["alpha_per"] == "combination"
    again = ComparisonResult.from_json(doc)
    assert again.combo_alphas == res.combo_alphas
    assert json.dumps(again.to_json()) == json.dumps(doc)
    damaged = json.loads(json.dumps(doc))
    damaged["combo_calibration"]["ksteer"] = damaged["combo_calibration"]["ksteer"][1:]
    with pytest.raises(StoreError, match="combo_calibration of 'ksteer' has no alpha"):
        ComparisonResult.from_json(damaged)
    # merged with the per-size run of the same methods (other calibration cells, same test cells)
    size = run(base)
    assert size.combo_calibration == {} and "combo_calibration" not in size.to_json()
    merged = merge_results({"size": size, "combination": res}, baseline="caa_mean@size")
    assert set(merged.combo_calibration) == {"caa_mean@combination", "ksteer@combination"}
    t = next(iter(evaluated))
    assert merged.alpha("ksteer@combination", t) == res.combo_alphas["ksteer"][t]
    assert merged.alpha("ksteer@size", t) == size.alphas["ksteer"][len(t)]
    doc = json.loads(json.dumps(merged.to_json()))
    assert ComparisonResult.from_json(doc).combo_alphas == merged.combo_alphas


def test_size_summary_refuses_no_combinations():
    with pytest.raises(ConfigError, match="no combination calibrated"):
        calibration.size_summary([])
    one = calibration.size_summary([Calibration(2.0, 0.5, 0.4, [(2.0, 0.4)])])
    assert (one.alpha, one.metric, one.evaluations) == (2.0, 0.4, [])
