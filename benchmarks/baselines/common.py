"""Helpers shared by the baselines: truncating a model in place for a while, pooling in torch."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

import hsvfast
from hsvfast.layers import configured_depth

_DEPTH_ATTRIBUTES = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _parent_of(model: nn.Module, target: nn.Module):
    for module in model.modules():
        for name, child in module.named_children():
            if child is target:
                return module, name
    raise ValueError("block list not found in model")


@contextlib.contextmanager
def truncated(model: nn.Module, num_blocks: int):
    """Run ``model`` with only its first ``num_blocks`` blocks (weights shared, restored afterwards)."""
    blocks = hsvfast.find_blocks(model)
    parent, name = _parent_of(model, blocks)
    config = getattr(model, "config", None)
    depth_name = next((a for a in _DEPTH_ATTRIBUTES if isinstance(getattr(config, a, None), int)), None)
    depth = configured_depth(model)
    setattr(parent, name, nn.ModuleList(list(blocks)[:num_blocks]))
    if depth_name:
        setattr(config, depth_name, num_blocks)
    try:
        yield model
    finally:
        setattr(parent, name, blocks)
        if depth_name:
            setattr(config, depth_name, depth)


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def mean_pool(hidden: torch.Tensor, batch) -> torch.Tensor:
    """Mean over attended non-special tokens, in float32 like typical user code."""
    weights = (batch["attention_mask"].bool() & ~batch["special_tokens_mask"].bool()).to(hidden.dtype)
    return (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
