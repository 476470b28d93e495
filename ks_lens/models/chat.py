"""Chat formatting and batched tokenization (left padding, correct attention masks).

Text produced by a chat template already starts with the model's BOS-like token
(``<|im_start|>`` for SmolLM2), so tokenization here never adds special tokens: no double BOS.
Batches are LEFT padded, so the last real token of every row is at position ``-1`` and
generation appends directly after it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int

from ks_lens.errors import ConfigError, ContextLengthError, MissingKeyError, WrongTypeError
from ks_lens.models.loading import model_device, pad_token_id
from ks_lens.types import Model


@dataclass(frozen=True)
class ChatPrompt:
    """One conversation turn to feed the model.

    ``system=None`` keeps the model's own default system prompt (if its template has one);
    ``assistant`` is an answer prefix: the text is formatted as if the assistant had already
    said it (used to re-encode generated answers).
    """

    user: str
    system: str | None = None
    assistant: str | None = None


@dataclass
class TokenBatch:
    """Left-padded token ids and attention mask (1 on real tokens, 0 on padding).

    Pass both to the model; ``**batch`` does it::

        logits = model(**batch)                 # = model(batch.input_ids, attention_mask=batch.attention_mask)
        logits, cache = model.run_with_cache(**batch, names_filter="blocks.3.hook_resid_post")

    Always pass the attention mask with a left-padded batch: without it the padding is attended
    to and rows differ from the same prompt run alone.
    """

    input_ids: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]

    def keys(self) -> tuple[str, str]:
        """``model(**batch)`` unpacks to ``input=input_ids, attention_mask=attention_mask``."""
        return ("input", "attention_mask")

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in ("input", "input_ids"):
            return self.input_ids
        if key == "attention_mask":
            return self.attention_mask
        raise MissingKeyError(
            f"TokenBatch has input_ids (alias 'input') and attention_mask, not {key!r}"
        )

    @property
    def lengths(self) -> Int[torch.Tensor, " batch"]:
        return self.attention_mask.sum(dim=1)

    @property
    def n_pad(self) -> Int[torch.Tensor, " batch"]:
        return self.attention_mask.shape[1] - self.lengths

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> TokenBatch:
    """Left-pad token id lists into a :class:`TokenBatch` (mask 0 on padding)."""
    if len(seqs) == 0:
        raise ConfigError("cannot pad an empty batch")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    batch = TokenBatch(ids, mask)
    return batch.to(device) if device is not None else batch


def get_tokenizer(model_or_tokenizer: Any) -> Any:
    return getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer


def format_chat(tokenizer: Any, prompt: ChatPrompt | str) -> str:
    """Render ``prompt`` with the tokenizer's chat template, ending where the assistant speaks.

    With ``prompt.assistant`` set, the answer text follows the generation prompt verbatim (no
    end-of-turn token), so the last token is the answer's last token.
    """
    tokenizer = get_tokenizer(tokenizer)
    if isinstance(prompt, str):
        prompt = ChatPrompt(user=prompt)
    if not isinstance(prompt.user, str) or not prompt.user.strip():
        raise ConfigError("a chat prompt needs a non-empty user message")
    messages = []
    if prompt.system is not None:
        messages.append({"role": "system", "content": prompt.system})
    messages.append({"role": "user", "content": prompt.user})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        # Base models without a template: a plain, documented fallback format.
        sys_part = f"{prompt.system}\n\n" if prompt.system else ""
        text = f"{sys_part}User: {prompt.user}\nAssistant:"
        if tokenizer.bos_token:
            text = tokenizer.bos_token + text
        if prompt.assistant is not None:
            text += " "
    if prompt.assistant is not None:
        text += prompt.assistant
    return str(text)


def encode_chat(tokenizer: Any, prompt: ChatPrompt | str) -> list[int]:
    """The token ids of ``prompt`` rendered by :func:`format_chat` (no special tokens added: the
    template already starts with the model's BOS-like token)."""
    tokenizer = get_tokenizer(tokenizer)
    return list(tokenizer(format_chat(tokenizer, prompt), add_special_tokens=False)["input_ids"])


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], *, device: torch.device | str | None = None
) -> TokenBatch:
    """Tokenize already-formatted texts into a left-padded batch (no special tokens added)."""
    tokenizer = get_tokenizer(tokenizer)
    if isinstance(texts, str):
        raise WrongTypeError("tokenize_texts takes a sequence of strings, not one string")
    if len(texts) == 0:
        raise ConfigError("cannot tokenize an empty batch")
    enc = tokenizer(
        list(texts),
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=False,
    )
    batch = TokenBatch(enc["input_ids"], enc["attention_mask"])
    return batch.to(device) if device is not None else batch


def as_prompt_list(
    prompts: Sequence[ChatPrompt | str] | ChatPrompt | str,
) -> list[ChatPrompt | str]:
    """A single string or :class:`ChatPrompt` is one prompt (not one prompt per character).

    Raises:
        WrongTypeError: ``prompts`` is neither a prompt nor a sequence (or iterator) of them
            (``None``, a number, a set, ``[1, 2]``, ...).
    """
    if isinstance(prompts, (str, ChatPrompt)):
        return [prompts]
    if not isinstance(prompts, (Sequence, Iterator)) or isinstance(prompts, bytes):
        raise WrongTypeError(
            "prompts must be a string, a ChatPrompt or a sequence of them, got "
            f"{type(prompts).__name__}"
        )
    out = list(prompts)
    for i, p in enumerate(out):
        if not isinstance(p, (str, ChatPrompt)):
            raise WrongTypeError(
                f"prompts[{i}] is {type(p).__name__} ({p!r:.40}), not a string or a ChatPrompt"
            )
    return out


def context_window(model: Model) -> int | None:
    """The model's context window in tokens (``cfg.n_ctx``), or ``None`` if unknown."""
    n = getattr(getattr(model, "cfg", None), "n_ctx", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_context(
    model: Model, n_tokens: int, max_new_tokens: int = 0, what: str = "the prompt"
) -> None:
    """Refuse ``n_tokens`` prompt tokens (plus ``max_new_tokens`` to generate) that do not fit in
    the model's context window: positions beyond it give garbage after minutes of compute."""
    n_ctx = context_window(model)
    if n_ctx is None or n_tokens + max_new_tokens <= n_ctx:
        return
    if n_tokens > n_ctx or max_new_tokens == 0:
        raise ContextLengthError(
            f"{what} has {n_tokens} tokens, more than the model's context window of {n_ctx} "
            "tokens; shorten it"
        )
    raise ContextLengthError(
        f"{what} ({n_tokens} tokens) plus max_new_tokens={max_new_tokens} does not fit in the "
        f"model's context window of {n_ctx} tokens; shorten it or lower max_new_tokens to at "
        f"most {n_ctx - n_tokens}"
    )


def tokenize_chat(
    model_or_tokenizer: Any,
    prompts: Sequence[ChatPrompt | str] | ChatPrompt | str,
    *,
    device: torch.device | str | None = None,
) -> TokenBatch:
    """Format each prompt with the chat template and tokenize them as one left-padded batch.

    A single string or :class:`ChatPrompt` is one prompt. ``device=None`` uses the model's
    device when a model is passed; a model also has its context window checked.
    """
    tok = get_tokenizer(model_or_tokenizer)
    if device is None and hasattr(model_or_tokenizer, "original_model"):
        device = model_device(model_or_tokenizer)
    ids = [encode_chat(tok, p) for p in as_prompt_list(prompts)]
    if not ids:
        raise ConfigError("cannot tokenize an empty batch")
    batch = left_pad(ids, pad_token_id(tok), device)
    if model_or_tokenizer is not tok:
        longest = int(batch.lengths.argmax())
        what = "the prompt" if len(batch) == 1 else f"prompt {longest + 1} of {len(batch)}"
        check_context(model_or_tokenizer, int(batch.lengths[longest]), what=what)
    return batch
