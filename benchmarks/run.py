"""ks-lens benchmarks: speed and memory as ratios taken side by side in one run.

    .venv/bin/python benchmarks/run.py [--out benchmarks/results.json] [--quick] [--device cuda]

1. activation collection (all layers, last token) vs a plain Hugging Face forward over the same
   batches (target <= 1.10x);
2. prompt-mode collection with the system prompt's KV cache shared vs every row run whole
   (rows/s of each; target >= 1.5x faster, max difference <= 1e-5 of the layer's largest value);
3. steered greedy generation vs unsteered (batch 8, 64 new tokens, KV cache): CAA <= 1.05x,
   K-Steering 1 step <= 1.15x, 3 steps <= 1.40x; ks-lens's unsteered generation vs HF `generate`
   on a plain HF copy of the same weights (<= 1.10x), and the same through every bridge component;
4. per-example K-Steering gradients for 32 sequences in one backward pass vs 32 separate passes
   (>= 10x faster at the last token, identical results);
5. default model load: cached vs first conversion;
6. RSS growth per 1,000 prompts collected at 30 layers (slope over 250, 1,000 and 2,000 prompts)
   as a fraction of the activation bytes (reported, not guarded: see checks());
7. probe training for all layers at once vs one layer at a time;
8. scaling: peak RSS of collection (only the run's layers) + probe training + a steered readout
   on random-weight models of growing depth and width (one subprocess each), as a ratio to the
   weights' size (target <= 3x at the largest size, and not rising with the model).

Timings are medians of repeated runs, interleaved so that drifts in machine speed hit every
variant alike. Writes JSON (with the machine, torch version and threads, and every guarded figure
beside its target under ``checks``) and prints a table. Exits 1 when a figure misses its target
by more than the noise margin (``--margin``; 10 % of the target with ``--quick``, 5 % otherwise).
``--quick`` (a regression guard, about 3 minutes on 2 idle cores) uses fewer prompts, 32 new
tokens and 2 repeats, and skips the subprocess load and memory tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from scipy.stats import linregress

import ks_lens as ks
from ks_lens._runtime.batching import record_activations
from ks_lens._runtime.hf_path import hf_modules
from ks_lens.activations import capture_batch, collect_activations
from ks_lens.compat import bridge_cache_diverges, bridge_cache_message, versions
from ks_lens.datasets import load_dataset, make_splits
from ks_lens.hooks import resid_hook
from ks_lens.logs import add_logging_arguments, configure_logging
from ks_lens.models import model_device, pad_token_id
from ks_lens.probes import ProbeConfig, train_probe, train_probes
from ks_lens.steering import (
    CAA,
    DynamicComposition,
    KSteering,
    SteeringSpec,
    SteeringVectors,
    generate_composed,
)
from ks_lens.utils import machine_info

HERE = Path(__file__).resolve().parent


# what the streaming store's growth per 1,000 prompts should stay below, as a fraction of the
# activation bytes it writes (reported beside the figure; not guarded, see checks())
MEMORY_GROWTH_TARGET = 0.5

def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, running them round-robin ``repeats`` times."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def plain_hf(device: torch.device) -> Any:
    """A second copy of the default model's weights as a plain HF model (no bridge, no hooks)."""
    from transformers import AutoModelForCausalLM

    from ks_lens.models.packaged import ensure_model

    return (
        AutoModelForCausalLM.from_pretrained(str(ensure_model("default")), dtype=torch.float32)
        .to(device)
        .eval()
    )


def bench_collection(model: Any, hf: Any, prompts: list[str], repeats: int) -> dict[str, Any]:
    tok = model.tokenizer
    batches = [ks.tokenize_chat(model, prompts[i : i + 16]) for i in range(0, len(prompts), 16)]
    names = [resid_hook(layer) for layer in range(model.cfg.n_layers)]

    def ks_collect() -> None:
        for b in batches:
            capture_batch(model, b, names)

    def hf_forward() -> None:
        with torch.no_grad():
            for b in batches:
                hf(input_ids=b.input_ids, attention_mask=b.attention_mask)

    t = interleaved({"ks_lens_all_layers": ks_collect, "hf_forward": hf_forward}, repeats)
    del tok
    return {
        "seconds": t,
        "ratio": t["ks_lens_all_layers"] / t["hf_forward"],
        "target": 1.10,
        "n_prompts": len(prompts),
        "batch_size": 16,
        "layers": len(names),
    }


def bench_prefix_sharing(model: Any, dataset: Any, repeats: int) -> dict[str, Any]:
    """Prompt-mode collection (all layers, last token) with the instruction's KV cache shared
    within each behaviour vs every row run whole; same rows, same batch size, one run."""
    kw = dict(mode="prompt", batch_size=16, progress=False)

    def shared() -> Any:
        return collect_activations(model, dataset, share_prefix=True, **kw)

    def whole() -> Any:
        return collect_activations(model, dataset, share_prefix=False, **kw)

    t = interleaved({"shared_prefix": shared, "whole_rows": whole}, repeats)
    a, b = shared().tensor(), whole().tensor()
    rel = float(((a - b).abs() / b.abs().amax(dim=(0, 2), keepdim=True)).max())
    n = len(b)
    return {
        "seconds": t,
        "rows": n,
        "rows_per_s": {k: n / v for k, v in t.items()},
        "speedup": t["whole_rows"] / t["shared_prefix"],
        "target": 1.5,
        "max_diff_relative_to_layer_max": rel,
        "tolerance": 1e-5,
    }


def bench_readout_sharing(
    model: Any, probe: Any, evaluator: Any, vectors: Any, prompts: list[str], repeats: int
) -> dict[str, Any]:
    """The activation-level readout of the comparison: 8 steerings (CAA and K-Steering at layer
    18, four combinations) x the prompts, evaluator at layer 21; the unsteered layers below the
    steering run once per prompt batch (``share_lower_layers``) vs every row run whole."""
    from ks_lens.evaluation import readout_groups

    combos = [("helpful",), ("casual", "concise"), ("expert", "cautious"), ("empathetic",)]
    steerings = [
        (m, SteeringSpec(c, (), a))
        for c in combos
        for m, a in ((CAA(vectors), 2.0), (KSteering(probe), 30.0))
    ]

    def run(share: bool) -> Any:
        return readout_groups(
            model, prompts, steerings, probe=evaluator, batch_size=16, share_lower_layers=share
        )

    t = interleaved({"shared": lambda: run(True), "whole": lambda: run(False)}, repeats)
    diff = max(
        float((a.probs - b.probs).abs().max()) for a, b in zip(run(True), run(False), strict=True)
    )
    return {
        "seconds": t,
        "rows": len(prompts) * len(steerings),
        "ratio": t["shared"] / t["whole"],
        "target": 0.5,
        "max_prob_diff": diff,
        "tolerance": 1e-4,
    }


def bench_answer_scoring(
    model: Any, probe: Any, prompts: list[str], repeats: int
) -> dict[str, Any]:
    """Re-encoding generated answers for KL/NLL/response probe: each question's tokens run once
    and its answers after the cached question (``share_prefix``) vs whole rows; 12 answers of
    32 tokens per question, as in the comparison's text level."""
    from ks_lens.evaluation.answers import _score_answers
    from ks_lens.models.chat import ChatPrompt, encode_chat

    tok = model.tokenizer
    heads = [encode_chat(tok, ChatPrompt(q)) for q in prompts]
    g = torch.Generator().manual_seed(0)
    question_of = [q for q in range(len(prompts)) for _ in range(12)]
    answers = [torch.randint(100, 20000, (32,), generator=g).tolist() for _ in question_of]
    vocab = int(model.cfg.d_vocab)
    steps = [torch.log_softmax(torch.zeros(33, vocab), -1) for _ in question_of]

    def run(share: bool) -> Any:
        return _score_answers(
            model, heads, answers, question_of, steps, probe, batch_size=48, share_prefix=share
        )

    t = interleaved({"shared": lambda: run(True), "whole": lambda: run(False)}, repeats)
    a, b = run(True), run(False)
    diff = max(
        float((a[0] - b[0]).abs().max()),
        max(abs(x - y) for x, y in zip(a[1], b[1], strict=True)),
        max(abs(x - y) for x, y in zip(a[2], b[2], strict=True)),
    )
    return {
        "seconds": t,
        "answers": len(answers),
        "ratio": t["shared"] / t["whole"],
        "target": 0.8,
        "max_diff": diff,
        "tolerance": 1e-4,
    }


def bench_generation(
    model: Any, hf: Any, probe: Any, vectors: Any, prompts: list[str], repeats: int, new_tokens: int
) -> dict[str, Any]:
    k1 = KSteering(probe)
    k3 = KSteering(probe, steps=3)
    caa = CAA(vectors)
    batch = ks.tokenize_chat(model, prompts)
    from transformers import GenerationConfig

    gcfg = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id(model.tokenizer),
        eos_token_id=None,
    )

    def hf_generate() -> None:
        with torch.no_grad():
            hf.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                generation_config=gcfg,
            )

    # fixed-length generation for every variant: no early stop, so all decode the same tokens;
    # as ks_lens.generation does: the plain HF modules with only the hooked points routed, or
    # (full_bridge) every TransformerLens bridge component
    def fixed(fn_method: Any = None, full_bridge: bool = False) -> Callable[[], Any]:
        def f() -> Any:
            ctx = (
                fn_method.steer(model, target=["casual", "concise"], alpha=1e-3)
                if fn_method is not None
                else contextlib.nullcontext()
            )
            with ctx, torch.no_grad(), hf_modules(model, enabled=not full_bridge):
                return model.original_model.generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    generation_config=gcfg,
                )

        return f

    # under versions whose bridge ignores the KV cache (ks_lens.compat) the full-bridge variant
    # computes wrong tokens: it is neither timed nor compared there, and the record says why
    bridge_ok = not bridge_cache_diverges()
    same = torch.equal(fixed()(), fixed(full_bridge=True)()) if bridge_ok else None
    variants = {
        "unsteered": fixed(),
        **({"unsteered_full_bridge": fixed(full_bridge=True)} if bridge_ok else {}),
        "caa": fixed(caa),
            "ksteer_1": fixed(k1),
            "ksteer_3": fixed(k3),
        "hf_generate_plain": hf_generate,
    }
    dac = DynamicComposition(vectors)
    dac_steps: list[int] = []

    def dac_generate() -> None:  # its own loop; it may stop early, so it is timed per step
        st = [(dac, dac.spec(target=["casual", "concise"], alpha=1e-3))] * len(prompts)
        out = generate_composed(model, batch, st, max_new_tokens=new_tokens)
        assert out.generation.logits is not None
        dac_steps.append(int(out.generation.logits.shape[1]))

    variants["dac"] = dac_generate
    t = interleaved(variants, repeats)
    ratios = {
        "dac_per_step": (t["dac"] / (sum(dac_steps) / len(dac_steps)))
        / (t["unsteered"] / new_tokens),
        "caa": t["caa"] / t["unsteered"],
        "ksteer_1": t["ksteer_1"] / t["unsteered"],
        "ksteer_3": t["ksteer_3"] / t["unsteered"],
        "ks_lens_unsteered_vs_hf_plain": t["unsteered"] / t["hf_generate_plain"],
    }
    if bridge_ok:
        ratios["full_bridge_unsteered_vs_hf_plain"] = (
            t["unsteered_full_bridge"] / t["hf_generate_plain"]
        )
    return {
        "seconds": t,
        "batch": len(prompts),
        "new_tokens": new_tokens,
        "ratios": ratios,
        "targets": {
            "caa": 1.05,
            "ksteer_1": 1.15,
            "ksteer_3": 1.40,
            "ks_lens_unsteered_vs_hf_plain": 1.10,
        },
        "identical_tokens_plain_modules_vs_full_bridge": same,
        "full_bridge_refused": None if bridge_ok else bridge_cache_message(),
    }


def bench_gradients(model: Any, probe: Any, prompts: list[str], repeats: int) -> dict[str, Any]:
    """K-Steering gradients for 32 sequences: one batched backward vs one backward per sequence.

    Measured twice: at every real token (the work itself dominates: the probe is small, so the
    batched pass is compute-bound) and at each sequence's last token only (per-call overhead
    dominates)."""
    batch = ks.tokenize_chat(model, prompts)
    with torch.no_grad(), record_activations(model, probe.hook_name, stop=True) as rec:
        model(batch.input_ids, attention_mask=batch.attention_mask)
    acts = rec[probe.hook_name]
    mask = batch.attention_mask.bool()
    ks_ = KSteering(probe)
    spec = ks_.spec(["casual", "concise"], ["expert"], 1.0)
    out: dict[str, Any] = {"n_sequences": len(prompts), "target_speedup": 10.0}
    for name, rows in (
        ("all_tokens", [acts[i][mask[i]] for i in range(len(prompts))]),
        ("last_token", [acts[i, -1:] for i in range(len(prompts))]),
    ):
        x = torch.cat(rows)

        def batched(x: torch.Tensor = x) -> torch.Tensor:
            return ks_.direction(x, spec)

        def separate(rows: list[torch.Tensor] = rows) -> torch.Tensor:
            return torch.cat([ks_.direction(r, spec) for r in rows])

        t = interleaved({"one_backward": batched, "per_sequence": separate}, repeats)
        out[name] = {
            "seconds": t,
            "speedup": t["per_sequence"] / t["one_backward"],
            "n_tokens": int(x.shape[0]),
            "max_abs_diff": float((batched() - separate()).abs().max()),
        }
    return out


def bench_load(cache_root: Path) -> dict[str, Any]:
    """Cached load vs first conversion, each in a fresh subprocess (imports included)."""
    from ks_lens.models.packaged import DEFAULT_MODEL

    wheel = cache_root / "wheels" / DEFAULT_MODEL.parts[0].filename
    code = "import time,ks_lens;t=time.perf_counter();ks_lens.load_model();print(time.perf_counter()-t)"
    env = dict(os.environ)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if wheel.is_file():
            (Path(tmp) / "wheels").mkdir()
            shutil.copy(wheel, Path(tmp) / "wheels" / wheel.name)
        env["KS_LENS_CACHE"] = tmp
        out["first_conversion_s"] = _time_subprocess(code, env)
        out["cached_load_s"] = _time_subprocess(code, env)
    out["ratio"] = out["cached_load_s"] / out["first_conversion_s"]
    out["note"] = (
        "times inside the process (after imports); the first conversion includes extracting the GGUF"
    )
    return out


def _time_subprocess(code: str, env: dict[str, str]) -> float:
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return float(res.stdout.strip().splitlines()[-1])


def bench_memory(sizes: tuple[int, ...]) -> dict[str, Any]:
    """Resident memory while collecting each of ``sizes`` prompts (neutral mode, all 30 layers).

    Each run is a fresh subprocess; a thread samples the process's current RSS (Linux
    ``/proc/self/statm``) every 50 ms, and the figure is the peak during collection minus the
    RSS just before it (after a warm-up batch has paged in the memory-mapped weights). The
    streaming store (``collect_to_store``) is compared with the in-memory
    ``collect_activations``, which must hold every activation.

    The guarded figure is the growth per 1,000 prompts: the least-squares slope of the peak
    growth over the sizes, as a fraction of the activation bytes 1,000 prompts add in memory
    (30 x 576 float32 per prompt, 66 MiB). One run's peak carries allocator noise of tens of MB
    (a ratio of two runs' peaks once read 1.65 for a bounded store), which a slope over 250 to
    2,000 prompts divides by the 1,750-prompt span.
    """
    code = """
import os, sys, tempfile, threading, time, ks_lens
from ks_lens.activations import collect_activations, collect_to_store
from ks_lens.datasets import load_dataset, Question
n, how = int(sys.argv[1]), sys.argv[2]
ds = load_dataset("tones")
qs = list(ds.questions)
rows = [Question(f"{q.id}-{i}", q.text + (" " + str(i) if i else ""), q.category)
        for i in range((n + len(qs) - 1) // len(qs)) for q in qs][:n]
ds = ds.with_questions(rows)
m = ks_lens.load_model()
collect_activations(m, ds.head(32), mode="neutral", batch_size=32, progress=False)  # warm-up: page in weights
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
peak = [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.05)
base = rss()
t = threading.Thread(target=sample, daemon=True)
t.start()
with tempfile.TemporaryDirectory() as d:
    if how == "store":
        collect_to_store(m, ds, d + "/s", mode="neutral", batch_size=32, shard_rows=256, progress=False)
    else:
        acts = collect_activations(m, ds, mode="neutral", batch_size=32, progress=False)
    end = rss()
stop.set()
t.join()
print(base, max(peak[0], end), end)
"""
    out: dict[str, Any] = {}
    if not Path("/proc/self/statm").exists():
        return {"skipped": "needs Linux /proc to sample RSS"}
    per_1000_mb = 1000 * 30 * 576 * 4 / 2**20
    for how in ("store", "in_memory"):
        growth = []
        for n in sizes:
            t0 = time.perf_counter()
            res = subprocess.run(
                [sys.executable, "-c", code, str(n), how],
                capture_output=True,
                text=True,
                check=True,
            )
            base, peak, end = (int(v) for v in res.stdout.strip().splitlines()[-1].split())
            out[f"{how}_{n}"] = {
                "rss_before_mb": base / 2**20,
                "peak_rss_mb": peak / 2**20,
                "growth_mb": (peak - base) / 2**20,
                "held_at_end_mb": (end - base) / 2**20,
                "seconds": time.perf_counter() - t0,
            }
            growth.append((peak - base) / 2**20)
        slope = float(linregress(sizes, growth).slope) * 1000
        out[f"{how}_growth_mb_per_1000_prompts"] = slope
        out[f"{how}_growth_fraction_of_activations"] = slope / per_1000_mb
    out["sizes"] = list(sizes)
    out["activations_mb_per_1000_prompts"] = per_1000_mb
    out["one_shard_mb"] = 256 * 30 * 576 * 4 / 2**20
    return out


SCALING_CODE = """
import json, sys, tempfile, threading, time
import torch
from ks_lens.activations import collect_to_store
from ks_lens.datasets import Behaviour, BehaviourDataset, Question
from ks_lens.evaluation import readout_groups
from ks_lens.memory import peak_rss_mb, rss_mb
from ks_lens.models import boot_bridge
from ks_lens.pipeline import PipelineConfig, RunLayers
from ks_lens.probes import ProbeConfig, train_probe, train_probes
from ks_lens.steering import CAA, SteeringSpec, SteeringVectors
from ks_lens.models.tiny import build_tiny_llama
n_layers, d_model, n_questions, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
warm = boot_bridge(*build_tiny_llama(), "warm-up", device=torch.device("cpu"), dtype=torch.float32)
del warm  # every lazy import (transformers' Llama, TransformerLens' bridge) is done by now
base = rss_mb()
heads = max(1, d_model // 128)
hf, tok = build_tiny_llama(n_layers=n_layers, d_model=d_model, n_heads=heads,
                           n_kv_heads=max(1, heads // 4), d_mlp=2 * d_model, dtype=getattr(torch, dtype))
model = boot_bridge(hf, tok, "scaling", device=torch.device("cpu"), dtype=getattr(torch, dtype))
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
behaviours = (Behaviour("a", "Be brief."), Behaviour("b", "Be kind."), Behaviour("c", "Be odd."))
ds = BehaviourDataset("scaling", behaviours, tuple(
    Question(f"q{i}", f"Why is {i} so?", "x") for i in range(n_questions)))
run = RunLayers.of(PipelineConfig(), n_layers)
gold_layers = sorted({*run.train_store, *run.judge_store})  # both halves of the gold texts
peak = [0.0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_mb() or 0.0)
        time.sleep(0.02)
with_model = rss_mb()
t = threading.Thread(target=sample, daemon=True)
t.start()
t0 = time.perf_counter()
with tempfile.TemporaryDirectory() as d:
    store = collect_to_store(model, ds, d + "/s", layers=gold_layers, batch_size=16, progress=False)
    collected = peak_rss_mb()
    acts = store.load(layers=run.steering_probes)
    probes = train_probes(acts, layers=run.steering_probes, config=ProbeConfig(epochs=5), progress=False)
    evaluator = train_probe(store.load(layers=[run.evaluator]), run.evaluator, config=ProbeConfig(epochs=5))
    vectors = SteeringVectors.fit(acts, run.steering)
    readout_groups(model, [q.text for q in ds.questions], [(CAA(vectors), SteeringSpec(("a",), (), 2.0))],
                   probe=evaluator, batch_size=16)
stop.set()
t.join()
print(json.dumps({"n_layers": n_layers, "d_model": d_model, "dtype": dtype, "rows": len(acts),
    "kept_layers": len(gold_layers), "weights_mb": weights, "rss_before_model_mb": base,
    "rss_with_model_mb": with_model, "peak_rss_mb": max(peak[0], peak_rss_mb()),
    "peak_after_collection_mb": collected, "seconds": time.perf_counter() - t0}))
"""


def bench_scaling(sizes: list[tuple[int, int]], n_questions: int, dtype: str) -> dict[str, Any]:
    """Peak resident memory of collection (the run's layers, :class:`ks_lens.pipeline.RunLayers`)
    + probe training + a steered readout on random-weight models of growing depth and width,
    each in a fresh subprocess (so every size has its own peak), as a ratio to the weights:
    ``(peak - RSS before the model) / weights``. The rows are the same at every size, so memory
    that grew with rows x layers x width would show as a ratio that rises with the model."""
    out: dict[str, Any] = {"sizes": [], "n_questions": n_questions, "dtype": dtype}
    for n_layers, d_model in sizes:
        res = subprocess.run(
            [sys.executable, "-c", SCALING_CODE, str(n_layers), str(d_model), str(n_questions), dtype],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(res.stdout.strip().splitlines()[-1])
        r["ratio_to_weights"] = (r["peak_rss_mb"] - r["rss_before_model_mb"]) / r["weights_mb"]
        # what holding every layer of every row would take, for contrast
        r["all_layers_mb"] = r["rows"] * n_layers * d_model * 4 / 2**20
        out["sizes"].append(r)
    return out


def bench_probe_training(acts: Any, repeats: int) -> dict[str, Any]:
    cfg = ProbeConfig(epochs=10, patience=0)

    def all_at_once() -> dict[int, Any]:
        return train_probes(acts, config=cfg, progress=False)

    def one_by_one() -> dict[int, Any]:
        return {layer: train_probe(acts, layer, config=cfg) for layer in acts.layers}

    t = interleaved({"all_layers_batched": all_at_once, "one_layer_at_a_time": one_by_one}, repeats)
    a, b = all_at_once(), one_by_one()
    diff = max(
        float((a[layer].linears[0].weight - b[layer].linears[0].weight).abs().max())
        for layer in acts.layers
    )
    return {
        "seconds": t,
        "speedup": t["one_layer_at_a_time"] / t["all_layers_batched"],
        "layers": len(acts.layers),
        "rows": len(acts),
        "epochs": cfg.epochs,
        "max_abs_weight_diff": diff,
    }


def checks(r: dict[str, Any], margin: float) -> list[dict[str, Any]]:
    """Each guarded figure with its target; a check fails when the figure misses the target by
    more than ``margin`` (a fraction of the target: timing noise of side-by-side medians)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, target: float, op: str) -> None:
        if op == "<=":
            ok = value <= target * (1 + margin)
        else:
            ok = value >= target * (1 - margin)
        out.append({"name": name, "value": value, "target": f"{op} {target}", "passed": bool(ok)})

    if "collection" in r:
        add("collection all layers / HF forward", r["collection"]["ratio"], 1.10, "<=")
    if "prefix_sharing" in r:
        ps = r["prefix_sharing"]
        add("prompt-mode collection speedup from prefix sharing", ps["speedup"], 1.5, ">=")
        add("prefix sharing max diff / layer max", ps["max_diff_relative_to_layer_max"], 1e-5, "<=")
    if "readout_sharing" in r:
        rs = r["readout_sharing"]
        add("steered readout, shared lower layers / whole rows", rs["ratio"], 0.5, "<=")
        add("steered readout max probability diff", rs["max_prob_diff"], 1e-4, "<=")
    if "answer_scoring" in r:
        sc = r["answer_scoring"]
        add("answer re-encoding, shared question / whole rows", sc["ratio"], 0.8, "<=")
        add("answer re-encoding max diff (probs, NLL, KL)", sc["max_diff"], 1e-4, "<=")
    if "generation" in r:
        g = r["generation"]
        for k, target in g["targets"].items():
            add(f"generation {k}", g["ratios"][k], target, "<=")
        if g["identical_tokens_plain_modules_vs_full_bridge"] is not None:
            add(
                "generation tokens identical (plain modules vs full bridge)",
                float(g["identical_tokens_plain_modules_vs_full_bridge"]),
                1.0,
                ">=",
            )
    if "gradients" in r:
        add(
            "per-example gradients at the last token: speedup",
            r["gradients"]["last_token"]["speedup"],
            10.0,
            ">=",
        )
    if "scaling" in r:
        sz = r["scaling"]["sizes"]
        add(
            f"collection + training + readout, {sz[-1]['n_layers']} x {sz[-1]['d_model']} random "
            "model: peak RSS / weights",
            sz[-1]["ratio_to_weights"],
            3.0,
            "<=",
        )
        if len(sz) > 1:
            add(
                "peak RSS / weights does not rise with the model (largest / smallest size)",
                sz[-1]["ratio_to_weights"] / sz[0]["ratio_to_weights"],
                1.0,
                "<=",
            )
    # The streaming store's memory is reported (print_table), not guarded: its peak-growth slope
    # read 0.14 and 0.68 of the activation bytes in two clean runs at e687148 (the peak follows
    # the longest batch met, which grows with the number of prompts), so no target would fail
    # only for real. docs/performance.md has both runs.
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="a regression guard in about 3 minutes: fewer prompts, tokens and repeats; no "
        "subprocess load or memory tests",
    )
    p.add_argument("--device", default=None)
    p.add_argument(
        "--skip",
        default="",
        help="comma-separated benchmarks to skip "
        "(collection,prefix,readout,generation,gradients,load,memory,probes,scaling)",
    )
    p.add_argument(
        "--scaling-sizes",
        default=None,
        help="layers x width of the random models of the scaling benchmark, e.g. 8x256,28x3072 "
        "(default 8x512 with --quick (about 20 s), else 8x256,16x512,24x1024,32x2048)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=None,
        help="noise margin: a figure fails when it misses its target by more than this "
        "fraction of the target (default 0.10 with --quick, 0.05 otherwise)",
    )
    add_logging_arguments(p)
    args = p.parse_args()
    configure_logging(args.verbosity)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.quick:
        skip |= {"load", "memory"}
    margin = args.margin if args.margin is not None else (0.10 if args.quick else 0.05)
    reps = 2 if args.quick else 3
    t_all = time.perf_counter()
    model = ks.load_model(device=args.device)
    device = model_device(model)
    hf = plain_hf(device)
    ds = load_dataset("tones")
    splits = make_splits(ds)
    train = ds.subset(splits.ids("train")).head(12 if args.quick else 24)
    layers = list(range(0, 30, 3)) if args.quick else None  # includes 18
    acts = collect_activations(model, train, layers=layers, progress=False)
    probe = train_probe(acts, 18, config=ProbeConfig(epochs=10))
    evaluator = train_probe(acts, 21, config=ProbeConfig(epochs=10, seed=1))
    vectors = SteeringVectors.fit(acts, 18)
    test_q = [q.text for q in ds.subset(splits.ids("test")).questions]
    results: dict[str, Any] = {
        "machine": machine_info(),
        "versions": versions(),
        "device": str(device),
        "model": model.cfg.model_name,
        "quick": args.quick,
        "noise_margin": margin,
    }
    if "collection" not in skip:
        results["collection"] = bench_collection(
            model, hf, test_q[: 32 if args.quick else 64], reps
        )
    if "prefix" not in skip:
        results["prefix_sharing"] = bench_prefix_sharing(
            model, ds.subset(splits.ids("test")).head(6 if args.quick else 16), reps
        )
    if "readout" not in skip:
        results["readout_sharing"] = bench_readout_sharing(
            model, probe, evaluator, vectors, test_q[: 8 if args.quick else 32], reps
        )
        results["answer_scoring"] = bench_answer_scoring(
            model, evaluator, test_q[: 2 if args.quick else 4], reps
        )
    if "generation" not in skip:
        results["generation"] = bench_generation(
            model, hf, probe, vectors, test_q[:8], reps, 32 if args.quick else 64
        )
    if "gradients" not in skip:
        results["gradients"] = bench_gradients(model, probe, test_q[:32], reps * 2)
    if "probes" not in skip:
        results["probe_training"] = bench_probe_training(acts, reps)
    if "load" not in skip:
        from ks_lens.models.packaged import cache_root

        results["load"] = bench_load(cache_root())
    if "memory" not in skip:
        results["memory"] = bench_memory((250, 1000, 2000))
    if "scaling" not in skip:
        spec = args.scaling_sizes or (
            "8x512" if args.quick else "8x256,16x512,24x1024,32x2048"
        )
        sizes = [(int(a), int(b)) for a, b in (x.split("x") for x in spec.split(","))]
        results["scaling"] = bench_scaling(sizes, 4 if args.quick else 32, "float32")
    results["checks"] = checks(results, margin)
    results["passed"] = all(c["passed"] for c in results["checks"])
    results["total_s"] = time.perf_counter() - t_all
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwrote {args.out} ({results['total_s']:.0f} s)")
    failed = [c for c in results["checks"] if not c["passed"]]
    for c in failed:
        print(
            f"FAILED: {c['name']} = {c['value']:.4g}, target {c['target']} "
            f"(noise margin {margin:.0%})",
            file=sys.stderr,
        )
    return 1 if failed else 0


def print_table(r: dict[str, Any]) -> None:
    print(
        f"machine: {r['machine']['cpu_count']} CPUs, {r['machine']['torch_threads']} torch threads, "
        f"torch {r['versions']['torch']}, device {r['device']}"
    )
    rows = []
    if "collection" in r:
        c = r["collection"]
        rows.append(("collection all layers / HF forward", f"{c['ratio']:.2f}x", "<= 1.10x"))
    if "prefix_sharing" in r:
        ps = r["prefix_sharing"]
        rps = ps["rows_per_s"]
        rows.append(
            (
                f"prompt-mode collection, {ps['rows']} rows: shared prefix / whole rows",
                f"{rps['shared_prefix']:.1f} / {rps['whole_rows']:.1f} rows/s = "
                f"{ps['speedup']:.2f}x",
                ">= 1.5x",
            )
        )
    if "readout_sharing" in r:
        rs = r["readout_sharing"]
        rows.append(
            (
                f"steered readout, {rs['rows']} rows: shared lower layers / whole rows "
                f"(max prob diff {rs['max_prob_diff']:.1e})",
                f"{rs['ratio']:.2f}x",
                "<= 0.5x",
            )
        )
    if "answer_scoring" in r:
        sc = r["answer_scoring"]
        rows.append(
            (
                f"answer re-encoding, {sc['answers']} answers: shared question / whole rows "
                f"(max diff {sc['max_diff']:.1e})",
                f"{sc['ratio']:.2f}x",
                "<= 0.8x",
            )
        )
    if "generation" in r:
        g = r["generation"]["ratios"]
        rows += [
            ("generation CAA / unsteered", f"{g['caa']:.3f}x", "<= 1.05x"),
            ("generation K-Steering 1 step / unsteered", f"{g['ksteer_1']:.3f}x", "<= 1.15x"),
            ("generation K-Steering 3 steps / unsteered", f"{g['ksteer_3']:.3f}x", "<= 1.40x"),
            (
                "generation DAC (2 labels) / unsteered, per decoding step",
                f"{g['dac_per_step']:.2f}x" if "dac_per_step" in g else "not run",
                "- (1 + 3 probe rows per answer row)",
            ),
            (
                "ks-lens unsteered / plain HF generate",
                f"{g['ks_lens_unsteered_vs_hf_plain']:.3f}x",
                "<= 1.10x",
            ),
            (
                "  the same through every bridge component (full_bridge)",
                f"{g['full_bridge_unsteered_vs_hf_plain']:.3f}x"
                if "full_bridge_unsteered_vs_hf_plain" in g
                else "refused (versions)",
                "-",
            ),
        ]
    if "gradients" in r:
        for pos in ("all_tokens", "last_token"):
            gr = r["gradients"][pos]
            rows.append(
                (
                    f"per-example grads, {pos} ({gr['n_tokens']} rows): 32 passes / one pass",
                    f"{gr['speedup']:.1f}x faster (max diff {gr['max_abs_diff']:.1e})",
                    ">= 10x" if pos == "last_token" else "-",  # guarded at the last token only
                )
            )
    if "probe_training" in r:
        pt = r["probe_training"]
        rows.append(
            (
                f"probe training: {pt['layers']} layers one by one / batched",
                f"{pt['speedup']:.1f}x faster",
                "-",
            )
        )
    if "load" in r:
        lo = r["load"]
        rows.append(
            (
                "default model load: cached / first conversion",
                f"{lo['cached_load_s']:.1f} s / {lo['first_conversion_s']:.1f} s",
                "a few s",
            )
        )
    if "memory" in r and "skipped" not in r["memory"]:
        m = r["memory"]
        for how in ("store", "in_memory"):
            peaks = " / ".join(f"{m[f'{how}_{n}']['growth_mb']:.0f}" for n in m["sizes"])
            rows.append(
                (
                    f"RSS growth per 1,000 prompts ({how}; peaks {peaks} MB at "
                    f"{'/'.join(map(str, m['sizes']))} prompts)",
                    f"{m[f'{how}_growth_mb_per_1000_prompts']:.1f} MB "
                    f"({m[f'{how}_growth_fraction_of_activations']:.2f} of the activations)",
                    f"<= {MEMORY_GROWTH_TARGET}" if how == "store" else "-",
                )
            )
    if "scaling" in r:
        for z in r["scaling"]["sizes"]:
            rows.append(
                (
                    f"random {z['n_layers']} x {z['d_model']} ({z['weights_mb']:.0f} MB weights, "
                    f"{z['rows']} rows, {z['kept_layers']} layers kept): peak RSS / weights",
                    f"{z['ratio_to_weights']:.2f}x",
                    "<= 3x (largest)",
                )
            )
    w = max(len(a) for a, _, _ in rows)
    for a, b, c in rows:
        print(f"{a:<{w}}  {b:>28}  target {c}")


if __name__ == "__main__":
    sys.exit(main())
