"""Versions and known-bad version combinations (ks_lens.compat)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import ks_lens as ks
from ks_lens import compat
from ks_lens.activations import ActivationStore, collect_to_store
from ks_lens.errors import VersionError, VersionMismatchWarning
from ks_lens.io import META_FILE, with_meta_checksum
from ks_lens.steering.positions import PositionTracker


def test_versions_name_every_package_that_determines_numbers():
    v = compat.versions()
    assert set(v) == {*compat.NUMERIC_PACKAGES, "python"}
    assert v["torch"] == torch.__version__
    assert all(isinstance(x, str) and x for x in v.values())


@pytest.mark.parametrize(
    ("version", "expected"),
    [("5.23.0", "5"), ("2.13.0+cpu", "2"), ("0.1.0", "0.1"), ("0.12.2", "0.12"), ("1", "1")],
)
def test_major_version(version, expected):
    assert compat.major(version) == expected


def test_major_of_an_unparsable_version_is_none():
    assert compat.major("not a version") is None


def _fake_saved_versions(path, **changes):
    meta = json.loads((path / META_FILE).read_text())
    meta["versions"] = {**meta["versions"], **changes}
    (path / META_FILE).write_text(json.dumps(with_meta_checksum(meta)))


def test_a_probe_saved_under_another_major_version_warns_naming_both(tiny_probe, tmp_path):
    out = tmp_path / "probe"
    tiny_probe.save(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ks.Probe.load(out)  # same versions: silent
    installed = compat.versions()["transformers"]
    _fake_saved_versions(out, transformers="4.57.1", numpy="1.26.4")
    with pytest.warns(VersionMismatchWarning) as caught:
        loaded = ks.Probe.load(out)
    msg = str(caught[0].message)
    assert f"transformers 4.57.1 (saved) vs {installed} (installed)" in msg
    assert "numpy 1.26.4 (saved)" in msg and str(out) in msg
    torch.testing.assert_close(loaded.state_dict(), tiny_probe.state_dict(), rtol=0, atol=0)


def test_a_minor_version_difference_does_not_warn(tiny_probe, tmp_path):
    out = tmp_path / "probe"
    tiny_probe.save(out)
    major = compat.major(compat.versions()["transformers"])
    _fake_saved_versions(out, transformers=f"{major}.0.0", torch="2.0.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        loaded = ks.Probe.load(out)
    assert compat.version_mismatches(json.loads((out / META_FILE).read_text())["versions"]) == []
    assert loaded.label_names == tiny_probe.label_names


def test_a_store_saved_under_another_major_version_warns(tiny_model, tiny_dataset, tmp_path):
    out = tmp_path / "store"
    collect_to_store(tiny_model, tiny_dataset.head(2), out, layers=[1], progress=False)
    meta = json.loads((out / "meta.json").read_text())
    meta["versions"]["torch"] = "1.13.1"
    (out / "meta.json").write_text(json.dumps(with_meta_checksum(meta)))
    with pytest.warns(VersionMismatchWarning, match=r"torch 1\.13\.1 \(saved\)"):
        store = ActivationStore(out)
    assert store.complete and store.meta["versions"]["torch"] == "1.13.1"


def test_cache_keyword_follows_the_installed_transformers(tiny_model):
    import inspect

    hf = tiny_model.original_model
    params = inspect.signature(type(hf).forward).parameters
    expected = "cache" if "cache" in params else "past_key_values"
    assert compat.cache_keyword(hf) == expected


def _pretend(monkeypatch, transformers: str, tl: str) -> None:
    real = compat.dist_version
    fake = {"transformers": transformers, "transformer-lens": tl}
    monkeypatch.setattr(compat, "dist_version", lambda d: fake.get(d) or real(d))


@pytest.mark.parametrize(
    ("transformers", "tl", "diverges"),
    [("5.23.0", "4.3.0", False), ("5.24.0", "4.3.0", True), ("5.25.0", "4.3.0", True),
     ("5.25.0", "4.4.0", False), ("5.24.0.dev0", "4.3.0", False)],
)
def test_known_divergent_bridge_cache_versions(monkeypatch, transformers, tl, diverges):
    _pretend(monkeypatch, transformers, tl)
    assert compat.bridge_cache_diverges() is diverges


def test_full_bridge_generation_is_refused_under_divergent_versions(tiny_model, monkeypatch):
    _pretend(monkeypatch, "5.25.0", "4.3.0")
    with pytest.raises(VersionError, match=r"transformer-lens 4\.3\.0 with transformers 5\.25\.0"):
        ks.generate(tiny_model, "hi?", max_new_tokens=2, full_bridge=True)
    assert len(ks.generate(tiny_model, "hi?", max_new_tokens=2).output_ids[0]) <= 2  # default path


def test_loading_a_model_warns_under_divergent_versions(monkeypatch):
    _pretend(monkeypatch, "5.25.0", "4.3.0")
    with pytest.warns(ks.VersionWarning, match="use_past_kv_cache=False"):
        model = ks.load_model("tiny-random-llama")
    assert model.cfg.n_layers == 4  # loaded all the same: the default paths are unaffected


def test_position_tracker_reads_the_cache_under_either_keyword():
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)
    for keyword in ("cache", "past_key_values"):
        tracker = PositionTracker()
        tracker._pre_hook(None, (), {"input_ids": torch.ones(1, 1, dtype=torch.long), keyword: cache})
        assert tracker.past_len == 5, keyword
