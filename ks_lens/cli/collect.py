"""``ks-lens collect`` (activations into a store), ``ks-lens train`` (probes on a store) and
``ks-lens vectors`` (CAA steering vectors from a store)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from ks_lens.activations import Mode, Pooling
from ks_lens.cli.common import Model, _check_out
from ks_lens.cli.options import Layers, one_of
from ks_lens.datasets import SPLITS
from ks_lens.errors import Interrupted, KsLensError
from ks_lens.hooks import HOOK_KINDS
from ks_lens.models import ModelOptions
from ks_lens.probes import ProbeConfig
from ks_lens.steering.caa import VectorMethod

_HOOK_HELP = (
    "comma-separated kinds: " + ",".join(HOOK_KINDS) + ", or any per-block hook suffix such as "
    "attn.hook_z or mlp.hook_post (collect and train only; steering writes to d_model-wide kinds)"
)


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
    pooling: Pooling = "last"  # tokens read per row: last token or mean_response (response modes)
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
            pooling=o.pooling,
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
