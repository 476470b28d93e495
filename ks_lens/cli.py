"""The ``ks-lens`` command line: ``info``, ``models``, ``collect``, ``train``, ``vectors``,
``steer``, ``capability``, ``demo``, ``evaluate-text``, ``train-text-evaluator``, ``report``.

Each subcommand is a thin shell over the library; run ``ks-lens SUBCOMMAND --help``. Its
options are the fields of one dataclass (``CollectOptions``, ``TrainOptions``, ...), read by
:mod:`ks_lens.options`: shared settings come from the library's own dataclasses
(:class:`~ks_lens.models.ModelOptions` for ``--model/--device/--dtype``,
:class:`~ks_lens.probes.ProbeConfig` for the probe options of ``train``,
:class:`~ks_lens.pipeline.PipelineConfig` for ``demo``), and choices from its ``Literal`` types.
``-q``/``-v`` come before the subcommand (``ks-lens -v demo``).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro

from ks_lens.activations import Mode, Pooling
from ks_lens.capability import Rule
from ks_lens.datasets import SPLITS
from ks_lens.demo import DemoOptions, cmd_demo, parse_demo_options
from ks_lens.errors import ConfigError, Interrupted, KsLensError, LabelError
from ks_lens.hooks import HOOK_KINDS
from ks_lens.logs import add_logging_arguments, configure_logging
from ks_lens.models import ModelOptions
from ks_lens.options import Layers, one_of, parse
from ks_lens.probes import ProbeConfig
from ks_lens.steering.caa import CAA, CaaCombine, VectorMethod
from ks_lens.steering.ksteer import Combine, KSteering, Objective, StepNorm
from ks_lens.steering.positions import Positions

#: the model options, spelled --model, --device and --dtype (no prefix)
Model = Annotated[ModelOptions, tyro.conf.arg(name="")]
_HOOK_HELP = (
    "comma-separated kinds: " + ",".join(HOOK_KINDS) + ", or any per-block hook suffix such as "
    "attn.hook_z or mlp.hook_post (collect and train only; steering writes to d_model-wide kinds)"
)


def _describe_os_error(e: OSError) -> str:
    """``"runs/x: Permission denied"`` for an ``OSError`` (no errno number, no traceback)."""
    what = e.strerror or str(e) or type(e).__name__
    if e.filename is None:
        return what
    name = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    return f"{name}: {what}"


_ARTEFACT_NAMES = {
    "ks_lens.probe": "a probe",
    "ks_lens.probe_set": "a probe set",
    "ks_lens.steering_vectors": "steering vectors",
    "ks_lens.activation_store": "an activation store",
    "ks_lens.text_evaluator": "a text evaluator",
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


@dataclass(frozen=True)
class InfoOptions:
    """Versions, machine and cache; with --model, also that model's hook points and a sample reply."""

    model: Model = field(default_factory=lambda: ModelOptions(model=""))
    prompt: str = "What is the capital of France? Answer in one sentence."  # for the sample reply
    system: str | None = None  # system prompt of the sample reply
    max_new_tokens: int = 32


def cmd_info(o: InfoOptions) -> int:
    import ks_lens
    from ks_lens.compat import versions
    from ks_lens.packaged_models import cache_root
    from ks_lens.utils import machine_info

    print(f"ks-lens {ks_lens.__version__}")
    for k, v in versions().items():
        print(f"  {k:17s} {v}")
    for k, v in machine_info().items():
        print(f"  {k:17s} {v}")
    print(f"  {'cache':17s} {cache_root()}")
    if not o.model.model:
        return 0
    from ks_lens.chat import ChatPrompt, tokenize_chat
    from ks_lens.generation import generate
    from ks_lens.models import model_signature

    t0 = time.perf_counter()
    model = o.model.load()
    print(
        f"\nloaded {model.cfg.model_name} in {time.perf_counter() - t0:.1f} s: {model_signature(model)}"
    )
    resid = [n for n in model.hook_dict if n.startswith("blocks.0.")]
    print(
        f"hook points: {len(model.hook_dict)} in all; per block e.g. "
        f"blocks.{{L}}.hook_resid_pre / hook_resid_mid / hook_resid_post ({len(resid)} hooks in block 0)"
    )
    prompt = ChatPrompt(o.prompt, system=o.system)
    batch = tokenize_chat(model, [prompt])
    print(
        f"prompt ({batch.input_ids.shape[1]} tokens): {model.tokenizer.decode(batch.input_ids[0])!r}"
    )
    gen = generate(model, [prompt], max_new_tokens=o.max_new_tokens)
    print(f"reply: {gen.texts[0]}")
    return 0


@dataclass(frozen=True)
class ModelsOptions:
    """List the named models."""


def cmd_models(o: ModelsOptions) -> int:
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


@dataclass(frozen=True)
class CollectOptions:
    """Collect residual-stream activations at every layer into a store."""

    out: str  # store directory (rerun the same command to resume)
    model: Model = field(default_factory=ModelOptions)
    dataset: str = "tones"  # shipped dataset name or behaviours JSON file
    questions: str | None = None  # replace the questions (.jsonl/.json/.csv or hf:NAME)
    mode: Mode = "prompt"
    split: Annotated[str, one_of((*SPLITS, "all"))] = "train"
    split_seed: int = 0
    layers: Layers = None  # comma-separated layer indices, or all
    hooks: Annotated[tuple[str, ...], tyro.conf.arg(help=_HOOK_HELP)] = ("resid_post",)
    position: Pooling = "last"
    batch_size: int = 16
    max_new_tokens: int = 48  # answer length (response mode)
    max_questions: int | None = None  # limit the number of questions
    shard_rows: int = 256
    responses_from: str | None = None  # reuse generated answers from a response-mode store
    seed: int = 0
    # cache the shared system-prompt tokens once; --no-share-prefix runs every row whole (same
    # activations within float rounding; slower)
    share_prefix: bool = True


def cmd_collect(o: CollectOptions) -> int:
    from ks_lens.activations import ActivationStore, collect_to_store
    from ks_lens.datasets import load_dataset, make_splits
    from ks_lens.utils import check_seed

    out = _check_out(o.out)
    check_seed(o.seed, "--seed")  # before the model loads (the library checks it again)
    ds = load_dataset(o.dataset, questions=o.questions)
    if o.split != "all":
        ds = ds.split(o.split, make_splits(ds, seed=o.split_seed))
    ds = ds.head(o.max_questions)
    model = o.model.load()
    responses = ActivationStore(o.responses_from).responses() if o.responses_from else None
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

    try:
        store = collect_to_store(
            model,
            ds,
            out,
            mode=o.mode,
            layers=None if o.layers is None else list(o.layers),
            hook_kinds=list(o.hooks),
            position=o.position,
            batch_size=o.batch_size,
            max_new_tokens=o.max_new_tokens,
            seed=o.seed,
            split=o.split,
            shard_rows=o.shard_rows,
            responses=responses,
            share_prefix=o.share_prefix,
        )
    except KeyboardInterrupt:
        raise Interrupted(progress()) from None
    print(f"{store} in {time.perf_counter() - t0:.1f} s")
    return 0


@dataclass(frozen=True)
class TrainOptions:
    """Train probes on a store (one layer, several, or all)."""

    acts: str  # activation store directory
    out: str  # directory for the probe (one layer) or probe set (several layers)
    layer: Layers = None  # layer index, comma-separated list, or all
    hook: Annotated[
        str,
        tyro.conf.arg(
            help="a kind collected in the store: " + ",".join(HOOK_KINDS) + " or e.g. attn.hook_z"
        ),
    ] = "resid_post"
    overwrite: bool = False  # replace the probe(s) already in --out
    probe: Annotated[ProbeConfig, tyro.conf.arg(name="")] = field(default_factory=ProbeConfig)


def cmd_train(o: TrainOptions) -> int:
    from ks_lens.activations import ActivationStore
    from ks_lens.io import write_directory
    from ks_lens.probes import save_probes, train_probes

    out = _check_out(
        o.out,
        holds=("ks_lens.probe", "ks_lens.probe_set"),
        what="a probe or probe set",
        overwrite=o.overwrite,
    )
    store = ActivationStore(o.acts)
    layers = list(store.layers) if o.layer is None else list(o.layer)
    acts = store.load(layers=layers, kinds=[o.hook])
    probes = train_probes(acts, layers=layers, kind=o.hook, config=o.probe)
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


@dataclass(frozen=True)
class VectorsOptions:
    """Compute per-label CAA steering vectors from a store."""

    acts: str  # activation store directory
    layer: int
    out: str  # directory for the vectors
    hook: Annotated[str, one_of(HOOK_KINDS)] = "resid_post"
    method: VectorMethod = "mean_diff"
    overwrite: bool = False  # replace the vectors already in --out


def cmd_vectors(o: VectorsOptions) -> int:
    from ks_lens.activations import ActivationStore
    from ks_lens.io import write_directory
    from ks_lens.steering import SteeringVectors

    out = _check_out(
        o.out,
        holds=("ks_lens.steering_vectors",),
        what="steering vectors",
        overwrite=o.overwrite,
    )
    store = ActivationStore(o.acts)
    acts = store.load(layers=[o.layer], kinds=[o.hook])
    vec = SteeringVectors.fit(acts, o.layer, kind=o.hook, method=o.method)
    write_directory(out, vec.save)
    norms = ", ".join(
        f"{n}={float(v.norm()):.2f}" for n, v in zip(vec.label_names, vec.vectors, strict=True)
    )
    print(f"{vec}\nnorms: {norms}\nsaved to {o.out}")
    return 0


# ----------------------------------------------------------------------------- steer


def _method_arg(cls: type, name: str, meaning: str | None = None, param: str = "") -> Any:
    """Help for an option of one steering method whose None means the method's own default."""
    default = inspect.signature(cls).parameters[param or name].default
    which = "K-Steering (--classifier)" if cls is KSteering else "CAA (--vectors)"
    return tyro.conf.arg(help=f"{meaning or f'None: {default}'}; {which} only")


@dataclass(frozen=True)
class SteerOptions:
    """Answer questions unsteered and steered, side by side.

    Give exactly one of --classifier (K-Steering) or --vectors (CAA).
    """

    # one or more questions
    question: Annotated[list[str], tyro.conf.Positional, tyro.conf.arg(metavar="QUESTION")]
    alpha: float  # steering strength
    model: Model = field(default_factory=ModelOptions)
    classifier: str | None = None  # probe directory (K-Steering)
    vectors: str | None = None  # steering-vector directory (CAA)
    layer: int | None = None  # layer to pick from a multi-layer probe set
    target: tuple[str, ...] = ()  # labels to strengthen
    avoid: tuple[str, ...] = ()  # labels to suppress
    positions: Positions = "all"
    steps: Annotated[int | None, _method_arg(KSteering, "steps")] = None
    decay: Annotated[float | None, _method_arg(KSteering, "decay")] = None
    step_norm: Annotated[
        StepNorm | None, _method_arg(KSteering, "step_norm", "None: raw steps")
    ] = None
    objective: Annotated[Objective | None, _method_arg(KSteering, "objective")] = None
    combine: Annotated[Combine | None, _method_arg(KSteering, "combine")] = None
    caa_combine: Annotated[CaaCombine | None, _method_arg(CAA, "caa_combine", param="combine")] = (
        None
    )
    normalize: bool = False  # unit-norm combined vector; CAA (--vectors) only
    system: str | None = None  # system prompt for the questions
    max_new_tokens: int = 64
    sample: bool = False  # sample instead of greedy decoding
    seed: int = 0


# the options of one steering method only
_KSTEER_ONLY = ("steps", "decay", "step_norm", "objective", "combine")
_CAA_ONLY = ("caa_combine", "normalize")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cmd_steer(o: SteerOptions) -> int:
    import textwrap

    from ks_lens.chat import ChatPrompt
    from ks_lens.generation import generate
    from ks_lens.probes import load_probe_any
    from ks_lens.steering import Steerer, SteeringVectors

    if not o.question:
        raise ConfigError("give one or more questions to answer")
    if bool(o.classifier) == bool(o.vectors):
        raise ConfigError(
            "give exactly one of --classifier DIR (K-Steering) or --vectors DIR (CAA)"
        )
    # options of the other method would be silently ignored: refuse them instead. "Given" is
    # anything but the unset default (None, or False for --normalize): a 0 (--steps 0, --decay 0)
    # is given, and reaches the method's own checks (0 == False, so no `in (None, False)` test)
    given = {n for n in _KSTEER_ONLY + _CAA_ONLY if getattr(o, n) is not None}
    given -= {n for n in given if getattr(o, n) is False}
    if o.vectors and given & set(_KSTEER_ONLY):
        flags = ", ".join(sorted(_flag(n) for n in given & set(_KSTEER_ONLY)))
        raise ConfigError(f"{flags} apply to K-Steering (--classifier), not to --vectors (CAA)")
    if o.classifier and given & set(_CAA_ONLY):
        flags = ", ".join(sorted(_flag(n) for n in given & set(_CAA_ONLY)))
        raise ConfigError(f"{flags} apply to CAA (--vectors), not to --classifier (K-Steering)")
    model = o.model.load()
    method: Steerer
    if o.classifier:
        probe = load_probe_any(o.classifier, model=model, layer=o.layer)
        # the options not given keep KSteering's defaults
        method = KSteering(probe, **{n: getattr(o, n) for n in given & set(_KSTEER_ONLY)})
    else:
        assert o.vectors is not None
        vectors = SteeringVectors.load(o.vectors, model=model)
        if o.layer is not None and o.layer != vectors.layer:
            raise ConfigError(
                f"--layer {o.layer} does not apply: the vectors in {o.vectors} were made at "
                f"{vectors.hook_name} and CAA steers there; drop --layer or use vectors made at "
                f"layer {o.layer}"
            )
        if o.caa_combine is None:  # CAA's default
            method = CAA(vectors, normalize=o.normalize)
        else:
            method = CAA(vectors, combine=o.caa_combine, normalize=o.normalize)

    prompts = [ChatPrompt(q, system=o.system) for q in o.question]
    gen: dict[str, Any] = dict(max_new_tokens=o.max_new_tokens, do_sample=o.sample, seed=o.seed)
    try:
        base = generate(model, prompts, **gen)
        with method.steer(
            model, target=list(o.target), avoid=list(o.avoid), alpha=o.alpha, positions=o.positions
        ):
            steered = generate(model, prompts, **gen)
    except KeyboardInterrupt:
        raise Interrupted(
            "nothing was saved (steer writes no files); the model's hooks were removed"
        ) from None
    width = 60
    target, avoid = ",".join(o.target), ",".join(o.avoid)
    desc = f"steered (target={target or '-'}, avoid={avoid or '-'}, alpha={o.alpha})"
    for q, a, b in zip(o.question, base.texts, steered.texts, strict=True):
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


# ----------------------------------------------------------------------------- capability


@dataclass(frozen=True)
class CapabilityOptions:
    """Multiple-choice accuracy by option log-likelihood, unsteered or steered, with a 95 percent interval.

    Steered (--classifier or --vectors, with --alpha) or instructed (--system or --instruct), the
    plain model is scored too and the paired accuracy difference is printed.
    """

    model: Model = field(default_factory=ModelOptions)
    questions: str | None = None  # multiple-choice JSONL (None: the shipped set)
    classifier: str | None = None  # probe directory (K-Steering)
    vectors: str | None = None  # steering-vector directory (CAA)
    layer: int | None = None  # layer to pick from a multi-layer probe set
    target: tuple[str, ...] = ()  # labels to strengthen
    avoid: tuple[str, ...] = ()  # labels to suppress
    alpha: float | None = None  # steering strength (needed with --classifier or --vectors)
    positions: Positions = "all"  # steered tokens; the options count as generated
    system: str | None = None  # system prompt of every question
    instruct: tuple[str, ...] = ()  # tone labels whose shipped instructions are the system prompt
    rule: Rule = "char"  # how options are compared: sum, per token, per character
    batch_size: int = 64  # rows (question + one option) per forward pass
    baseline: bool = True  # also score the plain model (--no-baseline skips it)
    out: str | None = None  # JSON file for every question's scores
    seed: int = 0  # bootstrap seed


def _check_capability_steering(o: CapabilityOptions) -> None:
    """Refuse steering options that do not go together, before any work."""
    if o.classifier and o.vectors:
        raise ConfigError(
            "give at most one of --classifier DIR (K-Steering) or --vectors DIR (CAA)"
        )
    if not (o.classifier or o.vectors):
        if o.alpha is not None or o.target or o.avoid or o.layer is not None:
            raise ConfigError(
                "--alpha, --target, --avoid and --layer need --classifier DIR or --vectors DIR"
            )
    elif o.alpha is None or not (o.target or o.avoid):
        raise ConfigError("steering needs --alpha and at least one --target or --avoid label")


def _capability_steerer(o: CapabilityOptions, model: Any) -> Any:
    """The steering method of ``ks-lens capability`` (None: unsteered), with its defaults."""
    from ks_lens.probes import load_probe_any
    from ks_lens.steering import SteeringVectors

    if o.classifier:
        return KSteering(load_probe_any(o.classifier, model=model, layer=o.layer))
    if not o.vectors:
        return None
    vectors = SteeringVectors.load(o.vectors, model=model)
    if o.layer is not None and o.layer != vectors.layer:
        raise ConfigError(
            f"--layer {o.layer} does not apply: the vectors in {o.vectors} were made at "
            f"{vectors.hook_name}; drop --layer or use vectors made at layer {o.layer}"
        )
    return CAA(vectors)


def _capability_system(o: CapabilityOptions) -> str | None:
    if o.system is not None and o.instruct:
        raise ConfigError("give --system TEXT or --instruct LABELS, not both")
    if not o.instruct:
        return o.system
    from ks_lens.datasets import load_dataset

    tones = load_dataset("tones")
    return " ".join(tones.instruction(label) for label in o.instruct)


def cmd_capability(o: CapabilityOptions) -> int:
    from ks_lens.capability import evaluate_capability, load_mc_questions
    from ks_lens.capability import paired_accuracy_difference as paired
    from ks_lens.compat import versions
    from ks_lens.io import atomic_write_json
    from ks_lens.utils import git_commit

    if o.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {o.batch_size}")
    if o.out is not None and Path(o.out).is_dir():
        raise ConfigError(f"--out {o.out} is a directory; give a JSON file path")
    _check_capability_steering(o)
    system = _capability_system(o)
    questions = load_mc_questions(o.questions)
    model = o.model.load()
    method = _capability_steerer(o, model)
    run: dict[str, Any] = dict(rule=o.rule, batch_size=o.batch_size)
    label = "unsteered"
    settings: dict[str, Any] = {}
    if method is not None:
        kind = "ksteer" if isinstance(method, KSteering) else "caa"
        label = f"{kind} target={','.join(o.target) or '-'} avoid={','.join(o.avoid) or '-'}"
        label += f" alpha={o.alpha}"
        settings = {
            "method": kind,
            "steerer": o.classifier or o.vectors,
            "target": list(o.target),
            "avoid": list(o.avoid),
            "alpha": o.alpha,
            "positions": o.positions,
        }
    if system is not None:
        label = ("instructed" if method is None else label + " +system") + (
            f" ({','.join(o.instruct)})" if o.instruct else ""
        )
    try:
        base = None
        if o.baseline and (method is not None or system is not None):
            base = evaluate_capability(model, questions, **run)
        if method is None:
            res = evaluate_capability(model, questions, system=system, label=label, **run)
        else:
            steer = method.steer(
                model,
                target=list(o.target),
                avoid=list(o.avoid),
                alpha=float(o.alpha or 0.0),
                positions=o.positions,
            )
            with steer:
                res = evaluate_capability(
                    model, questions, system=system, label=label, settings=settings, **run
                )
    except KeyboardInterrupt:
        raise Interrupted("nothing was saved; the model's hooks were removed") from None
    print(
        f"{res.settings['model']}: {len(res)} questions, {len(set(res.subjects))} subjects, "
        f"rule {o.rule}, chance {res.chance:.3f}"
    )
    for r in (base, res):
        if r is not None:
            print(f"  {r.label:40s} accuracy {r.interval(seed=o.seed).fmt()}")
    diff = paired(res, base, seed=o.seed) if base is not None else None
    if diff is not None:
        print(f"  difference (paired, 95 % bootstrap over questions): {diff.fmt()}")
    print("  by subject: " + ", ".join(f"{k} {v:.2f}" for k, v in res.by_subject().items()))
    if o.out is not None:
        out = {
            # the command line when run as ks-lens (not through main(argv) from Python)
            "command": "ks-lens " + " ".join(sys.argv[1:]) if "capability" in sys.argv else None,
            "versions": versions(),
            "commit": git_commit(),
            "questions": o.questions or "shipped",
            "result": res.to_json(),
            "baseline": base.to_json() if base is not None else None,
            "difference": diff.to_json() if diff is not None else None,
        }
        Path(o.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(o.out, out)
        print(f"saved to {o.out}")
    return 0


# ----------------------------------------------------------------------------- text evaluator


@dataclass(frozen=True)
class ReportOptions:
    """Re-render a comparison report (DIR/report.json) with this version's summaries."""

    dir: tyro.conf.Positional[str]  # a demo output directory holding report.json


def cmd_report(o: ReportOptions) -> int:
    from ks_lens.io import read_json
    from ks_lens.report import rerender, versions_line

    paths = rerender(o.dir, command=f"ks-lens report {o.dir}")
    print(f"re-rendered {paths['json']}, {paths['markdown']} and {len(paths) - 2} figures")
    print(versions_line(read_json(paths["json"], what="comparison report")))
    return 0


@dataclass(frozen=True)
class EvaluateTextOptions:
    """Score texts (JSONL with a 'text' field) for each label with a text-level evaluator."""

    texts: str  # JSONL file, one object with 'text' per line
    # evaluator directory (None: trained on the dataset's shipped gold texts, cached)
    evaluator: str | None = None
    # behaviour family of the default evaluator: tones, concepts, or a behaviours JSON file
    dataset: str = "tones"
    style: bool = False  # also print each text's style meters


def cmd_evaluate_text(o: EvaluateTextOptions) -> int:
    import json

    from ks_lens.gold_texts import load_texts
    from ks_lens.style import style_meters
    from ks_lens.text_evaluator import LongTextWarning, TextEvaluator, default_text_evaluator

    rows = load_texts(o.texts)
    ev = (
        TextEvaluator.load(o.evaluator)
        if o.evaluator
        else default_text_evaluator(family=o.dataset)
    )
    texts = [text for _, text in rows]
    long = ev.long_texts(texts)
    if long:  # once, naming the texts by id (or position in the file), before any output
        names = [f"id {r}" if r is not None else f"text {i + 1}" for i, (r, _) in enumerate(rows)]
        warnings.warn(ev.long_text_message(texts, long, names), LongTextWarning, stacklevel=1)
    chunk = 256
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        with warnings.catch_warnings():  # said above: not again per chunk
            warnings.simplefilter("ignore", LongTextWarning)
            probs = ev.predict_proba([text for _, text in part])
        for (rid, text), p in zip(part, probs, strict=True):
            out: dict[str, object] = {} if rid is None else {"id": rid}
            out["probs"] = {n: round(float(v), 6) for n, v in zip(ev.label_names, p, strict=True)}
            if o.style:
                out["style"] = {k: round(v, 6) for k, v in style_meters(text).to_json().items()}
            print(json.dumps(out, ensure_ascii=False))
    return 0


@dataclass(frozen=True)
class TrainTextEvaluatorOptions:
    """Train a text-level evaluator on labelled texts and print its held-out validity."""

    out: str  # directory to save the evaluator in
    texts: str | None = None  # labelled-text JSONL (None: the dataset's shipped gold texts)
    # behaviour family whose labels (and gold texts, without --texts) are used: tones, concepts,
    # or a behaviours JSON file
    dataset: str = "tones"
    overwrite: bool = False  # replace the text evaluator already in --out
    labels: tuple[str, ...] = ()  # label names (none given: those in the texts)
    folds: int = 5  # question-grouped CV folds; 0 skips validation
    C: float | None = None  # inverse regularisation strength (None: TextEvaluatorConfig's)
    style: bool = True  # use the style meters (--no-style leaves them out)
    seed: int = 0


def cmd_train_text_evaluator(o: TrainTextEvaluatorOptions) -> int:
    import dataclasses

    from ks_lens.datasets import load_dataset
    from ks_lens.gold_texts import check_label_options, load_gold_texts, load_labelled_texts
    from ks_lens.text_evaluator import TextEvaluator, TextEvaluatorConfig, validate_text_evaluator

    out = _check_out(
        o.out, holds=("ks_lens.text_evaluator",), what="a text evaluator", overwrite=o.overwrite
    )
    family = load_dataset(o.dataset).labels
    try:
        labels: list[str] | None = list(check_label_options(o.labels)) if o.labels else None
    except LabelError as e:
        raise LabelError(f"--labels: {e}") from None
    if o.texts:
        texts = load_labelled_texts(o.texts, labels)
        if labels is None:
            seen = list(dict.fromkeys(x for t in texts for x in t.labels))
            labels = [x for x in family if x in seen] if set(seen) <= set(family) else seen
    else:
        texts = load_gold_texts(o.dataset)
        labels = labels or list(family)
        if list(labels) != list(family):
            raise LabelError(f"the shipped gold texts have the labels {list(family)}")
    cfg = TextEvaluatorConfig(use_style=o.style, seed=o.seed)
    if o.C is not None:
        cfg = dataclasses.replace(cfg, C=o.C)
    t0 = time.perf_counter()
    ev = TextEvaluator.fit(texts, labels, cfg)
    print(f"trained on {len(texts)} texts in {time.perf_counter() - t0:.1f} s: {ev}")
    if o.folds > 0:
        t0 = time.perf_counter()
        ev.validity = validate_text_evaluator(texts, labels, cfg, n_folds=o.folds)
        print(ev.validity.summary())
        print(f"(validation took {time.perf_counter() - t0:.1f} s)")
    ev.save(out)  # as a whole: a failed save leaves --out as it was
    print(f"saved to {out}")
    return 0


# ----------------------------------------------------------------------------- main

Parser = Callable[[Sequence[str], str], Any]


def _reader(cls: type[Any]) -> Parser:
    return lambda argv, prog: parse(cls, argv, prog=prog)


def _summary(cls: type[Any]) -> str:
    """The first line of ``cls``'s docstring, for ``ks-lens --help``."""
    line = (cls.__doc__ or "").strip().splitlines()[0].rstrip(".")
    return line[:1].lower() + line[1:]


def build_parser() -> argparse.ArgumentParser:
    """The top level: ``ks-lens [-q|-v] COMMAND``; each command reads the rest of the arguments
    into its options dataclass (``ks-lens COMMAND --help``)."""
    parser = argparse.ArgumentParser(
        prog="ks-lens",
        description="Multi-direction activation steering on TransformerLens hooks.",
        epilog="Run 'ks-lens COMMAND --help' for the options of a command.",
    )
    add_logging_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands: list[tuple[str, type[Any], Callable[[Any], int], Parser | None]] = [
        ("info", InfoOptions, cmd_info, None),
        ("models", ModelsOptions, cmd_models, None),
        ("collect", CollectOptions, cmd_collect, None),
        ("train", TrainOptions, cmd_train, None),
        ("vectors", VectorsOptions, cmd_vectors, None),
        ("steer", SteerOptions, cmd_steer, None),
        ("capability", CapabilityOptions, cmd_capability, None),
        ("evaluate-text", EvaluateTextOptions, cmd_evaluate_text, None),
        ("train-text-evaluator", TrainTextEvaluatorOptions, cmd_train_text_evaluator, None),
        ("report", ReportOptions, cmd_report, None),
        ("demo", DemoOptions, cmd_demo, lambda argv, prog: parse_demo_options(argv, prog=prog)),
    ]
    for name, cls, func, reader in commands:
        p = sub.add_parser(name, help=_summary(cls), add_help=False)
        p.set_defaults(func=func, read=reader or _reader(cls))
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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # the top level has only flags: the first other argument is the command, the rest its options
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    args = parser.parse_args(argv[: at + 1])
    configure_logging(args.verbosity)
    warnings.formatwarning = _format_warning
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        options = args.read(argv[at + 1 :], f"ks-lens {args.command}")
        return int(args.func(options) or 0)
    except KsLensError as e:
        # bad input or a damaged artefact: a clear message, no traceback
        print(f"ks-lens: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # the file system or the machine refused (permissions, full disk, missing file, ...)
        print(f"ks-lens: error: {_describe_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        saved = e.saved if isinstance(e, Interrupted) else "nothing was saved"
        print(f"ks-lens: interrupted; {saved}", file=sys.stderr)
        return 130
    # anything else is a bug in ks-lens (or a library below it): let the traceback show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
