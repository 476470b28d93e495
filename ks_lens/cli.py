"""The ``ks-lens`` command line: ``info``, ``models``, ``collect``, ``train``, ``steer``, ``demo``,
``evaluate-text``, ``train-text-evaluator``, ``report``.

Each subcommand is a thin shell over the library; run ``ks-lens SUBCOMMAND --help``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from ks_lens.errors import ConfigError, KsLensError, LabelError
from ks_lens.hooks import HOOK_KINDS
from ks_lens.logs import add_logging_arguments, configure_logging


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="model name, local path or HF id (default: %(default)s)"
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)"
    )
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")


def _describe_os_error(e: OSError) -> str:
    """``"runs/x: Permission denied"`` for an ``OSError`` (no errno number, no traceback)."""
    what = e.strerror or str(e) or type(e).__name__
    if e.filename is None:
        return what
    name = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    return f"{name}: {what}"


def _labels(s: str | None) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


def _layer_list(value: str) -> list[int] | None:
    """argparse type for ``--layer(s)``: ``all`` (None) or comma-separated layer indices."""
    if value.strip().lower() == "all":
        return None
    try:
        layers = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise argparse.ArgumentTypeError(
            f"expected 'all' or comma-separated layer indices such as 3 or 2,5,9; got {value!r}"
        )
    return layers


_ARTEFACT_NAMES = {
    "ks_lens.probe": "a probe",
    "ks_lens.probe_set": "a probe set",
    "ks_lens.steering_vectors": "steering vectors",
    "ks_lens.activation_store": "an activation store",
}


def _check_out(
    path: str, *, holds: tuple[str, ...] = (), what: str = "", overwrite: bool = False
) -> Path:
    """Check ``--out`` before any work: not a file, writable, and (for artefacts) either new,
    or holding one of the artefact formats ``holds`` and ``overwrite`` given."""
    from ks_lens.io import artifact_format

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file; give a directory path")
    if holds:
        found = artifact_format(out)
        if found is None:
            raise ConfigError(
                f"--out {out} is a non-empty directory that does not hold {what}; "
                "choose a new or empty directory"
            )
        name = _ARTEFACT_NAMES.get(found, found)
        if found and found not in holds:
            raise ConfigError(f"--out {out} holds {name}, not {what}; choose another directory")
        if found and not overwrite:
            raise ConfigError(
                f"--out {out} already holds {name}; pass --overwrite to replace it, or choose "
                "another directory"
            )
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ConfigError(
            f"--out {out}: cannot write in {parent} ({e.strerror or e}); choose a writable directory"
        ) from None
    return out


# ----------------------------------------------------------------------------- info / models


def cmd_info(args: argparse.Namespace) -> int:
    import ks_lens
    from ks_lens.packaged_models import cache_root
    from ks_lens.utils import machine_info, versions

    print(f"ks-lens {ks_lens.__version__}")
    for k, v in versions().items():
        print(f"  {k:17s} {v}")
    for k, v in machine_info().items():
        print(f"  {k:17s} {v}")
    print(f"  {'cache':17s} {cache_root()}")
    if not args.model:
        return 0
    from ks_lens.chat import ChatPrompt, tokenize_chat
    from ks_lens.generation import generate
    from ks_lens.models import load_model, model_signature

    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    print(
        f"\nloaded {model.cfg.model_name} in {time.perf_counter() - t0:.1f} s: {model_signature(model)}"
    )
    resid = [n for n in model.hook_dict if n.startswith("blocks.0.")]
    print(
        f"hook points: {len(model.hook_dict)} in all; per block e.g. "
        f"blocks.{{L}}.hook_resid_pre / hook_resid_mid / hook_resid_post ({len(resid)} hooks in block 0)"
    )
    prompt = ChatPrompt(args.prompt, system=args.system)
    batch = tokenize_chat(model, [prompt])
    print(
        f"prompt ({batch.input_ids.shape[1]} tokens): {model.tokenizer.decode(batch.input_ids[0])!r}"
    )
    gen = generate(model, [prompt], max_new_tokens=args.max_new_tokens)
    print(f"reply: {gen.texts[0]}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ks_lens.models import NAMED_MODELS

    for name, spec in NAMED_MODELS.items():
        alias = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        print(f"{name:20s} {spec.description}{alias}")
    print(
        "\nAlso accepted: a local HF checkpoint directory, a local .gguf file, or an HF id 'org/name' "
        "(needs the weights cached locally or hub access)."
    )
    return 0


# ----------------------------------------------------------------------------- collect / train


def cmd_collect(args: argparse.Namespace) -> int:
    from ks_lens.activations import ActivationStore, collect_to_store
    from ks_lens.datasets import load_dataset, make_splits
    from ks_lens.models import load_model

    out = _check_out(args.out)
    ds = load_dataset(args.dataset, questions=args.questions)
    if args.split != "all":
        ds = ds.split(args.split, make_splits(ds, seed=args.split_seed))
    ds = ds.head(args.max_questions)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    responses = ActivationStore(args.responses_from).responses() if args.responses_from else None
    t0 = time.perf_counter()

    def progress() -> str:
        try:
            store = ActivationStore(out)
        except KsLensError:
            return "nothing was saved"
        return (
            f"{store.n_rows_done}/{store.meta['n_rows']} rows are saved in {out}; "
            "rerun the same command to resume"
        )

    args.on_interrupt = progress
    store = collect_to_store(
        model,
        ds,
        out,
        mode=args.mode,
        layers=args.layers,
        hook_kinds=_labels(args.hooks),
        position=args.position,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        split=args.split,
        shard_rows=args.shard_rows,
        responses=responses,
        share_prefix=args.share_prefix,
    )
    print(f"{store} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ks_lens.activations import ActivationStore
    from ks_lens.io import write_directory
    from ks_lens.probes import ProbeConfig, save_probes, train_probes

    out = _check_out(
        args.out,
        holds=("ks_lens.probe", "ks_lens.probe_set"),
        what="a probe or probe set",
        overwrite=args.overwrite,
    )
    cfg = ProbeConfig(
        kind=args.kind,
        hidden=args.hidden,
        depth=args.depth,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        loss=args.loss,
        patience=args.patience,
        seed=args.seed,
        C=args.C,
        solver=args.solver,
        max_iter=args.max_iter,
        val_split=args.val_split,
    )
    store = ActivationStore(args.acts)
    layers = list(store.layers) if args.layer is None else args.layer
    acts = store.load(layers=layers, kinds=[args.hook])
    probes = train_probes(acts, layers=layers, kind=args.hook, config=cfg)
    save: Callable[[Path], object]
    if len(probes) == 1:
        (probe,) = probes.values()
        save = probe.save
    else:
        save = lambda d: save_probes(probes, d)  # noqa: E731
    # the new probe(s) replace the directory as a whole: never a mix of old and new
    write_directory(out, save)
    print(f"{'layer':>5}  {'val acc':>7}  per-label val accuracy")
    for layer, p in sorted(probes.items()):
        per = "  ".join(f"{k}={v:.2f}" for k, v in p.metrics["val_per_label_accuracy"].items())
        print(f"{layer:5d}  {p.metrics['val_accuracy']:7.3f}  {per}")
    print(f"saved to {out}")
    return 0


def cmd_vectors(args: argparse.Namespace) -> int:
    from ks_lens.activations import ActivationStore
    from ks_lens.io import write_directory
    from ks_lens.steering import SteeringVectors

    out = _check_out(
        args.out,
        holds=("ks_lens.steering_vectors",),
        what="steering vectors",
        overwrite=args.overwrite,
    )
    store = ActivationStore(args.acts)
    acts = store.load(layers=[args.layer], kinds=[args.hook])
    vec = SteeringVectors.fit(acts, args.layer, kind=args.hook, method=args.method)
    write_directory(out, vec.save)
    norms = ", ".join(
        f"{n}={float(v.norm()):.2f}" for n, v in zip(vec.label_names, vec.vectors, strict=True)
    )
    print(f"{vec}\nnorms: {norms}\nsaved to {args.out}")
    return 0


# ----------------------------------------------------------------------------- steer

# flag -> argparse dest, for the options of one steering method only
_KSTEER_FLAGS = {
    "--steps": "steps",
    "--decay": "decay",
    "--step-norm": "step_norm",
    "--objective": "objective",
    "--combine": "combine",
}
_CAA_FLAGS = {"--caa-combine": "caa_combine", "--normalize": "normalize"}


def cmd_steer(args: argparse.Namespace) -> int:
    import textwrap

    from ks_lens.chat import ChatPrompt
    from ks_lens.generation import generate
    from ks_lens.models import load_model
    from ks_lens.probes import load_probe_any
    from ks_lens.steering import CAA, KSteering, Steerer, SteeringVectors

    if bool(args.classifier) == bool(args.vectors):
        raise ConfigError(
            "give exactly one of --classifier DIR (K-Steering) or --vectors DIR (CAA)"
        )
    # options of the other method would be silently ignored: refuse them instead
    given = {
        flag
        for flag, dest in _KSTEER_FLAGS.items() | _CAA_FLAGS.items()
        if getattr(args, dest) not in (None, False)
    }
    if args.vectors and given & set(_KSTEER_FLAGS):
        flags = ", ".join(sorted(given & set(_KSTEER_FLAGS)))
        raise ConfigError(f"{flags} apply to K-Steering (--classifier), not to --vectors (CAA)")
    if args.classifier and given & set(_CAA_FLAGS):
        flags = ", ".join(sorted(given & set(_CAA_FLAGS)))
        raise ConfigError(f"{flags} apply to CAA (--vectors), not to --classifier (K-Steering)")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    method: Steerer
    if args.classifier:
        probe = load_probe_any(args.classifier, model=model, layer=args.layer)
        method = KSteering(
            probe,
            steps=1 if args.steps is None else args.steps,
            decay=0.95 if args.decay is None else args.decay,
            step_norm=args.step_norm,
            objective=args.objective or "logits",
            combine=args.combine or "sum",
        )
    else:
        vectors = SteeringVectors.load(args.vectors, model=model)
        if args.layer is not None and args.layer != vectors.layer:
            raise ConfigError(
                f"--layer {args.layer} does not apply: the vectors in {args.vectors} were made at "
                f"{vectors.hook_name} and CAA steers there; drop --layer or use vectors made at "
                f"layer {args.layer}"
            )
        method = CAA(vectors, combine=args.caa_combine or "mean", normalize=args.normalize)

    def nothing_saved() -> str:
        return "nothing was saved (steer writes no files); the model's hooks were removed"

    args.on_interrupt = nothing_saved
    prompts = [ChatPrompt(q, system=args.system) for q in args.question]
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, seed=args.seed)
    base = generate(model, prompts, **kw)
    with method.steer(
        model,
        target=_labels(args.target),
        avoid=_labels(args.avoid),
        alpha=args.alpha,
        positions=args.positions,
    ):
        steered = generate(model, prompts, **kw)
    width = 60
    desc = f"steered (target={args.target or '-'}, avoid={args.avoid or '-'}, alpha={args.alpha})"
    for q, a, b in zip(args.question, base.texts, steered.texts, strict=True):
        print(f"\nQ: {q}")
        left = textwrap.wrap(a, width) or [""]
        right = textwrap.wrap(b, width) or [""]
        print(f"{'unsteered':<{width}} | {desc}")
        print(f"{'-' * width}-+-{'-' * width}")
        for i in range(max(len(left), len(right))):
            la = left[i] if i < len(left) else ""
            rb = right[i] if i < len(right) else ""
            print(f"{la:<{width}} | {rb}")
    return 0


# ----------------------------------------------------------------------------- text evaluator


def cmd_report(args: argparse.Namespace) -> int:
    from ks_lens.report import rerender

    paths = rerender(args.dir, command=f"ks-lens report {args.dir}")
    print(f"re-rendered {paths['json']}, {paths['markdown']} and {len(paths) - 2} figures")
    return 0


def cmd_evaluate_text(args: argparse.Namespace) -> int:
    import json

    from ks_lens.gold_texts import load_texts
    from ks_lens.style import style_meters
    from ks_lens.text_evaluator import TextEvaluator, default_text_evaluator

    rows = load_texts(args.texts)
    ev = TextEvaluator.load(args.evaluator) if args.evaluator else default_text_evaluator()
    chunk = 256
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        probs = ev.predict_proba([text for _, text in part])
        for (rid, text), p in zip(part, probs, strict=True):
            out: dict[str, object] = {} if rid is None else {"id": rid}
            out["probs"] = {n: round(float(v), 6) for n, v in zip(ev.label_names, p, strict=True)}
            if args.style:
                out["style"] = {k: round(v, 6) for k, v in style_meters(text).to_json().items()}
            print(json.dumps(out, ensure_ascii=False))
    return 0


def cmd_train_text_evaluator(args: argparse.Namespace) -> int:
    import dataclasses

    from ks_lens.datasets import load_dataset
    from ks_lens.gold_texts import load_gold_texts, load_labelled_texts
    from ks_lens.text_evaluator import TextEvaluator, TextEvaluatorConfig, validate_text_evaluator

    tones = load_dataset("tones").labels
    if args.texts:
        labels = _labels(args.labels) or None
        texts = load_labelled_texts(args.texts, labels)
        if labels is None:
            seen = list(dict.fromkeys(x for t in texts for x in t.labels))
            labels = [x for x in tones if x in seen] if set(seen) <= set(tones) else seen
    else:
        texts = load_gold_texts()
        labels = _labels(args.labels) or list(tones)
        if list(labels) != list(tones):
            raise LabelError(f"the shipped gold texts have the labels {list(tones)}")
    cfg = TextEvaluatorConfig(use_style=not args.no_style, seed=args.seed)
    if args.C is not None:
        cfg = dataclasses.replace(cfg, C=args.C)
    t0 = time.perf_counter()
    ev = TextEvaluator.fit(texts, labels, cfg)
    print(f"trained on {len(texts)} texts in {time.perf_counter() - t0:.1f} s: {ev}")
    if args.folds > 0:
        t0 = time.perf_counter()
        ev.validity = validate_text_evaluator(texts, labels, cfg, n_folds=args.folds)
        print(ev.validity.summary())
        print(f"(validation took {time.perf_counter() - t0:.1f} s)")
    ev.save(args.out)
    print(f"saved to {args.out}")
    return 0


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ks-lens", description="Multi-direction activation steering on TransformerLens hooks."
    )
    add_logging_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "info", help="versions, machine, and (with --model) a model's hooks and a sample reply"
    )
    p.add_argument(
        "--model", default=None, help="also load this model and chat with it (e.g. default)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("--system", default=None)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list the named models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "collect", help="collect residual-stream activations at every layer into a store"
    )
    _add_model_args(p)
    p.add_argument(
        "--dataset", default="tones", help="shipped dataset name or behaviours JSON file"
    )
    p.add_argument(
        "--questions", default=None, help="replace the questions (.jsonl/.json/.csv or hf:NAME)"
    )
    p.add_argument(
        "--mode", default="prompt", choices=["prompt", "response", "response-only", "neutral"]
    )
    p.add_argument(
        "--split", default="train", choices=["train", "evaluator", "calibration", "test", "all"]
    )
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", required=True, help="store directory (rerun to resume)")
    p.add_argument(
        "--layers", type=_layer_list, default=None, help="comma-separated layer indices, or all"
    )
    p.add_argument(
        "--hooks",
        default="resid_post",
        help="comma-separated kinds: "
        + ",".join(HOOK_KINDS)
        + ", or any per-block hook suffix such as attn.hook_z or mlp.hook_post (collect and "
        "train only; steering writes to d_model-wide kinds)",
    )
    p.add_argument("--position", default="last", choices=["last", "mean_response"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-questions", type=int, default=None, help="limit the number of questions")
    p.add_argument("--shard-rows", type=int, default=256)
    p.add_argument(
        "--responses-from", default=None, help="reuse generated answers from a response-mode store"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-share-prefix",
        dest="share_prefix",
        action="store_false",
        help="run every row whole instead of caching the shared system-prompt tokens once "
        "(same activations within float rounding; slower)",
    )
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("train", help="train probes on a store (one layer, several, or all)")
    p.add_argument("--acts", required=True, help="activation store directory")
    p.add_argument(
        "--layer",
        type=_layer_list,
        default=None,
        help="layer index, comma-separated list, or all (default)",
    )
    p.add_argument(
        "--hook",
        default="resid_post",
        help="a kind collected in the store: " + ",".join(HOOK_KINDS) + " or e.g. attn.hook_z",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace the probe(s) already in --out")
    p.add_argument(
        "--kind",
        default="mlp",
        choices=["mlp", "linear", "logistic"],
        help="mlp, linear (both trained in torch) or logistic (scikit-learn LogisticRegression)",
    )
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--loss", default="bce", choices=["bce", "ce"])
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--C",
        dest="C",
        type=float,
        default=1.0,
        help="--kind logistic: inverse L2 regularisation strength (default 1.0)",
    )
    p.add_argument(
        "--solver",
        default="lbfgs",
        help="--kind logistic: the LogisticRegression solver: lbfgs (default), newton-cg, "
        "newton-cholesky, sag or saga",
    )
    p.add_argument(
        "--max-iter",
        type=int,
        default=1000,
        help="--kind logistic: solver iterations at most (default 1000)",
    )
    p.add_argument(
        "--val-split",
        default="group",
        choices=["group", "stratified_group"],
        help="validation rows: whole questions (group, default), or whole questions stratified "
        "by label set (stratified_group, scikit-learn StratifiedGroupKFold)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("vectors", help="compute per-label CAA steering vectors from a store")
    p.add_argument("--acts", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--hook", default="resid_post", choices=list(HOOK_KINDS))
    p.add_argument("--method", default="mean_diff", choices=["mean_diff", "mean_centring"])
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace the vectors already in --out")
    p.set_defaults(func=cmd_vectors)

    p = sub.add_parser("steer", help="answer questions unsteered and steered, side by side")
    _add_model_args(p)
    p.add_argument("question", nargs="+", help="one or more questions")
    p.add_argument("--classifier", default=None, help="probe directory (K-Steering)")
    p.add_argument("--vectors", default=None, help="steering-vector directory (CAA)")
    p.add_argument(
        "--layer", type=int, default=None, help="layer to pick from a multi-layer probe set"
    )
    ks_only = "K-Steering (--classifier) only"
    p.add_argument("--target", default="", help="comma-separated labels to strengthen")
    p.add_argument("--avoid", default="", help="comma-separated labels to suppress")
    p.add_argument("--alpha", type=float, required=True)
    p.add_argument("--positions", default="all", choices=["all", "prompt", "generated", "last"])
    p.add_argument("--steps", type=int, default=None, help=f"default 1; {ks_only}")
    p.add_argument("--decay", type=float, default=None, help=f"default 0.95; {ks_only}")
    p.add_argument(
        "--step-norm", default=None, choices=["unit", "relative"], help=f"default raw; {ks_only}"
    )
    p.add_argument(
        "--objective",
        default=None,
        choices=["logits", "logsigmoid", "softmin"],
        help=f"default logits; {ks_only}",
    )
    p.add_argument(
        "--combine",
        default=None,
        choices=["sum", "balanced", "pcgrad"],
        help=f"default sum; {ks_only}",
    )
    p.add_argument(
        "--caa-combine", default=None, choices=["mean", "sum"], help="default mean; CAA only"
    )
    p.add_argument("--normalize", action="store_true", help="CAA only: unit-norm combined vector")
    p.add_argument("--system", default=None, help="system prompt for the questions")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser(
        "evaluate-text",
        help="score texts (JSONL with a 'text' field) for each tone with a text-level evaluator",
    )
    p.add_argument("--texts", required=True, help="JSONL file, one object with 'text' per line")
    p.add_argument(
        "--evaluator",
        default=None,
        help="evaluator directory (default: trained on the shipped gold texts, cached)",
    )
    p.add_argument("--style", action="store_true", help="also print each text's style meters")
    p.set_defaults(func=cmd_evaluate_text)

    p = sub.add_parser(
        "train-text-evaluator",
        help="train a text-level evaluator on labelled texts and print its held-out validity",
    )
    p.add_argument(
        "--texts", default=None, help="labelled-text JSONL (default: the shipped gold texts)"
    )
    p.add_argument("--out", required=True, help="directory to save the evaluator in")
    p.add_argument(
        "--labels", default=None, help="comma-separated label names (default: those in the texts)"
    )
    p.add_argument(
        "--folds", type=int, default=5, help="question-grouped CV folds; 0 skips validation"
    )
    p.add_argument(
        "--C", type=float, default=None, help="inverse regularisation strength (default: 16)"
    )
    p.add_argument("--no-style", action="store_true", help="leave out the style meters")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_text_evaluator)

    p = sub.add_parser(
        "report",
        help="re-render a comparison report (DIR/report.json) with this version's summaries",
    )
    p.add_argument("dir", help="a demo output directory holding report.json")
    p.set_defaults(func=cmd_report)

    try:
        from ks_lens.demo import add_demo_parser
    except ImportError:  # pragma: no cover
        pass
    else:
        add_demo_parser(sub)
    return parser


def _format_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    return f"ks-lens: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbosity)
    warnings.formatwarning = _format_warning
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KsLensError as e:
        # bad input or a damaged artefact: a clear message, no traceback
        print(f"ks-lens: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # the file system or the machine refused (permissions, full disk, missing file, ...)
        print(f"ks-lens: error: {_describe_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = getattr(args, "on_interrupt", None)
        print(f"ks-lens: interrupted; {hint() if hint else 'nothing was saved'}", file=sys.stderr)
        return 130
    # anything else is a bug in ks-lens (or a library below it): let the traceback show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
