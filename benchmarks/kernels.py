"""Pool-and-fold kernel throughput against a copy of the same tensor, measured in one run.

    python benchmarks/kernels.py                 # CPU
    python benchmarks/kernels.py --device cuda   # GPU: CUDA events, no host sync inside the loop
    python benchmarks/kernels.py --small         # one tiny case (for compute-sanitizer)

Kernel bandwidth counts the bytes of the attended activations, read once (the kernel's minimum
traffic). The copy baseline is shown both ways: read+write (the usual device-to-device figure, the
GPU target's reference: ≥ 70 %) and its read stream alone (what a read-only kernel can hope for
on a CPU, where reads and writes compete for DRAM).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hsvfast import _kernels

CASES = [  # (batch, tokens, hidden)
    (64, 32, 384),
    (64, 128, 1024),
    (32, 512, 4096),
]


def make(batch, tokens, dim, dtype, device, classes=2):
    act = torch.randn(batch, tokens, dim, device=device).to(dtype)
    weights = torch.ones(batch, tokens, device=device)
    weights[:, tokens * 3 // 4 :] = 0  # a quarter padding, never read
    labels = torch.arange(batch, device=device) % classes
    out_rows = torch.arange(batch, device=device)
    f64 = dict(dtype=torch.float64, device=device)
    state = dict(out=torch.empty(batch, dim, **f64), shift=torch.zeros(classes, dim, **f64),
                 sums=torch.zeros(classes, dim, **f64), sqnorms=torch.zeros(classes, **f64),
                 nonfinite=torch.full((1,), _kernels.NO_BAD_BATCH, dtype=torch.int64, device=device))
    return act, weights, labels, out_rows, state


def time_it(fn, device, repeats):
    fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    cases = [(4, 7, 131)] if args.small else CASES
    backend = _kernels.backend(args.device)
    print(f"device={torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'} backend={backend} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}\n")
    print("| B×T×d | dtype | kernel ms | kernel GB/s | copy GB/s (read+write) | kernel/copy | "
          "copy read GB/s | kernel/copy read |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for batch, tokens, dim in cases:
        for dtype in (torch.float32, torch.bfloat16):
            act, weights, labels, out_rows, state = make(batch, tokens, dim, dtype, args.device)
            kernel = lambda: _kernels.pool_fold(act, weights, state["out"], labels=labels, out_rows=out_rows,  # noqa: E731
                                                shift=state["shift"], sums=state["sums"], sqnorms=state["sqnorms"],
                                                nonfinite=state["nonfinite"])
            target = torch.empty_like(act)
            copy = lambda: target.copy_(act)  # noqa: E731
            seconds = time_it(kernel, args.device, args.repeats)
            copy_seconds = time_it(copy, args.device, args.repeats)
            attended = act.element_size() * batch * (tokens * 3 // 4) * dim
            kernel_bw = attended / seconds / 1e9
            copy_bw = 2 * act.numel() * act.element_size() / copy_seconds / 1e9
            print(f"| {batch}×{tokens}×{dim} | {str(dtype).replace('torch.', '')} | {seconds * 1e3:.3f} | "
                  f"{kernel_bw:.1f} | {copy_bw:.1f} | {kernel_bw / copy_bw:.2f} | {copy_bw / 2:.1f} | "
                  f"{2 * kernel_bw / copy_bw:.2f} |")
    if args.device == "cuda":
        torch.cuda.synchronize()
    assert int(state["nonfinite"].item()) == _kernels.NO_BAD_BATCH


if __name__ == "__main__":
    main()
