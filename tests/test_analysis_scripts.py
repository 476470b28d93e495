"""The studies in analysis/ run end to end (--fast, tiny model) and write their JSON and figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDIES = {
    "geometry": [
        "geometry.json",
        "cosine_violins.png",
        "label_cosines.png",
        "by_depth.png",
        "pca_directions.png",
    ],
    "vanishing": ["vanishing.json", "remedies.png", "vanished_labels.png", "token_view.html"],
    "layer_sweep": ["layer_sweep.json", "layer_sweep.png"],
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


@pytest.mark.parametrize("study", list(STUDIES))
def test_study_runs_fast_on_tiny_model(study, work, tmp_path):
    out = tmp_path / study
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "analysis" / f"{study}.py"),
            "--fast",
            "--model",
            "tiny-random-llama",
            "--work",
            str(work),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for name in STUDIES[study]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    payload = json.loads((out / STUDIES[study][0]).read_text())
    assert payload["model"] == "tiny-random-llama"
    assert "versions" in payload and "elapsed_s" in payload
    if study == "layer_sweep":
        assert payload["recommended_layer"] in payload["layers"] and payload["reason"]
        assert payload["recommendation"]["chosen_on"] == "calibration questions"
        gap = payload["eval_gap"]
        for rec in payload["sweep"]:
            assert rec["eval_layer"] >= rec["layer"] + gap or rec["capped"]
            assert rec["calibration"] and rec["test"]
    if study == "vanishing":
        rows = payload["remedies"]["3"]
        assert {r["method"] for r in rows} == {
            "ksteer",
            "ksteer_multistep",
            "ksteer_logsigmoid",
            "ksteer_softmin",
            "ksteer_balanced",
            "ksteer_pcgrad",
            "caa_mean",
        }
        assert all((r["vanish_diff"] is None) == (r["method"] == "ksteer") for r in rows)
        assert payload["verdict"]["3"]["statement"]
        for d in payload["diagnoses"]:
            k = str(len(d["targets"]))
            assert d["alpha"] == payload["alpha"][d["method"]][k]
            caa = d["method"].startswith("caa")
            assert d["geometry"] == ("CAA vectors" if caa else "probe gradients")
    if study == "geometry":
        for rec in payload["per_layer"]:
            for combo in rec["combos"]:
                # the linear probe's gradient is constant: one direction for every input
                assert combo["linear"]["mean_resultant_length"] == pytest.approx(1.0, abs=1e-4)
