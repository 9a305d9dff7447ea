"""Worker of the 2-process gloo test: a top-level module, so spawned processes can import it."""
import json
import os
import sys
from pathlib import Path

import hsvfast

TESTS = Path(__file__).resolve().parent


def score_shard(rank, world, init_file, out_dir):
    import torch.distributed as dist

    sys.path.insert(0, str(TESTS))
    from hsvfast.distributed import shard
    from tiny_models import random_batches as make, tiny_model as build

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches = make(num_batches=5)
        batches[3]["labels"][:] = 7  # class 7 exists only in batch 3, which only rank 1 gets
        report = hsvfast.score(build("bert"), shard(batches), checkpoint=os.path.join(out_dir, "ckpt"),
                               checkpoint_every=1)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report.to_dict()))
    finally:
        dist.destroy_process_group()


def score_batcher_shard(rank, world, init_file, out_dir):
    """Each rank scores its shard of texts through BucketedBatches, with too little memory for
    per-class matrices: the class counts come from a pre-pass over every rank's shard."""
    import torch.distributed as dist

    sys.path.insert(0, str(TESTS))
    from hsvfast.batching import BucketedBatches
    from hsvfast.distributed import shard
    from tiny_models import tiny_corpus, tiny_tokenizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        texts, labels = tiny_corpus()
        loader = BucketedBatches(shard(texts), shard(labels), tiny_tokenizer(), batch_size=8)
        report = hsvfast.score(build_double_bert(), loader, max_memory=100_000)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({**report.to_dict(), "mode": report.stats.mode}))
    finally:
        dist.destroy_process_group()


def build_double_bert():
    from tiny_models import tiny_model

    return tiny_model("bert").double()
