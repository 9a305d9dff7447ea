"""Measure the CUDA data-side defaults of ``hsvfast.score`` one at a time, in one run on the same batches.

    python benchmarks/gpu_choices.py --device cuda

A float32 BERT-base-size model with random weights, batches on the host as a DataLoader yields them.
Each row changes one choice against hsvfast's default (bf16 autocast on, SDPA attention, batches
copied as the loader yields them, CUDA graphs where the forward is bound by the host); the floors are bare truncated forwards with the same precision.
(hsvfast used to pin every batch itself; on an H100 that measured 1.003× the pageable copy, so it
no longer does; the row "loader-pinned batches" measures what DataLoader(pin_memory=True) gives.)
Prints median seconds over interleaved rounds, the ratio to the default, and how far ν moves
under autocast.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hsvfast  # noqa: E402
from baselines.floor import bare_forward  # noqa: E402
from end_to_end import seconds, synthetic_batches, warm_up  # noqa: E402


def make_model(attention: str, device: str):
    import transformers as tf

    config = tf.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           attn_implementation=attention)
    torch.manual_seed(0)
    return tf.BertModel(config).to(device).eval()


def floor(model, batches, device, autocast: bool) -> None:
    """The bare forward of every block, under bf16 autocast or not."""
    precision = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with precision:
        bare_forward(model, batches, len(hsvfast.find_blocks(model)) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--examples", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = args.device
    sdpa, eager = make_model("sdpa", device), make_model("eager", device)
    batches, real_tokens, _ = synthetic_batches(args.examples, args.batch_size)

    def score(model, data=batches, **kwargs):
        return np.array(hsvfast.score(model, data, device=device, **kwargs).metrics["variability"])

    pinned = [{k: v.pin_memory() for k, v in b.items()} for b in batches] if device == "cuda" else batches

    methods = {
        "hsvfast default (bf16 autocast, SDPA, cuda_graphs='auto')": lambda: score(sdpa),
        "CUDA graphs off (cuda_graphs=False)": lambda: score(sdpa, cuda_graphs=False),
        "autocast off (float32)": lambda: score(sdpa, autocast=False),
        "loader-pinned batches (pin_memory=True)": lambda: score(sdpa, pinned),
        "eager attention instead of SDPA": lambda: score(eager),
        "floor, bf16 autocast": lambda: floor(sdpa, batches, device, True),
        "floor, float32": lambda: floor(sdpa, batches, device, False),
    }
    warm_up(methods.values(), batches, pinned)
    times = {name: [] for name in methods}
    results = {}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            elapsed, results[name] = seconds(fn, device)
            times[name].append(elapsed)

    default_name = next(iter(methods))
    default = statistics.median(times[default_name])
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\nBERT-base-size random float32, device={name} torch={torch.__version__} examples={args.examples} "
          f"batch={args.batch_size} rounds={args.rounds}\n")
    print("| choice | median s | × default | tokens/s |")
    print("|---|---:|---:|---:|")
    for label, samples in times.items():
        median = statistics.median(samples)
        print(f"| {label} | {median:.3f} | {median / default:.3f} | {real_tokens / median:,.0f} |")
    bf16 = results[default_name]
    fp32 = results["autocast off (float32)"]
    print(f"\nν under bf16 autocast vs float32, max relative difference over layers: "
          f"{np.max(np.abs(bf16 - fp32) / np.abs(fp32)):.2e}")


if __name__ == "__main__":
    main()
