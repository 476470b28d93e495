"""Memory that does not grow with the model (issue 26): only the layers a run reads are collected,
stores are read lazily, generated answers are scored as soon as their question is complete, and
the demo's memory estimate."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

import ks_lens.activations as activations
import ks_lens.activations.collect as activations_collect
import ks_lens.activations.store as activations_store
import ks_lens.evaluation.answers as answers
import ks_lens.evaluation.scoring as scoring
from ks_lens.activations import ActivationStore, collect_to_store
from ks_lens.errors import ConfigError
from ks_lens.memory import (
    RunShape,
    check_memory,
    estimate_run,
    peak_rss_mb,
    record_memory,
    rss_mb,
    timed_stage,
)
from ks_lens.pipeline import PipelineConfig, RunLayers, prepare
from ks_lens.pipeline.layers import _layer_tag


def test_run_layers_policy():
    cfg = PipelineConfig(layer=18, multilayer_offsets=(-6, -3, 0))
    run = RunLayers.of(cfg, 30)
    assert (run.steering, run.evaluator, run.multilayer) == (18, 22, (12, 15, 18))
    assert run.train_store == [12, 15, 18]
    assert run.evaluator_store == [22]
    assert run.judge_store == list(range(18, 30)) and run.gold_steer_store == [12, 15, 18]
    assert run.widest_store == 12
    assert RunLayers.of(cfg, 30, [0, 22]).evaluator_store == [0, 22]
    assert RunLayers.of(cfg, 30, "all").train_store == list(range(30))
    with pytest.raises(ConfigError, match="study layer 30 is out of range"):
        RunLayers.of(cfg, 30, [30])
    assert _layer_tag([12, 15, *range(18, 30)], 30) == "-L12.15.18-29"
    assert _layer_tag([22], 30) == "-L22"
    assert _layer_tag(list(range(30)), 30) == ""


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    cfg = PipelineConfig.fast(
        model="tiny-random-llama", n_gold=24, layer=2, eval_layer=3, multilayer_offsets=(-1, 0)
    )
    work = tmp_path_factory.mktemp("work")
    return prepare(cfg, work, progress=False), work


def test_prepare_collects_only_the_run_layers(run_setup):
    """Each store holds only the layers its stage reads (the tiny model has 4 layers)."""
    setup, _ = run_setup
    assert setup.evaluator_store.layers == (3,)
    assert setup.response_store.layers == (2, 3)
    assert setup.steer_store is not None and setup.steer_store.layers == (1, 2)
    assert setup.evaluator_store.path.name.endswith("-L3")
    assert setup.response_store.path.name.endswith("-L2-3")
    # the two halves of the gold texts, each in its own store
    judge, steer = ({t.id for t in ts} for ts in (setup.gold_judge, setup.gold_steer))
    assert set(setup.response_store.load().question_ids) <= judge
    assert set(setup.steer_store.load().question_ids) <= steer
    for store in (setup.evaluator_store, setup.response_store, setup.steer_store):
        n = len(store.layers)
        for s in store.meta["shards"]:
            t = load_file(str(store.path / s["tensors"]["file"]))["resid_post"]
            assert t.shape[1] == n  # the shard files hold only those layers
        assert store.meta["hook_names"] == [f"blocks.{x}.hook_resid_post" for x in store.layers]
    assert setup.evaluator.layer == 3 and setup.response_evaluator.layer in (2, 3)
    assert sorted(setup.kit.layer_probes) == [1, 2]
    for k in ("collect", "train"):
        assert setup.timings[f"{k}_peak_rss_mb"] >= setup.timings[f"{k}_rss_mb"] > 0


def test_prepare_reuses_a_study_store_of_every_layer(run_setup, tmp_path):
    """A study's all-layer stores serve a later run in the same folder (no second collection)."""
    setup, _ = run_setup
    cfg = setup.config
    study = prepare(cfg, tmp_path, progress=False, study_layers="all")
    assert study.evaluator_store.layers == (0, 1, 2, 3)
    assert not study.evaluator_store.path.name.endswith("-L3")
    again = prepare(cfg, tmp_path, progress=False)
    assert again.evaluator_store.path == study.evaluator_store.path
    assert again.evaluator.metrics == setup.evaluator.metrics  # same rows, same layer, same probe


def test_collection_hooks_only_the_requested_layers(tiny_model, tiny_dataset, tmp_path, monkeypatch):
    """The forward passes hook only the requested layers, and the store holds only those."""
    seen: list[tuple[str, ...]] = []
    real = activations_collect.capture_features

    def spy(model, batch, names, **kw):
        if batch.input_ids.shape != (2, 2) or batch.input_ids.any():  # not feature_shapes' probe
            seen.append(tuple(names))
        return real(model, batch, names, **kw)

    monkeypatch.setattr(activations_collect, "capture_features", spy)
    store = collect_to_store(
        tiny_model, tiny_dataset.head(3), tmp_path / "s", layers=[3, 1], progress=False
    )
    assert len(seen) >= 2 and set(seen) == {("blocks.1.hook_resid_post", "blocks.3.hook_resid_post")}
    assert store.layers == (1, 3)
    acts = store.load()
    assert acts.shape == (3 * 3, 2, tiny_model.cfg.d_model)


def test_collecting_fewer_layers_gives_the_same_numbers(tiny_model, tiny_dataset):
    """Capturing only some layers (the pass stops after the last one, the shared prefix too)
    gives exactly the numbers of those layers in an all-layer collection, so a run that keeps
    only its layers reports the same figures."""
    ds = tiny_dataset.head(4)
    every = activations.collect_activations(tiny_model, ds, progress=False, batch_size=5)
    for layers in ([1], [0, 2], [3, 1]):
        some = activations.collect_activations(
            tiny_model, ds, layers=layers, progress=False, batch_size=5
        )
        assert torch.equal(some.acts["resid_post"], every.acts["resid_post"][:, sorted(layers)])


class _LazyOnly:
    """A safetensors handle that refuses whole-tensor reads (only lazy slices)."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        self.inner = self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def get_slice(self, key):
        return self.inner.get_slice(key)

    def get_tensor(self, key):
        raise AssertionError(f"whole tensor {key!r} read")


def test_lazy_store_reads_equal_eager_reads(tiny_model, tiny_dataset, tmp_path, monkeypatch):
    """Loading some layers reads only their columns, and equals the same columns of the whole
    shards exactly, in the order asked for (contiguous, gapped, reversed, one, none)."""
    store = collect_to_store(
        tiny_model, tiny_dataset.head(5), tmp_path / "s", shard_rows=4, progress=False
    )
    eager = torch.cat(
        [
            load_file(str(store.path / s["tensors"]["file"]))["resid_post"]
            for s in store.meta["shards"]
        ]
    )
    assert len(store.meta["shards"]) == 4 and eager.shape[1] == 4
    real = activations_store.safe_open
    monkeypatch.setattr(activations_store, "safe_open", lambda *a, **k: _LazyOnly(real(*a, **k)))
    for layers in ([0, 1, 2, 3], [1, 2], [0, 3], [3, 0, 2], [2], []):
        got = ActivationStore(store.path).load(layers=layers)
        assert got.layers == tuple(layers)
        assert torch.equal(got.acts["resid_post"], eager[:, layers])


def test_answers_are_scored_right_after_their_batch(tiny_model, tiny_probe, monkeypatch):
    """generate_and_score_rows scores each generation batch's answers right after it and drops
    their steered logits then (nothing waits for later batches); each question's cached pass
    runs once even when its answers span batches; the numbers equal scoring every answer at the
    end."""
    import numpy as np

    import ks_lens.activations as prefix

    events: list[str] = []
    held: list[int] = []
    passes: list[int] = []
    real_gen = scoring.generate_from_batch
    real_batch = scoring._AnswerScorer.batch
    real_pass = prefix.prefix_pass

    def gen(*a, **k):
        events.append("generate")
        return real_gen(*a, **k)

    def batch(self, rows):
        events.append(f"score {sorted({self.question_of[r] for r in rows})}")
        real_batch(self, rows)
        held.append(sum(x is not None for x in self.step_logits))

    def counted(model, ids, names=()):
        passes.append(len(ids))
        return real_pass(model, ids, names)

    monkeypatch.setattr(scoring, "generate_from_batch", gen)
    monkeypatch.setattr(scoring._AnswerScorer, "batch", batch)
    monkeypatch.setattr(prefix, "prefix_pass", counted)
    questions = ["Hi?", "Why is the sky blue today?", "How do I boil an egg, please?"]
    rows = [(0, i) for i in range(3)] + [(0, 2), (0, 1), (0, 0)] + [(0, 1)]
    kw = dict(response_probe=tiny_probe, max_new_tokens=4, batch_size=2)
    inc = scoring.generate_and_score_rows(tiny_model, questions, [None], rows, **kw)
    # the shortest question's two answers fill the first batch; they are scored before the next
    assert events[:2] == ["generate", "score [0]"] and events.count("generate") == 4
    # at most the rest of the current batch waits (batches of 2), nothing at the end
    assert held and max(held) <= 1 and held[-1] == 0
    assert len(passes) == 3  # question 1's three answers span two batches: one pass
    monkeypatch.setattr(scoring._AnswerScorer, "batch", real_batch)
    whole = answers._score_answers(
        tiny_model,
        [scoring.encode_chat(tiny_model.tokenizer, scoring.ChatPrompt(q)) for q in questions],
        inc.answer_ids,
        [i for _, i in rows],
        _steered(tiny_model, questions, rows),
        tiny_probe,
        batch_size=2,
    )
    torch.testing.assert_close(inc.probs, whole[0], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(inc.nll, whole[1], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(inc.kl, whole[2], atol=1e-6, rtol=1e-6)
    assert inc.kl_steps == whole[3]


def _steered(model, questions, rows):
    """The per-row step log-probs of the same generation (rerun, no scoring)."""
    out = []
    batches = scoring.sorted_batches(
        [scoring.encode_chat(model.tokenizer, scoring.ChatPrompt(questions[i])) for _, i in rows],
        2,
        pad_id=scoring.pad_token_id(model.tokenizer),
        tiebreak=lambda r: (rows[r][1], rows[r][0]),
    )
    logps: dict[int, torch.Tensor] = {}
    for b, (idx, batch) in enumerate(batches):
        res = scoring.generate_from_batch(
            model, batch, max_new_tokens=4, seed=b, return_logits=True
        )
        for j, r in enumerate(idx):
            steps = len(res.ids[j]) + (1 if res.finished[j] else 0)
            logps[r] = torch.log_softmax(res.logits[j, :steps].float(), -1)
    out = [logps[r] for r in range(len(rows))]
    return out


def test_memory_is_recorded_per_stage():
    t: dict[str, float] = {}
    before = peak_rss_mb()
    record_memory(t, "stage")
    assert t["stage_peak_rss_mb"] >= before > 0
    now = rss_mb()
    assert now is not None and 0 < t["stage_rss_mb"] <= t["stage_peak_rss_mb"] + 1
    # timed_stage: the block's seconds and its memory, recorded only when the block completes
    with timed_stage(t, "block"):
        time.sleep(0.01)
    assert t["block_s"] >= 0.01 and t["block_peak_rss_mb"] >= before
    with pytest.raises(ValueError), timed_stage(t, "failed"):
        raise ValueError
    assert "failed_s" not in t and "failed_peak_rss_mb" not in t


def test_memory_estimate_matches_a_hand_computed_case():
    """The default demo's shape: SmolLM2-135M (576 wide, vocab 49,152, 134,515,008 parameters,
    fp32); 1,776 collected rows in stores of up to 14 layers; 5,248 steered readouts; 784
    answers of 32 tokens; batches of 48 answers (the answers waiting to be scored are on disk)."""
    shape = RunShape(
        d_model=576,
        d_vocab=49152,
        n_params=134_515_008,
        collect_rows=1776,
        store_layers=14,
        collect_batch=16,
        shard_rows=256,
        readout_rows=5248,
        gen_tokens=784 * 32,
        gen_batch=48,
        new_tokens=32,
    )
    est = estimate_run(shape)
    # by hand, in MiB: weights 134,515,008 x 4 B = 513.13; one shard 2 x 256 x 14 x 576 x 4 B =
    # 15.75 and the forward buffers 16 x 96 x 4 x 576 x 4 B = 13.5; the text level's batch of
    # logits and the scoring pass's, 2 x 48 x 33 x 49,152 x 4 B = 594.0, and one answer's
    # log-probs 33 x 49,152 x 4 B = 6.19
    assert est.parts_mb["weights"] == pytest.approx(513.13, abs=0.01)
    assert est.parts_mb["collection"] == pytest.approx(15.75 + 13.5)
    assert est.parts_mb["text level"] == pytest.approx(594.0 + 6.19, abs=0.01)
    assert est.peak_mb == pytest.approx(850 + 513.13 + 600.19, abs=0.02)
    # time: 134.515 M parameters x (7.7e-4 x 1,776 + 1.18e-4 x 5,248 + 7.6e-5 x 25,088) s
    assert est.seconds == pytest.approx(134.515008 * (1.36752 + 0.619264 + 1.906688))


def test_a_run_that_does_not_fit_is_refused_with_the_option_that_lowers_it():
    est = estimate_run(
        RunShape(d_model=576, d_vocab=49152, n_params=134_515_008, gen_tokens=1, gen_batch=400)
    )
    check_memory(est, available_mb=est.peak_mb - 100, held_mb=100)  # fits exactly
    check_memory(est, available_mb=None, held_mb=None)  # unknown: not refused
    with pytest.raises(ConfigError, match="The text level is the largest part: lower --gen-b"):
        check_memory(est, available_mb=1000, held_mb=500)


def test_the_memory_check_can_be_turned_off_on_the_command_line():
    from ks_lens.cli.demo import parse_demo_options

    assert parse_demo_options([]).memory_check is True
    assert parse_demo_options(["--no-memory-check"]).memory_check is False


def test_a_subprocess_peak_is_its_own_not_its_parents():
    """``getrusage`` hands a child the RSS high-water mark of its parent at fork; the peak that
    ks-lens records (and the scaling benchmark compares) is the child's own."""
    import subprocess
    import sys

    import torch

    from ks_lens.memory import peak_rss_mb, rss_mb

    held = torch.ones(100_000_000)  # 400 MB more in this process before the fork
    parent = rss_mb()
    assert parent is not None and parent > 400
    code = "from ks_lens.memory import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child_peak = float(out.stdout.strip())
    assert 0 < child_peak < parent - 300, (child_peak, parent)
    assert peak_rss_mb() >= parent - 1
    del held
