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
    if study == "geometry":
        for rec in payload["per_layer"]:
            for combo in rec["combos"]:
                # the linear probe's gradient is constant: one direction for every input
                assert combo["linear"]["mean_resultant_length"] == pytest.approx(1.0, abs=1e-4)
