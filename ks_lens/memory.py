"""Resident memory: what the process holds now and at its peak, per stage, and what a run needs.

:func:`record_memory` writes ``<stage>_rss_mb`` (held now, ``/proc/self/statm``) and
``<stage>_peak_rss_mb`` (the process's peak so far, ``getrusage``'s ``ru_maxrss``) into a
timings dict; the demo records them after collection, training, calibration, the activation
level and the text level. :func:`estimate_run` predicts a run's peak memory and time from the
model's shape and the row counts, before anything is loaded.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ks_lens.errors import ConfigError

if TYPE_CHECKING:
    from ks_lens.comparison import ComparisonConfig
    from ks_lens.pipeline import PipelineConfig
    from ks_lens.steering.dct import DCTSettings
    from ks_lens.types import Model

MIB = 2**20


def rss_mb() -> float | None:
    """The memory this process holds now (resident set size, MiB); ``None`` without ``/proc``."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
    except OSError:
        return None
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mb() -> float:
    """The most memory this process has held so far (peak resident set size, MiB).

    On Linux this is ``VmHWM`` of ``/proc/self/status``: ``getrusage``'s ``ru_maxrss`` keeps the
    high-water mark a child inherits from its parent at ``fork`` across ``exec``, so a subprocess
    started by a process holding 2 GB would report a peak of at least 2 GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def record_memory(timings: dict[str, float], stage: str) -> None:
    """Add ``{stage}_rss_mb`` (held now, where ``/proc`` exists) and ``{stage}_peak_rss_mb``
    (peak so far) to ``timings``."""
    now = rss_mb()
    if now is not None:
        timings[f"{stage}_rss_mb"] = now
    timings[f"{stage}_peak_rss_mb"] = peak_rss_mb()


@contextmanager
def timed_stage(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Time the block into ``timings[f"{stage}_s"]`` and then :func:`record_memory` it (only
    when the block completes)."""
    t0 = time.perf_counter()
    yield
    timings[f"{stage}_s"] = time.perf_counter() - t0
    record_memory(timings, stage)


def available_memory_mb() -> float | None:
    """Memory available to new allocations (``MemAvailable`` of ``/proc/meminfo``, capped by a
    cgroup v2 ``memory.max`` limit), MiB; ``None`` where neither can be read."""
    avail: float | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = (int(limit) - used) / MIB
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


# What the estimate assumes (measured on SmolLM2-135M, fp32, 2 CPU cores; docs/performance.md)
# Python, torch, transformers and the tokenizer (640 MiB held after collection at 4b415d2) plus
# allocator slack (measured peaks sat 0.2-0.45 GiB above the other parts)
RUNTIME_MB = 850.0
TOKENS_PER_ROW = 96  # a prompt-mode or gold-text row (chat header + question + answer)
# seconds per million parameters: per collected row, per steered readout row, per generated token
# (the full tones demo at 5c18b30 on 2 idle cores: collection 184 s for 1,776 rows, activation
# level 125 s for 7,872 readouts, calibration + text level 451 s for 43,904 tokens; the capability
# stage, about 1 minute, is not counted)
SECONDS_PER_MPARAM = {"collect": 7.7e-4, "readout": 1.18e-4, "token": 7.6e-5}
# a DCT learning row runs forward and backward: about this many readouts (not measured)
DCT_ROW_READOUTS = 3.0


@dataclass(frozen=True)
class RunShape:
    """What a run's memory and time depend on: the model's shape and the row counts."""

    d_model: int
    d_vocab: int
    n_params: int
    bytes_per_value: int = 4  # float32
    collect_rows: int = 0  # rows collected to stores (all stores)
    store_layers: int = 1  # layers a collected row keeps (the widest store)
    collect_batch: int = 16
    shard_rows: int = 256
    readout_rows: int = 0  # steered readouts (activation level)
    gen_tokens: int = 0  # generated tokens (text level and calibration)
    gen_batch: int = 48  # generation rows per batch
    new_tokens: int = 32  # answer length of the text level

    @property
    def weights_mb(self) -> float:
        return self.n_params * self.bytes_per_value / MIB


@dataclass(frozen=True)
class Estimate:
    """A run's estimated peak resident memory (MiB), its parts, and its time (seconds)."""

    peak_mb: float
    parts_mb: dict[str, float]
    seconds: float


def estimate_run(shape: RunShape) -> Estimate:
    """Peak resident memory and time of a run of ``shape`` (rough). The peak is the runtime,
    the weights and the larger of two stages (float32 logits and activations):

    * collection: one shard of ``shard_rows x store_layers x d_model`` and its stacked copy,
      plus one batch's forward buffers (``collect_batch x TOKENS_PER_ROW x 4 d_model``);
    * text level: one generation batch's logits with its KV cache, or the scoring pass's logits,
      with the allocator's slack between them (``2 x gen_batch x (new_tokens + 1) x d_vocab``),
      and one answer's log-probs (``(new_tokens + 1) x d_vocab``); a batch's answers are
      scored right after it is generated, so no steered logits wait beyond one batch.

    The time is ``SECONDS_PER_MPARAM`` x millions of parameters x the work of each stage.
    """
    b, mb = 4, MIB  # activations and logits are kept in float32 whatever the weights' dtype
    shard = 2 * shape.shard_rows * shape.store_layers * shape.d_model * b / mb
    forward = shape.collect_batch * TOKENS_PER_ROW * 4 * shape.d_model * b / mb
    steps = shape.new_tokens + 1
    batch = (2 * shape.gen_batch + 1) * steps * shape.d_vocab * b / mb
    parts = {
        "runtime": RUNTIME_MB,
        "weights": shape.weights_mb,
        "collection": shard + forward,
        "text level": batch if shape.gen_tokens else 0.0,
    }
    peak = parts["runtime"] + parts["weights"] + max(parts["collection"], parts["text level"])
    rate = SECONDS_PER_MPARAM
    work = (
        rate["collect"] * shape.collect_rows
        + rate["readout"] * shape.readout_rows
        + rate["token"] * shape.gen_tokens
    )
    return Estimate(peak, parts, shape.n_params / 1e6 * work)


def dct_readout_rows(settings: DCTSettings, n_prompts: int, n_labels: int = 1) -> int:
    """Readout-equivalent rows of learning DCT vectors on ``n_prompts`` prompts and mapping them
    to labels there: one unsteered pass, ``steps + 1`` objective evaluations of ``K`` rows per
    prompt, each a forward and a backward pass (:data:`DCT_ROW_READOUTS` readouts), and the
    mapping's ``2 K + 1`` steered readouts per prompt; ``K`` is ``n_vectors`` raised to
    ``n_labels``, as a comparison learns them."""
    k = max(settings.n_vectors, n_labels)
    fit = (settings.steps + 1) * k * DCT_ROW_READOUTS + 1
    return int(n_prompts * (fit + 2 * k + 1))


@dataclass(frozen=True)
class ComparisonWork:
    """What one comparison computes: steered readout rows (activation level, and the DCT
    vectors' learning when compared) and generated tokens (calibration and text level)."""

    readout_rows: int
    gen_tokens: int
    text_rows: int  # generated answers of the text level (0 without it)


def comparison_work(
    c: ComparisonConfig,
    labels: Sequence[str],
    *,
    n_calib: int,
    n_eval: int,
    n_gen: int,
    text: bool = True,
    reread_calib: bool = False,
) -> ComparisonWork:
    """The work of one :func:`~ks_lens.comparison.run_comparison` under ``c`` (``text``: with
    the text level; ``reread_calib``: the activation level also reads the calibration questions,
    as a layer sweep does)."""
    from ks_lens.comparison import plan_comparison, uses_dct

    plan = plan_comparison(labels, c, n_calib=n_calib, n_test=n_gen)
    methods = len(c.methods)
    curve = len(plan.curve_cells(c.curve_cells_per_question)) * (len(c.curve_factors) - 1)
    text_rows = n_gen + (len(plan.gen_cells) + curve) * methods if text else 0
    # the instructed reference row: one more answer per text cell, one readout per question
    # and combination (counted like a method's: its shared system-prompt prefix runs once)
    text_rows += len(plan.gen_cells) if c.instructed and text else 0
    # a calibration evaluates each cell and method at a few alphas (3-4 with the power-law steps)
    calib_tokens = len(plan.calib_cells) * methods * 4 * c.calib_tokens
    read = (n_eval + (n_calib if reread_calib else 0)) * len(plan.act_combos) * methods
    read += n_eval * len(plan.act_combos) if c.instructed else 0
    if uses_dct(c):
        read += dct_readout_rows(c.dct, n_calib, len(labels))
    return ComparisonWork(read, text_rows * c.max_new_tokens + calib_tokens, text_rows)


def run_shape(
    cfg: PipelineConfig, model: Model, labels: Sequence[str], n_gold_texts: int, store_layers: int
) -> RunShape:
    """The row counts of a run of ``cfg`` (as :func:`~ks_lens.pipeline.prepare` and the
    comparison plan them; ``store_layers``: the widest store's layers) and the model's shape."""
    c, k = cfg.comparison, len(labels)
    n_gold = n_gold_texts if cfg.n_gold is None else min(cfg.n_gold, n_gold_texts)
    collect = cfg.n_evaluator * (k + cfg.evaluator_combos_per_question) + n_gold
    if cfg.probe_source == "prompt":
        collect += cfg.n_train * k
    work = comparison_work(c, labels, n_calib=cfg.n_calib, n_eval=cfg.n_eval, n_gen=cfg.n_gen)
    first = next(model.parameters())
    return RunShape(
        d_model=int(model.cfg.d_model),
        d_vocab=int(model.cfg.d_vocab),
        n_params=sum(p.numel() for p in model.parameters()),
        bytes_per_value=first.element_size(),
        collect_rows=collect,
        store_layers=store_layers,
        collect_batch=cfg.batch_size,
        readout_rows=work.readout_rows,
        gen_tokens=work.gen_tokens,
        gen_batch=c.gen_batch_size,
        new_tokens=c.max_new_tokens,
    )


def add_work(shape: RunShape, *works: ComparisonWork) -> RunShape:
    """``shape`` with the readouts and generated tokens of ``works`` added (a study's own
    comparisons beside the run's)."""
    return replace(
        shape,
        readout_rows=shape.readout_rows + sum(w.readout_rows for w in works),
        gen_tokens=shape.gen_tokens + sum(w.gen_tokens for w in works),
    )


def check_memory(est: Estimate, *, available_mb: float | None, held_mb: float | None) -> None:
    """Refuse a run whose estimated peak exceeds what this process holds plus what is available,
    naming the options that lower the largest part."""
    if available_mb is None:
        return
    room = available_mb + (held_mb or 0.0)
    if est.peak_mb <= room:
        return
    largest = max(("collection", "text level"), key=lambda k: est.parts_mb[k])
    lower = {
        "text level": "--gen-batch-size (generation rows per batch; 16 needs a third of 48's "
        "logits) or --max-new-tokens",
        "collection": "--batch-size (rows per forward pass when collecting)",
    }[largest]
    raise ConfigError(
        f"this run needs about {est.peak_mb / 1024:.1f} GiB of memory at its peak ("
        + ", ".join(f"{k} {v / 1024:.2f}" for k, v in est.parts_mb.items())
        + f" GiB), but only {room / 1024:.1f} GiB are available. The {largest} is the largest "
        f"part: lower {lower}; --dtype bfloat16 halves the weights. --no-memory-check runs anyway."
    )


__all__ = [
    "ComparisonWork",
    "Estimate",
    "RunShape",
    "add_work",
    "available_memory_mb",
    "check_memory",
    "comparison_work",
    "dct_readout_rows",
    "estimate_run",
    "peak_rss_mb",
    "record_memory",
    "rss_mb",
    "run_shape",
    "timed_stage",
]
