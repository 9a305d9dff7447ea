"""A classification head on a (truncated) backbone's last kept layer, shaped like a transformers model."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .pooling import check_pooling, special_token_ids, token_weights
from .layers import hidden_size_of, without_cache


class Classifier(nn.Module):
    """Backbone → pooled last kept layer → the paper's head → logits (and loss with ``labels``).

    The head is the official code's: dropout → Linear(d, d) → tanh → dropout → Linear(d, C).
    Pooling is the one used for scoring (``"mean"`` over non-special tokens by default), so the
    classifier sees the representation ν measured. The forward returns a
    ``SequenceClassifierOutput`` (``loss``, ``logits``), so the Hugging Face ``Trainer`` works.

    Args:
        backbone: a transformers base model (after :func:`hsvfast.truncate`).
        num_labels: number of classes C.
        pooling: ``"mean"``, ``"mean_all"``, ``"first"`` or ``"last"``.
        tokenizer: finds special tokens when batches carry no ``special_tokens_mask``.
        dropout: dropout probability in the head.
    """

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str = "mean", tokenizer: Any = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
        check_pooling(pooling)  # else the first forward would say it
        self.backbone = backbone
        self.pooling = pooling
        self.num_labels = num_labels
        self.special_ids = special_token_ids(tokenizer)
        # PEFT's wrapper takes **kwargs and hands them to the model it wraps: ask that model.
        self._no_cache = without_cache(backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone)
        hidden = hidden_size_of(backbone)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(dropout),
                                  nn.Linear(hidden, num_labels))
        reference = next(backbone.parameters())
        self.head.to(device=reference.device, dtype=reference.dtype)

    @property
    def config(self):
        return getattr(self.backbone, "config", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, special_tokens_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **unused):
        from transformers.modeling_outputs import SequenceClassifierOutput

        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**inputs, **self._no_cache).last_hidden_state
        batch = dict(inputs)
        if special_tokens_mask is not None:
            batch["special_tokens_mask"] = special_tokens_mask
        weights = token_weights(batch, self.pooling, self.special_ids).to(hidden.dtype)
        pooled = (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        logits = self.head(pooled)
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
