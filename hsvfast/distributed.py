"""Scoring past one process on torch.distributed: exact all-reduce of the statistics, sharding.

Each rank scores its own shard; at the end the ranks agree on one class order and one shift per
class (the shift of the lowest rank that saw the class), re-express their moments around it
(exact: the moments are polynomials in the shift), and sum them with one all-reduce per layer.
Every rank then holds the statistics of the whole corpus.
"""
from __future__ import annotations

from typing import Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .statistics import LayerMoments, Statistics, balanced_scale, recentred


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, rank + 2·world, …`` of a dataset of ``size`` examples.

    Unlike ``DistributedSampler`` it never pads or drops: shards differ in length by at most one
    and together hold every example exactly once, so the statistics stay exact.
    """

    def __init__(self, size: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> None:
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        self.size = size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def shard(items, rank: Optional[int] = None, world_size: Optional[int] = None) -> list:
    """This rank's share of a sequence (see :class:`ShardSampler`)."""
    return [items[i] for i in ShardSampler(len(items), rank, world_size)]


def gathered(value, group=None) -> list:
    """``value`` of every rank, in rank order (any picklable value)."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, value, group=group)
    return everyone


def all_reduce_statistics(stats: Statistics, group=None) -> Statistics:
    """Sum the statistics of every rank into every rank's ``stats`` (in place; returns it)."""
    stats.flush()  # staged rows are relative to the shifts this function replaces
    rank = dist.get_rank(group)
    mine = {"labels": stats.labels, "counts": stats.counts[: stats.num_classes].tolist(),
            "sizes": [m.hidden_size if m is not None else None for m in stats.moments],
            "skipped": stats.num_skipped, "batches": stats.num_batches, "info": stats.info, "layers": stats.layers,
            "mode": stats.mode}
    everyone: List[dict] = gathered(mine, group)
    for other in everyone:
        if other["layers"] != stats.layers or other["mode"] != stats.mode:
            raise ValueError("ranks scored different layers or modes; every rank must call score() alike")
    labels, owner = [], {}
    for r, other in enumerate(everyone):
        for label in other["labels"]:
            if label not in owner:
                owner[label] = r
                labels.append(label)
    index = {label: i for i, label in enumerate(labels)}
    total = np.zeros(len(labels), dtype=np.int64)
    for other in everyone:
        for label, n in zip(other["labels"], other["counts"]):
            total[index[label]] += n
    sizes = [next((o["sizes"][p] for o in everyone if o["sizes"][p] is not None), None)
             for p in range(len(stats.layers))]
    local = np.array([index[label] for label in stats.labels], dtype=np.int64)
    my_counts = stats.counts[: stats.num_classes].astype(np.float64)
    owned = np.array([owner[label] == rank for label in stats.labels], dtype=bool)
    capacity = max(2, len(labels))

    for position, hidden in enumerate(sizes):
        if hidden is None:
            continue
        old = stats.moments[position]
        new = LayerMoments.empty(hidden, capacity, stats.mode, stats.device)
        if old is not None and len(local):
            idx = torch.as_tensor(local, device=stats.device)
            n = torch.as_tensor(my_counts, dtype=torch.float64, device=stats.device)
            keep = torch.as_tensor(owned, device=stats.device)
            # The common shift: each class's owner contributes its own.
            new.shift[idx] = torch.where(keep.unsqueeze(1), old.shift[: len(local)], 0.0)
        dist.all_reduce(new.shift, group=group)
        if old is not None and len(local):
            delta = old.shift[: len(local)] - new.shift[idx]          # x' = x + δ around the common shift
            new.sums[idx], new.sqnorms[idx], correction = recentred(
                old.sums[: len(local)], old.sqnorms[: len(local)], n, delta, second=stats.mode != "trace")
            if stats.mode == "per_class":
                new.second[idx] = old.second[: len(local)] + correction
            elif stats.mode == "balanced":
                scale = balanced_scale(stats.class_counts, stats.labels, stats.device)
                new.second.copy_(old.second + torch.einsum("c,cij->ij", scale, correction))
            new.nonfinite.copy_(old.nonfinite)
        elif old is not None and stats.mode == "balanced":
            new.second.copy_(old.second)
        packed = torch.cat([new.sums.flatten(), new.sqnorms] + ([new.second.flatten()] if new.second is not None
                                                                 else []))
        dist.all_reduce(packed, group=group)  # one collective per layer
        a, b = new.sums.numel(), new.sums.numel() + new.sqnorms.numel()
        new.sums.copy_(packed[:a].view_as(new.sums))
        new.sqnorms.copy_(packed[a:b])
        if new.second is not None:
            new.second.copy_(packed[b:].view_as(new.second))
        dist.all_reduce(new.nonfinite, op=dist.ReduceOp.MIN, group=group)
        stats.moments[position] = new

    stats.labels = labels
    stats._class_of = dict(index)
    stats.counts = total
    stats.capacity = capacity
    stats.num_skipped = sum(o["skipped"] for o in everyone)
    stats.num_batches = sum(o["batches"] for o in everyone)
    return stats
