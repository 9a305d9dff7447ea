"""End to end on a CUDA device (skips without one): statistics and scores agree with the CPU."""
import numpy as np
import pytest
import torch

import hsvfast
from conftest import requires_cuda
from tiny_models import random_batches, tiny_model

pytestmark = requires_cuda


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_score_on_cuda_matches_cpu(kind):
    model = tiny_model(kind).double()
    batches = random_batches()
    on_cpu = hsvfast.score(model, batches)
    on_gpu = hsvfast.score(model, batches, device="cuda")
    assert on_gpu.backend == "cuda"
    assert next(model.parameters()).device.type == "cpu"  # moved back
    for name in on_cpu.metrics:
        np.testing.assert_allclose(on_gpu.metrics[name], on_cpu.metrics[name], rtol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_on_cuda(dtype):
    model = tiny_model("bert").to("cuda", dtype)
    report = hsvfast.score(model, random_batches())
    assert report.backend == "cuda" and all(np.isfinite(report.metrics["variability"]))


def test_nan_on_cuda_is_reported_at_the_end_with_layer_and_batch():
    model = tiny_model("bert").cuda()
    with torch.no_grad():
        model.encoder.layer[1].output.dense.bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 1: non-finite .* batch 0"):
        hsvfast.score(model, random_batches())


def test_cuda_compiled_and_torch_backends_agree(monkeypatch):
    model = tiny_model("bert").cuda()
    batches = random_batches()
    compiled = hsvfast.score(model, batches)
    from hsvfast import _kernels

    monkeypatch.setattr(_kernels, "_FORCE_TORCH", True)
    fallback = hsvfast.score(model, batches)
    assert compiled.backend == "cuda" and fallback.backend == "torch"
    for name in compiled.metrics:
        np.testing.assert_allclose(compiled.metrics[name], fallback.metrics[name], rtol=1e-9)
