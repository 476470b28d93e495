"""``ks-lens info`` (versions, machine, cache; a model's hook points and a sample reply) and
``ks-lens models`` (the named models)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ks_lens.cli.common import Model
from ks_lens.models import ModelOptions


@dataclass(frozen=True)
class InfoOptions:
    """Versions, machine and cache; with --model, also that model's hook points and a sample reply."""

    model: Model = field(default_factory=lambda: ModelOptions(model=""))
    prompt: str = "What is the capital of France? Answer in one sentence."  # for the sample reply
    system: str | None = None  # system prompt of the sample reply
    max_new_tokens: int = 32


def cmd_info(o: InfoOptions) -> int:
    from ks_lens.compat import versions
    from ks_lens.models.packaged import cache_root
    from ks_lens.utils import machine_info, package_version

    print(f"ks-lens {package_version()}")  # ks_lens.__version__ (only ks_lens.cli imports the root)
    for k, v in versions().items():
        print(f"  {k:17s} {v}")
    for k, v in machine_info().items():
        print(f"  {k:17s} {v}")
    print(f"  {'cache':17s} {cache_root()}")
    if not o.model.model:
        return 0
    from ks_lens.generation import generate
    from ks_lens.models import model_signature
    from ks_lens.models.chat import ChatPrompt, tokenize_chat

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
