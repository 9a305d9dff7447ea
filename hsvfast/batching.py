"""Length-bucketed batches of tokenised text, ready for :func:`hsvfast.score`.

ν does not depend on the order of examples, so the corpus can be sorted by token
length before batching: sequences of similar length share a batch and almost no
compute is spent on padding. Sorting happens within chunks of ``chunk_batches``
batches, so a huge corpus is never held tokenised all at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Hashable, Iterator, List, Optional, Sequence

import numpy as np
import torch


@dataclass
class PaddingStats:
    """Real (attended) and padded token counts of the batches produced so far."""

    real_tokens: int = 0
    padded_tokens: int = 0

    @property
    def efficiency(self) -> float:
        """real / padded tokens (1.0 = no padding at all)."""
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


class BucketedBatches:
    """Iterable of dict batches: ``input_ids``, ``attention_mask``, ``special_tokens_mask``,
    ``labels`` (and ``token_type_ids`` where the tokenizer makes them).

    Args:
        texts: the sentences (or first sentences of pairs).
        labels: one label per text.
        tokenizer: a (fast) Hugging Face tokenizer; it tokenises in batches.
        text_pairs: second sentences for pair tasks (MRPC, RTE, QNLI).
        batch_size: sequences per batch.
        max_length: truncate longer sequences (128 as in the paper).
        chunk_batches: how many batches are tokenised and sorted together.
    """

    def __init__(
        self,
        texts: Sequence[str],
        labels: Sequence[Hashable],
        tokenizer: Any,
        text_pairs: Optional[Sequence[str]] = None,
        batch_size: int = 64,
        max_length: int = 128,
        chunk_batches: int = 64,
    ) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(text_pairs)} second sentences")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.texts, self.labels, self.text_pairs = list(texts), list(labels), text_pairs
        self.tokenizer = tokenizer
        self.batch_size, self.max_length, self.chunk_size = batch_size, max_length, batch_size * chunk_batches
        self.padding = PaddingStats()

    def __len__(self) -> int:
        return sum(-(-min(self.chunk_size, len(self.texts) - s) // self.batch_size)
                   for s in range(0, len(self.texts), self.chunk_size))

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        self.padding = PaddingStats()
        for start in range(0, len(self.texts), self.chunk_size):
            stop = min(len(self.texts), start + self.chunk_size)
            pairs = self.text_pairs[start:stop] if self.text_pairs is not None else None
            encoded = self.tokenizer(
                self.texts[start:stop], pairs, truncation=True, max_length=self.max_length,
                return_special_tokens_mask=True, return_attention_mask=True,
            )
            lengths = np.array([len(ids) for ids in encoded["input_ids"]])
            order = np.argsort(lengths, kind="stable")
            for first in range(0, len(order), self.batch_size):
                rows = order[first : first + self.batch_size]
                features = [{key: encoded[key][r] for key in encoded.keys()} for r in rows]
                batch = dict(self.tokenizer.pad(features, return_tensors="pt"))
                batch["labels"] = _label_tensor([self.labels[start + r] for r in rows])
                self.padding.real_tokens += int(lengths[rows].sum())
                self.padding.padded_tokens += int(batch["input_ids"].numel())
                yield batch


def _label_tensor(labels: List[Hashable]):
    """Integer labels as a tensor; anything else (strings) stays a list."""
    if all(isinstance(label, (int, np.integer)) and not isinstance(label, bool) for label in labels):
        return torch.tensor(labels, dtype=torch.long)
    return labels
