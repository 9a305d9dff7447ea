"""``hsvfast.score``: every requested layer of a model in one forward pass over a corpus."""
from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import warnings
from typing import Any, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from . import _kernels
from .batching import BucketedBatches
from .graphs import (DEFAULT_MULTIPLE, ForwardGraphs, HostBoundProbe, convolves_across_tokens, graphs_supported,
                     tensors_of)
from .layers import (StopForward, block_hidden_states, find_blocks, hidden_size_of, layer_modules, output_layout,
                     resolve_layers, without_cache)
from .metrics import DEFAULT_METRICS, check_metric_names, metrics_of_layers
from .pooling import special_token_ids
from .prefetch import LABEL_KEYS, prepared_batches, read_ahead
from .report import Report
from .distributed import all_reduce_statistics, gathered, is_distributed
from .statistics import DEFAULT_MAX_MEMORY, Statistics, normalise_labels, per_class_bytes
from .storage import load_statistics, save_statistics

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: Bytes of block outputs held per batch before they are folded together, by device type. CPU: none
#: (each layer is pooled while it is still in cache; a call costs ~1 µs there, not a kernel launch).
_HOLD_BYTES = {"cuda": 256 << 20}


def score(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    layers: Optional[Sequence[int]] = None,
    pooling: str = "mean",
    tokenizer: Any = None,
    class_counts: Optional[Mapping[Hashable, int]] = None,
    device: "torch.device | str | None" = None,
    progress: bool = False,
    strict: bool = False,
    blocks: Optional[nn.ModuleList] = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    autocast: Optional[bool] = None,
    checkpoint: "str | os.PathLike | None" = None,
    checkpoint_every: int = 1000,
    metrics: "str | Sequence[str] | None" = None,
    cuda_graphs: "bool | str" = "auto",
) -> Report:
    """Score every requested layer of ``model`` on a labelled corpus in one forward pass.

    Forward hooks hand each block's output, in place, to the compiled pooling kernel,
    which folds it into streaming float64 per-class statistics; the forward stops
    after the deepest requested block. Memory does not grow with the corpus. On a GPU
    the block outputs of a batch (up to 256 MiB of them) are pooled by one kernel launch
    once the forward stops, instead of one launch per block.

    Args:
        model: a transformers model (any architecture with a list of blocks).
        loader: iterable of dict batches with ``input_ids``, ``attention_mask``,
            ``labels`` (or ``label``), optionally ``special_tokens_mask`` and
            ``token_type_ids`` — what tokenizers and collators produce; on the host (copied over
            without blocking) or already on ``device``. The loader is read one batch ahead.
        layers: block indices to score (negative allowed); default all.
        pooling: ``"mean"`` (non-special tokens, the paper's), ``"mean_all"``,
            ``"first"`` or ``"last"``; see :mod:`hsvfast.pooling`.
        tokenizer: finds special tokens when batches carry no ``special_tokens_mask``.
        class_counts: ``{label: count}`` of the whole corpus, known in advance: keeps
            one class-balanced d×d matrix per layer instead of one per class (needed
            for many classes at large d). When per-class matrices would exceed ``max_memory``,
            read from the loader's dataset label column, or counted by a pre-pass of a
            :class:`hsvfast.batching.BucketedBatches` loader.
        device: run the model and keep the statistics there (the model is moved
            for the call and moved back); default the model's device.
        progress: show a progress bar.
        strict: raise instead of skipping sequences with no token to pool.
        blocks: the model's ``nn.ModuleList`` of blocks, if it cannot be found.
        max_memory: bytes allowed for per-class second moments (and their staging buffers), all
            layers together. When new classes make them grow, the old and the new tensors coexist
            during the copy: for a moment up to 1.5× the new size (at a doubling).
        autocast: run the forward under bfloat16 autocast. Default: on for a float32
            model on CUDA (tensor cores; the statistics stay float64), off elsewhere.
        metrics: which metrics to compute (default ``["variability", "trace_ratio"]``; one may be named as a string);
            see ``hsvfast.metrics.LOWER_IS_BETTER`` for all and their directions. Only what
            the selected metrics need is accumulated (``["trace_ratio"]`` alone: O(C·d)).
        cuda_graphs: replay each batch's forward (and pooling) from a CUDA graph, one per batch
            shape, tokens padded to a multiple of 8 (exact shapes for a model that convolves across
            tokens, as ConvBERT does; see :mod:`hsvfast.graphs`): for forwards bound by the host (short
            sequences on a large GPU). ``"auto"`` (default): on CUDA, only where a few timed eager
            batches show the forward is bound by the host; elsewhere (CPU, a model split over devices,
            no compiled CUDA kernels) off. True: always (CUDA only); False: never. A model that
            synchronises with the host inside its forward cannot be captured: graphs then switch off
            (with a warning for True) and scoring goes on eagerly. A graph is captured again when an
            eager forward replaced a registered buffer or a tensor attribute of one of the model's
            modules; a model that keeps tensors elsewhere (in a list, a dict, a non-module object) and
            replaces them between forwards needs False.
        checkpoint: a file to write the statistics to every ``checkpoint_every`` batches
            (atomically: a crash at any instant leaves the last good checkpoint). Called
            again with the same arguments and a deterministic loader, ``score`` resumes
            after the last checkpointed batch; a checkpoint from a different model, layer
            set, pooling or dataset is refused. Under torch.distributed each rank writes
            its own file (``.rankN`` is added to the name).

    Under an initialised torch.distributed process group, each rank passes a loader over its
    own shard (see :class:`hsvfast.distributed.ShardSampler`); the statistics are all-reduced
    once at the end and every rank returns the report of the whole corpus.

    Returns:
        a :class:`Report` (``report.metrics["variability"]``, ``report.best_layer`` …).
    """
    blocks = find_blocks(model) if blocks is None else blocks
    modules = layer_modules(model, blocks)  # one per layer; ALBERT's shared groups appear once per layer they run
    layer_ids = resolve_layers(layers, len(modules))
    original_device = _model_device(model)
    device = available_device(device) if device is not None else original_device
    special_ids = special_token_ids(tokenizer)
    metric_names = check_metric_names(metrics if metrics is not None else DEFAULT_METRICS)
    # Only ν needs d×d second moments that class_counts can make class-balanced (one per layer).
    if class_counts is None and "variability" in metric_names and set(metric_names) <= {"variability", "trace_ratio"}:
        class_counts = _counts_if_needed(model, loader, len(layer_ids), max_memory, pooling, progress)
    family = [n for n in metric_names if n not in ("variability", "trace_ratio")]
    if family and class_counts is not None:
        raise ValueError(f"metric {family[0]!r} needs per-class statistics; leave class_counts out to compute it")
    stats = Statistics(layer_ids, device=device, class_counts=class_counts, max_memory=max_memory,
                       second_moments=metric_names != ["trace_ratio"])
    stats.info.update(_describe(model, modules, pooling, device))
    resume = _Checkpointer(checkpoint, checkpoint_every, stats, model, loader)
    stats = resume.stats  # fresh, or the checkpoint's
    stats.info["metrics"] = metric_names  # a resumed run reports what this call asks for
    forward_kwargs = without_cache(model)
    if autocast is None:
        autocast = device.type == "cuda" and next(model.parameters()).dtype == torch.float32
    precision = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    max_positions = _max_positions(model)
    if cuda_graphs not in (True, False, "auto"):
        raise ValueError(f"cuda_graphs must be True, False or 'auto', got {cuda_graphs!r}")
    cuda_graphs = cuda_graphs if cuda_graphs == "auto" else bool(cuda_graphs)
    if cuda_graphs is True and not graphs_supported(device):
        raise ValueError(f"cuda_graphs=True needs a CUDA device and the compiled CUDA kernels; scoring runs on "
                         f"{device} with the {_kernels.backend(device)!r} backend. Leave cuda_graphs off (or 'auto').")
    # A model split over devices (accelerate's device_map, CPU offload): blocks elsewhere hand their outputs
    # over with a copy to the statistics' device (its cost is the copy: ~1 % of a block's work at d = 8192).
    block_devices = {p.device for block in blocks for p in block.parameters()}
    spread = bool(block_devices - {device}) and device == original_device
    if spread and cuda_graphs is True:
        raise ValueError(f"cuda_graphs=True needs the whole model on one device; its blocks lie on "
                         f"{sorted(str(d) for d in block_devices)}. Leave cuda_graphs off.")
    use_graphs = not spread and (cuda_graphs is True or (cuda_graphs == "auto" and graphs_supported(device)))

    current: Dict[str, Any] = {"held_bytes": 0}
    deepest = layer_ids[-1]
    # Block outputs wait here until the forward stops (or they pass the byte budget), then all are
    # folded with one kernel launch: on a GPU, a forward of short sequences is bound by the host,
    # and a launch per layer would add its whole host cost to every batch. Reading a block's output
    # after later blocks ran is safe: a block never writes into its input in place (its norm or
    # projections keep it for the backward pass); test_block_outputs_held_* check every architecture.
    held_positions: List[int] = []
    held_acts: List[torch.Tensor] = []
    held_budget = _HOLD_BYTES.get(device.type, 0)

    def drop_held() -> None:
        held_positions.clear()
        held_acts.clear()
        current["held_bytes"] = 0

    # Kept out of torch.compile'd graphs: in a compiled model's hooks dynamo would trace the statistics code
    # and warn at the compiled kernel, then break the graph there anyway (~1 µs a call when not compiled).
    @torch.compiler.disable
    def fold_held() -> None:
        if held_acts:
            stats.fold_layers(held_positions, held_acts, current["weights"], current["plan"])
        drop_held()

    # A module's n-th call in a forward makes the layer at its n-th place in `modules` (ALBERT's shared
    # groups run several layers; every other model's blocks run once each). One call counter per hooked
    # module, reset before each forward.
    tokens_first, pads_right = output_layout(model)
    calls: List[int] = []

    def make_hook(slot: int, expected: int, scored: Dict[int, Tuple[int, int]]):
        def hook(module, args, output):
            occurrence = calls[slot]
            calls[slot] = occurrence + 1
            if occurrence >= expected:
                raise RuntimeError(
                    f"block {type(module).__name__} ran {occurrence + 1} times in one forward, but the model's "
                    f"depth says {expected}; the blocks found are not the ones the model runs once per layer. "
                    "Pass blocks= explicitly."
                )
            where = scored.get(occurrence)
            if where is None:
                return
            position, layer = where
            hidden = block_hidden_states(output)
            if tokens_first:
                hidden = hidden.transpose(0, 1)  # a strided view: the kernels take any strides
            if pads_right and hidden.shape[1] > current["tokens"]:  # padded inside the model: the input comes first
                hidden = hidden[:, : current["tokens"]]
            if spread and hidden.device != device:
                hidden = hidden.to(device)
            shape = hidden.shape
            if len(shape) != 3 or shape[0] != current["sequences"] or shape[1] != current["tokens"]:
                raise ValueError(
                    f"block {layer} returned hidden states of shape {tuple(shape)}, but the batch holds "
                    f"{tuple(current['weights'].shape)} (sequences, tokens): hsvfast reads each block's output as "
                    "(sequences, tokens, hidden) for every token of the input. This model's blocks change, reorder "
                    "or split the tokens' states (e.g. Funnel pools them; hyper-connection models keep several "
                    "streams); score a model whose blocks keep them, or pass blocks= the list of blocks that do."
                )
            held_positions.append(position)
            held_acts.append(hidden)
            current["held_bytes"] += hidden.numel() * hidden.element_size()
            if current["held_bytes"] > held_budget:
                fold_held()
            if layer == deepest:
                raise StopForward
        return hook

    def run_forward(inputs: Dict[str, torch.Tensor], weights: torch.Tensor, plan, precision=precision) -> None:
        # One batch, eagerly: the forward up to the deepest block; the hooks fold the block outputs.
        current["plan"], current["weights"] = plan, weights
        current["sequences"], current["tokens"] = weights.shape
        calls[:] = [0] * len(calls)
        try:
            with precision:
                model(**inputs, **forward_kwargs)
        except StopForward:
            fold_held()
        else:
            raise RuntimeError(
                f"the forward pass finished without running block {deepest}; the blocks found are not "
                "the ones the model runs. Pass blocks= explicitly."
            )

    graphs = None
    if use_graphs:
        # Inside a capture, autocast must not cache casts made outside it (torch's CUDA graph notes).
        graph_precision = (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if autocast
                           else contextlib.nullcontext())

        def run_graphed(inputs, weights, plan) -> None:
            try:
                run_forward(inputs, weights, plan, graph_precision)
            except BaseException:  # a failed capture: the hooks may hold outputs of the aborted forward
                drop_held()
                raise

        graphs = ForwardGraphs(stats, run_graphed, device, pad_token_id=_pad_token_id(model), max_tokens=max_positions,
                               multiple=1 if convolves_across_tokens(model) else DEFAULT_MULTIPLE,
                               probe=HostBoundProbe(device) if cuda_graphs == "auto" else None,
                               watch=tensors_of(model), warn=cuda_graphs is True)

    was_training = model.training
    hooked: Dict[int, Tuple[nn.Module, Dict[int, Tuple[int, int]]]] = {}  # module -> {its n-th call: layer}
    for position, layer in enumerate(layer_ids):
        module = modules[layer]
        occurrence = sum(other is module for other in modules[:layer])
        hooked.setdefault(id(module), (module, {}))[1][occurrence] = (position, layer)
    calls[:] = [0] * len(hooked)
    handles = [module.register_forward_hook(make_hook(slot, sum(m is module for m in modules), scored))
               for slot, (module, scored) in enumerate(hooked.values())]
    warned_empty = warned_unmasked = False
    pad_id = _config_pad_token_id(model)
    bar = None
    try:
        if device != original_device:
            model.to(device)
        model.eval()
        bar = _progress_bar(loader, progress, done=resume.batches_done)
        with torch.inference_mode():
            # Each batch is prepared (its host facts copied back, if it lives on a GPU) while the one
            # before it is scored: see hsvfast.prefetch.
            prepared_stream = prepared_batches(loader, pooling, special_ids, skip=resume.skip,
                                               pin=device.type == "cuda")
            for prepared in read_ahead(prepared_stream):
                batch_index, batch, weights = prepared.index, prepared.batch, prepared.weights
                labels, poolable = prepared.labels_and_poolable()
                if len(labels) != len(poolable):
                    raise ValueError(f"batch {batch_index}: {len(labels)} labels for {len(poolable)} sequences")
                if not poolable.all():
                    if strict:
                        raise ValueError(
                            f"batch {batch_index}: {int((~poolable).sum())} sequence(s) have no token to pool "
                            f"with pooling={pooling!r} (e.g. an empty text is only special tokens)"
                        )
                    if not warned_empty:
                        warnings.warn(
                            f"skipping sequences with no token to pool (first in batch {batch_index}); "
                            "the report counts them in num_skipped; strict=True raises instead",
                            stacklevel=2,
                        )
                        warned_empty = True
                plan = stats.plan_batch(labels, poolable)
                if not warned_unmasked and _padded_without_mask(batch, pad_id):
                    warnings.warn(
                        f"batch {batch_index} has no attention_mask but holds the model's pad token (id {pad_id}): "
                        "the padding is attended (and, unless special_tokens_mask marks it, pooled) as if it were "
                        "text, which changes every layer's states; pass the tokenizer's attention_mask",
                        stacklevel=2,
                    )
                    warned_unmasked = True
                if max_positions and batch["input_ids"].shape[1] > max_positions:
                    raise ValueError(
                        f"batch {batch_index} has sequences of {batch['input_ids'].shape[1]} tokens but the model "
                        f"takes at most {max_positions}; tokenize with truncation=True, max_length={max_positions}"
                    )
                inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}

                def eager() -> None:  # this batch, copied to the device, through the eager forward
                    run_forward({k: _to_device(v, device) for k, v in inputs.items()}, _to_device(weights, device), plan)

                try:
                    if not poolable.any():
                        pass  # nothing to pool (e.g. only empty texts: maybe no token at all): no forward
                    elif graphs is None:
                        eager()
                    else:
                        graphs.run(inputs, weights, plan, eager)
                except torch.cuda.OutOfMemoryError as error:  # torch.OutOfMemoryError from torch 2.5 on (one class)
                    raise type(error)(
                        f"out of memory on {device} in batch {batch_index} ({batch['input_ids'].shape[0]} sequences "
                        f"of {batch['input_ids'].shape[1]} tokens): use a smaller batch size or max_length. {error}"
                    ) from error
                stats.finish_batch(plan)
                resume.after_batch(batch_index, batch)
                if bar is not None:  # counts scored batches (the loader is read one batch ahead)
                    elapsed = bar.format_dict.get("elapsed") or 0.0
                    bar.set_postfix(examples=stats.num_examples,
                                    per_s=f"{stats.num_examples / elapsed:.0f}" if elapsed else "-", refresh=False)
                    bar.update(1)
        if graphs is not None:  # how the batches ran: report.stats.info["cuda_graphs"]
            stats.info["cuda_graphs"] = graphs.summary()
        resume.finish()
        if is_distributed():
            all_reduce_statistics(stats)
    finally:
        if bar is not None:
            bar.close()
        if graphs is not None:
            graphs.close()
        for handle in handles:
            handle.remove()
        model.train(was_training)
        if device != original_device:
            model.to(original_device)

    return report_from(stats)


def report_from(stats: Statistics) -> Report:
    """A :class:`Report` from finished statistics (from ``score``, a file, or a merge)."""
    from . import __version__

    stats.check_complete()
    names = stats.info.get("metrics")
    if names is not None and stats.mode == "trace":
        names = [n for n in names if n == "trace_ratio"]
    per_layer = metrics_of_layers(stats.all_class_moments(), names)
    return Report(
        layers=list(stats.layers),
        metrics={name: [m[name] for m in per_layer] for name in per_layer[0]},
        class_counts=dict(sorted(zip(stats.labels, stats.counts.tolist()), key=lambda kv: repr(kv[0]))),
        pooling=stats.info.get("pooling", "unknown"),
        model_name=stats.info.get("model_name"),
        num_examples=stats.num_examples,
        num_skipped=stats.num_skipped,
        backend=stats.info.get("backend", _kernels.backend(stats.device)),
        version=__version__,
        num_blocks=stats.info.get("num_blocks"),
        task=stats.info.get("task"),
        hidden_size=max((m.hidden_size for m in stats.moments if m is not None), default=None),
        stats=stats,
    )


class _Checkpointer:
    """Periodic atomic checkpoints of the statistics, and resuming from one."""

    def __init__(self, path, every: int, stats: Statistics, model: nn.Module, loader: Any) -> None:
        self.path, self.every, self.stats = path, every, stats
        self.batches_done, self.digest = 0, hashlib.sha256()
        if path is None:
            return
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint_every must be a positive number of batches, got {every!r}")
        if os.path.isdir(path):
            raise ValueError(f"checkpoint {os.fspath(path)} is a folder: pass a file name in it (e.g. run.ckpt)")
        if is_distributed():
            import torch.distributed as dist

            root, suffix = os.path.splitext(os.fspath(path))
            self.path = f"{root}.rank{dist.get_rank()}{suffix}"
        self.fingerprint = json_roundtrip({
            "info": {k: stats.info.get(k) for k in ("model_name", "model_class", "num_blocks", "pooling", "dtype")},
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "layers": stats.layers,
            "mode": stats.mode,
            "class_counts": None if stats.class_counts is None else sorted(map(list, stats.class_counts.items()),
                                                                           key=repr),
            "num_batches_in_loader": len(loader) if hasattr(loader, "__len__") else None,
        })  # compared with a fingerprint read back from JSON
        if os.path.exists(self.path):
            saved, extra = load_statistics(self.path, device=stats.device, with_extra=True)
            theirs, ours = extra.get("fingerprint", {}), self.fingerprint
            # A loader without len() (a generator) cannot be compared by size; its data is still checked.
            differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)
                            and not (k == "num_batches_in_loader" and None in (theirs.get(k), ours.get(k))))
            if differ:
                raise ValueError(
                    f"checkpoint {self.path} belongs to a different run (differs in {', '.join(differ)}); "
                    "pass the same model, layers, pooling and data, or delete the checkpoint to start over"
                )
            self.stats = saved
            self.batches_done = int(extra["batches_done"])
            self.expected_digest = extra["digest"]

    def _absorb(self, batch: Any) -> None:
        for key in ("input_ids", "labels", "label"):
            value = batch.get(key) if isinstance(batch, Mapping) else None
            if value is not None:
                self.digest.update(key.encode())
                self.digest.update(np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value).tobytes())

    def skip(self, batch_index: int, batch: Any) -> bool:
        """True for batches the checkpoint already holds (the data is checked while skipping)."""
        if self.path is None or batch_index >= self.batches_done:
            return False
        self._absorb(batch)
        if batch_index + 1 == self.batches_done and self.digest.hexdigest() != self.expected_digest:
            raise ValueError(
                f"the loader yields different data than the run that wrote checkpoint {self.path} "
                "(resuming needs a deterministic loader over the same data); delete it to start over"
            )
        return True

    def after_batch(self, batch_index: int, batch: Any) -> None:
        if self.path is None:
            return
        self._absorb(batch)
        self.batches_done = batch_index + 1
        if self.batches_done % self.every == 0:
            self.save()

    def finish(self) -> None:
        if self.path is not None and self.batches_done:
            self.save()

    def save(self) -> None:
        extra = {"fingerprint": self.fingerprint, "batches_done": self.batches_done,
                 "digest": self.digest.hexdigest()}
        save_statistics(self.stats, self.path, extra)


def json_roundtrip(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def _max_positions(model: nn.Module) -> Optional[int]:
    """The longest input of a model with learned absolute positions (BERT, GPT-2 …); None for RoPE models
    and models without a limit (XLNet's config says -1)."""
    config = getattr(model, "config", None)
    if getattr(config, "rope_theta", None) is not None or getattr(config, "rope_parameters", None) is not None:
        return None
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    for name, module in model.named_modules():
        # RoBERTa-style embeddings (RoBERTa, XLM-R, CamemBERT, MPNet …) count positions from padding_idx + 1.
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and module.padding_idx is not None:
            return min(limit, module.num_embeddings) - module.padding_idx - 1
    return limit


def _describe(model: nn.Module, blocks: Sequence[nn.Module], pooling: str, device: torch.device) -> Dict[str, Any]:
    config = getattr(model, "config", None)
    parameter = next(model.parameters(), None)
    return {
        "model_name": getattr(config, "name_or_path", None) or type(model).__name__,
        "model_revision": getattr(config, "_commit_hash", None),
        "model_class": type(model).__name__,
        "num_blocks": len(blocks),
        "pooling": pooling,
        "dtype": str(parameter.dtype).replace("torch.", "") if parameter is not None else None,
        "backend": _kernels.backend(device),
    }


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a tensor to the device; asynchronous when it is pinned (``DataLoader(pin_memory=True)``).

    hsvfast does not pin the loader's tensors itself (on an H100 that measured no faster,
    benchmarks/RESULTS.md); what it makes on the host for a GPU pass (token weights, index vectors)
    it makes in pinned memory.
    """
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=True)


def _padded_without_mask(batch: Mapping[str, Any], pad_id: Optional[int]) -> bool:
    """Whether a batch without an attention mask holds the model's pad token (read on the host only:
    a batch already on a GPU is not checked, which would wait for the device)."""
    ids = batch["input_ids"]
    return ("attention_mask" not in batch and pad_id is not None and isinstance(ids, torch.Tensor)
            and ids.is_cpu and bool((ids == pad_id).any()))


def _config_pad_token_id(model: nn.Module) -> Optional[int]:
    """The id a tokenizer pads with, as the model's config names it (None where it names none)."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return pad if isinstance(pad, int) and pad >= 0 else None


def _pad_token_id(model: nn.Module) -> int:
    """The id a graph's padding uses: the config's pad token, or 0 where it names none (never attended)."""
    pad = _config_pad_token_id(model)
    return 0 if pad is None else pad


def available_device(device: "str | torch.device") -> torch.device:
    """``device`` as a ``torch.device``; a ValueError that says why when it is a CUDA device this process
    cannot use (torch would raise an AssertionError from deep inside ``model.to``)."""
    device = torch.device(device)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            build = "a CPU-only build of torch" if torch.version.cuda is None else \
                f"torch built for CUDA {torch.version.cuda}"
            raise ValueError(f"device {device} is not available: {build} sees {count} CUDA device(s); use the CPU "
                             "(device 'cpu'), or a machine with a GPU and a CUDA build of torch")
    return device


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _counts_if_needed(model: nn.Module, loader: Any, num_layers: int, max_memory: int, pooling: str,
                      progress: bool = False):
    """Class counts, when per-class matrices would not fit: from :class:`hsvfast.batching.BucketedBatches`
    (a tokenising pre-pass that counts what will be scored) or a Hugging Face dataset's label column."""
    try:
        hidden = hidden_size_of(model)
    except ValueError:
        return None
    if isinstance(loader, BucketedBatches):
        classes = set(normalise_labels(loader.labels))
        if is_distributed():  # every rank decides alike, on the classes and counts of the whole corpus
            classes = set().union(*gathered(classes))
        if num_layers * per_class_bytes(len(classes), hidden) <= max_memory:
            return None
        counts = loader.label_counts(pooling, progress=progress)
        if is_distributed():
            counts = dict(sum((collections.Counter(part) for part in gathered(counts)), collections.Counter()))
        return counts
    dataset = getattr(loader, "dataset", None)
    columns = getattr(dataset, "column_names", None)
    if not columns:
        return None
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, (torch.utils.data.SequentialSampler, torch.utils.data.RandomSampler)):
        return None  # a subset or shard: the column's counts would not be what is scored
    if getattr(loader, "drop_last", False):
        return None
    for key in LABEL_KEYS:
        if key in columns:
            counts = collections.Counter(normalise_labels(np.asarray(dataset[key])))
            if num_layers * per_class_bytes(len(counts), hidden) > max_memory:
                return dict(counts)
    return None


def _progress_bar(loader: Iterable, enabled: bool, done: int = 0) -> Any:
    """A bar over the batches, advanced as each is scored (None when disabled); ``done``: resumed batches."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="hsvfast", unit="batch", total=len(loader) if hasattr(loader, "__len__") else None,
                initial=done)
