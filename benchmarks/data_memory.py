"""Memory of the CLI's data side: read a labelled file and batch it, texts kept as the reader gives them
(Arrow, memory-mapped) or turned into a Python list first (what the reader returned before).

    python benchmarks/data_memory.py --rows 600000

Writes a TSV of random words (about 95 bytes a row) to a temporary folder, then runs each mode in a
fresh process (so one's allocations do not hide the other's) and prints anonymous resident memory after
reading and after batching, the peak resident set, and the times. Needs the MiniLM package's tokenizer.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_corpus(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(5000)])
    with path.open("w") as handle:
        handle.write("sentence\tlabel\n")
        for _ in range(rows):
            handle.write(" ".join(rng.choice(words, rng.integers(3, 30))) + f"\t{rng.integers(0, 2)}\n")


def anonymous_mib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("RssAnon:")[1].split()[0]) // 1024


def measure(path: str, mode: str) -> None:
    import transformers as tf

    from hsvfast.batching import BucketedBatches
    from hsvfast.cli import default_model_path
    from hsvfast.data import read_labelled_text

    tokenizer = tf.AutoTokenizer.from_pretrained(default_model_path())
    start = time.perf_counter()
    table = read_labelled_text(path)
    texts = list(table.texts) if mode == "list" else table.texts
    read = time.perf_counter() - start
    after_read = anonymous_mib()
    batches = sum(1 for _ in BucketedBatches(texts, table.labels, tokenizer, batch_size=64))
    batched = time.perf_counter() - start - read
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"| {mode} | {read:.2f} | {after_read} | {batched:.1f} | {anonymous_mib()} | {peak} | {batches} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600_000)
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(*args.measure)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "corpus.tsv"
        write_corpus(path, args.rows)
        print(f"{args.rows:,} rows, {path.stat().st_size / 1e6:.0f} MB")
        print("| texts | read s | anon MiB after read | batching s | anon MiB after | peak RSS MiB | batches |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for mode in ("arrow", "list"):
            subprocess.run([sys.executable, __file__, "--measure", str(path), mode], check=True)


if __name__ == "__main__":
    main()
