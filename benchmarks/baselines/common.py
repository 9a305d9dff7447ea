"""Helpers shared by the baselines: truncating a model in place for a while, pooling in torch."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

import hsvfast
from hsvfast.layers import set_depth


@contextlib.contextmanager
def truncated(model: nn.Module, num_blocks: int):
    """Run ``model`` with only its first ``num_blocks`` blocks (weights shared, restored afterwards)."""
    _install_output_hooks(model)
    blocks = hsvfast.find_blocks(model)
    config = getattr(model, "config", None)
    lists = {k: v for k, v in vars(config).items() if isinstance(v, list)} if config is not None else {}
    set_depth(model, nn.ModuleList(list(blocks)[:num_blocks]))
    try:
        yield model
    finally:
        set_depth(model, blocks)
        for key, value in lists.items():  # per-layer lists were cut to the shorter depth
            setattr(config, key, value)


def _install_output_hooks(model: nn.Module) -> None:
    """Make transformers (≥ 5) put its ``output_hidden_states`` hooks on every block now.

    It installs them on the first forward that asks for hidden states, on the blocks present then,
    and never again: first installed on a truncated model, the restored blocks would have none and
    later calls would return too few hidden states.
    """
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers 4 returns hidden states without hooks
        return
    if hasattr(model, "config"):
        maybe_install_capturing_hooks(model)


def on_device(batch, model):
    """The batch's tensors on the model's device, copied without blocking (labels stay on the host).

    Loaders yield host tensors (pinned, with ``pin_memory=True``); every method pays this copy.
    """
    device = next(model.parameters()).device
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k != "labels" else v
            for k, v in batch.items()}


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def mean_pool(hidden: torch.Tensor, batch) -> torch.Tensor:
    """Mean over attended non-special tokens, in float32 like typical user code."""
    weights = (batch["attention_mask"].bool() & ~batch["special_tokens_mask"].bool()).to(hidden.dtype)
    return (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
