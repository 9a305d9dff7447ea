"""What the host must know of each batch, read one batch ahead so the pass never waits on a GPU.

``score`` plans every batch on the host: class ids, staging rows and counts come from the
batch's labels and from which sequences have a token to pool. For batches a loader yields on
the host (the usual case) those are at hand. For batches that already live on a GPU they must
come back to the host; copied when the batch is taken from the loader — one batch early, into
pinned memory, on the current stream — they have long arrived when the batch is scored, so
reading them does not wait for the device (a plain ``.tolist()`` there would wait for every
kernel queued before it, once per batch).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch

from .pooling import token_weights
from .statistics import check_label_tensor, normalise_labels

#: Batch entries read as labels, in this order.
LABEL_KEYS = ("labels", "label")
#: Label tensors handed to the statistics as an int64 array (no Python list per batch).
_INTEGER_LABELS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
T = TypeVar("T")


class PreparedBatch:
    """A batch with its token weights (on the batch's device) and, possibly still in flight, the
    labels and the poolable-row mask on the host."""

    def __init__(self, index: int, batch: Mapping[str, Any], pooling: str,
                 special_ids: Optional[Sequence[int]], pin: bool = False) -> None:
        self.index, self.batch = index, batch
        self.weights = token_weights(batch, pooling, special_ids)
        if pin and self.weights.is_cpu:  # bound for a GPU: a copy from pinned memory never waits for it
            self.weights = self.weights.pin_memory()
        labels = batch_labels(batch, index)
        if isinstance(labels, torch.Tensor):
            check_label_tensor(labels)  # the regression / multi-label error before anything is copied
        self._labels, labels_arrived = _start_copy(labels)
        self._poolable, mask_arrived = _start_copy(self.weights.sum(1) > 0)
        self._arrivals = [event for event in (labels_arrived, mask_arrived) if event is not None]

    def labels_and_poolable(self) -> Tuple[Any, np.ndarray]:
        """The batch's labels — an int64 array for an integer label tensor, else a list of plain Python
        values — and the (B,) mask of rows with a token to pool."""
        for event in self._arrivals:
            event.synchronize()  # recorded a batch ago: long done
        labels = self._labels
        if isinstance(labels, torch.Tensor) and labels.dtype in _INTEGER_LABELS:
            labels = labels.reshape(-1).numpy().astype(np.int64, copy=False)
        else:
            try:
                labels = normalise_labels(labels)
            except ValueError as error:  # a missing or multi-hot label: say which batch holds it
                raise ValueError(f"batch {self.index}: {error}") from None
        return labels, self._poolable.numpy().astype(bool, copy=False)


def batch_labels(batch: Mapping[str, Any], index: int) -> Any:
    """The batch's ``labels`` (or ``label``) entry, as the loader gave it."""
    for key in LABEL_KEYS:
        if key in batch:
            return batch[key]
    raise ValueError(
        f"batch {index} has no labels: expected a 'labels' or 'label' entry (keys: {sorted(batch)})"
    )


def _start_copy(value: Any) -> Tuple[Any, Optional["torch.cuda.Event"]]:
    """``value`` on the host; for a CUDA tensor a pinned copy still in flight, and the event that
    marks its arrival (recorded on the stream of the tensor's device, which made the copy)."""
    if not isinstance(value, torch.Tensor) or value.is_cpu:
        return value, None
    if not value.is_cuda:
        return value.cpu(), None
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)
    arrived = torch.cuda.Event()
    arrived.record(torch.cuda.current_stream(value.device))
    return host, arrived


def prepared_batches(loader: Iterable[Any], pooling: str, special_ids: Optional[Sequence[int]],
                     skip: Callable[[int, Any], bool] = lambda index, batch: False,
                     pin: bool = False) -> Iterator[PreparedBatch]:
    """The loader's batches, checked and prepared; ``skip(index, batch)`` drops those already scored.

    ``pin``: the batches are scored on a GPU, so token weights made on the host go to pinned memory.
    """
    for index, batch in enumerate(loader):
        if skip(index, batch):
            continue
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"batch {index} is a {type(batch).__name__}; hsvfast needs dict batches with "
                "'input_ids', 'attention_mask' and 'labels' (as tokenizers and collators make them)"
            )
        if "input_ids" not in batch:
            raise ValueError(f"batch {index} has no 'input_ids' (keys: {sorted(batch)})")
        yield PreparedBatch(index, batch, pooling, special_ids, pin)


def read_ahead(items: Iterable[T]) -> Iterator[T]:
    """Yield each item only once the next one has been taken (and so prepared) from ``items``.

    An error while taking the next item is raised after the item before it has been yielded
    (and scored): a loader that fails midway loses nothing that was already read.
    """
    iterator = iter(items)
    try:
        pending = next(iterator)
    except StopIteration:
        return
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            yield pending
            return
        except Exception:
            yield pending
            raise
        yield pending
        pending = item
