"""Dispatch between the compiled kernels (``hsvfast._C``) and the PyTorch reference.

Tensors reach the compiled module as raw pointers with shape, strides, dtype and
the current CUDA stream: no libtorch at build time, no copy of the activations.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import torch

from ._reference import pool_fold_torch

#: Set HSVFAST_BACKEND=torch to force the pure-PyTorch path (debugging, comparisons).
_FORCE_TORCH = os.environ.get("HSVFAST_BACKEND", "").lower() == "torch"

try:  # the compiled core is optional: without it everything runs on the reference, which is much slower
    from . import _C
except ImportError as error:
    _C = None
    if not _FORCE_TORCH:  # say why, instead of just running slower
        missing = error.name in (__package__, f"{__package__}._C")  # no such module, as opposed to one that fails
        reason = ("is not built (is hsvfast imported from its source folder?)" if missing
                  else f"does not load ({error})")
        warnings.warn(f"hsvfast's compiled core {reason}: scoring falls back to the much slower PyTorch reference. "
                      "Build it for this Python with pip install <hsvfast's source folder>; set HSVFAST_BACKEND=torch "
                      "to use the reference without this warning.", RuntimeWarning, stacklevel=2)

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

NO_BAD_BATCH = 2**63 - 1


def backend(device: "torch.device | str | None" = None) -> str:
    """Which implementation pools and folds activations on ``device`` (default CPU).

    Returns ``"cpp"`` (compiled CPU kernel), ``"cuda"`` (compiled CUDA kernel) or
    ``"torch"`` (pure-PyTorch fallback: no compiled core, ``HSVFAST_BACKEND=torch``,
    or a device the compiled core was not built for).
    """
    device = torch.device(device if device is not None else "cpu")
    return _backend_for(device.type == "cpu", device.type == "cuda")


def _backend_for(is_cpu: bool, is_cuda: bool) -> str:
    """:func:`backend` from the device kind (``pool_fold`` reads it off the tensor: no device object)."""
    if _C is None or _FORCE_TORCH:
        return "torch"
    if is_cpu:
        return "cpp"
    if is_cuda and _C.WITH_CUDA:
        return "cuda"
    return "torch"


def compiled_with_cuda() -> bool:
    """True when the compiled core contains the CUDA kernels."""
    return _C is not None and bool(_C.WITH_CUDA)


def pool_fold(
    act: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    out_rows: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    sums: Optional[torch.Tensor] = None,
    sqnorms: Optional[torch.Tensor] = None,
    nonfinite: Optional[torch.Tensor] = None,
    batch_index: int = 0,
    use: Optional[str] = None,
    validate: bool = True,
) -> None:
    """Pool one layer's activations and fold them into per-class statistics, in place.

    ``act`` (B, T, d) float32/float16/bfloat16/float64 with any strides; ``weights``
    (B, T) float32 contiguous; ``labels``/``out_rows`` (B,) int64; ``shift``/``sums``
    (C, d), ``sqnorms`` (C,), ``out`` (rows, d) float64 contiguous; ``nonfinite`` a
    one-element int64 tensor lowered to ``batch_index`` when a pooled value is NaN/Inf.
    Everything must be on ``act``'s device. ``use`` overrides :func:`backend`; ``use="cuda_emulated"``
    runs the CUDA kernel's code on the CPU, on CPU tensors (slow: for tests without a GPU).
    ``validate=False`` skips the checks of the accumulator tensors (for callers that
    made them, like :class:`~hsvfast.statistics.Statistics`: it saves host time per layer).
    """
    which = use if use is not None else _backend_for(act.is_cpu, act.is_cuda)
    dtype_code = _DTYPE_CODES.get(act.dtype)
    if act.dim() != 3:
        raise ValueError(f"activations must be (batch, tokens, hidden), got shape {tuple(act.shape)}")
    if dtype_code is None:
        raise TypeError(f"activations of dtype {act.dtype} are not supported; use float32, float16 or bfloat16")
    if weights.shape != act.shape[:2]:  # the kernels index the weights with the activations' (batch, tokens)
        raise ValueError(f"weights must be (batch, tokens) = {tuple(act.shape[:2])} like the activations "
                         f"{tuple(act.shape)}, got {tuple(weights.shape)}")
    if which == "torch":
        finite = pool_fold_torch(act, weights, out, labels, out_rows, shift, sums, sqnorms)
        if not finite and nonfinite is not None:
            nonfinite.clamp_(max=batch_index)
        return

    if validate:
        for name, tensor, dtype in (
            ("weights", weights, torch.float32), ("out", out, torch.float64), ("labels", labels, torch.int64),
            ("out_rows", out_rows, torch.int64), ("shift", shift, torch.float64), ("sums", sums, torch.float64),
            ("sqnorms", sqnorms, torch.float64), ("nonfinite", nonfinite, torch.int64),
        ):
            if tensor is not None and (tensor.dtype != dtype or not tensor.is_contiguous()
                                       or tensor.device != act.device):
                raise ValueError(f"pool_fold: {name} must be a contiguous {dtype} tensor on {act.device}")
    # Called once per layer and batch: pointers inline, no helper calls (benchmarks/host_overhead.py).
    args = (
        act.data_ptr(), dtype_code, *act.shape, *act.stride(), weights.data_ptr(),
        0 if labels is None else labels.data_ptr(), 0 if out_rows is None else out_rows.data_ptr(),
        0 if shift is None else shift.data_ptr(), out.data_ptr(), 0 if sums is None else sums.data_ptr(),
        0 if sqnorms is None else sqnorms.data_ptr(), 0 if nonfinite is None else nonfinite.data_ptr(),
        batch_index,
    )
    if which in ("cpp", "cuda_emulated") and not act.is_cpu:
        raise ValueError(f"use={which!r} runs on the CPU: pass CPU tensors, not {act.device}")
    if which == "cpp":
        _C.pool_fold_cpu(*args)
    elif which == "cuda_emulated":  # the multi-layer entry with one layer: the emulator has no other
        (act_ptr, _, batch, tokens, dim, stride_b, stride_t, stride_d, weights_ptr, labels_ptr, rows_ptr,
         shift_ptr, out_ptr, sums_ptr, sqnorms_ptr, nonfinite_ptr, _) = args
        layer = [act_ptr, dim, stride_b, stride_t, stride_d, shift_ptr, out_ptr, sums_ptr, sqnorms_ptr, nonfinite_ptr]
        _C.pool_fold_layers(dtype_code, batch, tokens, weights_ptr, labels_ptr, rows_ptr, batch_index, layer,
                            _C.EMULATED_CUDA, 0)
    elif which == "cuda":
        index = act.get_device()
        _C.pool_fold_cuda(*args, index, _current_stream(index))
    else:
        raise ValueError(f"unknown backend {which!r}; expected 'cpp', 'cuda', 'cuda_emulated' or 'torch'")


def pool_fold_layers(
    acts: Sequence[torch.Tensor],
    weights: torch.Tensor,
    outs: Sequence[torch.Tensor],
    labels: torch.Tensor,
    out_rows: Optional[torch.Tensor],
    shifts: Sequence[torch.Tensor],
    sums: Sequence[torch.Tensor],
    sqnorms: Sequence[torch.Tensor],
    nonfinites: Sequence[torch.Tensor],
    batch_index: int = 0,
    use: Optional[str] = None,
    batch_index_at: Optional[torch.Tensor] = None,
) -> None:
    """:func:`pool_fold` of several layers of one batch: layer ``i`` is ``acts[i]`` (B, T, d_i) into
    ``outs[i]``, ``shifts[i]``, ``sums[i]``, ``sqnorms[i]`` and ``nonfinites[i]``; the weights, labels
    and output rows (None: row b to row b) are shared. On CUDA one kernel launch pools them all.

    The accumulators are not checked (callers made them: :class:`~hsvfast.statistics.Statistics`);
    the activations must share the dtype, batch size and token count, and lie on one device.
    ``batch_index_at``: a one-element int64 tensor on that device holding the batch index, read by
    the kernel when it runs (a CUDA graph replays the launch for later batches); else ``batch_index``.
    """
    if not acts:
        return
    first = acts[0]
    which = use if use is not None else _backend_for(first.is_cpu, first.is_cuda)
    if first.dim() != 3:
        raise ValueError(f"activations must be (batch, tokens, hidden), got shape {tuple(first.shape)}")
    if weights.dim() != 2:
        raise ValueError(f"weights must be (batch, tokens), got shape {tuple(weights.shape)}")
    batch, tokens = weights.shape  # the kernels index the weights with each layer's (batch, tokens)
    dtype, device = first.dtype, first.get_device()
    one_call = which == "cuda_emulated" or (which != "torch" and (len(acts) > 1 or batch_index_at is not None))
    flat = []  # 10 entries per layer: see layer_pointers in csrc/bindings.cpp
    for i, act in enumerate(acts):  # runs once per layer and batch: plain attribute reads only
        shape = act.shape
        if len(shape) != 3 or shape[0] != batch or shape[1] != tokens or act.dtype is not dtype \
                or act.get_device() != device:
            raise ValueError(
                "pool_fold_layers: every layer's activations must be (batch, tokens, hidden) with the weights' "
                f"batch and tokens {tuple(weights.shape)} and one dtype and device; got {tuple(first.shape)} "
                f"{first.dtype} {first.device} and {tuple(act.shape)} {act.dtype} {act.device}"
            )
        if one_call:
            flat += (act.data_ptr(), shape[2], *act.stride(), shifts[i].data_ptr(), outs[i].data_ptr(),
                     sums[i].data_ptr(), sqnorms[i].data_ptr(), nonfinites[i].data_ptr())
    if not one_call:
        if batch_index_at is not None:  # the PyTorch reference (never inside a CUDA graph: it synchronises)
            batch_index = int(batch_index_at.item())
        for i, act in enumerate(acts):
            pool_fold(act, weights, outs[i], labels=labels, out_rows=out_rows, shift=shifts[i], sums=sums[i],
                      sqnorms=sqnorms[i], nonfinite=nonfinites[i], batch_index=batch_index, use=which,
                      validate=False)
        return
    dtype_code = _DTYPE_CODES.get(dtype)
    if dtype_code is None:
        raise TypeError(f"activations of dtype {dtype} are not supported; use float32, float16 or bfloat16")
    if which in ("cpp", "cuda_emulated") and not first.is_cpu:  # get_device() is -1 for meta tensors too
        raise ValueError(f"use={which!r} runs on the CPU: pass CPU tensors, not {first.device}")
    if which == "cpp":
        device, stream = -1, 0
    elif which == "cuda_emulated":
        device, stream = _C.EMULATED_CUDA, 0
    elif which == "cuda":
        stream = _current_stream(device)
    else:
        raise ValueError(f"unknown backend {which!r}; expected 'cpp', 'cuda', 'cuda_emulated' or 'torch'")
    _C.pool_fold_layers(dtype_code, batch, tokens, weights.data_ptr(), labels.data_ptr(),
                        0 if out_rows is None else out_rows.data_ptr(), batch_index, flat, device, stream,
                        0 if batch_index_at is None else batch_index_at.data_ptr())


def _current_stream(index: int) -> int:
    """The raw handle of the current CUDA stream of device ``index``.

    ``torch._C._cuda_getCurrentRawStream`` (what torch's own compiled kernels launch on) skips
    building a ``torch.cuda.Stream`` object; the public call is the fallback.
    """
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
