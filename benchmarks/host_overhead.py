"""hsvfast's own host time per batch: score a model whose blocks cost (almost) nothing.

    python benchmarks/host_overhead.py                # CPU
    python benchmarks/host_overhead.py --device cuda  # the host's launch path on a GPU

When the forward pass is bound by the host (eager PyTorch launching small kernels for short
sequences: a BERT-large batch of 128 SST-2 sentences costs ~13 ms of host time on an H100),
every microsecond hsvfast spends per batch and per layer — planning the batch, the hooks,
argument marshalling, launching the kernel — adds to the wall time one for one. This script
measures exactly that: the model is an embedding followed by L blocks that return their input,
so ``score`` minus the bare forward of the same model is hsvfast's bookkeeping. Activations are
small (2 tokens), so the pooling kernel's own work is negligible; the hidden size is 64 on the
CPU (where the kernel runs on the host) and 1024 on a GPU (BERT-large's: the float64 Gram
updates then come every ~8 batches, as in a real run). The time to finalise the metrics (once
per call) is measured separately and subtracted. On a GPU it also times the launch path
before block outputs were held per batch (one launch per layer).

Prints median microseconds per batch and per layer and batch, for each statistics mode.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hsvfast  # noqa: E402
from baselines.floor import bare_forward  # noqa: E402
from end_to_end import launch_per_layer, seconds  # noqa: E402


class FreeBlock(nn.Module):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class FreeModel(nn.Module):
    """An embedding and ``num_layers`` blocks that pass the hidden states through."""

    def __init__(self, num_layers: int, hidden: int) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(1000, hidden)
        self.layers = nn.ModuleList(FreeBlock() for _ in range(num_layers))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.embeddings(input_ids)
        for block in self.layers:
            hidden = block(hidden)
        return hidden


def batches(n: int, batch_size: int, tokens: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 1000, (batch_size, tokens), generator=g),
             "attention_mask": torch.ones(batch_size, tokens, dtype=torch.long),
             "labels": torch.randint(0, classes, (batch_size,), generator=g)} for _ in range(n)]


def sleep_cycles(milliseconds: float) -> int:
    """``torch.cuda._sleep`` cycles that keep the current CUDA device busy for about ``milliseconds``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(10**6)
    end.record()
    end.synchronize()
    return int(milliseconds * 10**6 / start.elapsed_time(end))


def copy_waits(device: torch.device, busy_ms: float = 50.0) -> dict:
    """Host ms that a non-blocking copy of a batch's token weights (128 × 66 float32) takes when
    ~``busy_ms`` of work is queued on the device: near ``busy_ms``, the driver waited for the device
    (CUDA allows that for pageable memory), near 0 it did not."""
    cycles = sleep_cycles(busy_ms)
    waited = {}
    for kind, tensor in (("pageable", torch.ones(128, 66)), ("pinned", torch.ones(128, 66).pin_memory())):
        tensor.to(device, non_blocking=True)  # warm-up
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        began = time.perf_counter()
        tensor.to(device, non_blocking=True)
        waited[kind] = (time.perf_counter() - began) * 1e3
        torch.cuda.synchronize()
    return waited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 64 on the CPU, 1024 on a GPU)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    hidden = args.hidden or (1024 if device.type == "cuda" else 64)
    model = FreeModel(args.layers, hidden).to(device).eval()
    data = batches(args.batches, args.batch_size, 2, args.classes)
    if device.type == "cuda":
        data = [{k: v.pin_memory() for k, v in b.items()} for b in data]
    counts = dict(collections.Counter(label for b in data for label in b["labels"].tolist()))

    def floor():
        bare_forward(model, data, args.layers - 1)

    # The eager pass (cuda_graphs=False; on CUDA the default "auto" would choose graphs for this model).
    common = dict(layers=None, pooling="mean_all", blocks=model.layers, cuda_graphs=False)
    modes = {
        "trace ratio only (sums, squared norms)": dict(metrics=["trace_ratio"]),
        "ν + trace ratio (per-class second moments)": {},
        "class_counts given (one balanced second moment)": dict(class_counts=counts),
    }
    if device.type == "cuda":
        modes["ν + trace ratio, CUDA graphs (the forward and pooling replayed)"] = dict(cuda_graphs=True)
    methods = {"bare forward": floor}
    for name, kwargs in modes.items():
        methods[name] = (lambda kw: lambda: hsvfast.score(model, data, **{**common, **kw}))(kwargs)
    if device.type == "cuda":
        for name in list(modes)[:2]:
            modes[f"{name}, a launch per layer"] = modes[name]
            methods[f"{name}, a launch per layer"] = launch_per_layer(methods[name])
    for fn in methods.values():  # warm-up
        fn()
    times = {name: [] for name in methods}
    reports = {}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            elapsed, reports[name] = seconds(fn, device.type)
            times[name].append(elapsed)
    finalise = {}
    for name in modes:
        stats = reports[name].stats
        finalise[name] = statistics.median(seconds(lambda: hsvfast.report_from(stats), device.type)[0]
                                           for _ in range(args.rounds))

    base = statistics.median(times["bare forward"])
    print(f"\ndevice={device} backend={hsvfast.backend(device)} torch={torch.__version__} layers={args.layers} hidden={hidden} "
          f"batches={args.batches} batch={args.batch_size} classes={args.classes} rounds={args.rounds}\n")
    print("| method | median ms per call | finalise ms | hsvfast µs per batch | µs per layer and batch |")
    print("|---|---:|---:|---:|---:|")
    print(f"| bare forward | {base * 1e3:.1f} | | | |")
    for name in modes:
        total = statistics.median(times[name])
        per_batch = (total - base - finalise[name]) / args.batches
        print(f"| {name} | {total * 1e3:.1f} | {finalise[name] * 1e3:.2f} | {per_batch * 1e6:.0f} | "
              f"{per_batch / args.layers * 1e6:.1f} |")
    if device.type == "cuda":
        waited = copy_waits(device)
        print("\nhost ms of a non-blocking 33 KB host-to-device copy behind 50 ms of queued device work "
              "(~50: the driver waited for the device): "
              + ", ".join(f"{kind} {ms:.2f}" for kind, ms in waited.items()))


if __name__ == "__main__":
    main()
