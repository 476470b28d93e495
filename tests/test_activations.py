from __future__ import annotations

import json

import pytest
import torch

import ks_lens as ks
from ks_lens import activations as A
from ks_lens.activations import ActivationStore, collect_activations, collect_to_store
from ks_lens.activations import collect as collect_module
from ks_lens.errors import MetadataMismatchError, StoreError
from ks_lens.models.chat import ChatPrompt


def _alone(model, prompt: ChatPrompt, layer: int, kind="resid_post"):
    batch = ks.tokenize_chat(model, [prompt])
    _, cache = model.run_with_cache(batch.input_ids, names_filter=[f"blocks.{layer}.hook_{kind}"])
    return cache[f"blocks.{layer}.hook_{kind}"][0, -1]


def test_last_token_matches_prompt_run_alone(tiny_model, tiny_dataset, tiny_acts):
    assert tiny_acts.acts["resid_post"].shape == (len(tiny_dataset.questions) * 3, 4, 64)
    # rows are question-major, then label; compare a few rows of different lengths
    for row in (0, 4, 11, 35):
        q = tiny_dataset.questions[row // 3]
        label = row % 3
        assert tiny_acts.question_ids[row] == q.id and int(tiny_acts.labels[row]) == label
        ref = _alone(tiny_model, ChatPrompt(q.text, tiny_dataset.behaviours[label].instruction), 2)
        torch.testing.assert_close(tiny_acts.at(2)[row], ref, atol=1e-5, rtol=1e-5)


def test_resid_pre_and_layer_subset(tiny_model, tiny_dataset):
    ds = tiny_dataset.head(3)
    acts = collect_activations(
        tiny_model, ds, layers=[1, 3], hook_kinds=("resid_pre", "resid_post"), progress=False
    )
    assert acts.layers == (1, 3)
    q = ds.questions[0]
    ref = _alone(tiny_model, ChatPrompt(q.text, ds.behaviours[0].instruction), 3, "resid_pre")
    torch.testing.assert_close(acts.at(3, "resid_pre")[0], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(StoreError, match="layer 2 was not collected"):
        acts.at(2)


def test_neutral_and_response_only_modes(tiny_model, tiny_dataset):
    ds = tiny_dataset.head(2)
    neutral = collect_activations(tiny_model, ds, mode="neutral", layers=[2], progress=False)
    assert neutral.labels.tolist() == [-1, -1]
    torch.testing.assert_close(
        neutral.at(2)[1],
        _alone(tiny_model, ChatPrompt(ds.questions[1].text), 2),
        atol=1e-5,
        rtol=1e-5,
    )

    resp = collect_activations(
        tiny_model, ds, mode="response", layers=[2], max_new_tokens=5, progress=False
    )
    only = collect_activations(
        tiny_model,
        ds,
        mode="response-only",
        layers=[2],
        max_new_tokens=5,
        progress=False,
        responses={
            (q, int(lab)): ids
            for q, lab, ids in zip(
                resp.question_ids, resp.labels, resp.meta["answer_ids"], strict=True
            )
        },
    )
    assert resp.texts is not None and only.texts == resp.texts
    # response-only = question + the same answer ids, without the instruction
    tok = tiny_model.tokenizer
    row = 1
    head = tok(ks.format_chat(tok, ChatPrompt(ds.questions[0].text)), add_special_tokens=False)[
        "input_ids"
    ]
    ids = torch.tensor([head + resp.meta["answer_ids"][row]])
    _, cache = tiny_model.run_with_cache(ids, names_filter=["blocks.2.hook_resid_post"])
    torch.testing.assert_close(
        only.at(2)[row], cache["blocks.2.hook_resid_post"][0, -1], atol=1e-5, rtol=1e-5
    )
    # with the instruction it differs
    assert not torch.allclose(only.at(2)[row], resp.at(2)[row])


def test_mean_response_pooling(tiny_model, tiny_dataset):
    ds = tiny_dataset.head(1)
    acts = collect_activations(
        tiny_model,
        ds,
        mode="response-only",
        layers=[1],
        max_new_tokens=4,
        pooling="mean_response",
        progress=False,
    )
    tok = tiny_model.tokenizer
    head = tok(ks.format_chat(tok, ChatPrompt(ds.questions[0].text)), add_special_tokens=False)[
        "input_ids"
    ]
    answer = acts.meta["answer_ids"][0]
    _, cache = tiny_model.run_with_cache(
        torch.tensor([head + answer]), names_filter=["blocks.1.hook_resid_post"]
    )
    ref = (
        cache["blocks.1.hook_resid_post"][0, len(head) :].mean(0)
        if answer
        else cache["blocks.1.hook_resid_post"][0, -1]
    )
    torch.testing.assert_close(acts.at(1)[0], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mean_response"):
        collect_activations(tiny_model, ds, mode="prompt", pooling="mean_response", progress=False)


def test_store_round_trip_is_identical(tiny_model, tiny_dataset, tiny_acts, tmp_path):
    store = collect_to_store(
        tiny_model, tiny_dataset, tmp_path / "s", shard_rows=10, progress=False
    )
    assert store.complete and len(store.meta["shards"]) == 4
    back = store.load()
    assert torch.equal(back.acts["resid_post"], tiny_acts.acts["resid_post"])
    assert back.question_ids == tiny_acts.question_ids and torch.equal(
        back.labels, tiny_acts.labels
    )
    assert back.label_names == tiny_dataset.labels
    sub = store.load(layers=[3, 1])
    assert torch.equal(sub.at(3), tiny_acts.at(3)) and torch.equal(sub.at(1), tiny_acts.at(1))
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    for key in ("model", "dataset", "collect", "hook_names", "versions", "split"):
        assert key in meta
    assert meta["dataset"]["hash"] == tiny_dataset.content_hash()
    # rerunning a complete store is a no-op returning it
    again = collect_to_store(
        tiny_model, tiny_dataset, tmp_path / "s", shard_rows=10, progress=False
    )
    assert again.meta["shards"] == store.meta["shards"]


def test_interrupted_collection_resumes_without_duplicates(
    tiny_model, tiny_dataset, tmp_path, monkeypatch
):
    real = collect_module._collect_chunk
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(collect_module, "_collect_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        collect_to_store(tiny_model, tiny_dataset, tmp_path / "s", shard_rows=8, progress=False)
    partial = ActivationStore(tmp_path / "s")
    assert not partial.complete and partial.n_rows_done == 16
    with pytest.raises(StoreError, match="incomplete"):
        partial.load()
    monkeypatch.setattr(collect_module, "_collect_chunk", real)
    done = collect_to_store(
        tiny_model, tiny_dataset, tmp_path / "s", shard_rows=8, progress=False
    ).load()
    full = collect_to_store(
        tiny_model, tiny_dataset, tmp_path / "ref", shard_rows=8, progress=False
    ).load()
    assert done.question_ids == full.question_ids
    assert len(done) == len(tiny_dataset.questions) * 3
    assert torch.equal(done.acts["resid_post"], full.acts["resid_post"])


def test_truncated_shard_is_detected(tiny_model, tiny_dataset, tmp_path):
    store = collect_to_store(
        tiny_model, tiny_dataset, tmp_path / "s", shard_rows=12, progress=False
    )
    shard = tmp_path / "s" / store.meta["shards"][1]["tensors"]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="truncated or corrupt"):
        ActivationStore(tmp_path / "s").load()
    # same size, flipped bytes: checksum
    shard.write_bytes(data[:-8] + b"\x00" * 8)
    with pytest.raises(StoreError, match="checksum"):
        ActivationStore(tmp_path / "s").load()


def test_store_validation(tiny_model, tiny_dataset, tmp_path):
    store = collect_to_store(tiny_model, tiny_dataset.head(2), tmp_path / "s", progress=False)
    other = ks.load_model("tiny-random-llama", seed=1)
    with pytest.raises(MetadataMismatchError, match="another model.*tiny-random-llama-seed1"):
        store.check_model(other)
    store.check_model(tiny_model)
    with pytest.raises(StoreError, match="other settings.*collect"):
        collect_to_store(
            tiny_model, tiny_dataset.head(2), tmp_path / "s", layers=[0], progress=False
        )
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="not an activation store"):
        collect_to_store(tiny_model, tiny_dataset.head(2), tmp_path / "junk", progress=False)
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore(tmp_path / "nothing")
    (tmp_path / "s" / "meta.json").write_text("{broken")
    with pytest.raises(StoreError, match="not valid JSON"):
        ActivationStore(tmp_path / "s")


def test_collect_argument_errors(tiny_model, tiny_dataset):
    with pytest.raises(ValueError, match="unknown mode"):
        collect_activations(tiny_model, tiny_dataset, mode="prompts", progress=False)
    with pytest.raises(ks.HookPointError, match="out of range"):
        collect_activations(tiny_model, tiny_dataset, layers=[7], progress=False)
    with pytest.raises(ValueError, match="unknown hook kind"):
        collect_activations(tiny_model, tiny_dataset, hook_kinds=("hook_z",), progress=False)


def test_collect_refuses_non_integer_settings_and_seeds_out_of_range(tiny_model, tiny_dataset):
    # issue 22: a seed past 2**64 overflowed inside torch after the store was begun; 1.5 rows
    # per batch or 2.5 new tokens were taken as they came
    for kwargs, error, message in [
        ({"seed": 10**23}, ks.ConfigError, "seed must be an integer from 0 to 4294967295"),
        ({"seed": -1}, ks.ConfigError, "seed must be at least 0, got -1"),
        ({"batch_size": 1.5}, ks.WrongTypeError, "batch_size must be an integer, got 1.5"),
        ({"max_new_tokens": True}, ks.WrongTypeError, "max_new_tokens must be an integer"),
    ]:
        with pytest.raises(error, match=message):
            collect_activations(tiny_model, tiny_dataset, progress=False, **kwargs)


def test_fixed_answers_are_re_encoded_not_generated(tiny_model):
    """Labelled texts (gold answers) flow through response-only collection as given answers:
    the activation equals question + answer encoded by hand, and combined labels give multi-hot
    targets over the base labels."""
    from ks_lens.datasets.gold_texts import LabelledText
    from ks_lens.pipeline import texts_dataset

    texts = (
        LabelledText("t1", "Sure thing, just boil it!", ("alpha",), "q1", "How do I boil an egg?"),
        LabelledText(
            "t2", "Careful: it is hot.", ("alpha", "gamma"), "q1", "How do I boil an egg?"
        ),
    )
    ds = texts_dataset(texts, ("alpha", "beta", "gamma"))
    acts = collect_activations(tiny_model, ds, mode="response-only", layers=[3], progress=False)
    assert acts.texts == ("Sure thing, just boil it!", "Careful: it is hot.")
    assert acts.one_hot().tolist() == [[1, 0, 0], [1, 0, 1]]
    assert acts.base_labels == ("alpha", "beta", "gamma")
    tok = tiny_model.tokenizer
    head = tok(ks.format_chat(tok, ChatPrompt("How do I boil an egg?")), add_special_tokens=False)[
        "input_ids"
    ]
    ids = head + tok("Careful: it is hot.", add_special_tokens=False)["input_ids"]
    _, cache = tiny_model.run_with_cache(
        torch.tensor([ids]), names_filter=["blocks.3.hook_resid_post"]
    )
    torch.testing.assert_close(
        acts.at(3)[1], cache["blocks.3.hook_resid_post"][0, -1], atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="no question"):
        texts_dataset((LabelledText("t3", "x y", ("beta",)),), ("alpha", "beta", "gamma"))


def test_damaged_shards_of_a_complete_store_are_recollected(tiny_model, tiny_dataset, tmp_path):
    ref = collect_to_store(tiny_model, tiny_dataset, tmp_path / "ref", shard_rows=8, progress=False)
    collect_to_store(tiny_model, tiny_dataset, tmp_path / "s", shard_rows=8, progress=False)
    shards = tmp_path / "s" / "shards"
    (shards / "shard-00001.safetensors").unlink()  # missing
    data = (shards / "shard-00003.safetensors").read_bytes()
    (shards / "shard-00003.safetensors").write_bytes(data[:-8] + b"\x00" * 8)  # altered
    with pytest.raises(StoreError, match="missing: .*shard-00001.*1 more.*rerun the same collect"):
        ActivationStore(tmp_path / "s").load()
    with pytest.warns(UserWarning, match="re-collecting 2 damaged shard"):
        again = collect_to_store(
            tiny_model, tiny_dataset, tmp_path / "s", shard_rows=8, progress=False
        )
    assert again.complete and again.meta["shards"] == ref.meta["shards"]
    assert torch.equal(again.load().acts["resid_post"], ref.load().acts["resid_post"])


def test_store_records_dtype_and_refuses_to_mix_it(tiny_model, tiny_dataset, tmp_path, monkeypatch):
    ds = tiny_dataset.head(4)
    bf16 = ks.load_model("tiny-random-llama", dtype="bfloat16")
    real = collect_module._collect_chunk
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(collect_module, "_collect_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        collect_to_store(bf16, ds, tmp_path / "s", shard_rows=4, progress=False)
    monkeypatch.setattr(collect_module, "_collect_chunk", real)
    assert ActivationStore(tmp_path / "s").meta["numerics"] == {
        "dtype": "bfloat16",
        "device": next(bf16.original_model.parameters()).device.type,
    }
    # an interrupted bf16 store is not finished in fp32 ...
    with pytest.raises(StoreError, match=r"numerics: stored .*bfloat16.*dtype='bfloat16'"):
        collect_to_store(tiny_model, ds, tmp_path / "s", shard_rows=4, progress=False)
    done = collect_to_store(bf16, ds, tmp_path / "s", shard_rows=4, progress=False)
    assert done.complete
    # ... and a complete one is not handed to an fp32 run
    with pytest.raises(StoreError, match="numerics"):
        collect_to_store(tiny_model, ds, tmp_path / "s", shard_rows=4, progress=False)


def test_store_metadata_is_checksummed(tiny_model, tiny_dataset, tmp_path):
    collect_to_store(tiny_model, tiny_dataset.head(2), tmp_path / "s", progress=False)
    path = tmp_path / "s" / "meta.json"
    meta = json.loads(path.read_text())
    meta["dataset"]["labels"] = list(reversed(meta["dataset"]["labels"]))  # would swap labels
    path.write_text(json.dumps(meta))
    with pytest.raises(
        StoreError, match=r"modified after saving.*Delete the directory .*/s and rerun"
    ):
        ActivationStore(tmp_path / "s")
    path.write_text("{broken")
    with pytest.raises(StoreError, match="not valid JSON.*Delete the directory"):
        collect_to_store(tiny_model, tiny_dataset.head(2), tmp_path / "s", progress=False)
    # another artefact is not damage: no advice to delete it
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "meta.json").write_text(json.dumps({"format": "ks_lens.probe"}))
    with pytest.raises(StoreError) as e:
        ActivationStore(tmp_path / "p")
    assert (
        str(e.value)
        == f"{tmp_path / 'p'} is not a ks-lens activation store (it holds 'ks_lens.probe')"
    )


def test_store_output_that_is_a_file(tiny_model, tiny_dataset, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="is an existing file"):
        collect_to_store(tiny_model, tiny_dataset.head(2), tmp_path / "f", progress=False)


def test_questions_too_long_for_the_context_are_refused_before_compute(
    tiny_model, tiny_dataset, monkeypatch
):
    from ks_lens.datasets import Question

    ds = tiny_dataset.with_questions([*tiny_dataset.questions[:2], Question("long", "w " * 1100)])
    monkeypatch.setattr(collect_module, "_collect_chunk", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(
        ks.ContextLengthError, match=r"question 'long' \(as prompted\) has \d+ tokens, more than"
    ):
        collect_activations(tiny_model, ds, progress=False)
    monkeypatch.undo()
    ds = tiny_dataset.with_questions([Question("edge", "w " * 962)])  # fits, but not with answers
    collect_activations(tiny_model, ds, mode="neutral", layers=[0], progress=False)
    with pytest.raises(ks.ContextLengthError, match="plus max_new_tokens=48"):
        collect_activations(tiny_model, ds, mode="response", progress=False)


# ----------------------------------------------------------------------------- prefix sharing


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    # the stated tolerance of prefix sharing: float rounding only
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("mode", "pooling", "kinds", "layers"),
    [
        ("prompt", "last", ("resid_post",), None),
        ("prompt", "last", ("resid_pre", "attn_out", "mlp_out"), [0, 2]),
        ("neutral", "last", ("resid_post",), [1]),
        ("response", "mean_response", ("resid_post",), [3]),
        ("response", "last", ("resid_pre",), [0, 1]),
        ("prompt", "last", ("attn.hook_z", "mlp.hook_post"), [1, 3]),
        ("response", "mean_response", ("attn.hook_z",), [2]),
        ("response-only", "last", ("resid_post",), [1, 3]),
        ("response-only", "mean_response", ("resid_post",), [2]),
    ],
)
def test_shared_prefix_gives_the_unshared_activations(
    tiny_model, tiny_dataset, mode, pooling, kinds, layers
):
    ds = tiny_dataset.head(5)
    kw = dict(
        mode=mode,
        pooling=pooling,
        hook_kinds=kinds,
        layers=layers,
        batch_size=4,
        max_new_tokens=4,
        progress=False,
    )
    whole = collect_activations(tiny_model, ds, share_prefix=False, **kw)
    shared = collect_activations(tiny_model, ds, **kw)
    assert shared.question_ids == whole.question_ids
    assert torch.equal(shared.labels, whole.labels)
    assert shared.meta["share_prefix"] is True and whole.meta["share_prefix"] is False
    for k in kinds:
        _close(shared.acts[k], whole.acts[k])


def test_shared_prefix_runs_only_the_suffix_tokens(tiny_model, tiny_dataset, monkeypatch):
    """The prefix (chat header + instruction) runs once per system prompt, the rows run only their
    remaining tokens, and the hooks still fire under their TransformerLens names."""
    ds = tiny_dataset.head(4)
    seen: list[tuple[str, int, int]] = []
    real = collect_module.capture_features

    def spy(model, batch, names, **kw):
        if "response_start" not in kw:  # the 2-token pass that reads the feature shapes
            return real(model, batch, names, **kw)
        prefix = kw.get("prefix")
        seen.append(("batch", len(batch), batch.input_ids.shape[1]))
        if prefix is not None:
            seen.append(("prefix", 1, len(prefix)))
        return real(model, batch, names, **kw)

    fired: set[str] = set()

    def note(act, hook):
        fired.add(hook.name)

    monkeypatch.setattr(collect_module, "capture_features", spy)
    with tiny_model.hooks(fwd_hooks=[("blocks.2.hook_resid_post", note)]):
        acts = collect_activations(tiny_model, ds, layers=[2], batch_size=16, progress=False)
    assert fired == {"blocks.2.hook_out"}  # the canonical name of blocks.2.hook_resid_post
    batches = [s for s in seen if s[0] == "batch"]
    prefixes = [s for s in seen if s[0] == "prefix"]
    assert len(batches) == 3 and len(prefixes) == 3  # one group per behaviour, 4 rows each
    tok = tiny_model.tokenizer
    for label, (_, _, n_prefix) in enumerate(prefixes):
        assert n_prefix == len(A.system_prefix(tok, ds.behaviours[label].instruction))
    full = max(
        len(tok(ks.format_chat(tok, ChatPrompt(q.text, b.instruction)))["input_ids"])
        for q in ds.questions
        for b in ds.behaviours
    )
    assert all(width < full - 20 for _, _, width in batches)
    ref = _alone(tiny_model, ChatPrompt(ds.questions[3].text, ds.behaviours[1].instruction), 2)
    _close(acts.at(2)[3 * 3 + 1], ref)


def test_prefix_cache_edge_cases(tiny_model):
    # nothing to cache before the first attention layer, or for an empty prefix
    assert A.prefix_cache(tiny_model, [1, 5, 6], ["blocks.0.hook_resid_pre"]) is None
    assert A.prefix_cache(tiny_model, [], ["blocks.1.hook_resid_post"]) is None
    p = A.prefix_cache(tiny_model, [1, 5, 6, 7], ["blocks.1.hook_resid_pre"])
    assert p is not None and len(p) == 4 and len(p.kv) == 1  # block 0's attention only
    p = A.prefix_cache(tiny_model, [1, 5, 6, 7], ["blocks.1.hook_attn_out"])
    assert p is not None and len(p.kv) == 2
    tok = tiny_model.tokenizer
    head = A.system_prefix(tok, "Be brief.")
    assert tok.decode(head) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert tok.decode(A.system_prefix(tok, None)) == "<|im_start|>user\n"  # too short to share
    assert len(A.system_prefix(tok, None)) < A.MIN_SHARED_PREFIX


def test_store_records_prefix_sharing_and_resumes_across_it(tiny_model, tiny_dataset, tmp_path):
    ds = tiny_dataset.head(4)
    whole = collect_to_store(
        tiny_model, ds, tmp_path / "s", shard_rows=4, share_prefix=False, progress=False
    )
    assert whole.meta["share_prefix"] is False
    ref = whole.load().acts["resid_post"]  # before the resume rewrites shards 1 and 2
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta["shards"] = meta["shards"][:1]
    meta["status"] = "incomplete"
    from ks_lens.io import atomic_write_json, with_meta_checksum

    atomic_write_json(tmp_path / "s" / "meta.json", with_meta_checksum(meta))
    mixed = collect_to_store(tiny_model, ds, tmp_path / "s", shard_rows=4, progress=False)
    assert mixed.complete and mixed.meta["share_prefix"] == "mixed"
    _close(mixed.load().acts["resid_post"], ref)



def test_the_removed_positions_alias_names_its_replacement():
    import ks_lens.activations as acts

    assert acts.POOLINGS == ("last", "mean_response")
    with pytest.raises(AttributeError, match="renamed POOLINGS"):
        acts.POSITIONS  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        acts.nope  # noqa: B018
