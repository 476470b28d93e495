"""A tiny random-weight Llama-family model built in-process (no files, no network).

``load_model("tiny-random-llama")`` gives a 4-layer, ``d_model = 64`` Llama with grouped-query
attention and a byte-level tokenizer whose chat template matches SmolLM2's
(``<|im_start|>role\\n...<|im_end|>``). It loads in well under a second, so unit tests and
first experiments can exercise every code path; its outputs are of course meaningless text.
Weights are a deterministic function of ``seed``.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_NAME = "tiny-random-llama"
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer() -> Any:
    """Byte-level tokenizer: 3 special tokens + the 256 byte symbols, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(_SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        add_bos_token=True,
    )
    # TransformerLens re-reads the tokenizer's name; it has none, being built in memory.
    tok.init_kwargs["name_or_path"] = TINY_NAME
    return tok


def build_tiny_llama(
    *,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any]:
    """Return ``(hf_model, tokenizer)`` for a random-weight Llama; the global RNG is untouched."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=2048,  # a character tokenizer: room for three joined instructions
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg._name_or_path = TINY_NAME
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = LlamaForCausalLM(cfg)
    model = model.to(dtype=dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
