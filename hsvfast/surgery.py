"""Model surgery for the plan: truncate above the head layer, freeze, add adapters.

All of it finds the blocks generically (:func:`hsvfast.find_blocks`), so the same calls work for
encoders (BERT, RoBERTa, DistilBERT, ELECTRA …) and decoder LMs (GPT-2, Llama, Qwen2 …).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .layers import (depth_attribute, find_blocks, hidden_size_of, layer_index, layer_list, layer_modules, layer_parts,
                     modules_of_layers, parallel_lists, parent_of, set_depth, shares_weights)
from .optional import require

ADAPTER_KINDS = ("sequential", "lora")
ADAPTER_INITS = ("bert", "zero")


def truncate(model: nn.Module, head_layer: int) -> nn.Module:
    """Remove the blocks above ``head_layer`` (in place; config updated) and return the model.

    Afterwards the model's last block is block ``head_layer``: its output is what the paper puts
    the classifier on. For decoders the model's final norm, if any, still follows it. A model
    whose layers share weights (ALBERT) runs fewer layers through the same groups, where that
    keeps every remaining layer on its group (always with one group, ALBERT's default).
    """
    blocks = find_blocks(model)
    modules = layer_modules(model, blocks)
    head_layer = layer_index(head_layer, "head_layer")
    if not 0 <= head_layer < len(modules):
        raise ValueError(
            f"head_layer {head_layer!r} is out of range: the model has {len(modules)} blocks (0..{len(modules) - 1})"
        )
    if shares_weights(modules):
        _truncate_shared(model, blocks, modules, head_layer)
    else:
        set_depth(model, nn.ModuleList(list(blocks)[: head_layer + 1]))
    return model


def _truncate_shared(model: nn.Module, blocks: nn.ModuleList, modules: List[nn.Module], head_layer: int) -> None:
    """ALBERT: run head_layer + 1 layers through the same groups (the group of each layer follows from
    the depth, so check that every kept layer keeps its group)."""
    config = model.config
    attribute = depth_attribute(config)
    depth = getattr(config, attribute)
    setattr(config, attribute, head_layer + 1)
    if any(a is not b for a, b in zip(layer_modules(model, blocks), modules)):
        setattr(config, attribute, depth)
        raise ValueError(
            f"cannot truncate {type(model).__name__} to {head_layer + 1} layers: its {len(modules)} layers share "
            f"{len(blocks)} weight groups, and with {head_layer + 1} layers the model would run some of them through "
            "another group. Truncate a model with one group (num_hidden_groups=1) or keep every layer."
        )


def _check_layers(layers: Iterable[int], num_blocks: int, what: str) -> List[int]:
    layers = sorted(set(layer_list(layers, f"{what}: layers")))
    for layer in layers:
        if not 0 <= layer < num_blocks:
            raise ValueError(f"{what}: layer {layer!r} does not exist (the model has blocks 0..{num_blocks - 1})")
    return layers


def _modules_of(modules: List[nn.Module], layers: List[int], what: str) -> List[nn.Module]:
    """The distinct modules that run ``layers``; refused where one of them also runs another layer
    (ALBERT's shared groups): changing it would change that layer too."""
    chosen = {id(modules[k]): modules[k] for k in layers}
    for k, module in enumerate(modules):
        if id(module) in chosen and k not in layers:
            shared = [j for j, other in enumerate(modules) if other is module]
            raise ValueError(
                f"{what}: layers {shared} share their weights (one {type(module).__name__} runs all of them), so "
                f"changing layer {min(set(shared) & set(layers))} changes layer {k} too. Include every layer that "
                f"shares them (for a plan: num_tuned = head_layer + 1), or none."
            )
    return list(chosen.values())


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm", "Norm"))


def freeze(model: nn.Module, tuned_layers: Sequence[int], train_norms: bool = True,
           train_blocks: bool = True) -> nn.Module:
    """Freeze every parameter except those of the blocks in ``tuned_layers``.

    ``train_blocks=False`` keeps even the tuned blocks frozen (adapter tuning), so that only their
    norm layers (``train_norms``) and any hsvfast adapters train. Adapters are always trainable.
    """
    blocks = find_blocks(model)
    modules = layer_modules(model, blocks)
    tuned_layers = _check_layers(tuned_layers, len(modules), "freeze")
    _modules_of(modules, tuned_layers, "freeze")  # refuses layers that share weights with untuned ones
    tuned = modules_of_layers(layer_parts(model, blocks), tuned_layers)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for block in tuned:
        for module in block.modules():
            own = list(module.parameters(recurse=False))
            trainable = train_blocks or (train_norms and _is_norm(module))
            for parameter in own:
                parameter.requires_grad_(trainable)
    for module in model.modules():
        if isinstance(module, BottleneckAdapter):
            module.requires_grad_(True)
    return model


class BottleneckAdapter(nn.Module):
    """Sequential bottleneck adapter (He et al. 2022, as the paper uses): x + up(ReLU(down(x)))."""

    def __init__(self, hidden_size: int, bottleneck: int, init: str = "bert") -> None:
        super().__init__()
        if init not in ADAPTER_INITS:
            raise ValueError(f"unknown adapter init {init!r}; choose one of {', '.join(ADAPTER_INITS)}")
        if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive integer (the adapter's width), got {bottleneck!r}")
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        for layer in (self.down, self.up):
            nn.init.normal_(layer.weight, mean=0.0, std=0.02)  # BERT-style
            nn.init.zeros_(layer.bias)
        if init == "zero":  # identity at the start: the model's output is unchanged
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x)))


class AdaptedProjection(nn.Module):
    """A projection (or a mixture-of-experts block) followed by an adapter: where the residual add
    and LayerNorm come next. Attributes it lacks are the wrapped module's (T5 reads ``wo.weight``)."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        if isinstance(out, tuple):  # (hidden states, router logits …) of some MoE blocks
            return (self.adapter(out[0]),) + out[1:]
        return self.adapter(out)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "adapter"):
                raise
            return getattr(self.base, name)


def _linear_shape(module: nn.Module) -> Optional[Tuple[int, int]]:
    """(in, out) of nn.Linear and GPT-2's Conv1D; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return tuple(module.weight.shape)  # Conv1D stores (in, out)
    return None


def adapter_sites(block: nn.Module, hidden_size: int) -> Tuple[str, str]:
    """Names of the attention output projection and the FFN output projection in a block.

    The attention output is the last projection to ``hidden_size`` inside the attention submodule
    (``attention.output.dense``, ``out_lin``, ``attn.c_proj``, ``self_attn.o_proj``); the FFN output is
    the last projection to ``hidden_size`` outside it (``output.dense``, ``lin2``, ``mlp.c_proj``,
    ``mlp.down_proj``) — in a mixture of experts, the module holding all experts (``mlp``), whose
    output is the routed experts' sum (the shared expert's included), not one expert's projection.
    """
    attention, ffn = None, None
    for name, module in block.named_modules():
        shape = _linear_shape(module)
        if shape is None or shape[1] != hidden_size:
            continue
        if _is_attention(name):
            attention = name
        else:
            ffn = name
    experts = [name.rsplit(".", 1)[0] for name, _ in block.named_modules()
               if "." in name and _is_expert(name.rsplit(".", 1)[-1]) and not _is_attention(name)]
    if experts:
        ffn = ".".join(_common_prefix([name.split(".") for name in experts])) or None
    if attention is None or ffn is None:
        raise ValueError(
            f"could not find the attention output and FFN output projections in {type(block).__name__} "
            f"(hidden size {hidden_size}); use kind='lora' or add adapters by hand"
        )
    return attention, ffn


def _is_attention(name: str) -> bool:
    return any(part in name.lower() for part in ("attn", "attention"))


def _is_expert(name: str) -> bool:
    """A module path through a mixture of experts' experts (``experts``, ``shared_expert`` …)."""
    return any("expert" in part.lower() for part in name.split("."))


def _common_prefix(paths: List[List[str]]) -> List[str]:
    prefix = paths[0]
    for path in paths[1:]:
        n = 0
        while n < min(len(prefix), len(path)) and prefix[n] == path[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def add_adapters(model: nn.Module, layers: Sequence[int], bottleneck: int = 256, kind: str = "sequential",
                 init: str = "bert", **lora_options) -> nn.Module:
    """Add the paper's adapters to ``layers`` and return the model.

    ``kind="sequential"``: a bottleneck adapter after the attention output projection and one after
    the FFN output, each before its residual add and LayerNorm (in place). ``init="bert"`` draws
    weights from normal(0, 0.02) with zero biases (the paper's); ``init="zero"`` also zeroes the
    up-projection so the model starts out unchanged.
    ``kind="lora"``: LoRA through PEFT (``pip install peft``) on the linear layers of ``layers``;
    returns PEFT's wrapped model. ``lora_options`` go to ``LoraConfig`` (e.g. ``r=8``).
    """
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {', '.join(ADAPTER_KINDS)}")
    blocks = find_blocks(model)
    if len(parallel_lists(model, blocks)) > 1:
        raise ValueError(f"{type(model).__name__} keeps its layers as parallel lists, not blocks: adapters cannot be "
                         "placed in them by hsvfast; fine-tune the layers (method='finetune') or add adapters by hand")
    modules = layer_modules(model, blocks)
    adapted = _modules_of(modules, _check_layers(layers, len(modules), "add_adapters"), "add_adapters")
    if kind == "lora":
        # PEFT reads an empty layers_to_transform as "every layer": no layers means no adapters here.
        # It counts positions in the block list (ALBERT: groups, not layers).
        positions = sorted(next(i for i, b in enumerate(blocks) if b is m) for m in adapted)
        return _add_lora(model, blocks, positions, **lora_options) if positions else model
    hidden = hidden_size_of(model)
    reference = next(model.parameters())
    for block in adapted:
        for site in adapter_sites(block, hidden):
            projection = block.get_submodule(site)
            parent, name = parent_of(block, projection)
            adapter = BottleneckAdapter(hidden, bottleneck, init).to(device=reference.device, dtype=reference.dtype)
            setattr(parent, name, AdaptedProjection(projection, adapter))
    return model


def _add_lora(model: nn.Module, blocks: nn.ModuleList, layers: List[int], **options) -> nn.Module:
    peft = require("peft", "kind='lora'", "lora")
    # Every linear layer of the adapted blocks, by its full name (a hybrid's attention and linear-attention
    # layers name theirs apart), except in mixtures of experts: PEFT reads names like "down_proj" there as
    # the fused expert weights (its transformers-4 compatibility mapping) and fails on them.
    adapted = {id(m) for k in layers for m in blocks[k].modules()}
    targets = sorted(name for name, m in model.named_modules() if id(m) in adapted and _linear_shape(m)
                     and not _is_expert(name))
    config = peft.LoraConfig(target_modules=targets, **{"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, **options})
    return peft.get_peft_model(model, config)
