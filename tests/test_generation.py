from __future__ import annotations

import torch

import ks_lens as ks
from ks_lens.generation import generate


def test_greedy_generation_matches_across_batch_sizes_and_keeps_order(tiny_model):
    prompts = ["hi?", "a much longer question about many things?", "mid length one?"]
    a = generate(tiny_model, prompts, max_new_tokens=6, batch_size=3)
    b = generate(tiny_model, prompts, max_new_tokens=6, batch_size=1)
    assert a.output_ids == b.output_ids and a.texts == b.texts
    assert len(a) == 3 and all(len(ids) <= 6 for ids in a.output_ids)
    for p, ids in zip(prompts, a.prompt_ids, strict=True):
        assert (
            ids
            == tiny_model.tokenizer(
                ks.format_chat(tiny_model.tokenizer, p), add_special_tokens=False
            )["input_ids"]
        )


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_model):
    prompts = ["hi?", "tell me something?"]
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    a = generate(tiny_model, prompts, max_new_tokens=8, do_sample=True, seed=3)
    assert torch.equal(torch.rand(1), expected_next)
    b = generate(tiny_model, prompts, max_new_tokens=8, do_sample=True, seed=3)
    c = generate(tiny_model, prompts, max_new_tokens=8, do_sample=True, seed=4)
    assert a.output_ids == b.output_ids
    assert a.output_ids != c.output_ids


def test_generation_input_errors(tiny_model):
    import pytest

    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny_model, ["hi?"], max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        generate(tiny_model, ["hi?"], batch_size=0)
    assert len(generate(tiny_model, [])) == 0


def test_a_single_string_is_one_prompt(tiny_model):
    import pytest

    one = generate(tiny_model, "Hello", max_new_tokens=3)
    listed = generate(tiny_model, ["Hello"], max_new_tokens=3)
    assert len(one) == 1 and one.output_ids == listed.output_ids
    assert (
        len(generate(tiny_model, ks.ChatPrompt("Hello", system="Be brief."), max_new_tokens=2)) == 1
    )
    assert ks.tokenize_chat(tiny_model, "Hello").input_ids.shape[0] == 1
    assert torch.equal(
        ks.tokenize_chat(tiny_model, "Hello").input_ids,
        ks.tokenize_chat(tiny_model, ["Hello"]).input_ids,
    )
    with pytest.raises(ks.ConfigError, match="non-empty user message"):
        generate(tiny_model, "")


def test_prompts_longer_than_the_context_window_are_refused_before_compute(tiny_model, monkeypatch):
    import pytest

    assert tiny_model.cfg.n_ctx == 1024
    calls = []
    monkeypatch.setattr(
        tiny_model.original_model, "generate", lambda *a, **k: calls.append(1)
    )  # must never be reached
    long = "word " * 1100  # one token per byte: far beyond 1024
    with pytest.raises(
        ks.ContextLengthError,
        match=r"prompt 2 of 2 has \d+ tokens, more than the model's context window of 1024",
    ):
        generate(tiny_model, ["short?", long])
    fits = "x" * 990  # fits alone, but not with 64 new tokens
    with pytest.raises(
        ks.ContextLengthError,
        match=r"the prompt \((\d+) tokens\) plus max_new_tokens=64 .* lower max_new_tokens to at most",
    ):
        generate(tiny_model, fits, max_new_tokens=64)
    with pytest.raises(ks.ContextLengthError, match="context window of 1024"):
        ks.tokenize_chat(tiny_model, long)
    assert calls == []
