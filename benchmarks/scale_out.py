"""Scale-out costs on the CPU: checkpoint overhead and a 2-process (gloo) run vs one process.

    python benchmarks/scale_out.py --examples 1024

Prints ratios measured in one run: scoring with a checkpoint after every batch vs none, and two
gloo processes with one thread each vs one process with two threads (same corpus, MiniLM).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from end_to_end import REPO, read_sst2  # noqa: E402

import hsvfast  # noqa: E402
from hsvfast.batching import BucketedBatches  # noqa: E402
from hsvfast.distributed import shard  # noqa: E402


def load(n):
    from transformers import AutoModel, AutoTokenizer

    from hsvfast.cli import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    model = AutoModel.from_pretrained(default_model_path()).eval()
    texts, labels = read_sst2(REPO.parent / "shared" / "data" / "sst2" / "train.tsv", n)
    return model, list(BucketedBatches(texts, labels, tokenizer, batch_size=32))


def _rank(rank, world, n, init, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    model, batches = load(n)
    mine = shard(batches)
    dist.barrier()
    began = time.perf_counter()
    hsvfast.score(model, mine)
    dist.barrier()
    if rank == 0:
        Path(out).write_text(str(time.perf_counter() - began))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model, batches = load(args.examples)
    hsvfast.score(model, batches[:2])
    plain, checkpointed = [], []
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            began = time.perf_counter()
            hsvfast.score(model, batches)
            plain.append(time.perf_counter() - began)
            began = time.perf_counter()
            hsvfast.score(model, batches, checkpoint=os.path.join(folder, f"c{r}.ckpt"), checkpoint_every=1)
            checkpointed.append(time.perf_counter() - began)
        import statistics as st
        import torch.multiprocessing as mp

        one = st.median(plain)
        print(f"examples={args.examples} batches={len(batches)} threads={torch.get_num_threads()}")
        print(f"checkpoint after every batch: {st.median(checkpointed) / one:.3f}× the time without "
              f"({st.median(checkpointed):.2f} s vs {one:.2f} s)")
        out = os.path.join(folder, "t")
        mp.spawn(_rank, args=(2, args.examples, os.path.join(folder, "init"), out), nprocs=2, join=True)
        two = float(Path(out).read_text())
        print(f"2 gloo processes × 1 thread: {two:.2f} s; 1 process × {torch.get_num_threads()} threads: "
              f"{one:.2f} s; speed-up {one / two:.2f}×")


if __name__ == "__main__":
    main()
