"""Names that explain themselves (issue 21, item 4): each name renamed in 0.2.0 is refused under
its old spelling with a :class:`~ks_lens.errors.RenamedError` naming the new one, artefacts saved
under the new names round-trip, and artefacts saved before the renames still load."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import ks_lens as ks
from ks_lens.activations import ActivationStore, CollectSpec, collect_activations, collect_to_store
from ks_lens.activations.capture import capture_batch, capture_features
from ks_lens.cli.options import RENAMED_OPTIONS
from ks_lens.errors import ConfigError, RenamedError
from ks_lens.io import (
    check_artifact_target,
    load_artifact,
    load_meta,
    save_artifact,
    with_meta_checksum,
    write_meta,
)
from ks_lens.pipeline import PipelineConfig
from ks_lens.probes import Probe, ProbeConfig
from ks_lens.report import read_report

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny-demo"


def test_renamed_error_is_a_config_and_type_error():
    assert issubclass(RenamedError, ConfigError) and issubclass(RenamedError, TypeError)


@pytest.mark.parametrize(
    ("call", "old", "new"),
    [
        (lambda: ProbeConfig(kind="linear"), "kind=", "architecture="),  # type: ignore[call-arg]
        (lambda: replace(ProbeConfig(), kind="linear"), "kind=", "architecture="),
        (lambda: CollectSpec(position="last"), "position=", "pooling="),  # type: ignore[call-arg]
        (lambda: PipelineConfig(text_position="last"), "text_position=", "text_pooling="),  # type: ignore[call-arg]
        (lambda: PipelineConfig.fast(text_position="last"), "text_position=", "text_pooling="),
    ],
)
def test_old_fields_name_the_new_ones(call, old, new):
    with pytest.raises(RenamedError, match=f"{old} was renamed in ks-lens 0.2.0; pass {new}"):
        call()


def test_old_keywords_name_the_new_ones(tiny_model, tiny_dataset, tmp_path):
    def refused(fn, *args, old, new, **kwargs):
        with pytest.raises(RenamedError, match=f"{old}= was renamed .*; pass {new}="):
            fn(*args, **{old: kwargs.pop("value")}, **kwargs)

    ds = tiny_dataset.head(1)
    refused(collect_activations, tiny_model, ds, old="position", new="pooling", value="last")
    refused(
        collect_to_store,
        tiny_model,
        ds,
        tmp_path / "s",
        old="position",
        new="pooling",
        value="last",
    )
    batch = ks.tokenize_chat(tiny_model, ["hi"])
    names = ["blocks.0.hook_resid_post"]
    refused(capture_features, tiny_model, batch, names, old="position", new="pooling", value="last")
    refused(capture_batch, tiny_model, batch, names, old="position", new="pooling", value="last")
    t = {"w": torch.ones(2)}
    refused(save_artifact, tmp_path / "a", t, {}, old="kind", new="artefact", value="probe")
    refused(write_meta, tmp_path / "a", {}, old="kind", new="artefact", value="probe")
    refused(load_meta, tmp_path / "a", old="kind", new="artefact", value="probe")
    refused(load_artifact, tmp_path / "a", old="kind", new="artefact", value="probe")
    refused(check_artifact_target, tmp_path / "a", old="kind", new="artefact", value="probe")
    assert not (tmp_path / "s").exists() and not (tmp_path / "a").exists()  # nothing written


def test_old_options_name_the_new_ones(tmp_path, capsys):
    from ks_lens.cli import main

    assert RENAMED_OPTIONS["--position"] == "--pooling"
    for argv, old, new in [
        (
            ["collect", "--out", str(tmp_path / "s"), "--position", "last"],
            "--position",
            "--pooling",
        ),
        (
            ["train", "--acts", "a", "--out", str(tmp_path / "p"), "--kind", "linear"],
            "--kind",
            "--architecture",
        ),
        (
            ["demo", "--out", str(tmp_path / "d"), "--comparison.seed=3"],
            "--comparison.seed",
            "--seed",
        ),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{old} was renamed in ks-lens 0.2.0; use {new}" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_one_seed_and_one_batch_size_per_run():
    cfg = PipelineConfig(seed=5, batch_size=8)
    assert (cfg.comparison.seed, cfg.comparison.batch_size) == (5, 8)
    again = replace(cfg, seed=6)
    assert (again.comparison.seed, again.comparison.batch_size) == (6, 8)
    fast = PipelineConfig.fast(seed=2)
    assert fast.comparison.seed == 2 and fast.comparison.text_coverage == "per-size"
    # the defaults are what they were: seed 0, 16 rows per forward pass in both stages
    default = PipelineConfig()
    assert (default.seed, default.comparison.seed) == (0, 0)
    assert (default.batch_size, default.comparison.batch_size) == (16, 16)


def test_probe_round_trips_with_the_new_names(tiny_acts, tmp_path):
    probe = ks.train_probe(tiny_acts, 2, config=ProbeConfig(architecture="linear", epochs=2))
    probe.save(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["format"] == "ks_lens.probe"
    assert meta["config"]["architecture"] == "linear" and "kind" not in meta["config"]
    back = Probe.load(tmp_path / "p")
    assert back.config == probe.config and back.config.architecture == "linear"
    assert "Probe(linear," in repr(back)


def test_probe_saved_before_the_rename_still_loads(tiny_acts, tmp_path):
    """A probe saved by 0.1.x records its architecture as ``"kind"`` in ``meta.json``."""
    probe = ks.train_probe(tiny_acts, 2, config=ProbeConfig(architecture="linear", epochs=2))
    probe.save(tmp_path / "p")
    path = tmp_path / "p" / "meta.json"
    meta = json.loads(path.read_text())
    meta.pop("meta_sha256")
    config = meta["config"]
    meta["config"] = {"kind": config.pop("architecture"), **config}
    path.write_text(json.dumps(with_meta_checksum(meta)))
    back = Probe.load(tmp_path / "p")
    assert back.config == probe.config
    torch.testing.assert_close(back.mean, probe.mean)


def test_store_records_the_pooling_under_its_saved_key(tiny_model, tiny_dataset, tmp_path):
    """Stores keep the on-disk key ``collect.position`` (so stores saved before 0.2.0 resume);
    the Python name is ``pooling``."""
    ds = tiny_dataset.head(2)
    kw = dict(mode="prompt", layers=[1], pooling="last", progress=False)
    store = collect_to_store(tiny_model, ds, tmp_path / "s", **kw)
    assert store.meta["collect"]["position"] == "last"
    again = collect_to_store(tiny_model, ds, tmp_path / "s", **kw)  # resumes: nothing to do
    assert again.meta == ActivationStore(tmp_path / "s").meta
    mem = collect_activations(tiny_model, ds, **kw)
    torch.testing.assert_close(store.load().at(1), mem.at(1), atol=1e-5, rtol=1e-5)


def test_committed_report_still_loads():
    """The golden report was written before the renames (``demo_config.text_position``,
    ``comparison_config.seed``/``batch_size``): it still reads, with its comparison settings."""
    result, info = read_report(GOLDEN / "report.json")
    assert info["demo_config"]["text_position"] == "last"
    assert (result.config.seed, result.config.batch_size) == (0, 16)
    assert asdict(result.config)["seed"] == info["demo_config"]["seed"]
