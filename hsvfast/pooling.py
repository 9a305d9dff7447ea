"""Token weights: which tokens of each sequence make up its pooled vector.

Every pooling is a weighted mean over tokens, so one kernel serves them all:

* ``"mean"`` — attended tokens that are not special tokens (the paper's choice;
  the official code drops RoBERTa's ``<s>``/``</s>``/``<pad>``). Special tokens
  come from the batch's ``special_tokens_mask`` or from the tokenizer's special
  ids (``[UNK]`` is content, so it is kept).
* ``"mean_all"`` — every attended token.
* ``"first"`` — the first attended token (``[CLS]`` under right padding).
* ``"last"`` — the last attended token (correct under left padding too).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

POOLINGS = ("mean", "mean_all", "first", "last")


def special_token_ids(tokenizer: Any) -> Optional[Sequence[int]]:
    """The ids a tokenizer adds around text ([CLS], [SEP], <s>, </s>, pad …), without [UNK]."""
    if tokenizer is None:
        return None
    if not hasattr(tokenizer, "all_special_ids"):  # else no token would count as special: a silent "mean_all"
        raise TypeError(f"tokenizer must be a transformers tokenizer (with all_special_ids), got "
                        f"{type(tokenizer).__name__} {tokenizer!r:.40}")
    ids = set(tokenizer.all_special_ids or [])
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return sorted(i for i in ids if i is not None)


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


def token_weights(batch: Mapping[str, Any], pooling: str, special_ids: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(B, T) float32 weights on the batch's device; a row of zeros has nothing to pool."""
    check_pooling(pooling)
    input_ids = batch["input_ids"]
    attention = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention is None else attention.to(torch.bool)

    if pooling == "mean":
        special = batch.get("special_tokens_mask")
        if special is not None:
            mask = mask & ~special.to(device=mask.device, dtype=torch.bool)
        elif special_ids is not None:
            ids = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
            mask = mask & ~torch.isin(input_ids, ids)
        else:
            raise ValueError(
                "pooling='mean' averages the non-special tokens, but the batch has no 'special_tokens_mask' and "
                "no tokenizer was given: pass tokenizer=..., tokenize with return_special_tokens_mask=True, "
                "or use pooling='mean_all'"
            )
    elif pooling in ("first", "last"):
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        if pooling == "first":
            pick = torch.where(mask, positions, mask.shape[1]).min(1).values
        else:
            pick = torch.where(mask, positions, -1).max(1).values
        mask = (positions == pick.unsqueeze(1)) & mask
    return mask.to(torch.float32)
