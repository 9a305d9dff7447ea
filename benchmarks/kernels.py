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

from end_to_end import seconds
from hsvfast import _kernels

LAUNCHES = 10  # kernel launches per CUDA graph replay
ROTATE_BYTES = 256 << 20  # inputs rotated per replay: well over a GPU's L2 cache (50-60 MB on H100/H200)

CASES = [  # (batch, tokens, hidden)
    (64, 32, 384),
    (64, 128, 1024),
    (32, 512, 4096),
]


def make(batch, tokens, dim, dtype, device, classes=2, misaligned=False):
    if misaligned:  # a view one element into a wider buffer: the strided (generic) code path
        act = torch.randn(batch, tokens, dim + 1, device=device).to(dtype)[:, :, 1:]
    else:
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


def time_it(fns, device, repeats, graphed=True):
    """Median seconds of one call of ``fns`` (calls on rotating copies of the input, so a GPU's
    L2 cache does not hold the data from one call to the next). On CUDA the calls are replayed
    from a captured CUDA graph (``LAUNCHES`` per replay), so the host's launch overhead (Python,
    argument checks) stays out of the device time; ``graphed=False`` times eager launches."""
    fn = fns[0]
    fn()
    replay, per_sample = fn, 1
    if device == "cuda" and graphed:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm-up on the capture stream, as torch.cuda.graph asks
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for i in range(LAUNCHES):
                    fns[i % len(fns)]()
            replay, per_sample = graph.replay, LAUNCHES
        except RuntimeError as error:  # keep the table: fall back to eager launches, and say so
            print(f"(CUDA graph capture failed, timing eager launches instead: {error})")
            torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            replay()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3 / per_sample)
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
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated activation dtypes")
    args = parser.parse_args()
    # Small: one case for each CUDA path (hidden size 131: generic; 264: 16-byte loads).
    cases = [(4, 7, 131), (3, 37, 264)] if args.small else CASES
    backend = _kernels.backend(args.device)
    print(f"device={torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'} backend={backend} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}\n")
    print("| B×T×d | dtype | kernel ms | kernel GB/s | copy GB/s (read+write) | kernel/copy | "
          "copy read GB/s | kernel/copy read | one eager launch ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    runs = [(case, dtype, False) for case in cases for dtype in dtypes]
    if not args.small:
        runs += [((64, 128, 1024), dtype, True) for dtype in dtypes]
    for (batch, tokens, dim), dtype, misaligned in runs:
        act, weights, labels, out_rows, state = make(batch, tokens, dim, dtype, args.device, misaligned=misaligned)
        copies = max(1, min(LAUNCHES, -(-ROTATE_BYTES // (act.numel() * act.element_size()))))
        acts = [act] + [act.clone() if act.is_contiguous() else make(batch, tokens, dim, dtype, args.device,
                                                                     misaligned=misaligned)[0]
                        for _ in range(copies - 1)]
        kernels = [lambda a=a: _kernels.pool_fold(a, weights, state["out"], labels=labels, out_rows=out_rows,
                                                  shift=state["shift"], sums=state["sums"],
                                                  sqnorms=state["sqnorms"], nonfinite=state["nonfinite"])
                   for a in acts]
        targets = [torch.empty(act.shape, dtype=act.dtype, device=act.device) for _ in acts]
        copy_fns = [lambda a=a, t=t: t.copy_(a) for a, t in zip(acts, targets)]
        kernel_seconds = time_it(kernels, args.device, args.repeats)
        copy_seconds = time_it(copy_fns, args.device, args.repeats)
        eager = time_it(kernels, args.device, args.repeats, graphed=False)
        attended = act.element_size() * batch * (tokens * 3 // 4) * dim
        kernel_bw = attended / kernel_seconds / 1e9
        copy_bw = 2 * act.numel() * act.element_size() / copy_seconds / 1e9
        print(f"| {batch}×{tokens}×{dim}{' view' if misaligned else ''} | {str(dtype).replace('torch.', '')} | {kernel_seconds * 1e3:.3f} | "
              f"{kernel_bw:.1f} | {copy_bw:.1f} | {kernel_bw / copy_bw:.2f} | {copy_bw / 2:.1f} | "
              f"{2 * kernel_bw / copy_bw:.2f} | {eager * 1e3:.3f} |")
    if args.device == "cuda":
        torch.cuda.synchronize()
    assert int(state["nonfinite"].item()) == _kernels.NO_BAD_BATCH
    several_layers(args.device, args.small, args.repeats)


def several_layers(device: str, small: bool, repeats: int) -> None:
    """All layers of one batch in one call (what score does on a GPU) against a call per layer: the
    same numbers, and on the GPU the wall time of launching them (host path included, no graph)."""
    if small:  # for compute-sanitizer: widths and alignments of both CUDA code paths in one launch
        shapes, dtype, count = [(4, 7, 131), (4, 7, 264), (4, 7, 8)], torch.float32, 3
    else:  # BERT-large, a batch of 128 SST-2-length sequences
        shapes, dtype, count = [(128, 35, 1024)] * 24, torch.bfloat16, 24
    layers = []
    for i, (batch, tokens, dim) in enumerate(shapes[:count]):
        act, weights, labels, out_rows, state = make(batch, tokens, dim, dtype, device, misaligned=small and i == 0)
        layers.append((act, state))
    acts, states = [a for a, _ in layers], [st for _, st in layers]

    def one_call():
        _kernels.pool_fold_layers(acts, weights, [st["out"] for st in states], labels, out_rows,
                                  [st["shift"] for st in states], [st["sums"] for st in states],
                                  [st["sqnorms"] for st in states], [st["nonfinite"] for st in states])

    def call_per_layer():
        for act, st in layers:
            _kernels.pool_fold(act, weights, st["out"], labels=labels, out_rows=out_rows, shift=st["shift"],
                               sums=st["sums"], sqnorms=st["sqnorms"], nonfinite=st["nonfinite"], validate=False)

    one_call()
    got = [st["out"].clone() for st in states]
    call_per_layer()
    difference = max(float((g - st["out"]).abs().max()) for g, st in zip(got, states))
    times = {name: statistics.median(seconds(fn, device)[0] for _ in range(repeats))
             for name, fn in (("a call per layer", call_per_layer), ("one call", one_call))}
    print(f"\n{count} layers of {shapes[0][0]}×{shapes[0][1]}×{shapes[0][2]} {str(dtype).replace('torch.', '')} "
          f"(wall, host path included): a call per layer {times['a call per layer'] * 1e6:.0f} µs, one call "
          f"{times['one call'] * 1e6:.0f} µs; outputs differ by {difference:.1e}")
    assert difference == 0.0


if __name__ == "__main__":
    main()
