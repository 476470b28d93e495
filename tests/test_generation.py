from __future__ import annotations

import pytest
import torch
from _marks import needs_bridge_cache

import ks_lens as ks
from ks_lens.compat import bridge_cache_diverges
from ks_lens.errors import VersionError
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


def test_generation_refuses_non_integers_and_wrong_prompt_types(tiny_model):
    # 2.5 used to make 3 tokens and True 1; None and [1, 2] gave raw TypeError/AttributeError
    import numpy as np
    import pytest

    from ks_lens.errors import ConfigError, WrongTypeError

    for kwargs, message in [
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer, got 2.5"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer, got True"),
        ({"batch_size": 1.5}, "batch_size must be an integer, got 1.5"),
        ({"batch_size": False}, "batch_size must be an integer, got False"),
        ({"seed": 0.5}, "seed must be an integer, got 0.5"),
    ]:
        with pytest.raises(WrongTypeError, match=message):
            generate(tiny_model, ["hi?"], **kwargs)
    with pytest.raises(ConfigError, match="seed must be an integer from 0 to 4294967295"):
        generate(tiny_model, ["hi?"], seed=2**64)
    with pytest.raises(WrongTypeError, match="prompts must be a string, a ChatPrompt or a "):
        generate(tiny_model, None)  # type: ignore[arg-type]
    with pytest.raises(WrongTypeError, match=r"prompts\[0\] is int \(1\), not a string"):
        generate(tiny_model, [1, 2])  # type: ignore[list-item]
    with pytest.raises(WrongTypeError, match=r"prompts\[1\] is NoneType"):
        generate(tiny_model, ["hi?", None])  # type: ignore[list-item]
    with pytest.raises(WrongTypeError, match="got set"):  # no order: which answer is which?
        generate(tiny_model, {"hi?", "yo?"})  # type: ignore[arg-type]
    # NumPy integers are integers; an iterator of prompts is a sequence of prompts
    gen = generate(tiny_model, ["hi?"], max_new_tokens=np.int64(2), batch_size=np.int32(1))
    assert len(gen.output_ids[0]) <= 2
    assert generate(tiny_model, iter(["hi?"]), max_new_tokens=2).texts == gen.texts


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

    assert tiny_model.cfg.n_ctx == 2048
    calls = []
    monkeypatch.setattr(
        tiny_model.original_model, "generate", lambda *a, **k: calls.append(1)
    )  # must never be reached
    long = "word " * 1100  # one token per byte: far beyond 2048
    with pytest.raises(
        ks.ContextLengthError,
        match=r"prompt 2 of 2 has \d+ tokens, more than the model's context window of 2048",
    ):
        generate(tiny_model, ["short?", long])
    fits = "x" * 2010  # fits alone, but not with 64 new tokens
    with pytest.raises(
        ks.ContextLengthError,
        match=r"the prompt \((\d+) tokens\) plus max_new_tokens=64 .* lower max_new_tokens to at most",
    ):
        generate(tiny_model, fits, max_new_tokens=64)
    with pytest.raises(ks.ContextLengthError, match="context window of 2048"):
        ks.tokenize_chat(tiny_model, long)
    assert calls == []


# ----------------------------------------------------------------------------- plain HF modules


def _gen_ids(model, full_bridge, ctx=None, **kw):
    import contextlib

    with ctx or contextlib.nullcontext():
        return generate(
            model,
            ["hi?", "a much longer question about many things?"],
            max_new_tokens=8,
            full_bridge=full_bridge,
            **kw,
        ).output_ids


@needs_bridge_cache
def test_plain_hf_modules_give_the_bridge_tokens(tiny_model, tiny_probe, tiny_acts):
    """Greedy tokens through the plain HF modules equal those through every bridge component,
    unsteered and steered (CAA and K-Steering at every position, and at generated ones)."""
    from ks_lens.steering import CAA, KSteering, SteeringVectors

    assert _gen_ids(tiny_model, False) == _gen_ids(tiny_model, True)
    caa = CAA(SteeringVectors.fit(tiny_acts, 2))
    k = KSteering(tiny_probe, steps=2)
    for method, positions in ((caa, "all"), (caa, "generated"), (k, "all"), (k, "last")):

        def ctx(method=method, positions=positions):
            return method.steer(tiny_model, target=["beta"], alpha=3.0, positions=positions)

        steered = _gen_ids(tiny_model, False, ctx())
        assert steered == _gen_ids(tiny_model, True, ctx())
        assert steered != _gen_ids(tiny_model, False)  # the steering did something


def test_plain_hf_modules_route_every_steerable_hook_point(tiny_model):
    """Each block-level hook point fires once per forward under its canonical name with the
    bridge's tensor, and a hook's return value replaces the activation as in the bridge."""
    from ks_lens._runtime.hf_path import hf_modules

    batch = ks.tokenize_chat(tiny_model, ["hi?", "a longer question?"])
    hf = tiny_model.original_model
    kinds = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")

    def run(bypass: bool, edit: str | None):
        seen: dict[str, list[tuple[str, torch.Tensor]]] = {}

        def rec(kind):
            def hook(act, hook):
                seen.setdefault(kind, []).append((hook.name, act.detach().clone()))
                if kind == edit:
                    return act * 0.5 + 1.0
                return None

            return hook

        hooks = [(f"blocks.1.hook_{kind}", rec(kind)) for kind in kinds]
        with torch.no_grad(), tiny_model.hooks(fwd_hooks=hooks):
            with hf_modules(tiny_model, enabled=bypass) as routed:
                assert routed == bypass
                logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return seen, logits

    for edit in (None, "resid_pre", "attn_out", "mlp_out", "resid_post"):
        a, la = run(True, edit)
        b, lb = run(False, edit)
        assert set(a) == set(kinds)
        for kind in kinds:
            assert [n for n, _ in a[kind]] == [n for n, _ in b[kind]]  # names, and once each
            torch.testing.assert_close(a[kind][0][1], b[kind][0][1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    assert a["resid_post"][0][0] == "blocks.1.hook_out"


def test_plain_hf_modules_fall_back_and_restore(tiny_model):
    from ks_lens._runtime.hf_path import can_bypass, hf_modules

    hf = tiny_model.original_model
    before = [(n, type(m).__name__) for n, m in hf.named_modules()]
    # a hook point that cannot be routed (attention pattern): the full bridge runs
    with tiny_model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda a, hook: None)]):
        assert not can_bypass(tiny_model)
        with hf_modules(tiny_model) as routed:
            assert not routed
        if bridge_cache_diverges():  # the bridge would decode wrongly: refused, naming versions
            with pytest.raises(VersionError, match="transformer-lens"):
                _gen_ids(tiny_model, False)
        else:
            assert _gen_ids(tiny_model, False) == _gen_ids(tiny_model, True)
    assert can_bypass(tiny_model)
    # the module tree comes back after an exception inside the block
    try:
        with hf_modules(tiny_model) as routed:
            assert routed
            assert type(hf.model.layers[0]).__name__ == "LlamaDecoderLayer"
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert [(n, type(m).__name__) for n, m in hf.named_modules()] == before


def _shared_prefill_case(tiny_model, tiny_probe, tiny_acts):
    """Two questions, each answered unsteered, with CAA and with K-Steering in one batch."""
    from ks_lens._runtime.batching import left_pad
    from ks_lens.models import pad_token_id
    from ks_lens.models.chat import ChatPrompt, encode_chat
    from ks_lens.steering import CAA, KSteering, SteeringSpec, SteeringVectors

    caa = CAA(SteeringVectors.fit(tiny_acts, 2))
    k = KSteering(tiny_probe, steps=2)
    groups = [None, (caa, SteeringSpec(("beta",), (), 3.0)), (k, SteeringSpec(("alpha",), (), 3.0))]
    tok = tiny_model.tokenizer
    ids = [encode_chat(tok, ChatPrompt(q)) for q in ("hi?", "a much longer question about tides?")]
    rows = [(g, q) for q in range(2) for g in range(3)]
    batch = left_pad([ids[q] for _, q in rows], pad_token_id(tok), None)
    return groups, [g for g, _ in rows], batch


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_shared_prefill_gives_the_full_passes_tokens_and_logits(
    tiny_model, tiny_probe, tiny_acts, positions
):
    """Generation resumed above the layers each distinct prompt runs once gives the tokens and
    per-step logits of full prompt passes, each row steered by its own group."""
    from ks_lens.generation import generate_from_batch, shared_prefill
    from ks_lens.steering.base import steer_groups

    groups, row_group, batch = _shared_prefill_case(tiny_model, tiny_probe, tiny_acts)
    pre = shared_prefill(tiny_model, batch, 2)
    assert pre is not None and pre.layer == 2 and len(pre.kv) == 2
    assert pre.rows.tolist() == [0, 0, 0, 1, 1, 1]  # one pass per question
    assert pre.hidden.shape == (2, batch.input_ids.shape[1], tiny_model.cfg.d_model)
    for n in (1, 6):
        runs = []
        for prefill in (pre, None):
            with steer_groups(tiny_model, groups, row_group, positions=positions):
                runs.append(
                    generate_from_batch(
                        tiny_model, batch, max_new_tokens=n, return_logits=True, prefill=prefill
                    )
                )
        a, b = runs
        assert a.ids == b.ids and a.finished == b.finished
        assert a.logits is not None and b.logits is not None and a.logits.shape == b.logits.shape
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    assert len({tuple(x) for x in b.ids[:3]}) > 1  # the steering changed the answers


def test_shared_prefill_declines_and_refuses(tiny_model, tiny_probe, tiny_acts):
    from ks_lens.errors import ConfigError
    from ks_lens.generation import generate_from_batch, shared_prefill

    _, _, batch = _shared_prefill_case(tiny_model, tiny_probe, tiny_acts)
    assert shared_prefill(tiny_model, batch, None) is None
    assert shared_prefill(tiny_model, batch, 0) is None
    distinct = ks.TokenBatch(batch.input_ids[2:4], batch.attention_mask[2:4])
    assert shared_prefill(tiny_model, distinct, 2) is None  # no prompt repeats
    pre = shared_prefill(tiny_model, batch, 2)
    with pytest.raises(ConfigError, match="greedy decoding"):
        generate_from_batch(tiny_model, batch, max_new_tokens=2, do_sample=True, prefill=pre)


@pytest.mark.parametrize("shared", [True, False])
def test_recorded_layer_inputs_equal_an_unsteered_pass_over_the_answers(
    tiny_model, tiny_probe, tiny_acts, shared
):
    """record_inputs=L returns, per row, the hidden states that entered decoder layer L at each
    kept new token, the last one included: with steering only at L, they equal an unsteered pass
    of prompt + answer up to layer L (an off-by-one token would not)."""
    from ks_lens._runtime.hf_path import layer_input
    from ks_lens.generation import generate_from_batch, shared_prefill
    from ks_lens.steering.base import steer_groups

    groups, row_group, batch = _shared_prefill_case(tiny_model, tiny_probe, tiny_acts)
    pre = shared_prefill(tiny_model, batch, 2) if shared else None
    n_prompt = batch.input_ids.shape[1]
    for n in (1, 6):
        with steer_groups(tiny_model, groups, row_group, positions="all"):
            res = generate_from_batch(
                tiny_model, batch, max_new_tokens=n, return_logits=True, prefill=pre,
                record_inputs=2,
            )
        rec = res.layer_inputs
        assert rec is not None and rec.layer == 2 and len(rec.hidden) == len(res.ids)
        for b, ids in enumerate(res.ids):
            h = rec.hidden[b]
            assert h is not None and h.shape == (len(ids), tiny_model.cfg.d_model)
            if not ids:
                continue
            seq = torch.cat([batch.input_ids[b : b + 1], torch.tensor([ids])], dim=1)
            mask = torch.cat([batch.attention_mask[b : b + 1], torch.ones(1, len(ids))], dim=1)
            from ks_lens.generation import generation_positions

            want, _ = layer_input(
                tiny_model, 2, seq, mask.long(), position_ids=generation_positions(mask.long())
            )
            torch.testing.assert_close(h, want[0, n_prompt:], atol=1e-4, rtol=1e-4)
    assert len({tuple(x) for x in res.ids[:3]}) > 1  # the steering changed the answers


def test_record_inputs_is_validated_and_absent_on_the_bridge(tiny_model):
    from ks_lens.errors import ConfigError
    from ks_lens.generation import generate_from_batch
    from ks_lens.models.chat import ChatPrompt, encode_chat

    ids = torch.tensor([encode_chat(tiny_model.tokenizer, ChatPrompt("hi?"))])
    batch = ks.TokenBatch(ids, torch.ones_like(ids))
    with pytest.raises(ConfigError, match="record_inputs must be a decoder layer >= 1"):
        generate_from_batch(tiny_model, batch, max_new_tokens=2, record_inputs=0)
    res = generate_from_batch(
        tiny_model, batch, max_new_tokens=2, record_inputs=2, full_bridge=True
    )
    assert res.layer_inputs is None and res.logits is None
