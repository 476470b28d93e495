"""Interleaved A/B timings of issue 23's sixth speed round, on the default model, in one process.

Each pair runs the same work with a fast path on and off, alternately (``--repeats`` times), so
that drifts in the machine's speed (which change whole-demo wall times by 10-30 % on the
2-core CI machine) hit both sides alike. Prints the mean seconds of each side, their ratio and
whether the outputs agree:

- ``readout``: ``readout_groups`` of 32 test questions x 3 steering configurations
  (``positions="all"``), the prompts' shared start run once per configuration
  (``SteeredPrefix``) or with every prompt whole;
- ``attention``: ``ks.generate`` on 96 prompts (batches of 48, 32 tokens), grouped-query attention
  on the fast path or Hugging Face's eager attention.

Run: ``python benchmarks/fast_paths_ab.py [--repeats 2]`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

import ks_lens as ks
from ks_lens._runtime import hf_path
from ks_lens.evaluation import readouts
from ks_lens.evaluation.shared_prefix import SteeredPrefix
from ks_lens.steering import SteeringSpec


def _pieces(model: Any) -> tuple[list[str], list[Any]]:
    data = ks.load_dataset("tones")
    acts = ks.collect_activations(model, data.split("train").head(2), layers=[18], progress=False)
    vectors = ks.SteeringVectors.fit(acts, 18)
    probe = ks.train_probes(acts, config=ks.ProbeConfig(epochs=2, hidden=16))[18]
    questions = [q.text for q in data.split("test").questions]
    steerings = [
        None,
        (ks.CAA(vectors), SteeringSpec(("casual",), (), 2.0)),
        (ks.KSteering(probe), SteeringSpec(("casual", "concise"), (), 30.0)),
    ]
    return questions, steerings


@contextlib.contextmanager
def _no_grouped_attention(hf: Any) -> Iterator[bool]:
    yield False


def _pair(
    name: str, run: Callable[[], Any], off: Callable[[], Any], same: Callable[[Any, Any], str]
) -> None:
    """Time ``run`` with the fast path on and with ``off()`` (a context that turns it off)."""
    times: dict[str, list[float]] = {"on": [], "off": []}
    outs: dict[str, Any] = {}
    for _ in range(ARGS.repeats):
        for side in ("on", "off"):
            ctx = off() if side == "off" else contextlib.nullcontext()
            with ctx:
                t = time.perf_counter()
                outs[side] = run()
                times[side].append(time.perf_counter() - t)
    on, off_ = (sum(times[s]) / len(times[s]) for s in ("on", "off"))
    print(
        f"{name:10s} on {on:6.2f} s  off {off_:6.2f} s  on/off {on / off_:.3f}  "
        f"({', '.join(f'{a:.2f}/{b:.2f}' for a, b in zip(times['on'], times['off'], strict=True))})"
        f"  {same(outs['on'], outs['off'])}",
        flush=True,
    )


def _patched(obj: Any, attr: str, value: Any) -> Callable[[], Any]:
    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        saved = getattr(obj, attr)
        setattr(obj, attr, value)
        try:
            yield
        finally:
            setattr(obj, attr, saved)

    return ctx


def main() -> None:
    model = ks.load_model()
    questions, steerings = _pieces(model)
    ev = ks.train_probes(
        ks.collect_activations(
            model, ks.load_dataset("tones").split("train").head(2), layers=[22], progress=False
        ),
        config=ks.ProbeConfig(epochs=2, hidden=16),
    )[22]

    def readout() -> Any:
        return readouts.readout_groups(model, questions[:32], steerings, probe=ev, batch_size=16)

    def probs_diff(a: Any, b: Any) -> str:
        d = max(float((x.probs - y.probs).abs().max()) for x, y in zip(a, b, strict=True))
        return f"max |probability difference| {d:.1e}"

    no_start = classmethod(lambda cls, reader, ids, batch_size: None)
    _pair("readout", readout, _patched(SteeredPrefix, "build", no_start), probs_diff)

    prompts = [
        f"Question {i}: how should I plan a weekend trip with {i} friends{' and a dog' * (i % 5)}?"
        for i in range(96)
    ]

    def gen() -> Any:
        return ks.generate(model, prompts, max_new_tokens=32, batch_size=48)

    def tokens_same(a: Any, b: Any) -> str:
        same = sum(x == y for x, y in zip(a.output_ids, b.output_ids, strict=True))
        return f"same tokens {same}/{len(prompts)}"

    off = _patched(hf_path, "grouped_attention_for", _no_grouped_attention)
    _pair("attention", gen, off, tokens_same)
    print(f"torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="on/off pairs per benchmark")
    ARGS = parser.parse_args()
    main()
