"""Training the planned model: ``train`` (AdamW, linear warm-up/decay, best epoch kept) and ``apply``."""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import nn

from .classifier import Classifier
from .layers import encoder_of, find_blocks, layer_modules
from .planning import Plan
from .storage import write_atomically
from .surgery import add_adapters, freeze, truncate

METHODS = ("finetune", "adapter", "lora")
_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")


def apply(model: nn.Module, plan: Plan, num_labels: int, method: str = "finetune", bottleneck: int = 256,
          pooling: str = "mean", tokenizer: Any = None, init: str = "bert", train_norms: bool = True) -> Classifier:
    """Carry out a plan on ``model`` (in place) and return a :class:`Classifier` ready to train.

    Truncates above ``plan.head_layer``, then ``method``:

    * ``"finetune"`` — the tuned layers train, everything below is frozen;
    * ``"adapter"`` — sequential bottleneck adapters in the tuned layers; adapters, the tuned
      layers' norms (``train_norms``) and the head train (the paper's adapter setup);
    * ``"lora"`` — LoRA (PEFT) on the tuned layers.

    An encoder-decoder model (T5, BART) was scored on its encoder's layers: the classifier goes on
    the encoder, and the decoder is left out. A model whose depth is not the plan's ``num_blocks``
    (another model, or one already truncated) is refused.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    model = encoder_of(model)
    depth = len(layer_modules(model, find_blocks(model)))
    if depth != plan.num_blocks:  # the plan's layer indices are another model's
        raise ValueError(f"the plan was made for a model with {plan.num_blocks} blocks, and this "
                         f"{type(model).__name__} has {depth}: apply a plan to a fresh copy of the model that was scored")
    truncate(model, plan.head_layer)
    if method == "finetune":
        freeze(model, plan.tuned_layers, train_norms=train_norms)
        backbone = model
    elif method == "adapter":
        add_adapters(model, plan.tuned_layers, bottleneck=bottleneck, init=init)
        freeze(model, plan.tuned_layers, train_norms=train_norms, train_blocks=False)
        backbone = model
    else:
        freeze(model, [], train_norms=False)
        backbone = add_adapters(model, plan.tuned_layers, kind="lora")
    return Classifier(backbone, num_labels, pooling=pooling, tokenizer=tokenizer)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def evaluate(classifier: Classifier, loader: Iterable[Dict[str, Any]], device: torch.device) -> Dict[str, float]:
    """Accuracy and Matthews correlation (the CoLA metric) of the classifier on a loader."""
    classifier.eval()
    predictions, truth = [], []
    with torch.inference_mode():
        for batch in loader:
            inputs = {k: batch[k].to(device) for k in _MODEL_KEYS if k in batch}
            predictions.append(classifier(**inputs).logits.argmax(-1).cpu())
            truth.append(torch.as_tensor(batch["labels"]))
    if not predictions:
        raise ValueError("the evaluation loader has no batches")
    predicted, expected = torch.cat(predictions).numpy(), torch.cat(truth).numpy()
    return {"accuracy": float((predicted == expected).mean()), "mcc": _matthews(predicted, expected)}


def _matthews(predicted: np.ndarray, expected: np.ndarray) -> float:
    classes = np.union1d(predicted, expected)
    confusion = np.zeros((len(classes), len(classes)))
    for p, e in zip(np.searchsorted(classes, predicted), np.searchsorted(classes, expected)):
        confusion[e, p] += 1
    t, p, c, s = confusion.sum(1), confusion.sum(0), np.trace(confusion), confusion.sum()
    denominator = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator else 0.0


def _checked_labels(batch: Dict[str, Any], num_labels: Optional[int], epoch: int, index: int) -> torch.Tensor:
    """The batch's labels as class ids 0..num_labels-1, or a ValueError that names the batch (cross-entropy
    would fail with 'Target 2 is out of bounds', or a device-side assert on a GPU). Checked while on the host."""
    if "labels" not in batch:
        raise ValueError(f"epoch {epoch + 1}, batch {index}: no 'labels' (keys: {sorted(batch)})")
    labels = batch["labels"]
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"epoch {epoch + 1}, batch {index}: labels must be integer class ids "
                         f"(map string labels to ids first), got {list(labels)[:3]}…") from error
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"epoch {epoch + 1}, batch {index}: labels must be integer class ids, got {labels.dtype}")
    if num_labels is not None and labels.is_cpu:
        outside = labels[(labels < 0) | (labels >= num_labels)]
        if outside.numel():
            raise ValueError(f"epoch {epoch + 1}, batch {index}: label {int(outside[0])} is outside "
                             f"0..{num_labels - 1}; the classifier has num_labels={num_labels}")
    return labels


def train(classifier: Classifier, train_loader: Iterable[Dict[str, Any]],
          eval_loader: Optional[Iterable[Dict[str, Any]]] = None, epochs: int = 3, lr: float = 3e-4,
          warmup: float = 0.06, weight_decay: float = 0.0, seed: int = 0, device: "str | torch.device | None" = None,
          metric: str = "accuracy", checkpoint_dir: "str | Path | None" = None, progress: bool = True) -> List[Dict]:
    """Train with AdamW and a linear warm-up/decay schedule; evaluate each epoch; keep the best.

    The best epoch's trainable weights (by ``metric`` on ``eval_loader``; the last epoch without
    one) are saved as safetensors in ``checkpoint_dir`` (a temporary folder by default) and loaded
    back at the end. Returns one dict per epoch: ``epoch``, ``train_loss``, ``seconds`` and the
    evaluation metrics.
    """
    from safetensors.torch import load_file, save_file

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup <= 1:
        raise ValueError(f"warmup is the fraction of the steps spent warming up, in [0, 1], got {warmup!r}")
    if metric not in ("accuracy", "mcc"):  # anything else would silently keep the last epoch
        raise ValueError(f"metric must be 'accuracy' or 'mcc' (what evaluate computes), got {metric!r}")
    try:
        steps = epochs * len(train_loader)  # the schedule's length
    except TypeError:
        raise TypeError(f"train_loader must have a length and be readable once per epoch (a list of batches or a "
                        f"DataLoader), got a {type(train_loader).__name__}") from None
    if not steps:
        raise ValueError("train_loader has no batches")
    config = getattr(classifier, "config", None)  # a transformers model keeps num_labels there
    num_labels = getattr(classifier, "num_labels", None) or getattr(config, "num_labels", None)
    torch.manual_seed(seed)
    device = torch.device(device) if device is not None else next(classifier.parameters()).device
    classifier.to(device)
    parameters = [p for p in classifier.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the classifier has no trainable parameters")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    warm = max(1, int(warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: step / warm if step < warm else max(0.0, (steps - step) / max(1, steps - warm)))
    folder = Path(checkpoint_dir) if checkpoint_dir else Path(tempfile.mkdtemp(prefix="hsvfast-train-"))
    folder.mkdir(parents=True, exist_ok=True)
    best_path = folder / "best.safetensors"
    history, best = [], -math.inf
    trainable_names = [n for n, p in classifier.named_parameters() if p.requires_grad]
    for epoch in range(epochs):
        classifier.train()
        began, losses = time.perf_counter(), []
        batches = train_loader
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for index, batch in enumerate(batches):
            inputs = {k: batch[k].to(device) for k in _MODEL_KEYS if k in batch}
            labels = _checked_labels(batch, num_labels, epoch, index)
            loss = classifier(**inputs, labels=labels.to(device)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "seconds": time.perf_counter() - began}
        if eval_loader is not None:
            record.update(evaluate(classifier, eval_loader, device))
        history.append(record)
        score = record.get(metric, epoch)
        if score > best:
            best = score
            state = dict(classifier.named_parameters())
            weights = {n: state[n].detach().cpu().contiguous() for n in trainable_names}
            # Atomic: a crash mid-write leaves the previous best whole (the folder may be the user's).
            write_atomically(best_path, lambda temporary: save_file(weights, temporary))
    classifier.load_state_dict(load_file(str(best_path)), strict=False)
    return history
