"""The transferability family against independent float64 references on materialised features."""
import numpy as np
import pytest
import torch

import hsvfast
import reference as ref
from hsvfast import metrics
from tiny_models import random_batches, tiny_model

FAMILY = ["nc1", "hscore", "logme", "gbc", "probe_loss"]


def features_and_labels(seed, classes, dim, per_class, offset=0.0, imbalance=False):
    rng = np.random.default_rng(seed)
    counts = [per_class * (4 if imbalance and c == 0 else 1) for c in range(classes)]
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    centres = rng.normal(size=(classes, dim))
    spread = rng.uniform(0.5, 2.0, size=dim)
    return offset + centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("classes,dim,per_class,offset,imbalance", [
    (2, 8, 60, 0.0, False), (3, 32, 40, 5.0, True), (7, 24, 30, 0.0, False), (4, 64, 50, 2.0, True),
])
def test_family_matches_references(name, classes, dim, per_class, offset, imbalance):
    features, labels = features_and_labels(classes * 100 + dim, classes, dim, per_class, offset, imbalance)
    expected = getattr(ref, name)(features, labels)
    actual = metrics.metric(name, features, labels)
    assert ref.relative_error(actual, expected) <= 1e-6, (actual, expected)


def test_family_on_real_minilm_features(minilm_path, sst2_dev):
    from transformers import AutoModel, AutoTokenizer

    texts, labels = sst2_dev
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    enc = tokenizer(texts[:400], padding=True, return_tensors="pt", return_special_tokens_mask=True)
    with torch.no_grad():
        hidden = model(**{k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")},
                       output_hidden_states=True).hidden_states[3]
    features = ref.pool(hidden.numpy(), enc["input_ids"].numpy(), enc["attention_mask"].numpy(),
                        enc["special_tokens_mask"].numpy(), "mean")
    for name in FAMILY:
        expected = getattr(ref, name)(features, labels[:400])
        assert ref.relative_error(metrics.metric(name, features, labels[:400]), expected) <= 1e-6, name


def test_logme_uses_every_eigenvalue_when_n_below_d():
    features, labels = features_and_labels(3, 2, 50, 10)  # N = 20 < d = 50
    value = hsvfast.metrics.logme(features, labels)
    assert np.isfinite(value)
    # The same data padded with constant-zero dimensions: zero eigenvalues enter log det as log α.
    padded = np.hstack([features, np.zeros((len(features), 5))])
    assert np.isfinite(hsvfast.metrics.logme(padded, labels))


def test_nc1_is_not_imbalance_robust_but_variability_is():
    """The paper's point: class-balanced ν ignores class frequencies, sample-weighted NC1 does not."""
    features, labels = features_and_labels(5, 3, 16, 200)
    keep = np.concatenate([np.flatnonzero(labels == 0)[:20], np.flatnonzero(labels != 0)])
    sub_f, sub_y = features[keep], labels[keep]
    assert abs(hsvfast.variability(sub_f, sub_y) / hsvfast.variability(features, labels) - 1) < 0.1
    assert abs(metrics.nc1(sub_f, sub_y) / metrics.nc1(features, labels) - 1) > 0.1


def test_score_selects_metrics_and_refuses_unknown_or_impossible_ones():
    model, batches = tiny_model("bert"), random_batches()
    report = hsvfast.score(model, batches, metrics=["logme", "variability", "gbc"])
    assert list(report.metrics) == ["logme", "variability", "gbc"]
    only_trace = hsvfast.score(model, batches, metrics=["trace_ratio"])
    assert only_trace.stats.mode == "trace" and list(only_trace.metrics) == ["trace_ratio"]
    one_named = hsvfast.score(model, batches, metrics="trace_ratio")  # a single name as a string, not its letters
    assert one_named.metrics == only_trace.metrics
    with pytest.raises(ValueError, match="unknown metrics \\['accuracy'\\]"):
        hsvfast.score(model, batches, metrics=["accuracy"])
    labels = np.concatenate([b["labels"].numpy() for b in batches])
    counts = {int(c): int((labels == c).sum()) for c in np.unique(labels)}
    with pytest.raises(ValueError, match="'nc1' needs per-class statistics"):
        hsvfast.score(model, batches, metrics=["nc1"], class_counts=counts)
    assert report.best_layer in report.layers
