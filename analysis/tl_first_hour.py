"""A TransformerLens user's first hour with ks-lens, as a notebook-style script.

Runs the README's notebook flow (collect -> probes -> K-Steering and CAA) and then the TL idioms
a TL user reaches for next, checking each one does what TL documents:

1. plain TL calls on raw text still prepend BOS (``load_model`` changes no TL default);
2. ``run_with_cache`` with an alias ``names_filter`` (and what name a hook function sees);
3. ``run_with_hooks`` with ks-lens steering hooks plus a user hook;
4. TL's ``model.generate`` inside ``steer()`` (positions="generated", with and without KV cache);
5. ``run_with_cache(..., incl_bwd=True)`` through a steered model (gradients);
6. steering at ``hook_mlp_out`` and picking alpha from a KL budget.

Usage::

    python analysis/tl_first_hour.py                         # the default model (SmolLM2-135M)
    python analysis/tl_first_hour.py --model tiny-random-llama --fast

Prints one line per step and exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import ks_lens as ks
from ks_lens.activations import collect_activations
from ks_lens.calibration import calibrate_alpha
from ks_lens.datasets import load_dataset
from ks_lens.evaluation import kl_metric
from ks_lens.hooks import canonical_hook_name, same_hook_point
from ks_lens.logs import add_logging_arguments, configure_logging
from ks_lens.pipeline import STEER_DEPTH
from ks_lens.probes import ProbeConfig, train_probes
from ks_lens.steering import CAA, KSteering, SteeringVectors

QUESTION = "How do I boil an egg?"


def step(title: str) -> None:
    print(f"\n## {title}", flush=True)


def check(cond: bool, what: str) -> None:
    print(f"  [{'ok' if cond else 'FAIL'}] {what}", flush=True)
    if not cond:
        raise SystemExit(f"check failed: {what}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--fast", action="store_true", help="fewer questions and epochs")
    ap.add_argument("--layer", type=int, default=None, help="default: about 60%% of the depth")
    add_logging_arguments(ap)
    args = ap.parse_args(argv)
    configure_logging(args.verbosity)
    t0 = time.perf_counter()
    torch.manual_seed(0)

    # -- the README flow -------------------------------------------------------------------------
    step("load, collect, train (README flow)")
    model = ks.load_model(args.model)
    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    layer = args.layer if args.layer is not None else max(0, round(STEER_DEPTH * n_layers))
    hook = ks.resid_hook(layer)
    print(f"  {model.cfg.model_name}: {n_layers} layers, d_model {d_model}; steering at {hook}")
    tones = load_dataset("tones")
    train = tones.split("train").head(12 if args.fast else 60)
    acts = collect_activations(model, train, layers=[layer, n_layers - 1], progress=False)
    print(f"  {acts!r}")
    check(acts.shape == (len(acts), 2, d_model), f"acts.shape == {acts.shape}")
    probes = train_probes(acts, config=ProbeConfig(epochs=10 if args.fast else 60), progress=False)
    print(f"  {probes!r}")
    check(probes[-1].layer == n_layers - 1, "probes[-1] is the last layer's probe")
    probe = probes[layer]
    ksteer = KSteering(probe, steps=3, decay=0.95)
    caa = CAA(SteeringVectors.fit(acts, layer))
    with ksteer.steer(model, target=["casual", "concise"], avoid=["expert"], alpha=40.0):
        steered = ks.generate(model, QUESTION, max_new_tokens=24).texts[0]
    plain = ks.generate(model, QUESTION, max_new_tokens=24).texts[0]
    print(f"  unsteered: {plain[:100]!r}\n  K-steered: {steered[:100]!r}")

    # -- 1. TL defaults ----------------------------------------------------------------------------
    step("1. plain TL calls on raw text")
    bos = model.tokenizer.bos_token_id
    toks = model.to_tokens("The capital of France is")
    check(toks[0, 0].item() == bos, "model.to_tokens prepends BOS (TL default kept)")
    batch = ks.tokenize_chat(model, QUESTION)
    check(int((batch.input_ids[0, :2] == bos).sum()) <= 1, "chat path: no double BOS")
    logits = model(**batch)
    check(logits.shape[:2] == batch.input_ids.shape, "model(**batch) takes a TokenBatch")

    # -- 2. run_with_cache with an alias -----------------------------------------------------------
    step("2. run_with_cache(names_filter=alias)")
    _, cache = model.run_with_cache(**batch, names_filter=hook)
    canon = canonical_hook_name(hook, model)
    print(f"  cache keys: {sorted(cache.keys())}")
    check(torch.equal(cache[hook], cache[canon]), f"{hook} and {canon} are one tensor")
    seen: list[str] = []

    def spy(act: torch.Tensor, hook: object) -> None:
        seen.append(str(getattr(hook, "name", "")))

    model.run_with_hooks(**batch, fwd_hooks=[(hook, spy)])
    check(seen == [canon], f"a hook added at {hook} sees hook.name == {seen[0]!r}")
    check(same_hook_point(seen[0], probe.hook_name), "same_hook_point(hook.name, probe.hook_name)")

    # -- 3. run_with_hooks with ks-lens hooks + a user hook -------------------------------------
    step("3. run_with_hooks: ks-lens steering hooks + a user hook")
    got: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: object) -> None:
        got["post"] = act.detach().clone()

    fwd = [*ksteer.hooks(model, target=["casual"], alpha=40.0), (hook, grab)]
    steered_logits = model.run_with_hooks(**batch, fwd_hooks=fwd)
    with ksteer.steer(model, target=["casual"], alpha=40.0, hook_names=canon):
        same = model(**batch)
    check(torch.allclose(steered_logits, same, atol=1e-5), "hooks() == steer(hook_names=canonical)")
    p_before = probe.predict_proba(cache[hook][0, -1])[probe.label_indices(["casual"])[0]]
    p_after = probe.predict_proba(got["post"][0, -1])[probe.label_indices(["casual"])[0]]
    print(f"  user hook saw the steered activation: p(casual) {p_before:.3f} -> {p_after:.3f}")
    check(not torch.equal(got["post"], cache[hook]), "the user hook ran after the steering hook")

    # -- 4. TL generate with positions ------------------------------------------------------------
    step("4. model.generate inside steer(positions='generated')")
    outs = []
    for use_cache in (True, False):
        with caa.steer(model, target=["casual"], alpha=4.0, positions="generated"):
            out = model.generate(
                batch.input_ids,
                max_new_tokens=6,
                do_sample=False,
                use_past_kv_cache=use_cache,
                verbose=False,
                stop_at_eos=False,
            )
        outs.append(out[0, batch.input_ids.shape[1] :].tolist())
    print(f"  cache: {outs[0]}\n  no cache: {outs[1]}")
    check(outs[0] == outs[1], "same tokens with and without the KV cache")
    try:
        caa.hooks(model, target=["casual"], positions="generated")
        check(False, "bare hooks refuse positions='generated'")
    except ks.ConfigError as e:
        check("steer(" in str(e), "bare hooks refuse positions='generated' and point to steer()")

    # -- 5. gradients through a steered model ----------------------------------------------------
    step("5. run_with_cache(incl_bwd=True) through a steered model")
    with ksteer.steer(model, target=["casual"], alpha=40.0):
        _, gcache = model.run_with_cache(
            "The capital of France is", return_type="loss", incl_bwd=True, names_filter=hook
        )
    grad = gcache[hook + "_grad"]
    check(bool(grad.abs().sum() > 0), f"gradient at {hook}: shape {tuple(grad.shape)}")

    # -- 6. beyond the residual stream, and alpha from a budget ----------------------------------
    step("6. steering at hook_mlp_out; alpha from a KL budget")
    mlp_acts = collect_activations(
        model, train, layers=[layer], hook_kinds=("mlp_out",), progress=False
    )
    mlp_caa = CAA(SteeringVectors.fit(mlp_acts, layer, kind="mlp_out"), normalize=True)
    with mlp_caa.steer(model, target=["casual"], alpha=1.0):
        mlp_logits = model(**batch)
    check(not torch.allclose(mlp_logits, logits), f"steering at {mlp_caa.hook_name} changes logits")
    prompts = [QUESTION, "Why is the sky blue?"]
    budget = 0.01 if args.fast else 0.5
    metric = kl_metric(model, caa, [caa.spec(target=["casual"])], prompts)
    cal = calibrate_alpha(metric, budget=budget, alpha0=1.0)
    print(f"  CAA alpha={cal.alpha:.3g} gives first-token KL {cal.metric:.4f} <= {budget}")
    check(cal.metric <= budget, "calibrated alpha is within the budget")

    print(f"\nall checks passed in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
