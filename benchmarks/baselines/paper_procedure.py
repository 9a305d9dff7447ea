"""The official code's algorithm, re-implemented from its description (arXiv:2210.10041, shared/docs/paper.md).

One pass per layer, the model truncated to that layer each time (L(L+1)/2 block-forwards per
example instead of L), all hidden states kept, features moved to the CPU and concatenated per
class after every batch, metric in float32 on the CPU with a d×d pseudo-inverse.

For timing on any model; its ν is the paper's on encoders. On a decoder with a final norm
(Llama, GPT-2) a truncated model's last hidden state is after that norm, so there it scores
normed states where hsvfast scores the block outputs.
"""
import torch

from .common import mean_pool, model_inputs, on_device, truncated


def compute_nc(features_per_class):
    """ν as the official compute_nc: biased covariances, pinv, float32 on the CPU."""
    means = torch.stack([f.mean(0) for f in features_per_class])
    global_mean = means.mean(0)
    within = sum(torch.cov(f.T, correction=0) for f in features_per_class) / len(features_per_class)
    centred = means - global_mean
    between = centred.T @ centred / len(features_per_class)
    return float(torch.trace(within @ torch.linalg.pinv(between)) / len(features_per_class))


def one_layer(model, batches, layer: int) -> float:
    features = {}
    with truncated(model, layer + 1), torch.inference_mode():
        for batch in batches:
            batch = on_device(batch, model)
            states = model(**model_inputs(batch), output_hidden_states=True).hidden_states
            pooled = mean_pool(states[layer + 1], batch).cpu()
            for c in batch["labels"].unique().tolist():
                chunk = pooled[batch["labels"] == c]
                features[c] = torch.cat([features[c], chunk]) if c in features else chunk  # quadratic copying
    return compute_nc([features[c] for c in sorted(features)])


def paper_procedure(model, batches, layers):
    return [one_layer(model, batches, k) for k in layers]


def paper_end_to_end(model, tokenizer, texts, labels, layers, batch_size=8, max_length=128):
    """From raw text, as the official scripts: per layer, per class, padded to max_length, batch 8."""
    results = []
    for layer in layers:
        batches = []
        for c in sorted(set(labels)):
            rows = [t for t, y in zip(texts, labels) if y == c]
            for start in range(0, len(rows), batch_size):
                enc = tokenizer(rows[start : start + batch_size], padding="max_length", truncation=True,
                                max_length=max_length, return_tensors="pt", return_special_tokens_mask=True)
                enc["labels"] = torch.full((len(rows[start : start + batch_size]),), c)
                batches.append(dict(enc))
        results.append(one_layer(model, batches, layer))
    return results
