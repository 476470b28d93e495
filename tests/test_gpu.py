"""CUDA path: the same numbers as on the CPU (skipped where no GPU is present)."""

from __future__ import annotations

import pytest
import torch

import ks_lens as ks
from ks_lens.activations import collect_activations
from ks_lens.probes import ProbeConfig, train_probe
from ks_lens.steering import CAA, KSteering, SteeringVectors

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_tiny_pipeline_matches_cpu(tiny_dataset):
    cpu = ks.load_model("tiny-random-llama", device="cpu")
    gpu = ks.load_model("tiny-random-llama", device="cuda")
    ds = tiny_dataset.head(4)
    a_cpu = collect_activations(cpu, ds, progress=False)
    a_gpu = collect_activations(gpu, ds, progress=False)
    torch.testing.assert_close(
        a_gpu.acts["resid_post"], a_cpu.acts["resid_post"], atol=1e-4, rtol=1e-4
    )
    probe = train_probe(a_cpu, 2, config=ProbeConfig(epochs=3))
    probe_gpu = train_probe(a_cpu, 2, config=ProbeConfig(epochs=3), device="cuda")
    x = a_cpu.at(2)
    torch.testing.assert_close(probe_gpu.cpu()(x), probe(x), atol=1e-4, rtol=1e-4)
    batch = ks.tokenize_chat(cpu, ["hello?", "a longer question?"])
    for method in (KSteering(probe, steps=2), CAA(SteeringVectors.fit(a_cpu, 2))):
        with method.steer(cpu, target=["alpha"], alpha=3.0):
            out_cpu = cpu(batch.input_ids, attention_mask=batch.attention_mask)
        with method.steer(gpu, target=["alpha"], alpha=3.0):
            out_gpu = gpu(batch.input_ids.cuda(), attention_mask=batch.attention_mask.cuda())
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-3, rtol=1e-3)
    g_cpu = ks.generate(cpu, ["hello?"], max_new_tokens=5)
    g_gpu = ks.generate(gpu, ["hello?"], max_new_tokens=5)
    assert g_cpu.output_ids == g_gpu.output_ids
