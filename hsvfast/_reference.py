"""Pure-PyTorch implementation of the compiled pool-and-fold kernel.

It is the fallback where the compiled core is missing (or has no CUDA kernels)
and the oracle the tests hold the compiled kernels to. The contract is the one
in ``csrc/pool_fold.h``: for every row ``b`` with ``labels[b] >= 0``

    p      = sum_t w[b, t] * act[b, t] / sum_t w[b, t]      (float64; tokens with w == 0 unread)
    x      = p - shift[labels[b]]
    out[out_rows[b]] = x;  sums[labels[b]] += x;  sqnorms[labels[b]] += |x|^2

and rows with a negative label get a zero output row.
"""
from __future__ import annotations

from typing import Optional

import torch

# Rows pooled at once, so the float64 copy of the activations stays small.
_CHUNK_ELEMENTS = 1 << 23


def pool_fold_torch(
    act: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    out_rows: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    sums: Optional[torch.Tensor] = None,
    sqnorms: Optional[torch.Tensor] = None,
) -> bool:
    """Pool ``act`` (B, T, d) with token ``weights`` (B, T) and fold into the statistics.

    Returns True when every pooled value of a labelled row is finite.
    """
    batch, tokens, dim = act.shape
    pooled = torch.empty(batch, dim, dtype=torch.float64, device=act.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, tokens * dim))
    for start in range(0, batch, rows_per_chunk):
        stop = min(batch, start + rows_per_chunk)
        w = weights[start:stop].to(torch.float64)
        keep = (w != 0).unsqueeze(-1)
        # where() first: a padding token holding NaN must not poison 0 * NaN.
        x = torch.where(keep, act[start:stop].to(torch.float64), 0.0)
        pooled[start:stop] = torch.bmm(w.unsqueeze(1), x).squeeze(1) / w.sum(1, keepdim=True)

    if labels is None:
        labels = torch.zeros(batch, dtype=torch.int64, device=act.device)
    valid = labels >= 0
    safe_labels = labels.clamp(min=0)
    x = pooled - shift[safe_labels] if shift is not None else pooled
    x = torch.where(valid.unsqueeze(1), x, 0.0)
    finite = bool(torch.isfinite(torch.where(valid.unsqueeze(1), pooled, 0.0)).all())

    if out_rows is None:
        out.copy_(x)
    else:
        out[out_rows] = x
    if sums is not None:
        sums.index_add_(0, safe_labels[valid], x[valid])
    if sqnorms is not None:
        sqnorms.index_add_(0, safe_labels[valid], (x[valid] * x[valid]).sum(1))
    return finite
