"""End to end on a CUDA device (skips without one): statistics and scores agree with the CPU."""
import sys
import time

import numpy as np
import pytest
import torch

import hsvfast
from conftest import REPO, assert_same_statistics, requires_cuda
from tiny_models import DECODERS, ENCODERS, random_batches, tiny_model

sys.path.insert(0, str(REPO / "benchmarks"))
from end_to_end import seconds  # noqa: E402
from host_overhead import sleep_cycles  # noqa: E402

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


@pytest.mark.parametrize("kind", ENCODERS + DECODERS)
@pytest.mark.parametrize("mode", ["per_class", "balanced"])
def test_block_outputs_held_per_batch_match_a_launch_per_layer(kind, mode, monkeypatch):
    """score() on a GPU folds a batch's block outputs with one launch (scoring._HOLD_BYTES), and in
    balanced mode updates all layers' matrices with one batched GEMM: the same statistics as a launch
    and a GEMM per layer, whole or in groups, for every architecture."""
    from hsvfast import scoring

    model = tiny_model(kind).cuda()
    batches = random_batches()
    kwargs = {}
    if mode == "balanced":
        labels = np.concatenate([b["labels"].numpy() for b in batches])
        kwargs["class_counts"] = dict(zip(*np.unique(labels, return_counts=True)))
    monkeypatch.setattr(scoring, "_HOLD_BYTES", {})
    per_layer = hsvfast.score(model, batches, **kwargs).stats
    one_layer = batches[0]["input_ids"].numel() * model.config.hidden_size * 4
    for budget in (one_layer + 1, 1 << 30):  # groups of two layers, then all layers at once
        monkeypatch.setattr(scoring, "_HOLD_BYTES", {"cuda": budget})
        assert_same_statistics(hsvfast.score(model, batches, **kwargs).stats, per_layer)


class _SyncFreeModel(torch.nn.Module):
    """Embedding + linear blocks: a forward that never synchronises (unlike transformers' mask checks)."""

    def __init__(self, vocab=64, hidden=32, depth=3):
        super().__init__()
        self.embeddings = torch.nn.Embedding(vocab, hidden)
        self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh())
                                          for _ in range(depth))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.embeddings(input_ids)
        for block in self.layers:
            hidden = block(hidden)
        return hidden


def _sync_test_batches(resident: bool, num_batches: int = 12):
    """Batches of 12 sequences over 3 classes (on the GPU if ``resident``), their host copies and
    the score keyword arguments of each mode."""
    batches = random_batches(num_batches=num_batches, classes=3)
    for batch in batches:
        batch["input_ids"] = batch["input_ids"] % 64
    host_batches = batches
    if resident:
        batches = [{key: value.cuda() for key, value in batch.items()} for batch in batches]
    counts = {}
    for batch in host_batches:
        for label in batch["labels"].tolist():
            counts[label] = counts.get(label, 0) + 1
    kwargs = {"per_class": {}, "balanced": {"class_counts": counts}, "trace": {"metrics": ["trace_ratio"]}}
    return batches, host_batches, kwargs


MODES = pytest.mark.parametrize("mode", ["per_class", "balanced", "trace"])
RESIDENT = pytest.mark.parametrize("resident", [False, True], ids=["host_batches", "device_batches"])


@RESIDENT
@MODES
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_no_host_sync_between_batches(mode, resident, cuda_graphs):
    """Nothing in hsvfast waits for the device while batches are scored, whether the loader yields
    them on the host or already on the GPU (their labels and masks are read one batch ahead); the
    finalisation at the end is where the results come back. Batches 0-10 of 12 run under the check
    (the loader is read one batch ahead, so it ends before the last batch is scored); with CUDA
    graphs batches 3-10, the replayed ones (batch 2 is captured: a capture synchronises once)."""
    model = _SyncFreeModel().cuda()
    batches, host_batches, kwargs = _sync_test_batches(resident)

    def loader():
        for index, batch in enumerate(batches):
            if index == (4 if cuda_graphs else 1):
                torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises from here on
            yield batch
        torch.cuda.set_sync_debug_mode("default")

    try:
        report = hsvfast.score(model, loader(), blocks=model.layers, autocast=False, cuda_graphs=cuda_graphs,
                               **kwargs[mode])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert report.num_examples == 12 * 12 and report.backend == "cuda"
    reference = hsvfast.score(model.cpu(), host_batches, blocks=model.layers, **kwargs[mode])
    for name in report.metrics:  # float32 forward on both devices
        np.testing.assert_allclose(report.metrics[name], reference.metrics[name], rtol=1e-4)


class _BusyModel(_SyncFreeModel):
    """A forward that first spends ``host_seconds`` on the host (as eager PyTorch does launching
    kernels), then keeps the device busy for a while in each block (``torch.cuda._sleep``)."""

    def __init__(self, host_seconds: float, cycles: int):
        super().__init__()
        self.host_seconds, self.cycles = host_seconds, cycles

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        time.sleep(self.host_seconds)
        hidden = self.embeddings(input_ids)
        for block in self.layers:
            torch.cuda._sleep(self.cycles)
            hidden = block(hidden)
        return hidden


@RESIDENT
@MODES
def test_the_device_never_waits_for_the_host_between_batches(mode, resident):
    """What the sync debug mode cannot see: a driver call that waits for the device inside it (CUDA
    documents that copies from pageable host memory may). Each batch's forward spends 10 ms on the
    host before its 30 ms of device work. While the host stays ahead, that host time overlaps with
    the device's work on the batches before; a wait for the device once per batch would leave the
    device idle for it every batch (24 × 10 ms more than the bare forward)."""
    host_seconds, num_batches = 0.010, 24
    model = _BusyModel(host_seconds, sleep_cycles(10.0)).cuda()
    batches, _, kwargs = _sync_test_batches(resident, num_batches=num_batches)
    if not resident:  # as DataLoader(pin_memory=True) yields them: the test is about hsvfast's own copies
        batches = [{key: value.pin_memory() for key, value in batch.items()} for batch in batches]

    def bare_forward():
        with torch.inference_mode():
            for batch in batches:
                model(batch["input_ids"].cuda(non_blocking=True))

    def score():  # the eager pass's copies (graphs, the default's "auto", would time a few batches first)
        hsvfast.score(model, batches, blocks=model.layers, autocast=False, cuda_graphs=False, **kwargs[mode])

    hsvfast.score(model, batches[:2], blocks=model.layers, autocast=False)  # CUDA, cuBLAS, allocator warm-up
    floor = min(seconds(bare_forward, "cuda")[0] for _ in range(2))
    scored = min(seconds(score, "cuda")[0] for _ in range(2))
    added = scored - floor
    assert added < 0.5 * num_batches * host_seconds, (
        f"scoring took {scored * 1e3:.0f} ms, the bare forward {floor * 1e3:.0f} ms: {added * 1e3:.0f} ms more, "
        f"near the {num_batches} × {host_seconds * 1e3:.0f} ms the forward spends on the host before its device "
        "work, so that host time did not overlap with the device's (something waits for the device once per batch)"
    )


def test_more_layers_than_one_launch_takes():
    """50 blocks: one batch's outputs go out in two launches (48 layers each at most); float64 on both devices."""
    model = _SyncFreeModel(depth=50).double()
    batches, _, _ = _sync_test_batches(resident=False, num_batches=3)
    on_cpu = hsvfast.score(model, batches, blocks=model.layers, pooling="mean_all")
    on_gpu = hsvfast.score(model, batches, blocks=model.layers, pooling="mean_all", device="cuda")
    assert_same_statistics(on_gpu.stats, on_cpu.stats, rtol=1e-9, atol=1e-12)


def _run_on(device):
    """A forward pre-hook that moves a block's tensor arguments to ``device`` (what accelerate's hooks do
    for a model dispatched with a device_map)."""
    def move(value):
        if torch.is_tensor(value):
            return value.to(device)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    def hook(module, args, kwargs):
        return move(args), {k: move(v) for k, v in kwargs.items()}
    return hook


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_a_model_split_over_devices_is_scored_like_the_whole_model(kind):
    import reference as ref
    from test_score import all_labels, capture_block_outputs, reference_features

    model = tiny_model(kind).double().cuda()
    batches = random_batches()
    whole = hsvfast.score(model, batches)
    blocks = hsvfast.find_blocks(model)
    for k in (2, 3):  # the upper blocks offloaded to the host, as device_map="auto" does when a GPU is full
        blocks[k].to("cpu")
        blocks[k].register_forward_pre_hook(_run_on("cpu"), with_kwargs=True)
    split = hsvfast.score(model, batches)
    assert split.backend == "cuda" and next(blocks[3].parameters()).device.type == "cpu"
    # Against the split model's own block outputs, pooled and scored in float64 by the reference.
    labels = all_labels(batches)
    for k, outputs in enumerate(capture_block_outputs(model, batches)):
        features = reference_features(outputs, batches, split.pooling)
        assert ref.relative_error(split.metrics["variability"][k], ref.rank_aware_variability(features, labels)) < 1e-9
        assert ref.relative_error(split.metrics["trace_ratio"][k], ref.trace_ratio(features, labels)) < 1e-9
    # Against the whole model on the GPU: Llama's RMSNorm computes in float32 even in a float64 model, and
    # float32 rounds differently on the two devices (run 6: ν 7e-9 apart), as in the CPU-vs-CUDA tests above.
    for name in whole.metrics:
        np.testing.assert_allclose(split.metrics[name], whole.metrics[name], rtol=1e-7)
    with pytest.raises(ValueError, match="cuda_graphs=True needs the whole model on one device"):
        hsvfast.score(model, batches, cuda_graphs=True)
    assert "cuda_graphs" not in hsvfast.score(model, batches, cuda_graphs="auto").stats.info


@pytest.mark.parametrize("name", ["albert", "xlnet", "longformer", "t5", "xlm"])
def test_architectures_read_through_views_score_on_cuda_as_on_the_cpu(name):
    # Shared groups (ALBERT), tokens-first states read as a transposed view (XLNet), inside padding cut off
    # by a slice (Longformer), the encoder of an encoder-decoder (T5), parallel layer lists (XLM).
    from test_architectures import SWEEP

    model = SWEEP[name]().double()
    batches = random_batches(num_batches=3, batch_size=16, max_len=10)
    on_cpu = hsvfast.score(model, batches, pooling="mean_all")
    on_gpu = hsvfast.score(model, batches, pooling="mean_all", device="cuda")
    assert on_gpu.backend == "cuda" and on_gpu.layers == on_cpu.layers
    for metric in on_cpu.metrics:
        np.testing.assert_allclose(on_gpu.metrics[metric], on_cpu.metrics[metric], rtol=1e-7)
