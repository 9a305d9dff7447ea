"""Finding a model's transformer blocks and reading their outputs through hooks.

Layer k is the output of transformer block k (0-based), as the official code's
``--last_layer k`` (``hidden_states[k + 1]`` in Hugging Face terms for encoders;
for decoders the last block's output is taken before the final norm).
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

_DEPTH_ATTRIBUTES = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


class StopForward(Exception):
    """Raised by the hook of the deepest scored block: nothing above it is computed."""


def depth_attribute(config: Any) -> Optional[str]:
    """The name under which a config keeps its depth (``num_hidden_layers``, ``n_layer`` …), or None."""
    return next((name for name in _DEPTH_ATTRIBUTES
                 if isinstance(getattr(config, name, None), int) and getattr(config, name) > 0), None)


def configured_depth(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    attribute = depth_attribute(config)
    return None if attribute is None else getattr(config, attribute)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a model, found without a per-architecture table.

    Candidates are ``nn.ModuleList``s whose children all have one type, or of any types when the
    list is as long as the config's depth (``num_hidden_layers``, ``n_layer`` …; hybrid models mix
    attention and state-space layers); a list of that length wins, ties broken by parameter count.
    A model that keeps its layers as parallel lists of that length under one parent (XLM, FlauBERT:
    ``attentions``, ``layer_norm1``, ``ffns``, ``layer_norm2``) is read at the last one registered,
    whose output ends each layer. In an encoder-decoder model (T5, BART) only the encoder's blocks
    are candidates: they hold the input's hidden states. Works for the encoders and decoder LMs of
    transformers (tests/test_architectures.py lists those checked) and their task-head variants.
    """
    depth = configured_depth(model)
    root = encoder_of(model)
    candidates = []
    for order, (name, module) in enumerate(root.named_modules()):
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len(module) == depth or len({type(child) for child in module}) == 1:
                size = sum(p.numel() for p in module.parameters())
                candidates.append((len(module) == depth, size, order, name, module))
    if not candidates:
        raise ValueError(
            f"could not find the transformer blocks of {type(model).__name__}: no nn.ModuleList of identical "
            "modules. Pass blocks=<the nn.ModuleList of blocks> to hsvfast.score."
        )
    best = max(candidates, key=lambda c: (c[0], c[1]))
    if best[0]:
        parent = best[3].rpartition(".")[0]
        parallel = [c for c in candidates if c[0] and c[3].rpartition(".")[0] == parent]
        best = max(parallel, key=lambda c: c[2])
    return best[4]


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder of an encoder-decoder model (whose layers hsvfast scores); the model itself otherwise."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        encoder = model.get_encoder()
        if isinstance(encoder, nn.Module):
            return encoder
    return model


def layer_modules(model: nn.Module, blocks: Optional[nn.ModuleList] = None) -> List[nn.Module]:
    """The module whose call makes each layer, in the order the forward calls them.

    ``list(blocks)``, except where layers share weights: ALBERT runs ``num_hidden_layers``
    layers through ``num_hidden_groups`` groups, layer i through group ⌊i / (L / G)⌋ (as its
    forward computes it), so a group appears once per layer it runs.
    """
    blocks = find_blocks(model) if blocks is None else blocks
    depth = configured_depth(model)
    groups = getattr(getattr(model, "config", None), "num_hidden_groups", None)
    if depth is not None and isinstance(groups, int) and len(blocks) == groups < depth:
        return [blocks[int(i / (depth / groups))] for i in range(depth)]
    return list(blocks)


def parallel_lists(model: nn.Module, blocks: nn.ModuleList) -> List[nn.ModuleList]:
    """The lists that hold each layer's parts side by side, in registration order: ``blocks`` and its
    siblings of the same length (XLM: ``attentions``, ``layer_norm1``, ``ffns``, ``layer_norm2``); just
    ``[blocks]`` for a model whose blocks are whole layers."""
    try:
        parent, _ = parent_of(model, blocks)
    except ValueError:  # blocks given by hand, not in the model's tree
        return [blocks]
    return [module for module in parent.children()
            if module is blocks or (isinstance(module, nn.ModuleList) and len(module) == len(blocks))]


def layer_parts(model: nn.Module, blocks: Optional[nn.ModuleList] = None) -> List[List[nn.Module]]:
    """The modules that make up each layer, one list per layer: its block (ALBERT: its shared group),
    or where the layers are parallel lists, the layer's entry of each (see :func:`parallel_lists`)."""
    blocks = find_blocks(model) if blocks is None else blocks
    lists = parallel_lists(model, blocks)
    if len(lists) == 1:
        return [[module] for module in layer_modules(model, blocks)]
    return [[parts[k] for parts in lists] for k in range(len(blocks))]


def modules_of_layers(parts: List[List[nn.Module]], layers: Sequence[int]) -> List[nn.Module]:
    """The distinct modules that make up ``layers`` (``parts`` from :func:`layer_parts`): a group that
    ALBERT's layers share counts once."""
    return list({id(m): m for k in layers for m in parts[k]}.values())


def shares_weights(modules: Sequence[nn.Module]) -> bool:
    """Whether some module runs more than one layer (ALBERT)."""
    return len({id(m) for m in modules}) < len(modules)


def hidden_size_of(model: nn.Module) -> int:
    """The model's hidden size d, read from its config under any of the names transformers uses; for a
    part without a config (FSMT's encoder), the width of its token embedding."""
    config = getattr(model, "config", None)
    for name in ("hidden_size", "dim", "n_embd", "d_model", "emb_dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    if config is None:
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        if embedding is not None:
            return embedding.embedding_dim
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__} from its config")


def without_cache(model: nn.Module) -> Dict[str, Any]:
    """Forward arguments that switch off the KV cache, where the model takes them: neither scoring nor
    training a classifier reads it (and a hybrid cut to linear-attention layers cannot make one)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in parameters else {}


def layer_index(value: Any, what: str = "layers") -> int:
    """A layer index as a Python int: ints, NumPy integers and one-element integer tensors (indices computed
    with numpy or torch); refuses bools, floats and strings."""
    if not isinstance(value, (bool, np.bool_, str)):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{what}: {value!r} is not an integer (a block index)")


def layer_list(layers: Any, what: str = "layers") -> List[int]:
    """Layer indices given as a list (or any iterable) of them, as Python ints; ``what`` names them in errors."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"{what} must be a list of block indices (e.g. [2, 3]), got {layers!r}")
    return [layer_index(layer, what) for layer in layers]


def resolve_layers(layers: Optional[Sequence[int]], num_blocks: int) -> List[int]:
    """Sorted, de-duplicated block indices; negative indices count from the top."""
    if layers is None:
        return list(range(num_blocks))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    resolved = set()
    for layer in layer_list(layers):
        if not -num_blocks <= layer < num_blocks:
            raise ValueError(
                f"layer {layer} does not exist: the model has {num_blocks} blocks, so valid indices are "
                f"0..{num_blocks - 1} (or -{num_blocks}..-1)"
            )
        resolved.add(layer % num_blocks)
    if not resolved:
        raise ValueError("layers is empty; pass at least one layer index, or None for all")
    return sorted(resolved)


# Architectures whose blocks keep hidden states as (tokens, sequences, hidden) (XLNet; FSMT, fairseq's layout).
# Any other such model fails the shape check in the hooks on its first batch with sequences != tokens.
_TOKENS_FIRST = ("xlnet", "fsmt")
# Architectures that pad the sequence on the right inside the model (to a multiple of their attention window
# or block size), so their blocks see the input's tokens followed by padding.
_PADS_RIGHT = ("longformer", "led", "pegasus_x")


def output_layout(model: nn.Module) -> Tuple[bool, bool]:
    """(tokens first, padded on the right inside the model) for the block outputs of ``model``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type in _TOKENS_FIRST, model_type in _PADS_RIGHT


def block_hidden_states(output: Any) -> torch.Tensor:
    """The hidden-state tensor in a block's output (a tensor, or the first item of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "hidden_states", None) or getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot find the hidden states in a block output of type {type(output).__name__}")


def parent_of(model: nn.Module, target: nn.Module):
    """(parent module, attribute name) under which ``target`` hangs in ``model``."""
    for module in model.modules():
        for name, child in module.named_children():
            if child is target:
                return module, name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(model).__name__}")


def set_depth(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Install ``blocks`` as the model's block list and make the config agree with it.

    Per-layer config lists of the old depth (e.g. ``layer_types``) are cut to match. Where the
    layers are parallel lists (XLM: ``attentions``, ``layer_norm1``, ``ffns``, ``layer_norm2``), a
    shorter ``blocks`` cuts the others alike; a depth the parent module keeps as an attribute
    (XLM's ``n_layers``, read by its forward) follows.
    """
    current = find_blocks(model)
    parent, name = parent_of(model, current)
    old_depth = configured_depth(model)
    if len(blocks) < len(current):
        parallel = parallel_lists(model, current)
        for sibling, module in list(parent.named_children()):
            if module is not current and any(module is p for p in parallel):
                setattr(parent, sibling, nn.ModuleList(list(module)[: len(blocks)]))
    for attribute in _DEPTH_ATTRIBUTES:
        if getattr(parent, attribute, None) == len(current) and not isinstance(getattr(parent, attribute), bool):
            setattr(parent, attribute, len(blocks))
    setattr(parent, name, blocks)
    config = getattr(model, "config", None)
    if config is None:
        return
    attribute = depth_attribute(config)
    if attribute is not None:
        setattr(config, attribute, len(blocks))
    for attribute, value in list(vars(config).items()):
        if isinstance(value, list) and old_depth is not None and len(value) == old_depth:
            setattr(config, attribute, value[: len(blocks)])
