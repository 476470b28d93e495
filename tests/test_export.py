"""Exports of CAA steering (llama.cpp control-vector GGUF, steering-vectors) and the plain-HF
snippets of docs/steering.md, checked against ks-lens's own steering on the tiny model."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from _shapecheck import shapes_unchecked

import ks_lens as ks
from ks_lens.errors import (
    ConfigError,
    HookPointError,
    KsLensError,
    LabelError,
    MissingDependencyError,
    StoreError,
)
from ks_lens.models.tiny import build_tiny_llama
from ks_lens.steering import (
    CAA,
    ControlVector,
    KSteering,
    MultiLayer,
    SteeringVectors,
    control_vector,
    export_gguf,
    to_steering_vector,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "steering.md"
PROMPT = "How do I boil an egg?"


@pytest.fixture(scope="module")
def hf_twin(tiny_model):
    """A plain HF copy of the tiny model (same seed, same weights; eager attention as the bridge)."""
    hf, _ = build_tiny_llama()
    hf.set_attn_implementation("eager")
    ids = ks.tokenize_chat(tiny_model, PROMPT).input_ids
    with torch.no_grad():
        assert torch.equal(
            hf(ids).logits, tiny_model(ids)
        )  # the twin computes what the bridge does
    return hf


@pytest.fixture(scope="module")
def vecs(tiny_tone_acts) -> SteeringVectors:
    return SteeringVectors.fit(tiny_tone_acts, 2)


def _ids(model: Any) -> torch.Tensor:
    return ks.tokenize_chat(model, PROMPT).input_ids


def _steered(model: Any, method: Any, ids: torch.Tensor, **spec: Any) -> torch.Tensor:
    with torch.no_grad(), method.steer(model, **spec):
        return model(ids)


def _hf_added(hf: Any, directions: dict[int, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Logits of plain HF with ``directions[L]`` added to the output of ``model.layers[L]``."""

    def add(vec: torch.Tensor) -> Any:
        return lambda module, args, output: output + vec

    handles = [hf.model.layers[L].register_forward_hook(add(v)) for L, v in directions.items()]
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        for h in handles:
            h.remove()


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.fields[key]
    part = f.parts[f.data[0]]
    return bytes(part).decode() if f.types[0] == gguf.GGUFValueType.STRING else int(part[0])


def _doc_blocks(heading: str) -> list[str]:
    text = DOCS.read_text()
    start = text.index(heading)
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


# ------------------------------------------------------------------------------ GGUF


def test_gguf_file_has_the_control_vector_layout(vecs, tmp_path):
    caa = CAA(vecs)
    spec = caa.spec(["casual", "concise"], "expert", 2.5)
    path = export_gguf(
        caa, tmp_path / "cv.gguf", target=["casual", "concise"], avoid="expert", alpha=2.5
    )
    assert path == tmp_path / "cv.gguf"
    assert [p.name for p in tmp_path.iterdir()] == ["cv.gguf"]  # no temporary file left

    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "controlvector"
    assert _field(reader, "controlvector.model_hint") == "llama"
    assert _field(reader, "controlvector.layer_count") == 1
    assert [t.name for t in reader.tensors] == ["direction.2"]  # blocks.2.hook_resid_post
    t = reader.tensors[0]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [64]
    expected = 2.5 * caa.vector(spec)
    assert np.array_equal(np.asarray(t.data), expected.numpy())  # bit-exact
    prov = json.loads(_field(reader, "ks_lens.provenance"))
    assert prov["target"] == ["casual", "concise"] and prov["avoid"] == ["expert"]
    assert prov["alpha"] == 2.5 and prov["hook_names"] == ["blocks.2.hook_resid_post"]
    assert prov["model"]["model"] == "tiny-random-llama" and prov["weights_processed"] is False

    back = ControlVector.load_gguf(path)
    assert back.layers == (2,) and back.hook_names == ("blocks.2.hook_resid_post",)
    assert torch.equal(back.directions[2], expected)
    assert back.model_hint == "llama" and back.provenance == prov


def test_reads_repeng_style_files(tmp_path):
    """A file written as repeng writes it (no ks-lens metadata) reads back unchanged."""
    path = tmp_path / "repeng.gguf"
    rng = np.random.default_rng(0)
    dirs = {layer: rng.standard_normal(8).astype(np.float32) for layer in (5, 1, 3)}
    w = gguf.GGUFWriter(path, "controlvector")
    w.add_string("controlvector.model_hint", "mistral")
    w.add_uint32("controlvector.layer_count", len(dirs))
    for layer, d in dirs.items():
        w.add_tensor(f"direction.{layer}", d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cv = ControlVector.load_gguf(path)
    assert cv.layers == (1, 3, 5) and cv.model_hint == "mistral" and cv.provenance == {}
    for layer, d in dirs.items():
        assert np.array_equal(cv.directions[layer].numpy(), d)
    out = cv.save_gguf(tmp_path / "again.gguf")
    again = ControlVector.load_gguf(out)
    assert all(torch.equal(again.directions[k], cv.directions[k]) for k in cv.layers)


def test_gguf_in_plain_hf_steers_like_caa(tiny_model, hf_twin, vecs, tmp_path, monkeypatch):
    """The docs' plain-HF control-vector snippet, on the exported file, gives CAA's logits."""
    caa = CAA(vecs)
    monkeypatch.chdir(tmp_path)
    export_gguf(caa, "casual.gguf", target="casual")  # alpha 1: the scale is the runtime's
    ids = _ids(tiny_model)
    (snippet,) = [b for b in _doc_blocks("## Outside ks-lens") if "GGUFReader" in b]
    env: dict[str, Any] = {"hf_model": hf_twin, "input_ids": ids}
    exec(compile(snippet, str(DOCS), "exec"), env)
    assert env["scale"] == 1.5
    want = _steered(tiny_model, caa, ids, target="casual", alpha=1.5)
    base = tiny_model(ids)
    assert not torch.allclose(want, base, atol=1e-3)  # the steering does something
    torch.testing.assert_close(env["logits"], want, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(hf_twin(ids).logits, base)  # the snippet removed its hooks
    # one layer off would not match: the mapping is blocks.L.hook_resid_post -> layers[L]
    for wrong in (1, 3):
        off = _hf_added(hf_twin, {wrong: env["directions"][2] * 1.5}, ids)
        assert not torch.allclose(off, want, atol=1e-3)


def test_multilayer_caa_exports_each_share(tiny_model, hf_twin, tiny_tone_acts, tmp_path):
    v1, v3 = SteeringVectors.fit(tiny_tone_acts, 1), SteeringVectors.fit(tiny_tone_acts, 3)
    ml = MultiLayer([CAA(v1), CAA(v3, combine="sum", normalize=True)], weights=[0.25, 0.75])
    cv = control_vector(ml, target=["casual", "helpful"], avoid="expert", alpha=2.0)
    assert cv.layers == (1, 3)
    spec = ml.spec(["casual", "helpful"], "expert", 2.0)
    assert torch.equal(cv.directions[1], 0.5 * CAA(v1).vector(spec))
    assert torch.equal(cv.directions[3], 1.5 * ml.members[1].vector(spec))
    ids = _ids(tiny_model)
    want = _steered(tiny_model, ml, ids, target=["casual", "helpful"], avoid="expert", alpha=2.0)
    torch.testing.assert_close(_hf_added(hf_twin, cv.directions, ids), want, rtol=0, atol=1e-6)
    back = ControlVector.load_gguf(cv.save_gguf(tmp_path / "ml.gguf"))
    assert back.layers == (1, 3) and torch.equal(back.directions[3], cv.directions[3])


# ---------------------------------------------------------------------- K-Steering probe


def test_probe_snippet_in_plain_hf_steers_like_ksteering(
    tiny_model, hf_twin, tiny_tone_probe, tmp_path, monkeypatch
):
    """The docs' plain-HF K-Steering snippet, on a saved probe, gives KSteering's logits."""
    monkeypatch.chdir(tmp_path)
    tiny_tone_probe.save("probes/l18")  # the docs' path; the probe itself sits at layer 2
    (snippet,) = [b for b in _doc_blocks("## Outside ks-lens") if "def k_steer" in b]
    assert "alpha = 40.0" in snippet
    snippet = snippet.replace("alpha = 40.0", "alpha = 0.05")  # the random model's scale
    ids = _ids(tiny_model)
    env: dict[str, Any] = {"hf_model": hf_twin, "input_ids": ids}
    exec(compile(snippet, str(DOCS), "exec"), env)
    want = _steered(
        tiny_model, KSteering(tiny_tone_probe), ids, target="casual", avoid="expert", alpha=0.05
    )
    assert not torch.allclose(want, tiny_model(ids), atol=1e-3)
    torch.testing.assert_close(env["logits"], want, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------- steering-vectors


def test_steering_vectors_export_steers_hf_like_caa(tiny_model, hf_twin, vecs, tiny_tone_acts):
    """steering-vectors' decoder_block L is blocks.L.hook_resid_post: same logits as CAA, on the
    bridge's own HF model and on a plain HF copy (real tokens of a padded batch)."""
    pytest.importorskip("steering_vectors")
    batch = ks.tokenize_chat(tiny_model, [PROMPT, "Hi"])
    real = batch.attention_mask.bool()
    hf_in = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    v3 = SteeringVectors.fit(tiny_tone_acts, 3)
    cases = [
        (CAA(vecs), {"target": "casual", "avoid": "expert", "alpha": 3.0}),
        (MultiLayer([CAA(vecs), CAA(v3)]), {"target": ["casual", "concise"], "alpha": 2.0}),
    ]
    for method, spec in cases:
        sv = to_steering_vector(method, **spec)
        assert sv.layer_type == "decoder_block"
        assert sorted(sv.layer_activations) == list(control_vector(method, **spec).layers)
        with torch.no_grad(), method.steer(tiny_model, **spec):
            want = tiny_model(**batch)
        for hf in (tiny_model.original_model, hf_twin):
            with torch.no_grad(), sv.apply(hf):
                got = hf(**hf_in).logits
            torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
        with torch.no_grad():  # sv.apply removed its hooks again
            base = tiny_model(**batch)[real]
            torch.testing.assert_close(hf_twin(**hf_in).logits[real], base, rtol=0, atol=1e-5)
            assert not torch.allclose(base, want[real], atol=1e-3)


def test_missing_steering_vectors_is_a_clear_error(vecs, monkeypatch):
    monkeypatch.setitem(sys.modules, "steering_vectors", None)  # import fails as if absent
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps steering-vectors"):
        to_steering_vector(vecs, target="casual")
    assert issubclass(MissingDependencyError, ImportError)


# ------------------------------------------------------------------------- bad inputs


def test_methods_without_a_fixed_vector_are_refused(vecs, tiny_tone_acts, tiny_tone_probe):
    with pytest.raises(ConfigError, match="does not add a fixed vector"):
        control_vector(KSteering(tiny_tone_probe), target="casual")  # type: ignore[arg-type]
    mixed = MultiLayer([CAA(SteeringVectors.fit(tiny_tone_acts, 1)), KSteering(tiny_tone_probe)])
    with pytest.raises(ConfigError, match="CAA members"):
        control_vector(mixed, target="casual")
    with pytest.raises(ConfigError, match="expected SteeringVectors"):
        control_vector("vectors/l18", target="casual")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="avoid_mode='ablate'"):
        control_vector(CAA(vecs, avoid_mode="ablate"), target="casual", avoid="expert")
    # ablate without avoid labels is a plain addition
    ablate = control_vector(CAA(vecs, avoid_mode="ablate"), target="casual", alpha=2.0)
    assert torch.equal(
        ablate.directions[2], control_vector(vecs, "casual", alpha=2.0).directions[2]
    )
    with pytest.raises(LabelError):
        control_vector(vecs, target="pirate")
    with pytest.raises(LabelError):
        control_vector(vecs)  # nothing to steer
    with pytest.raises(ConfigError, match="alpha"):
        control_vector(vecs, target="casual", alpha=-1.0)


@pytest.mark.parametrize("kind", ["resid_pre", "attn_out", "mlp_out"])
def test_other_hook_kinds_are_refused(vecs, kind):
    at = SteeringVectors(
        vecs.vectors,
        label_names=vecs.label_names,
        hook_name=f"blocks.2.hook_{kind}",
        model=vecs.model_info,
    )
    with pytest.raises(HookPointError, match=r"resid_post"):
        control_vector(at, target="casual")
    with pytest.raises(HookPointError):
        to_steering_vector(at, target="casual")


def test_layer_zero_cannot_go_to_llama_cpp(tiny_tone_acts, tmp_path):
    cv = control_vector(SteeringVectors.fit(tiny_tone_acts, 0), target="casual")
    assert cv.layers == (0,)  # fine for steering-vectors and plain HF hooks
    with pytest.raises(HookPointError, match="direction.0"):
        cv.save_gguf(tmp_path / "l0.gguf")
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="is a directory"):
        control_vector(SteeringVectors.fit(tiny_tone_acts, 1), target="casual").save_gguf(tmp_path)


@pytest.mark.parametrize(
    "directions, hint, match",
    [
        ({}, "", "at least one"),
        ({1: torch.ones(2, 3)}, "", "1-D"),
        ({1: [1.0, 2.0]}, "", "1-D"),
        ({1: torch.ones(3), 2: torch.ones(4)}, "", "has 4 entries"),
        ({1: torch.tensor([1.0, float("nan")])}, "", "NaN"),
        ({-1: torch.ones(3)}, "", "ints >= 0"),
        ({"1": torch.ones(3)}, "", "ints >= 0"),
        ({1: torch.ones(3)}, 3, "model_hint"),
    ],
)
def test_control_vector_validates_its_fields(directions, hint, match):
    with shapes_unchecked(), pytest.raises(ConfigError, match=match):
        ControlVector(directions, hint)


def _write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> None:
    w = gguf.GGUFWriter(path, arch)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_gguf_files_are_store_errors(tmp_path):
    with pytest.raises(StoreError, match="no control-vector file"):
        ControlVector.load_gguf(tmp_path / "missing.gguf")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 7)
    with pytest.raises(StoreError, match="not a readable GGUF"):
        ControlVector.load_gguf(garbage)
    v = np.ones(4, dtype=np.float32)
    cases = {
        "model.gguf": ("llama", {"direction.1": v}, "architecture 'llama'"),
        "name.gguf": ("controlvector", {"weight.1": v}, "unexpected tensor 'weight.1'"),
        "f16.gguf": ("controlvector", {"direction.1": v.astype(np.float16)}, "1-D F32"),
        "2d.gguf": ("controlvector", {"direction.1": np.ones((2, 2), np.float32)}, "1-D F32"),
        "empty.gguf": ("controlvector", {}, "no direction tensors"),
        "widths.gguf": (
            "controlvector",
            {"direction.1": v, "direction.2": np.ones(3, np.float32)},
            "has 3 entries",
        ),
    }
    for name, (arch, tensors, match) in cases.items():
        _write_gguf(tmp_path / name, arch, tensors)
        with pytest.raises(StoreError, match=match) as err:
            ControlVector.load_gguf(tmp_path / name)
        assert isinstance(err.value, KsLensError)
