"""Length-bucketed batches of tokenised text, ready for :func:`hsvfast.score`.

ν does not depend on the order of examples, so the corpus can be sorted by token
length before batching: sequences of similar length share a batch and almost no
compute is spent on padding. Sorting happens within chunks of ``chunk_batches``
batches, so a huge corpus is never held tokenised all at once.
"""
from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Hashable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from .data import TextColumn
from .statistics import normalise_labels


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

    Sequences are padded on the right whatever ``tokenizer.padding_side`` says: every real token
    keeps the position it has unpadded, so a model that does not derive positions from the
    attention mask (BERT, and Llama without ``position_ids``) sees it exactly as it would alone.
    A tokenizer without a pad token pads with its end-of-sequence token (the attention mask
    and the token weights leave the padding out).

    Args:
        texts: the sentences (or first sentences of pairs).
        labels: one label per text.
        tokenizer: a Hugging Face tokenizer. A fast one is run through its Rust backend in batches
            (a private copy, so the caller's tokenizer settings are left alone).
        text_pairs: second sentences for pair tasks (MRPC, RTE, QNLI).
        batch_size: sequences per batch.
        max_length: truncate longer sequences (128 as in the paper).
        chunk_batches: how many batches are tokenised and sorted together.
        pin_memory: pad straight into pinned (page-locked) memory, for a pass on a GPU: the copies
            to the device are then asynchronous, as with ``DataLoader(pin_memory=True)``, at no
            extra host copy.
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
        pin_memory: bool = False,
    ) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(text_pairs)} second sentences")
        for name, value in (("batch_size", batch_size), ("max_length", max_length), ("chunk_batches", chunk_batches)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        # Below this a tokenizer does not truncate at all (it cannot drop its own special tokens).
        count_special = getattr(tokenizer, "num_special_tokens_to_add", None)
        special = count_special(pair=text_pairs is not None) if count_special is not None else 0
        if max_length <= special:
            raise ValueError(f"max_length={max_length} leaves no room for text: the tokenizer adds {special} special "
                             f"tokens to each {'pair' if text_pairs is not None else 'text'}; pass max_length > "
                             f"{special} (the paper uses 128)")
        # A TextColumn (read_labelled_text) is kept as it is: compact, all strings, turned into Python
        # strings a chunk at a time. Anything else is copied (later changes to it do not matter) and checked.
        texts, text_pairs = (column if isinstance(column, TextColumn) or column is None else list(column)
                             for column in (texts, text_pairs))
        for name, column in (("texts", texts), ("text_pairs", text_pairs)):
            if isinstance(column, list):
                bad = next((i for i, text in enumerate(column) if not isinstance(text, str)), None)
                if bad is not None:
                    raise TypeError(f"{name}[{bad}] is {column[bad]!r}, not a string: drop or fill missing texts first")
        # Checked now, not mid-pass: float (regression), multi-label and missing (None) labels are refused.
        self.texts, self.labels, self.text_pairs = texts, normalise_labels(labels), text_pairs
        self.tokenizer = tokenizer
        self.batch_size, self.max_length, self.chunk_size = batch_size, max_length, batch_size * chunk_batches
        self.padding = PaddingStats()
        self._backend = _truncating_backend(tokenizer, max_length)
        self._pad_values = _pad_values(tokenizer)
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True is for copies to a CUDA device, and none is available: leave it False")
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for start, stop in self._chunks())

    def _chunks(self) -> List[tuple]:
        """(start, stop) of each chunk of texts tokenised and sorted together."""
        total = len(self.texts)
        return [(start, min(total, start + self.chunk_size)) for start in range(0, total, self.chunk_size)]

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self.padding = PaddingStats()
        # Each chunk is tokenised in a background thread while the batches of the one before are
        # used: the Rust tokenizer releases the GIL, so tokenising overlaps with the forward pass.
        chunks = self._chunks()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hsvfast-tokenize")
        try:
            upcoming = pool.submit(self._encode, *chunks[0]) if chunks else None
            for index, (start, _) in enumerate(chunks):
                columns = upcoming.result()
                if index + 1 < len(chunks):
                    upcoming = pool.submit(self._encode, *chunks[index + 1])
                yield from self._chunk_batches(start, columns)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def label_counts(self, pooling: str = "mean", progress: bool = False) -> Dict[Hashable, int]:
        """How many texts of each label :func:`hsvfast.score` will pool with ``pooling`` — a tokenising
        pre-pass, chunk by chunk (nothing is kept). Texts with no token to pool (under ``"mean"``, an
        empty text is only special tokens) are skipped by ``score`` and not counted, so the result
        can be passed as ``class_counts``. ``progress`` shows a bar over the chunks."""
        labels = self.labels
        counts: Dict[Hashable, int] = {}
        chunks = self._chunks()
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="hsvfast: counting classes", unit="chunk")
        for start, stop in chunks:
            columns = self._encode(start, stop)
            poolable = columns["lengths"] > 0
            if pooling == "mean" and poolable.any():  # and a token that is not special
                ordinary = np.zeros(len(poolable), np.int64)
                # Sums over each non-empty sequence (reduceat would read an empty one's neighbour).
                ordinary[poolable] = np.add.reduceat(1 - columns["special_tokens_mask"], columns["starts"][poolable])
                poolable &= ordinary > 0
            for offset in np.flatnonzero(poolable).tolist():
                label = labels[start + offset]
                counts[label] = counts.get(label, 0) + 1
        return counts

    def _chunk_batches(self, start: int, columns: Dict[str, np.ndarray]) -> Iterator[Dict[str, Any]]:
        """The batches of one tokenised chunk (texts start, start + 1, …), shortest sequences first."""
        lengths = columns["lengths"]
        order = np.argsort(lengths, kind="stable")
        for first in range(0, len(order), self.batch_size):
            rows = order[first : first + self.batch_size]
            batch = _right_padded(columns, rows, self._pad_values, self.pin_memory)
            batch["labels"] = _label_tensor([self.labels[start + r] for r in rows])
            self.padding.real_tokens += int(lengths[rows].sum())
            self.padding.padded_tokens += int(batch["input_ids"].numel())
            yield batch

    def _encode(self, start: int, stop: int) -> Dict[str, np.ndarray]:
        """Token ids, special-token masks (and token types) of texts[start:stop], unpadded: each column
        one flat int64 array of the sequences one after another, with their ``lengths`` and ``starts``
        (made here, in the tokenising thread, so that batching is array indexing)."""
        texts = list(self.texts[start:stop])
        pairs = list(self.text_pairs[start:stop]) if self.text_pairs is not None else None
        with_types = "token_type_ids" in getattr(self.tokenizer, "model_input_names", ["token_type_ids"])
        if self._backend is not None:
            inputs = list(zip(texts, pairs)) if pairs is not None else texts
            # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, which are not used here.
            encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
            encodings = encode(inputs)
            columns = {"input_ids": [e.ids for e in encodings],
                       "special_tokens_mask": [e.special_tokens_mask for e in encodings]}
            if with_types:
                columns["token_type_ids"] = [e.type_ids for e in encodings]
        else:
            encoded = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length,
                                     return_special_tokens_mask=True, return_attention_mask=False)
            columns = {key: encoded[key] for key in ("input_ids", "special_tokens_mask", "token_type_ids")
                       if key in encoded}
        lengths = np.fromiter(map(len, columns["input_ids"]), np.int64, len(texts))
        total = int(lengths.sum())
        flat = {key: np.fromiter(itertools.chain.from_iterable(column), np.int64, total)
                for key, column in columns.items()}
        return {**flat, "lengths": lengths, "starts": np.cumsum(lengths) - lengths}


def _truncating_backend(tokenizer: Any, max_length: int) -> Any:
    """A private copy of a fast tokenizer's Rust backend that truncates like ``tokenizer(..., truncation=True,
    max_length=max_length)`` and never pads; None for a slow tokenizer (it is called as it is)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    try:
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(backend.to_str())
    except Exception:  # a component that does not serialise (custom Python pre-tokenizer): call the tokenizer
        return None
    copy.no_padding()
    copy.enable_truncation(max_length, strategy="longest_first",
                           direction=getattr(tokenizer, "truncation_side", "right"))
    return copy


def _pad_values(tokenizer: Any) -> Dict[str, int]:
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # decoders often have none; what fills the padding is never attended or pooled
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return {"input_ids": pad_id, "special_tokens_mask": 1,
            "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}


def _right_padded(columns: Dict[str, np.ndarray], rows: np.ndarray, pad_values: Dict[str, int],
                  pin_memory: bool = False) -> Dict[str, Any]:
    """The sequences ``rows`` of each flat column (see ``BucketedBatches._encode``) as one right-padded
    (B, longest) long tensor, plus the attention mask."""
    lengths = columns["lengths"][rows]
    positions = np.arange(int(lengths.max()) if len(lengths) else 0)
    attended = positions < lengths[:, None]
    # Where each attended position's token lies in the flat columns, in row-major order.
    taken = (columns["starts"][rows][:, None] + positions)[attended]
    batch = {}
    for key in ("input_ids", "special_tokens_mask", "token_type_ids"):
        if key not in columns:
            continue
        tensor = torch.empty(attended.shape, dtype=torch.long, pin_memory=pin_memory)
        padded = tensor.numpy()
        padded.fill(pad_values[key])
        padded[attended] = columns[key][taken]
        batch[key] = tensor
    mask = torch.empty(attended.shape, dtype=torch.long, pin_memory=pin_memory)
    mask.numpy()[...] = attended
    batch["attention_mask"] = mask
    return batch


def _label_tensor(labels: List[Hashable]):
    """Integer labels as a tensor; anything else (strings) stays a list."""
    if all(isinstance(label, (int, np.integer)) and not isinstance(label, bool) for label in labels):
        return torch.tensor(labels, dtype=torch.long)
    return labels
