"""Floor: a bare forward of the model truncated to the deepest scored layer, outputs discarded."""
import torch

from .common import model_inputs, on_device, truncated


def bare_forward(model, batches, deepest_layer: int) -> None:
    with truncated(model, deepest_layer + 1), torch.inference_mode():
        for batch in batches:
            model(**model_inputs(on_device(batch, model)))
