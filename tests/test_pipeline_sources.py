"""Text-grounded steering probes: which gold texts train what, and the kits `prepare` builds."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ks_lens.datasets.gold_texts import LabelledText, load_gold_texts, split_by_question
from ks_lens.errors import ConfigError
from ks_lens.pipeline import PROBE_SOURCES, PipelineConfig, prepare


def test_split_by_question_is_disjoint_stratified_and_seeded():
    gold = load_gold_texts()
    a, b = split_by_question(gold, 0.5, seed=0)
    qa = {t.question_id for t in a}
    qb = {t.question_id for t in b}
    assert not qa & qb and len(a) + len(b) == len(gold)
    assert abs(len(qa) - len(qb)) <= 1
    cats = {q.rsplit("-", 1)[0] for q in qa | qb}
    for c in cats:  # every category is on both sides
        assert any(q.startswith(c + "-") for q in qa) and any(q.startswith(c + "-") for q in qb)
    assert split_by_question(gold, 0.5, seed=0) == (a, b)
    assert split_by_question(gold, 0.5, seed=1) != (a, b)
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        split_by_question(gold, 1.0)
    one = (LabelledText("x", "text", ("casual",), "cat-001"),)
    with pytest.raises(ConfigError, match="at least two questions"):
        split_by_question(one)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    cfg = PipelineConfig.fast(
        model="tiny-random-llama", n_gold=40, layer=2, multilayer_offsets=(-2, -1, 0)
    )
    return prepare(cfg, tmp_path_factory.mktemp("work"), progress=False, sources=PROBE_SOURCES)


def test_text_kit_learns_only_from_the_steering_half(tiny_setup):
    s = tiny_setup
    steer_q = {t.question_id for t in s.gold_steer}
    judge_q = {t.question_id for t in s.gold_judge}
    assert not steer_q & judge_q
    text = s.kits["text"]
    src = text.vectors.source
    assert src["split"] == "gold-steer" and src["mode"] == "response-only"
    # the CAA vectors are mean differences over the single-tone steering-half texts only
    assert s.steer_store is not None
    acts = s.steer_store.load(layers=[2])
    steer_ids = {t.id for t in s.gold_steer}
    base = acts.base_labels
    rows = [
        i
        for i, (q, lab) in enumerate(zip(acts.question_ids, acts.labels.tolist(), strict=True))
        if q in steer_ids and 0 <= lab < len(base)
    ]
    assert src["n_rows"] == len(rows)
    x = acts.at(2)[rows]
    labs = acts.labels[rows]
    k = 0
    expected = x[labs == k].mean(0) - x[labs != k].mean(0)
    assert torch.allclose(text.vectors.vectors[k], expected, atol=1e-5)
    assert text.probe.label_names == base == s.kits["prompt"].probe.label_names
    # probes at the multi-layer layers, both sources
    for kit in s.kits.values():
        assert sorted(kit.layer_probes) == [0, 1, 2]
        assert kit.layer_probes[2] is kit.probe or kit.layer_probes[2].layer == 2
    assert s.probe is s.kits["text"].probe  # the default source (measured: docs/steering.md)


def test_linear_probe_beside_the_mlp_probe(tiny_setup, tmp_path):
    """ksteer_linear (a default method) gets a linear probe of each source, at the steering
    probe's hook point, trained on the same rows, saved beside it."""
    from ks_lens.probes import Probe

    s = tiny_setup
    assert "ksteer_linear" in s.config.comparison.methods
    for source, kit in s.kits.items():
        lin = kit.linear_probe
        assert lin is not None and len(lin.linears) == 1 and len(kit.probe.linears) > 1
        assert lin.hook_name == kit.probe.hook_name and lin.label_names == kit.probe.label_names
        assert lin.metrics["n_train"] == kit.probe.metrics["n_train"]  # the same rows
        work = s.evaluator_store.path.parents[1]  # <work>/acts/<store>
        saved = Probe.load(work / "probes" / f"steering-{source}-linear")
        assert torch.equal(saved.linears[0].weight, lin.linears[0].weight)


def test_response_evaluator_reads_only_the_other_half(tiny_setup):
    s = tiny_setup
    ev = s.response_evaluator
    n_judge = len([t for t in s.gold_texts if t.id in {g.id for g in s.gold_judge}])
    assert ev.metrics["n_train"] + ev.metrics["n_val"] <= n_judge


def test_probe_source_is_validated():
    with pytest.raises(ConfigError, match="unknown probe_source"):
        PipelineConfig(probe_source="both").validate()
    with pytest.raises(ConfigError, match="multilayer_offsets"):
        PipelineConfig(multilayer_offsets=(0,)).validate()
    with pytest.raises(ConfigError, match="text_pooling"):
        PipelineConfig(text_pooling="first").validate()


def test_prepare_builds_only_the_configured_source_by_default(tmp_path):
    """Without ``sources`` only the configured probe source is built, and the prompt-mode
    train split (used by the prompt source alone) is not collected."""
    cfg = PipelineConfig.fast(
        model="tiny-random-llama", n_gold=24, layer=2, multilayer_offsets=(-1, 0), n_evaluator=6
    )
    # no method steers with a linear probe: none is trained or saved
    cfg = replace(cfg, comparison=replace(cfg.comparison, methods=("caa_mean", "ksteer")))
    s = prepare(cfg, tmp_path / "work", progress=False)
    assert s.kit.linear_probe is None
    assert not (tmp_path / "work" / "probes" / "steering-text-linear").exists()
    assert sorted(s.kits) == ["text"] and s.train_store is None
    assert not list((tmp_path / "work" / "acts").glob("train-prompt-*"))
    assert s.kit_of("text") is s.kit
    with pytest.raises(ConfigError, match="prepared with sources \\['text'\\]"):
        s.kit_of("prompt")
    with pytest.raises(ConfigError, match="unknown probe source"):
        prepare(cfg, tmp_path / "w2", progress=False, sources=("both",))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must include the configured probe_source"):
        prepare(cfg, tmp_path / "w3", progress=False, sources=("prompt",))


def test_likelihood_vectors_join_every_kit_and_are_cached(tiny_setup):
    """Setup.train_likelihood (what prepare calls when a method needs them): trained on the
    steering half at the steering layer, put into every kit, reused from the work dir."""
    from ks_lens.steering.likelihood import LikelihoodConfig

    s = tiny_setup
    cfg = LikelihoodConfig(steps=2, batch_size=2, max_pairs=4, max_tokens=4)
    vecs = s.train_likelihood(cfg, progress=False)
    assert all(kit.likelihood_vectors is vecs for kit in s.kits.values())
    assert vecs.layer == s.layer and vecs.label_names == s.kit.probe.label_names
    assert s.work_dir is not None and (s.work_dir / "vectors" / "likelihood" / "meta.json").is_file()
    again = s.train_likelihood(cfg, progress=False)
    assert again.source == vecs.source and torch.equal(again.vectors, vecs.vectors)
