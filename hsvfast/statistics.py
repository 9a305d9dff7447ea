"""Streaming per-class statistics of pooled hidden states, for several layers at once.

Per layer and class c the accumulator holds, in float64 on the activations' device:

* ``shift[c]``  — the first pooled vector seen of class c. Every later vector of
  the class is stored relative to it, so hidden states with huge means (the
  outlier dimensions of real LMs) cost no precision: the moments below are of
  ``x = h - shift[c]``, which is of the size of the within-class spread.
* ``sums[c]  = Σ x``, ``sqnorms[c] = Σ |x|²`` — enough for the trace metrics.
* second moments: ``Σ x xᵀ`` per class (``mode="per_class"``), or one
  class-balanced matrix ``Σ x xᵀ / N_c`` when the class counts N_c are known
  before the pass (``mode="balanced"``: memory d² instead of C·d²).

In per-class mode the pooled rows of each class are first staged in a buffer
per layer and folded into the class's second moment R rows at a time (one GEMM
with inner size R instead of a thin one per class per batch; the buffer is at
most half the size of the second moments). :meth:`Statistics.flush` folds what
is staged; everything that reads or moves the moments calls it first.

Counts are exact integers on the host. Everything is a sum, so batches, parts of
a corpus and processes merge by addition. The finished metrics are derived in
:mod:`hsvfast.metrics`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence

import numpy as np
import torch

from . import _kernels

#: Default cap on the memory of per-class second-moment matrices, all layers together.
DEFAULT_MAX_MEMORY = 4 << 30
#: Rows staged per class before a Gram update: about this many rows over all classes,
#: at least _MIN_STAGE, at most _MAX_STAGE and half the hidden size (unless a batch needs more).
_STAGE_BUDGET, _MIN_STAGE, _MAX_STAGE = 4096, 16, 1024
#: Integer labels below this are mapped to class ids through a lookup table (others one by one).
_MAX_LOOKUP_LABEL = 1 << 20


def stage_rows(num_classes: int, hidden_size: Optional[int] = None) -> int:
    """Rows staged per class before its Gram update (see the module docstring)."""
    rows = min(_MAX_STAGE, max(_MIN_STAGE, _STAGE_BUDGET // max(1, num_classes)))
    if hidden_size is not None:
        rows = min(rows, max(_MIN_STAGE, hidden_size // 2))
    return rows


def per_class_bytes(num_classes: int, hidden_size: int) -> int:
    """Bytes of one layer's per-class second moments and their staging buffer (float64)."""
    staged_rows = num_classes * stage_rows(num_classes, hidden_size) + 1
    return 8 * hidden_size * (num_classes * hidden_size + staged_rows)


@dataclass(eq=False)  # compared by identity (fast: the staging bookkeeping looks layers up per batch)
class LayerMoments:
    """Accumulators of one layer (see the module docstring). Rows beyond ``num_classes`` are unused."""

    hidden_size: int
    shift: torch.Tensor
    sums: torch.Tensor
    sqnorms: torch.Tensor
    second: Optional[torch.Tensor]
    nonfinite: torch.Tensor
    staged: Optional[torch.Tensor] = None  # (capacity·R + 1, d) rows awaiting the Gram update (per-class mode)

    @classmethod
    def empty(cls, hidden_size: int, capacity: int, mode: str, device: torch.device,
              second: Optional[torch.Tensor] = None) -> "LayerMoments":
        """Zeroed accumulators; ``second``: zeroed second moments to use (a slot of a :class:`LayerStack`)."""
        f64 = dict(dtype=torch.float64, device=device)
        if second is None and mode == "per_class":
            second = torch.zeros(capacity, hidden_size, hidden_size, **f64)
        elif second is None and mode == "balanced":
            second = torch.zeros(hidden_size, hidden_size, **f64)
        return cls(
            hidden_size=hidden_size,
            shift=torch.zeros(capacity, hidden_size, **f64),
            sums=torch.zeros(capacity, hidden_size, **f64),
            sqnorms=torch.zeros(capacity, **f64),
            second=second,
            nonfinite=torch.full((1,), _kernels.NO_BAD_BATCH, dtype=torch.int64, device=device),
        )

    def grow(self, capacity: int, mode: str, second: bool = True) -> None:
        """Make room for ``capacity`` classes, keeping what was accumulated (``second=False``: the
        second moments are grown elsewhere, by their :class:`LayerStack`)."""
        self.shift, self.sums, self.sqnorms = _padded(self.shift, capacity), _padded(self.sums, capacity), \
            _padded(self.sqnorms, capacity)
        if mode == "per_class" and second:
            self.second = _padded(self.second, capacity)


def _padded(t: torch.Tensor, capacity: int, dim: int = 0) -> torch.Tensor:
    """``t`` with ``capacity`` entries along ``dim``, zeros after the old ones."""
    shape = list(t.shape)
    shape[dim] = capacity
    bigger = t.new_zeros(shape)
    bigger.narrow(dim, 0, t.shape[dim]).copy_(t)
    return bigger


class LayerStack:
    """The second moments (and, per-class mode, the staging buffers) of all layers of one hidden size,
    each kept in one tensor, so that one batched GEMM updates every layer — per class at a flush in
    per-class mode, per batch in balanced mode — instead of one GEMM per layer: on a GPU pass bound
    by the host, launches are the cost.

    Layer ``p``'s :class:`LayerMoments` hold views (``second_views[p]``, ``staged_views[p]``) into
    the stack; the stack is used only while every layer still holds exactly those views (see
    :meth:`Statistics._intact_stack`), else each layer is updated on its own.
    """

    def __init__(self, num_layers: int, hidden_size: int, capacity: Optional[int], device: torch.device) -> None:
        """``capacity``: classes of per-class second moments; None for one (balanced) matrix per layer."""
        self.hidden_size, self.device = hidden_size, device
        shape = (num_layers,) + ((capacity,) if capacity is not None else ()) + (hidden_size, hidden_size)
        self.second = torch.zeros(shape, dtype=torch.float64, device=device)
        self.second_views = list(self.second.unbind(0))
        self.staged: Optional[torch.Tensor] = None
        self.staged_views: List[torch.Tensor] = []

    def grow(self, capacity: int) -> None:
        # Old and new tensors coexist during the copy: at a doubling, 1.5× the new size for a moment
        # (per layer it was one layer's old tensor). Classes first seen together grow it in one step.
        self.second = _padded(self.second, capacity, dim=1)
        self.second_views = list(self.second.unbind(0))

    def holds(self, position: int, m: Optional["LayerMoments"]) -> bool:
        """Whether layer ``position``'s moments ``m`` still use this stack's slot."""
        return m is not None and m.second is self.second_views[position]

    def staging(self, rows: int) -> List[torch.Tensor]:
        """(rows, d) staging buffers of every layer (reallocated only with nothing staged)."""
        if self.staged is None or self.staged.shape[1] != rows:
            self.staged = torch.empty(self.second.shape[0], rows, self.hidden_size, dtype=torch.float64,
                                      device=self.device)
            self.staged_views = list(self.staged.unbind(0))
        return self.staged_views


@dataclass
class BatchPlan:
    """Host-side bookkeeping of one batch, shared by all layers."""

    index: int
    class_ids: np.ndarray                 # (B,) dense class id per row, -1 = skipped
    out_rows: Optional[np.ndarray]        # (B,) staging row per row (per-class mode); None: input order
    new_classes: List[tuple]              # (class id, row) for classes first seen here
    batch_counts: np.ndarray              # (num_classes,) rows per class in this batch
    device_tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    # What device_tensors were copied from: int64 [class ids (B) | staging rows or 1/N_c (B, if any) | index]
    host_packed: Optional[torch.Tensor] = None


class Statistics:
    """Per-class moments of pooled hidden states for a list of layers.

    Usually built by :func:`hsvfast.score`; :meth:`add_features` feeds an existing
    feature matrix through the same code.

    Args:
        layers: layer indices the accumulators belong to (labels for the report).
        device: where the accumulators live (the activations' device).
        class_counts: ``{label: N}`` known before the pass; switches the second
            moments to one class-balanced matrix per layer. The pass must then see
            exactly these counts.
        second_moments: False keeps only what the trace metrics need (O(C·d)).
        max_memory: cap in bytes on per-class second moments and their staging buffers (all layers).
    """

    def __init__(
        self,
        layers: Sequence[int],
        device: "torch.device | str" = "cpu",
        class_counts: Optional[Mapping[Hashable, int]] = None,
        second_moments: bool = True,
        max_memory: int = DEFAULT_MAX_MEMORY,
    ) -> None:
        self.layers: List[int] = list(layers)
        self.device = torch.device(device)
        self.labels: List[Hashable] = []
        self._class_of: Dict[Hashable, int] = {}
        self._label_texts: Dict[str, Hashable] = {}  # str(label) -> label: 1 and "1" must not be two classes
        self.counts = np.zeros(0, dtype=np.int64)
        self.num_skipped = 0
        self.num_batches = 0
        if max_memory < 0:
            raise ValueError(f"max_memory must be a number of bytes >= 0, got {max_memory}")
        self.max_memory = int(max_memory)
        self.class_counts: Optional[Dict[Hashable, int]] = None
        if not second_moments:
            self.mode = "trace"
        elif class_counts is not None:
            self.mode = "balanced"
            self.class_counts = _check_class_counts(class_counts)
        else:
            self.mode = "per_class"
        self._staged: Optional[np.ndarray] = None  # rows staged per class, shared by all layers
        self._stage_rows = 0                       # R: staged rows per class (per-class mode)
        self._largest_class_batch = 0
        self._stage_key: Optional[tuple] = None  # (capacity, layers seen, largest class batch) R was set for
        self._table: Optional[np.ndarray] = None  # class id by integer label (see _label_table)
        self._inverse_counts = np.zeros(0)         # 1/N_c by class id (balanced mode; see plan_batch)
        self._stack: Optional[LayerStack] = None   # per-class mode: all layers' second moments in one tensor
        # Pooled rows outside per-class mode (see _scratch_rows): the current (rows, d) views, what they
        # were cut for, and their storage.
        self._scratch: List[torch.Tensor] = []
        self._scratch_key: Optional[tuple] = None
        self._scratch_stacked: Optional[torch.Tensor] = None
        self._scratch_flat: Optional[torch.Tensor] = None
        self.capacity = max(2, len(self.class_counts) if self.class_counts else 2)
        self.moments: List[Optional[LayerMoments]] = [None] * len(self.layers)
        #: What the statistics describe (model name, pooling, dtype …): saved with them and
        #: compared when merging, so parts of different runs are never mixed.
        self.info: Dict[str, Any] = {}

    # ----------------------------------------------------------------- labels
    @property
    def capacity(self) -> int:
        """Classes the accumulators have room for (they grow by doubling, or exactly where doubling
        would pass ``max_memory``)."""
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        if self._staged is not None and self._staged.any():
            raise RuntimeError("internal: flush() the staged rows before changing the capacity")
        self._capacity = int(value)
        self._staged = np.zeros(self._capacity, np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def num_examples(self) -> int:
        return int(self.counts.sum())

    def plan_batch(self, labels: Sequence[Hashable], poolable: np.ndarray) -> BatchPlan:
        """Map a batch's labels to dense class ids, register new classes and, in per-class mode,
        place each row in its class's staging buffer.

        ``poolable[b]`` is False for a sequence with no token to pool; it is skipped.
        """
        # Runs once per batch, on the host path of the pass: numpy on small arrays, no Python loop per row.
        class_ids, new_classes = self._class_ids(labels, poolable)
        if new_classes:
            self._make_room()
        valid = class_ids >= 0
        batch_counts = np.bincount(class_ids[valid], minlength=self.num_classes)
        # What the kernel needs on the device goes over in one host-to-device copy, from pinned memory
        # on a GPU (a copy from pageable memory may wait for the device, CUDA's documented behaviour,
        # which would stall the pass once per batch): the class ids, then in per-class mode each row's
        # staging row, in balanced mode each row's 1/N_c (0 for a skipped row). Elsewhere rows are
        # written in input order (out_rows None). The last entry is the batch index (for a CUDA graph's
        # kernel launch, which reads it on the device: hsvfast.graphs).
        n = len(class_ids)
        host = torch.empty((n if self.mode == "trace" else 2 * n) + 1, dtype=torch.int64,
                           pin_memory=self.device.type == "cuda")
        packed = host.numpy()
        packed[:n] = class_ids
        packed[-1] = self.num_batches
        out_rows = None
        if self.mode == "per_class":
            out_rows = packed[n:-1] = self._stage_batch(class_ids, valid, batch_counts)
        elif self.mode == "balanced":
            if len(self._inverse_counts) != self.num_classes:  # classes were registered (here, by a merge or a load)
                self._inverse_counts = 1.0 / np.array([self.class_counts[label] for label in self.labels], np.float64)
            scale = packed[n:-1].view(np.float64)
            scale[:] = 0.0
            scale[valid] = self._inverse_counts[class_ids[valid]]
        plan = BatchPlan(self.num_batches, class_ids, out_rows, new_classes, batch_counts, host_packed=host)
        plan.device_tensors = self.plan_tensors(host.to(self.device, non_blocking=True), n)
        return plan

    def plan_tensors(self, packed: torch.Tensor, rows: int, with_index: bool = False) -> Dict[str, torch.Tensor]:
        """Views of a batch plan's packed int64 tensor (see :meth:`plan_batch`) by what the kernel reads;
        ``with_index``: also the batch index, for a kernel launch that reads it on the device."""
        tensors = {"class_ids": packed[:rows], "out_rows": None}
        if self.mode == "per_class":
            tensors["out_rows"] = packed[rows : 2 * rows]
        elif self.mode == "balanced":
            tensors["row_scale"] = packed[rows : 2 * rows].view(torch.float64)
        if with_index:
            tensors["batch_index"] = packed[-1:]
        return tensors

    def _class_ids(self, labels: Sequence[Hashable], poolable: np.ndarray):
        """Dense class id per row (-1 = skipped) and the (class id, row) of classes first seen here."""
        # An integer array (from a label tensor) is taken as is; a list is checked for bools, which
        # numpy would turn into 0/1 but are labels of their own.
        array = labels if isinstance(labels, np.ndarray) else np.asarray(labels)
        if (array.dtype.kind not in "iu" or array.ndim != 1 or not len(array)
                or (array is not labels and bool in set(map(type, labels)))):
            return self._class_ids_by_row(_as_list(labels), poolable)  # strings, bools, mixed types
        smallest, largest = int(array.min()), int(array.max())
        if smallest < 0 or largest >= _MAX_LOOKUP_LABEL:
            return self._class_ids_by_row(_as_list(labels), poolable)
        # Class indices 0..K (the usual case): a lookup table instead of one dict lookup per row.
        table = self._label_table(largest)
        class_ids = np.where(poolable, table[array], -1)
        missing = poolable & (class_ids < 0)
        if not missing.any():
            return class_ids, []
        new_classes = []
        for row in np.flatnonzero(missing):  # rows whose label the table does not know yet
            label = int(array[row])
            if table[label] < 0:  # a label new to the table: seen before (maybe as True for 1, via merge) or new
                cid = self._class_of.get(label)
                if cid is None:
                    cid = self._register(label)
                    new_classes.append((cid, int(row)))
                table[label] = cid
            class_ids[row] = table[label]
        return class_ids, new_classes

    def _label_table(self, largest: int) -> np.ndarray:
        """Class id by integer label, -1 where not looked up yet (filled from ``_class_of`` on first use)."""
        if self._table is None or len(self._table) <= largest:
            table = np.full(max(largest + 1, 2 * len(self._table) if self._table is not None else 0), -1, np.int64)
            if self._table is not None:
                table[: len(self._table)] = self._table
            self._table = table
        return self._table

    def _class_ids_by_row(self, labels: Sequence[Hashable], poolable: np.ndarray):
        class_ids = np.full(len(labels), -1, dtype=np.int64)
        new_classes = []
        for row, (label, ok) in enumerate(zip(labels, poolable)):
            if not ok:
                continue
            cid = self._class_of.get(label)
            if cid is None:
                cid = self._register(label)
                new_classes.append((cid, row))
            class_ids[row] = cid
        return class_ids, new_classes

    def _register(self, label: Hashable) -> int:
        """Give a label seen for the first time the next class id."""
        if self.class_counts is not None and label not in self.class_counts:
            raise ValueError(
                f"label {label!r} is not in class_counts (which has {sorted(self.class_counts, key=repr)}); "
                "pass the counts of every label the loader yields, or leave class_counts out"
            )
        texts = self._label_texts
        if len(texts) != len(self.labels):  # rebuilt where the labels were set from outside (merge, all-reduce)
            texts.clear()
            texts.update((str(known), known) for known in self.labels)
        same = texts.setdefault(str(label), label)
        if same is not label and same != label:
            raise ValueError(f"labels {same!r} and {label!r} read the same but are different classes (a "
                             f"{type(same).__name__} and a {type(label).__name__}): give every label one type")
        cid = len(self.labels)
        self._class_of[label] = cid
        self.labels.append(label)
        return cid

    # ---------------------------------------------------------------- staging
    def _stage_target(self) -> int:
        sizes = [m.hidden_size for m in self.moments if m is not None]
        return max(stage_rows(self.capacity, min(sizes) if sizes else None), self._largest_class_batch)

    def _stage_batch(self, class_ids: np.ndarray, valid: np.ndarray, batch_counts: np.ndarray) -> np.ndarray:
        """Staging-buffer row of every row of the batch (per-class mode); flushes full classes first.

        The j-th row (in input order) of class c goes to staging row c·R + (rows of c staged before) + j;
        skipped rows (``valid`` False) to the buffer's last row.
        """
        largest = int(batch_counts.max()) if len(batch_counts) else 0
        key = (self.capacity, len(self.moments) - self.moments.count(None), max(largest, self._largest_class_batch))
        if key != self._stage_key:  # what the staging rows R depend on may have changed
            self._stage_key = key
            self._largest_class_batch = key[2]
            target = self._stage_target()
            if target != self._stage_rows:  # layout change (first batch, more classes, a larger batch)
                self.flush()
                self._stage_rows = target
        rows = self._stage_rows
        staged = self._staged[: len(batch_counts)]
        full = np.flatnonzero((staged + batch_counts > rows) & (batch_counts > 0))
        if len(full):
            self._flush_classes(full.tolist())
        # Rows grouped by class, in input order within a class; skipped rows last.
        order = np.argsort(np.where(valid, class_ids, len(batch_counts)), kind="stable")
        taken = int(batch_counts.sum())
        cid = class_ids[order[:taken]]
        starts = np.cumsum(batch_counts) - batch_counts
        placed = np.full(len(order), self.capacity * rows, dtype=np.int64)
        placed[:taken] = cid * rows + staged[cid] + np.arange(taken) - starts[cid]
        staged += batch_counts
        result = np.empty_like(order)
        result[order] = placed  # order[j] is the input row placed j-th
        return result

    def flush(self) -> None:
        """Fold every staged row into the per-class second moments (no-op in other modes)."""
        if self.mode == "per_class" and self._staged.any():
            self._flush_classes(np.flatnonzero(self._staged).tolist())

    def _flush_classes(self, classes: Sequence[int]) -> None:
        rows = self._stage_rows
        stack = self._intact_stack()
        with torch.inference_mode():  # the moments may be inference tensors (made inside score)
            for cid in classes:
                span = slice(cid * rows, cid * rows + int(self._staged[cid]))
                if stack is not None:  # every layer at once: one batched GEMM per class
                    block = stack.staged[:, span]
                    stack.second[:, cid].baddbmm_(block.transpose(1, 2), block)
                    continue
                for m in self.moments:
                    if m is not None and m.staged is not None:
                        block = m.staged[span]
                        m.second[cid].addmm_(block.T, block)
        self._staged[list(classes)] = 0

    def _intact_stack(self) -> Optional[LayerStack]:
        """The layer stack, if every layer's second moments and staging buffer are still its views
        (a merge, a load or an all-reduce may have given layers tensors of their own)."""
        stack = self._stack
        if stack is None or len(stack.staged_views) != len(self.moments):
            return None
        for position, (m, staged) in enumerate(zip(self.moments, stack.staged_views)):
            if m is not None and not stack.holds(position, m):  # replaced for good: free the stack
                self._stack = None
                return None
            if m is None or m.staged is not staged:  # a layer not folded yet (or of another width)
                return None
        return stack

    def _staging_buffers(self, positions: Sequence[int], layers: Sequence[LayerMoments]) -> List[torch.Tensor]:
        """Each layer's (capacity·R + 1, d) staging buffer (only ever resized with nothing staged)."""
        needed = self.capacity * self._stage_rows + 1
        stack = self._stack
        views = stack.staging(needed) if stack is not None else None
        buffers = []
        for position, m in zip(positions, layers):
            if views is not None and stack.holds(position, m):
                m.staged = views[position]
            elif m.staged is None or m.staged.shape[0] != needed:
                m.staged = torch.empty(needed, m.hidden_size, dtype=torch.float64, device=m.shift.device)
            buffers.append(m.staged)
        return buffers

    def finish_batch(self, plan: BatchPlan) -> None:
        """Commit a batch's counts once every layer has folded it."""
        self.counts[: len(plan.batch_counts)] += plan.batch_counts
        self.num_skipped += int((plan.class_ids < 0).sum())
        self.num_batches += 1
        if self.device.type == "cpu":  # free to check at once; on a GPU it waits for the end (a sync)
            self.check_finite()

    def _make_room(self) -> None:
        """Accumulators and counts for every registered class (after new labels were registered)."""
        self._ensure_capacity(self.num_classes)
        self.counts = np.concatenate([self.counts, np.zeros(self.num_classes - len(self.counts), np.int64)])

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        self.flush()  # the staging layout depends on the capacity
        sizes = [m.hidden_size for m in self.moments if m is not None]
        capacity = max(needed, 2 * self.capacity)  # doubling: few regrowths
        if capacity > needed and (not sizes or self._memory_needed(capacity, sizes) > self.max_memory):
            # Room for exactly these classes where doubling would pass the cap (or, before the first
            # fold, might: the hidden size is not known yet).
            capacity = needed
        self._check_memory(capacity, sizes)
        stack = self._stack if self.mode == "per_class" else None  # a balanced matrix does not grow
        stacked = [stack is not None and stack.holds(p, m) for p, m in enumerate(self.moments)]
        if stack is not None:
            stack.grow(capacity)
        for p, m in enumerate(self.moments):
            if m is not None:
                m.grow(capacity, self.mode, second=not stacked[p])
                if stacked[p]:
                    m.second = stack.second_views[p]
        self.capacity = capacity

    def _memory_needed(self, capacity: int, hidden_sizes: List[int]) -> int:
        """Bytes of the capped buffers (per-class second moments and staging) at this capacity."""
        return sum(per_class_bytes(capacity, d) for d in hidden_sizes) if self.mode == "per_class" else 0

    def _check_memory(self, capacity: int, hidden_sizes: List[int]) -> None:
        needed_bytes = self._memory_needed(capacity, hidden_sizes)
        if needed_bytes > self.max_memory:
            raise MemoryError(
                f"per-class covariance statistics (with their staging buffers) for {capacity} classes over "
                f"{len(hidden_sizes)} layers "
                f"(hidden size {max(hidden_sizes)}) would need {bytes_text(needed_bytes)}, over the limit of "
                f"{bytes_text(self.max_memory)}. Pass class_counts={{label: count, ...}} (e.g. "
                "collections.Counter of your dataset's label column) so hsvfast keeps one class-balanced "
                "matrix per layer, or raise max_memory."
            )

    # ------------------------------------------------------------------ folding
    def fold(self, position: int, act: torch.Tensor, weights: torch.Tensor, plan: BatchPlan) -> None:
        """Pool layer ``self.layers[position]``'s activations (B, T, d) and add them.

        ``weights`` is the (B, T) float32 token-weight matrix on ``act``'s device.
        """
        self.fold_layers([position], [act], weights, plan)

    def fold_layers(self, positions: Sequence[int], acts: Sequence[torch.Tensor], weights: torch.Tensor,
                    plan: BatchPlan) -> None:
        """:meth:`fold` of several layers of one batch at once: on a GPU, one kernel launch.

        The activations must share dtype and device (else they are folded one layer at a time).
        """
        # Runs once per batch (or per layer): keep the host's work here to a minimum (benchmarks/host_overhead.py).
        dtype, device = acts[0].dtype, acts[0].get_device()
        if len(acts) > 1 and any(a.dtype is not dtype or a.get_device() != device for a in acts):
            for position, act in zip(positions, acts):
                self.fold_layers([position], [act], weights, plan)
            return
        tensors = plan.device_tensors
        where = tensors["class_ids"].device
        if acts[0].device != where or weights.device != where:
            # The kernels take raw pointers: a buffer on another device would be read as garbage (or crash).
            raise ValueError(
                f"activations on {acts[0].device} and token weights on {weights.device}, but these statistics "
                f"and their batch plan live on {self.device}: move the activations and weights there "
                f"(or create Statistics(..., device={str(acts[0].device)!r}))"
            )
        layers = []
        for position, act in zip(positions, acts):
            m = self.moments[position]
            if m is None or act.shape[-1] != m.hidden_size:
                m = self._first_fold(position, act)
            for cid, row in plan.new_classes:
                _kernels.pool_fold(act[row : row + 1], weights[row : row + 1], m.shift[cid : cid + 1])
            layers.append(m)
        if self.mode == "per_class":  # rows go to the staging buffers; flushes make the Gram updates
            outs = self._staging_buffers(positions, layers)
        else:
            outs = self._scratch_rows(acts[0].shape[0], [m.hidden_size for m in layers], acts[0].device)
        _kernels.pool_fold_layers(
            acts, weights, outs, tensors["class_ids"], tensors["out_rows"], [m.shift for m in layers],
            [m.sums for m in layers], [m.sqnorms for m in layers], [m.nonfinite for m in layers],
            batch_index=plan.index, batch_index_at=tensors.get("batch_index"),
        )
        if self.mode == "balanced":
            scale = tensors["row_scale"].unsqueeze(1)
            stack, stacked_rows = self._stack, self._scratch_stacked
            if (stacked_rows is not None and stack is not None and list(positions) == list(range(len(self.moments)))
                    and all(stack.holds(p, m) for p, m in zip(positions, layers))):
                # Every layer, in order, with one batched GEMM (the rows were cut from one (L, rows, d) block).
                stack.second.baddbmm_((stacked_rows * scale).transpose(1, 2), stacked_rows)
            else:
                for m, x in zip(layers, outs):
                    m.second.addmm_((x * scale).T, x)

    def buffer_addresses(self) -> tuple:
        """Where every buffer that folding a batch reads or writes lives, with what sets their layout.

        A CUDA graph that captured :meth:`fold_layers` replays it correctly only while this is
        unchanged (:mod:`hsvfast.graphs`): classes that grow the accumulators, a new staging layout
        or new scratch rows all change it.
        """
        flat = self._scratch_flat
        addresses = [self.capacity, self._stage_rows, self._scratch_key, None if flat is None else flat.data_ptr()]
        for m in self.moments:
            if m is None:
                addresses.append(None)
                continue
            addresses += (m.shift.data_ptr(), m.sums.data_ptr(), m.sqnorms.data_ptr(), m.nonfinite.data_ptr(),
                          0 if m.second is None else m.second.data_ptr(), 0 if m.staged is None else m.staged.data_ptr())
        return tuple(addresses)

    def _first_fold(self, position: int, act: torch.Tensor) -> LayerMoments:
        """The accumulators of a layer seen for the first time (or an error if its width changed)."""
        m = self.moments[position]
        if m is not None:
            raise ValueError(
                f"layer {self.layers[position]}: hidden size changed from {m.hidden_size} to {act.shape[-1]}"
            )
        sizes = [other.hidden_size for other in self.moments if other is not None]
        # Every layer is sized like this one, so the cap is checked once for the whole run.
        self._check_memory(self.capacity, [act.shape[-1]] * (len(self.layers) - len(sizes)) + sizes)
        hidden = act.shape[-1]
        second = None
        if self.mode != "trace":
            if self._stack is None and not sizes:  # the first layer: a stack for all, sized like it
                self._stack = LayerStack(len(self.layers), hidden,
                                         self.capacity if self.mode == "per_class" else None, act.device)
            stack = self._stack
            if stack is not None and stack.hidden_size == hidden and stack.device == act.device:
                second = stack.second_views[position].zero_()  # (zeroed: a flush may have run over the slot)
        m = self.moments[position] = LayerMoments.empty(hidden, self.capacity, self.mode, act.device, second)
        return m

    def _scratch_rows(self, rows: int, dims: Sequence[int], device: torch.device) -> List[torch.Tensor]:
        """(rows, d_i) float64 buffers for the pooled rows of the layers folded together (outside
        per-class mode), cut from one allocation kept across batches.

        Reusing them is safe: every use is in stream order on the same device (the kernel writes
        them, the balanced-mode GEMMs read them, the next batch's kernel overwrites them).
        """
        key = (rows, tuple(dims), device)
        if self._scratch_key != key:
            needed = rows * sum(dims)
            flat = self._scratch_flat
            if flat is None or flat.numel() < needed or flat.device != device:
                flat = self._scratch_flat = torch.empty(needed, dtype=torch.float64, device=device)
            offsets = np.concatenate([[0], np.cumsum([rows * d for d in dims])]).tolist()
            self._scratch = [flat[offsets[i] : offsets[i + 1]].view(rows, d) for i, d in enumerate(dims)]
            self._scratch_key = key
            # The same rows as one (layers, rows, d) tensor, when every layer has the same width.
            self._scratch_stacked = flat[:needed].view(len(dims), rows, dims[0]) if len(set(dims)) == 1 else None
        return self._scratch

    def check_finite(self, position: Optional[int] = None) -> None:
        """Raise ValueError naming the layer and batch if a pooled value was NaN or Inf."""
        positions = range(len(self.layers)) if position is None else [position]
        present = [p for p in positions if self.moments[p] is not None]
        if not present:
            return
        # One device-to-host copy for all layers (on a GPU each .item() would be a sync).
        first_bad = torch.cat([self.moments[p].nonfinite for p in present]).tolist()
        for p, batch in zip(present, first_bad):
            if batch != _kernels.NO_BAD_BATCH:
                raise ValueError(
                    f"layer {self.layers[p]}: non-finite (NaN or Inf) hidden states in batch "
                    f"{batch} (0-based). Check the inputs of that batch; in float16, "
                    "activations can overflow: run the model in bfloat16 or float32."
                )

    def add_features(self, features: torch.Tensor, labels: Sequence[Hashable], position: int = 0) -> None:
        """Fold a (N, d) matrix (NumPy or torch, on any device) of already pooled features of one
        layer (one batch); they are copied to the statistics' device first."""
        features = torch.as_tensor(features).to(self.device)
        if not features.is_floating_point():
            features = features.to(torch.float64)
        if features.dim() != 2:
            raise ValueError(f"features must be a (num_examples, hidden_size) matrix, got shape {tuple(features.shape)}")
        labels = normalise_labels(labels)
        if len(labels) != features.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows but {len(labels)} labels")
        weights = torch.ones(features.shape[0], 1, dtype=torch.float32, device=features.device)
        plan = self.plan_batch(labels, np.ones(features.shape[0], dtype=bool))
        self.fold(position, features.unsqueeze(1), weights, plan)
        self.finish_batch(plan)

    # ------------------------------------------------------------------ merging
    def merge(self, other: "Statistics") -> "Statistics":
        """Add another part's statistics (same layers, pooling and mode) into this one; returns self.

        Each part stores class c relative to its own shift s_c; the other part's
        moments are re-expressed around this part's shift (δ = s_other − s_self, of
        the size of the within-class spread, so nothing cancels) before adding.
        """
        for key in sorted(set(self.info) | set(other.info)):
            if key in _MERGE_KEYS and self.info.get(key) != other.info.get(key):
                raise ValueError(f"cannot merge statistics with different {key}: "
                                 f"{self.info.get(key)!r} vs {other.info.get(key)!r}")
        kinds = {type(label).__name__ for label in self.labels}, {type(label).__name__ for label in other.labels}
        if all(kinds) and kinds[0] != kinds[1]:
            raise ValueError(f"cannot merge statistics with different label mappings: labels of type "
                             f"{sorted(kinds[0])} {self.labels[:5]} vs {sorted(kinds[1])} {other.labels[:5]}")
        if other.layers != self.layers or other.mode != self.mode:
            raise ValueError(
                f"cannot merge statistics of layers {other.layers} ({other.mode}) into layers {self.layers} "
                f"({self.mode})"
            )
        if self.mode == "balanced" and other.class_counts != self.class_counts:
            raise ValueError("cannot merge statistics built with different class_counts")
        self.flush()
        other.flush()
        for label in other.labels:
            if label not in self._class_of:
                self._register(label)
        self._make_room()
        ids = [self._class_of[label] for label in other.labels]
        for position, (mine, theirs) in enumerate(zip(self.moments, other.moments)):
            if theirs is None:
                continue
            if mine is None:
                mine = self.moments[position] = LayerMoments.empty(
                    theirs.hidden_size, self.capacity, self.mode, theirs.shift.device
                )
            elif mine.hidden_size != theirs.hidden_size:
                raise ValueError(f"layer {self.layers[position]}: hidden sizes {mine.hidden_size} and {theirs.hidden_size} differ")
            _merge_layer(mine, theirs, ids, self.counts, other.counts, self.mode, self.class_counts, self.labels)
        for cid, n in zip(ids, other.counts):
            self.counts[cid] += n
        self.num_skipped += other.num_skipped
        self.num_batches += other.num_batches
        return self

    def save(self, path, extra: Optional[Dict[str, Any]] = None) -> None:
        """Write to a safetensors file atomically (see :mod:`hsvfast.storage`)."""
        from .storage import save_statistics

        save_statistics(self, path, extra)

    # --------------------------------------------------------------- read-out
    def check_complete(self) -> None:
        """Errors that make the statistics unusable for the metrics."""
        if self.num_examples == 0:
            raise ValueError(
                "no labelled example was scored: the loader was empty or every sequence had no token to pool"
            )
        if self.num_classes < 2:
            raise ValueError(
                f"only one class ({self.labels[0]!r}) was seen; the variability ratio compares classes, "
                "so the data must have at least two labels"
            )
        if self.class_counts is not None:
            seen = {label: int(n) for label, n in zip(self.labels, self.counts)}
            if seen != {k: v for k, v in self.class_counts.items()}:
                raise ValueError(
                    f"class_counts {self.class_counts} differ from the counts the loader yielded {seen} "
                    f"({self.num_skipped} sequences were skipped for having no token to pool). Pass the "
                    "counts of exactly the examples scored, or leave class_counts out."
                )
        self.check_finite()
        single = [label for label, n in zip(self.labels, self.counts) if n == 1]
        if len(single) == self.num_classes:  # every metric would be 0 (or undefined) at every layer
            raise ValueError(
                f"each of the {self.num_classes} classes has a single example (e.g. {label_text(single[0])}), so no "
                "within-class spread can be measured and every layer would score 0. The labels look like one per "
                "example: check that the label column is the right one, or score more examples per class."
            )
        if single:
            shown = ", ".join(map(label_text, single[:5])) + (f" and {len(single) - 5} more" if len(single) > 5 else "")
            warnings.warn(f"{len(single)} class(es) have a single example ({shown}): their spread cannot be measured "
                          "and counts as zero, which biases ν and the trace ratio low; score more examples of them",
                          stacklevel=2)

    def class_moments(self, position: int) -> "ClassMoments":
        """Counts, means and the paper's class-balanced within-class covariance of one layer."""
        return self.all_class_moments([position])[0]

    def all_class_moments(self, positions: Optional[Sequence[int]] = None) -> List["ClassMoments"]:
        """:meth:`class_moments` of several layers (default all), without a host–device round trip."""
        self.flush()
        c = self.num_classes
        counts: Dict[torch.device, torch.Tensor] = {}  # one copy of the counts per device
        result = []
        for position in range(len(self.layers)) if positions is None else positions:
            m = self.moments[position]
            device = m.sums.device
            if device not in counts:
                counts[device] = torch.as_tensor(self.counts[:c], dtype=torch.float64).to(device)
            n = counts[device]
            centred = m.sums[:c] / n.unsqueeze(1)          # mean of x = h - shift, per class
            means = (m.shift[:c] - m.shift[0]) + centred  # class means, up to a common translation
            within_trace = ((m.sqnorms[:c] / n) - (centred * centred).sum(1)).sum() / c
            second = m.second[:c] if self.mode == "per_class" else m.second
            result.append(ClassMoments(n, means, centred, within_trace, self.mode, second, origin=m.shift[0].clone()))
        return result


@dataclass(frozen=True)
class ClassMoments:
    """One layer's class statistics, ready for the metrics (float64 tensors).

    ``means`` (C×d) are the class means up to a common translation (all metrics here
    are translation invariant); Σ_w is the paper's class-balanced within-class
    covariance (1/C) Σ_c cov(h | c), available as a quadratic form (cheap: one pass
    over the second moments) or as a d×d matrix.
    """

    counts: torch.Tensor
    means: torch.Tensor
    centred: torch.Tensor       # per-class mean of the shifted vectors x = h − shift_c
    within_trace_tensor: torch.Tensor  # tr Σ_w, 0-d, on the statistics' device (reading it is a sync there)
    mode: str
    second: Optional[torch.Tensor]
    origin: Optional[torch.Tensor] = None  # add to ``means`` for absolute class means

    @property
    def within_trace(self) -> float:
        """tr Σ_w."""
        return float(self.within_trace_tensor)

    @property
    def has_covariance(self) -> bool:
        return self.mode != "trace"

    def within_quadratic(self, directions: torch.Tensor) -> torch.Tensor:
        """u_kᵀ Σ_w u_k for each column u_k of ``directions`` (d×r), without forming Σ_w."""
        c = self.counts.shape[0]
        projected_means = ((self.centred @ directions) ** 2).sum(0)
        if self.mode == "per_class":
            forms = (torch.einsum("cij,jr->cir", self.second, directions) * directions).sum(1)  # (C, r)
            second = (forms / self.counts.unsqueeze(1)).sum(0)
        elif self.mode == "balanced":
            second = ((self.second @ directions) * directions).sum(0)
        else:
            raise ValueError("these statistics were accumulated without second moments")
        return (second - projected_means) / c

    def within_matrix(self) -> torch.Tensor:
        """Σ_w as a d×d float64 matrix."""
        c = self.counts.shape[0]
        if self.mode == "per_class":
            scatter = torch.einsum("c,cij->ij", 1.0 / self.counts, self.second)
        elif self.mode == "balanced":
            scatter = self.second
        else:
            raise ValueError("these statistics were accumulated without second moments")
        return (scatter - self.centred.T @ self.centred) / c


#: ``info`` entries that must agree for two parts to be merged.
_MERGE_KEYS = ("model_name", "model_revision", "pooling", "num_blocks", "label_names")


def recentred(sums: torch.Tensor, sqnorms: torch.Tensor, counts: torch.Tensor, delta: torch.Tensor,
              second: bool = True):
    """Per-class moments of x' = x + δ from those of x (rows are classes); exact.

    Returns the new sums (C×d), squared norms (C,) and, with ``second``, the correction
    δ Sᵀ + S δᵀ + n δδᵀ (C×d×d) to add to the second moments.
    """
    new_sums = sums + counts.unsqueeze(1) * delta
    new_sqnorms = sqnorms + 2.0 * (delta * sums).sum(1) + counts * (delta * delta).sum(1)
    correction = None
    if second:
        correction = (torch.einsum("ci,cj->cij", delta, sums) + torch.einsum("ci,cj->cij", sums, delta)
                      + counts.view(-1, 1, 1) * torch.einsum("ci,cj->cij", delta, delta))
    return new_sums, new_sqnorms, correction


def balanced_scale(class_counts: Dict[Hashable, int], labels: Sequence[Hashable], device) -> torch.Tensor:
    """1/N_c per class, the weights of the class-balanced second moment."""
    return torch.as_tensor([1.0 / class_counts[label] for label in labels], dtype=torch.float64, device=device)


def _merge_layer(mine, theirs, ids, my_counts, their_counts, mode, class_counts, labels) -> None:
    device = mine.shift.device
    k = len(ids)
    idx = torch.as_tensor(ids, dtype=torch.int64, device=device)
    n = torch.as_tensor(np.asarray(their_counts[:k], dtype=np.float64), device=device)
    new = torch.as_tensor(my_counts[ids] == 0, device=device)
    their_shift = theirs.shift[:k].to(device)
    # A class new to this part adopts the other part's shift as is (δ = 0).
    mine.shift[idx[new]] = their_shift[new]
    delta = their_shift - mine.shift[idx]
    sums, sqnorms, correction = recentred(theirs.sums[:k].to(device), theirs.sqnorms[:k].to(device), n, delta,
                                          second=mode != "trace")
    mine.sums.index_add_(0, idx, sums)
    mine.sqnorms.index_add_(0, idx, sqnorms)
    if mode == "per_class":
        mine.second.index_add_(0, idx, theirs.second[:k].to(device) + correction)
    elif mode == "balanced":
        scale = balanced_scale(class_counts, [labels[i] for i in ids], device)
        mine.second += theirs.second.to(device) + torch.einsum("c,cij->ij", scale, correction)
    mine.nonfinite.clamp_(max=int(theirs.nonfinite.item()))


def _check_class_counts(class_counts: Mapping[Hashable, int]) -> Dict[Hashable, int]:
    if not isinstance(class_counts, Mapping):
        raise TypeError(f"class_counts must be a mapping {{label: count}} (e.g. collections.Counter of the labels), "
                        f"got a {type(class_counts).__name__}")
    checked = {}
    for label, count in dict(class_counts).items():
        if isinstance(count, bool) or int(count) != count or count <= 0:
            raise ValueError(f"class_counts[{label!r}] = {count!r}; counts must be positive integers")
        checked[_normalise_label(label)] = int(count)
    return checked


def check_label_tensor(labels: torch.Tensor) -> None:
    """Refuse float (regression) and multi-label (multi-hot) label tensors; reads no value (no device sync)."""
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(_FLOAT_LABELS.format(dtype=labels.dtype))
    if labels.dim() > 1 and labels.shape[-1] != 1:
        raise ValueError(_MULTI_LABELS.format(shape=tuple(labels.shape)))


def normalise_labels(labels: Any) -> List[Hashable]:
    """A batch's labels as plain Python values; refuses float (regression) and multi-label targets."""
    if isinstance(labels, torch.Tensor):
        check_label_tensor(labels)
        return labels.reshape(-1).tolist()
    array = np.asarray(labels)
    if array.dtype.kind in "fc":
        raise TypeError(_FLOAT_LABELS.format(dtype=array.dtype))
    if array.ndim > 1 and array.shape[-1] != 1:
        raise ValueError(_MULTI_LABELS.format(shape=array.shape))
    if array.dtype.kind in "biu":
        return array.reshape(-1).tolist()
    normalised = [_normalise_label(label) for label in labels]
    if None in normalised:  # a missing label (a dataset's unlabelled rows) is no class
        raise ValueError(f"label None at position {normalised.index(None)}: examples without a label cannot be "
                         "scored; drop them (or fill their labels) first")
    return normalised


_MULTI_LABELS = (
    "labels have shape {shape}: hsvfast needs one class per sequence, a (batch,) tensor or list. Multi-label "
    "(multi-hot) targets have no single class to compare; score each label as its own binary task."
)

_FLOAT_LABELS = (
    "labels have dtype {dtype}: hsvfast needs discrete class labels (ints or strings). "
    "Regression targets (e.g. STS-B scores) have no classes to compare; bin them or use a classification task."
)


def _as_list(labels: Any) -> List[Hashable]:
    """Labels as plain Python values (an array's items become ints, bools, strings …)."""
    return labels.tolist() if isinstance(labels, np.ndarray) else labels


def bytes_text(size: float) -> str:
    """A size in bytes for a message, in the largest binary unit it reaches (0.00 GiB said nothing)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} bytes"


def label_text(label: Hashable, limit: int = 40) -> str:
    """A label for a message: its repr, cut to ``limit`` characters (a label column mistaken for the text
    column would otherwise print whole sentences)."""
    text = repr(label)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _normalise_label(label: Hashable) -> Hashable:
    """Plain Python scalars, so 3, np.int64(3) and tensor(3) are one class."""
    if isinstance(label, torch.Tensor):
        label = label.item()
    if isinstance(label, np.generic):
        label = label.item()
    return label
