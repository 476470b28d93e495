"""The one batching iterator (sort by length, left pad, scatter back) and the one recorder."""

from __future__ import annotations

import pytest
import torch

import ks_lens as ks
from ks_lens._runtime.batching import Recording, record_activations, scatter, sorted_batches
from ks_lens.errors import ConfigError, HookPointError
from ks_lens.models import pad_token_id
from ks_lens.models.chat import encode_chat

SEQS = [[5, 6, 7], [1], [2, 3, 4, 5, 6], [8, 9], [4], [7, 7, 7]]


def test_sorted_batches_sorts_by_length_and_pads_left():
    got = list(sorted_batches(SEQS, 2, pad_id=0))
    order = [i for idx, _ in got for i in idx]
    assert sorted(order) == list(range(len(SEQS)))
    # shortest first, ties by index: the order every caller used to write out by hand
    assert order == sorted(range(len(SEQS)), key=lambda i: (len(SEQS[i]), i)) == [1, 4, 3, 0, 5, 2]
    assert [len(idx) for idx, _ in got] == [2, 2, 2]
    for idx, batch in got:
        width = max(len(SEQS[i]) for i in idx)
        assert batch.input_ids.shape == (len(idx), width)
        for j, i in enumerate(idx):
            n_pad = width - len(SEQS[i])
            assert batch.input_ids[j, n_pad:].tolist() == SEQS[i]  # real tokens at the right
            assert batch.input_ids[j, :n_pad].tolist() == [0] * n_pad
            assert batch.attention_mask[j].tolist() == [0] * n_pad + [1] * len(SEQS[i])


def test_scatter_restores_the_input_order():
    out = torch.full((len(SEQS),), -1)
    lists: list[list[int] | None] = [None] * len(SEQS)
    for idx, batch in sorted_batches(SEQS, 4, pad_id=0):
        scatter(out, idx, batch.lengths)
        scatter(
            lists,
            idx,
            [batch.input_ids[j][batch.attention_mask[j].bool()].tolist() for j in range(len(idx))],
        )
    assert out.tolist() == [len(s) for s in SEQS]
    assert lists == SEQS
    with pytest.raises(ValueError, match="2 values for 1 rows"):
        scatter(lists, [0], [1, 2])


def test_sorted_batches_subsets_tiebreaks_and_empty_input():
    assert list(sorted_batches([], 3, pad_id=0)) == []
    assert list(sorted_batches(SEQS, 3, pad_id=0, rows=[])) == []
    sub = [idx for idx, _ in sorted_batches(SEQS, 10, pad_id=0, rows=[5, 0, 2])]
    assert sub == [[0, 5, 2]]
    # the tiebreak orders rows of equal length (here: index descending)
    tied = [idx for idx, _ in sorted_batches(SEQS, 10, pad_id=0, tiebreak=lambda i: -i)]
    assert tied == [[4, 1, 3, 5, 0, 2]]
    with pytest.raises(ConfigError, match="batch_size"):
        list(sorted_batches(SEQS, 0, pad_id=0))


def test_batches_of_chat_prompts_match_the_prompts_run_alone(tiny_model):
    """Left padding with masks: a row's last-token activation does not depend on its batch."""
    tok = tiny_model.tokenizer
    prompts = ["Hi", "Why is the sky blue at noon?", "How do I boil an egg?"]
    ids = [encode_chat(tok, p) for p in prompts]
    assert ids[0] == ks.tokenize_chat(tiny_model, "Hi").input_ids[0].tolist()
    hook = "blocks.2.hook_resid_post"
    batched = torch.empty(len(prompts), tiny_model.cfg.d_model)
    for idx, batch in sorted_batches(ids, 2, pad_id=pad_token_id(tok)):
        with torch.no_grad(), record_activations(tiny_model, hook, last_token=True) as rec:
            tiny_model(**batch)
        scatter(batched, idx, rec[hook])
    for i, p in enumerate(prompts):
        with torch.no_grad(), record_activations(tiny_model, hook, last_token=True) as rec:
            tiny_model(**ks.tokenize_chat(tiny_model, p))
        torch.testing.assert_close(batched[i], rec[hook][0], atol=1e-5, rtol=1e-5)


def _n_hooks(model, name: str) -> int:
    return len(model.hook_dict[name]._forward_hooks)


def test_record_activations_positions_and_hook_removal(tiny_model):
    batch = ks.tokenize_chat(tiny_model, ["Hello there", "Why is the sky blue?"])
    names = ["blocks.1.hook_resid_post", "blocks.2.attn.hook_z"]
    before = [_n_hooks(tiny_model, n) for n in names]
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(**batch, names_filter=names)
        with record_activations(tiny_model, names) as full:
            tiny_model(**batch)
            assert [_n_hooks(tiny_model, n) for n in names] == [b + 1 for b in before]
        with record_activations(tiny_model, names, last_token=True) as last:
            tiny_model(**batch)
        with record_activations(
            tiny_model, names[0], reduce=lambda a, name: a[:, 1:3].sum(1)
        ) as red:
            tiny_model(**batch)
    assert isinstance(full, Recording) and list(full) == names and not full.missing
    for n in names:
        torch.testing.assert_close(full[n], cache[n])
        torch.testing.assert_close(last[n], cache[n][:, -1])
        assert not full[n].requires_grad
    torch.testing.assert_close(red[names[0]], cache[names[0]][:, 1:3].sum(1))
    assert [_n_hooks(tiny_model, n) for n in names] == before
    # removed: a later forward pass records nothing more
    del full[names[0]]
    with torch.no_grad():
        tiny_model(**batch)
    assert names[0] not in full and full.missing == [names[0]]


def test_record_activations_removes_hooks_on_exceptions(tiny_model):
    name = "blocks.1.hook_resid_post"
    before = _n_hooks(tiny_model, name)
    batch = ks.tokenize_chat(tiny_model, "Hello")

    def boom(a: torch.Tensor, name: str) -> torch.Tensor:
        raise RuntimeError("from inside the hook")

    with pytest.raises(RuntimeError, match="inside the hook"), torch.no_grad():
        with record_activations(tiny_model, name, reduce=boom, stop=True):
            tiny_model(**batch)
    assert _n_hooks(tiny_model, name) == before
    with pytest.raises(KeyError, match="from the body"):
        with record_activations(tiny_model, name):
            raise KeyError("from the body")
    assert _n_hooks(tiny_model, name) == before
    with pytest.raises(HookPointError, match="cannot collect at.*use_hook_mlp_in is False"):
        with record_activations(tiny_model, ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_in"]):
            pass
    assert _n_hooks(tiny_model, name) == before


def test_record_activations_stops_the_forward_once_all_fired(tiny_model):
    batch = ks.tokenize_chat(tiny_model, ["Hello", "How are you today?"])
    early = ["blocks.1.hook_resid_post", "blocks.0.hook_resid_pre"]
    late = "blocks.3.hook_resid_post"
    after_forward = []
    with torch.no_grad(), record_activations(tiny_model, late) as outer:
        with record_activations(tiny_model, early, last_token=True, stop=True) as rec:
            tiny_model(**batch)
            after_forward.append(True)  # skipped: the pass ended inside the call
    assert rec.stopped and not after_forward and set(rec) == set(early)
    assert late not in outer  # nothing after blocks.1 ran
    # without stop the pass runs to the end
    with torch.no_grad(), record_activations(tiny_model, late) as outer:
        with record_activations(tiny_model, early, last_token=True) as rec2:
            logits = tiny_model(**batch)
    assert not rec2.stopped and late in outer and logits.shape[:2] == batch.input_ids.shape
    for n in early:
        torch.testing.assert_close(rec[n], rec2[n])
    # another recorder's stop passes through an inner one untouched
    with torch.no_grad(), record_activations(tiny_model, early[0], stop=True) as stopper:
        with record_activations(tiny_model, late) as inner:
            tiny_model(**batch)
    assert stopper.stopped and not inner.stopped and late not in inner
    # hook points that never fire: no stop, and `missing` says which
    with torch.no_grad():
        with record_activations(
            tiny_model, [early[0], "blocks.0.attn.hook_hidden_states"], stop=True
        ) as rec3:
            tiny_model(**batch)
    assert not rec3.stopped and rec3.missing == ["blocks.0.attn.hook_hidden_states"]
