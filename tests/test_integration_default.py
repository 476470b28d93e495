"""Integration tests on the real default model (SmolLM2-135M-Instruct, offline from a PyPI wheel)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ks_lens as ks
from ks_lens.activations import ActivationStore
from ks_lens.cli.demo import run_demo
from ks_lens.pipeline import PipelineConfig

pytestmark = pytest.mark.integration


def test_default_model_loads_offline_with_every_resid_hook(default_model, monkeypatch):
    model = default_model
    assert model.cfg.n_layers == 30 and model.cfg.d_model == 576
    batch = ks.tokenize_chat(model, [ks.ChatPrompt("What is the capital of France?")])
    ids = batch.input_ids[0].tolist()
    assert (
        ids[0] == model.tokenizer.bos_token_id and ids[1] != model.tokenizer.bos_token_id
    )  # no double BOS
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(30)]
    logits, cache = model.run_with_cache(batch.input_ids, names_filter=names)
    assert logits.shape == (1, len(ids), model.cfg.d_vocab)
    for name in names:
        assert cache[name].shape == (1, len(ids), 576)
        assert torch.isfinite(cache[name]).all()
    # resid_post of block L is resid_pre of block L+1
    _, c2 = model.run_with_cache(
        batch.input_ids, names_filter=["blocks.5.hook_resid_post", "blocks.6.hook_resid_pre"]
    )
    assert torch.equal(c2["blocks.5.hook_resid_post"], c2["blocks.6.hook_resid_pre"])


def test_default_model_answers_sensibly(default_model):
    gen = ks.generate(
        default_model, ["What is the capital of France? Answer in one sentence."], max_new_tokens=20
    )
    text = gen.texts[0]
    assert "Paris" in text
    assert text[0].isupper() and len(text.split()) >= 4


def test_second_load_uses_the_cache_and_is_fast(default_model):
    import time

    t0 = time.perf_counter()
    again = ks.load_model("default")
    assert time.perf_counter() - t0 < 30
    p1 = next(default_model.original_model.parameters())
    p2 = next(again.original_model.parameters())
    assert torch.equal(p1, p2)


def test_fast_demo_on_default_model(tmp_path):
    # the default methods and the 3-step variant (the one that moves this small run's evaluator
    # by more than 0.05 at one target)
    fast = PipelineConfig.fast()
    methods = (*fast.comparison.methods, "ksteer_multistep")
    cfg = replace(fast, comparison=replace(fast.comparison, methods=methods))
    (result,) = run_demo(cfg, tmp_path / "demo", progress=False)
    on_disk = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert on_disk["model"] == "SmolLM2-135M-Instruct-Q4_1" and on_disk["layer"] == 18
    assert on_disk["steering_probe_metrics"]["val_accuracy"] >= 0.9
    rows = {(r.method, r.k): r for r in result.summary("activation")}
    base = rows[("unsteered", 1)].target_prob.estimate
    # every method moves the held-out evaluator toward the target (the text-grounded vectors
    # of this small run only a little at the activation level), and at least one clearly
    gains = {
        m: rows[(m, 1)].target_prob.estimate - base
        for m in ("caa_mean", "ksteer", "ksteer_precond", "ksteer_multistep")
    }
    assert all(g > 0 for g in gains.values()) and max(gains.values()) > 0.05, gains
    for m in gains:
        for k in (1, 2, 3):
            cal = on_disk["calibration"][m][str(k)]
            assert (
                0 < cal["alpha"]
                and cal["metric_at_alpha"] <= on_disk["comparison_config"]["kl_budget"]
            )
    # the text level ran at every alpha factor, and the validity of the evaluators is reported;
    # the text evaluator is measured on (and trained from) the judge half of the gold texts only
    validity = on_disk["text_evaluator_validity"]
    assert len(result.curves) > 0 and 400 <= validity["n_texts"] < 1000
    assert validity["question_cv"]["single_accuracy"] >= 0.8


def _wait_for_shards(meta: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if len(json.loads(meta.read_text())["shards"]) >= n:
                return
        except (OSError, ValueError, KeyError):
            pass  # not written yet (every write is atomic, so never half-written)
        if proc.poll() is not None:
            raise AssertionError(f"collect exited early with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError(f"no {n} shards after {timeout} s")


def test_kill_9_during_collect_then_rerun_gives_an_identical_store(default_model, tmp_path):
    """SIGKILL twice in the middle of a several-shard collection; the rerun finishes it and the
    store is bitwise identical to an uninterrupted one (same shard checksums, same tensors)."""
    argv = [
        sys.executable,
        "-m",
        "ks_lens.cli",
        "collect",
        "--model",
        "default",
        "--device",
        "cpu",
        "--split",
        "train",
        "--max-questions",
        "6",
        "--shard-rows",
        "6",
        "--batch-size",
        "4",
    ]  # 36 rows, 6 shards
    env = {**os.environ, "PYTHONPATH": str(Path(ks.__file__).parent.parent)}
    out = tmp_path / "killed"
    for shards_before_kill in (1, 3):
        proc = subprocess.Popen([*argv, "--out", str(out)], env=env, stderr=subprocess.DEVNULL)
        try:
            _wait_for_shards(out / "meta.json", shards_before_kill, proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
    partial = ActivationStore(out)
    assert not partial.complete and 3 <= len(partial.meta["shards"]) < 6
    subprocess.run([*argv, "--out", str(out)], env=env, check=True, capture_output=True)
    subprocess.run(
        [*argv, "--out", str(tmp_path / "ref")], env=env, check=True, capture_output=True
    )
    done, ref = ActivationStore(out), ActivationStore(tmp_path / "ref")
    assert done.complete and done.meta["shards"] == ref.meta["shards"]  # sizes and SHA-256
    a, b = done.load(), ref.load()
    assert a.question_ids == b.question_ids and torch.equal(
        a.acts["resid_post"], b.acts["resid_post"]
    )
    # no temporary files are left behind by the killed runs' atomic writes ... after the rerun
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        p.name for p in (tmp_path / "ref" / "shards").iterdir()
    )


def test_prefix_sharing_matches_whole_rows_on_the_default_model(default_model):
    """Prompt-mode collection with the instruction's KV cache shared gives the activations of the
    whole rows: stated tolerance 1e-5 of the largest activation per layer (measured: bitwise
    equal on CPU, because the suffixes run right padded)."""
    from ks_lens.activations import collect_activations
    from ks_lens.datasets import load_dataset

    ds = load_dataset("tones").head(3)
    kw = dict(layers=[0, 9, 18, 29], batch_size=8, progress=False)
    whole = collect_activations(default_model, ds, share_prefix=False, **kw).tensor()
    shared = collect_activations(default_model, ds, **kw).tensor()
    scale = whole.abs().amax(dim=(0, 2), keepdim=True)  # per layer; up to ~600 at layer 29
    assert float(((shared - whole).abs() / scale).max()) <= 1e-5
