"""Grouped-query attention on the plain-HF fast path (ks_lens._runtime.attention)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

import ks_lens as ks
from ks_lens._runtime.attention import GROUPED, grouped_attention, grouped_attention_for
from ks_lens._runtime.hf_path import hf_modules, plain_forward


def _qkv(batch=3, heads=6, kv_heads=2, q_len=5, k_len=9, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=g)
    # eager-style additive mask: causal over the last q_len keys, row 0 left padded by 2
    mask = torch.zeros(batch, 1, q_len, k_len)
    causal = torch.triu(torch.ones(q_len, k_len, dtype=torch.bool), diagonal=k_len - q_len + 1)
    mask[:, :, causal] = torch.finfo(torch.float32).min
    mask[0, :, :, :2] = torch.finfo(torch.float32).min
    return q, k, v, mask


class _Module(torch.nn.Module):
    pass


def test_grouped_attention_equals_eager_attention():
    module = _Module().eval()
    module.num_key_value_groups = 3
    q, k, v, mask = _qkv()
    want, want_w = modeling_llama.eager_attention_forward(module, q, k, v, mask, 0.3)
    got, got_w = grouped_attention(module, q, k, v, mask, 0.3)
    assert got.shape == want.shape == (3, 5, 6, 8)
    assert got_w.shape == want_w.shape == (3, 6, 5, 9)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-6)
    # the padded keys get no weight, for every query head of row 0
    assert float(got_w[0, :, :, :2].abs().max()) == 0.0


def test_grouped_attention_one_query_and_no_mask():
    module = _Module().eval()
    module.num_key_value_groups = 3
    q, k, v, _ = _qkv(q_len=1)
    want, _ = modeling_llama.eager_attention_forward(module, q, k, v, None, 0.125)
    got, _ = grouped_attention(module, q, k, v, None, 0.125)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_soft_capped_call_goes_to_the_modules_own_eager_function(monkeypatch):
    """A keyword that changes eager attention (here a soft cap) is not grouped."""
    module = modeling_llama.LlamaAttention.__new__(modeling_llama.LlamaAttention)
    torch.nn.Module.__init__(module)
    seen = []

    def eager(*args, **kwargs):
        seen.append(kwargs)
        return "eager"

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", eager)
    q, k, v, mask = _qkv()
    assert grouped_attention(module, q, k, v, mask, 0.3, softcap=50.0) == "eager"
    assert seen == [{"softcap": 50.0}]


def test_fast_path_switches_attention_only_inside_and_restores(tiny_model):
    config = tiny_model.original_model.config
    assert config._attn_implementation == "eager"
    with hf_modules(tiny_model) as plain:
        assert plain and config._attn_implementation == GROUPED
        with grouped_attention_for(tiny_model.original_model) as again:
            assert not again  # nested: left as it is
        assert config._attn_implementation == GROUPED
    assert config._attn_implementation == "eager"
    with pytest.raises(RuntimeError, match="boom"), hf_modules(tiny_model):
        raise RuntimeError("boom")
    assert config._attn_implementation == "eager"


def test_fast_path_logits_equal_eager_logits(tiny_model):
    """Grouped attention (the tiny model has 4 query heads on 2 key/value heads) gives the
    eager path's logits within float rounding, on a left-padded batch."""
    batch = ks.tokenize_chat(tiny_model, ["hello there", "a much longer question about rivers"])
    with torch.no_grad():
        got = plain_forward(tiny_model, batch.input_ids, attention_mask=batch.attention_mask)
        want = tiny_model.original_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits
    assert got is not None
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    assert not torch.equal(got, torch.zeros_like(got))


def test_sdpa_model_is_left_alone():
    hf = _Module()
    hf.config = type("C", (), {"_attn_implementation": "sdpa"})()
    with grouped_attention_for(hf) as switched:
        assert not switched and hf.config._attn_implementation == "sdpa"
