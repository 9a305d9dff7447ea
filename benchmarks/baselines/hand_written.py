"""What most users write: output_hidden_states=True, pool every layer, concatenate, ν at the end."""
import numpy as np
import torch

from .common import mean_pool, model_inputs, on_device


def variability_numpy(features: np.ndarray, labels: np.ndarray) -> float:
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(0) for c in classes])
    within = np.mean([np.cov(features[labels == c].T, bias=True) for c in classes], axis=0)
    centred = means - means.mean(0)
    between = centred.T @ centred / len(classes)
    return float(np.trace(within @ np.linalg.pinv(between, hermitian=True)) / len(classes))


def hand_written(model, batches, layers):
    pooled = {k: [] for k in layers}
    labels = []
    with torch.inference_mode():
        for batch in batches:
            batch = on_device(batch, model)
            states = model(**model_inputs(batch), output_hidden_states=True).hidden_states
            for k in layers:
                pooled[k].append(mean_pool(states[k + 1], batch).cpu())
            labels.append(batch["labels"])
    labels = torch.cat(labels).numpy()
    return [variability_numpy(torch.cat(pooled[k]).double().numpy(), labels) for k in layers]
