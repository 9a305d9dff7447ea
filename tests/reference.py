"""Independent float64 references, written in plain NumPy on materialised features.

Nothing here imports hsvfast: these are the oracles the library is held to.
"""
from __future__ import annotations

import numpy as np


def class_moments(features: np.ndarray, labels: np.ndarray):
    """Class means (C×d), paper's Σ_w (mean of biased per-class covariances) and Σ_b."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(0) for c in classes])
    within = np.mean([np.cov(features[labels == c].T, bias=True).reshape(features.shape[1], -1)
                      for c in classes], axis=0)
    centred = means - means.mean(0)
    between = centred.T @ centred / len(classes)
    return means, within, between


def official_variability(features: np.ndarray, labels: np.ndarray, rcond: float | None = None) -> float:
    """ν as the official compute_nc defines it: tr(Σ_w pinv(Σ_b)) / C (here in float64)."""
    _, within, between = class_moments(features, labels)
    num_classes = len(np.unique(labels))
    if rcond is None:
        rcond = max(between.shape) * np.finfo(np.float64).eps
    return float(np.trace(within @ np.linalg.pinv(between, rcond=rcond, hermitian=True)) / num_classes)


def rank_aware_variability(features: np.ndarray, labels: np.ndarray) -> float:
    """ν with Σ_b's pseudo-inverse restricted to its top C−1 eigenpairs (its true rank).

    Robust where a tolerance-based pinv inverts round-off (adversarial means).
    """
    _, within, between = class_moments(features, labels)
    num_classes = len(np.unique(labels))
    values, vectors = np.linalg.eigh(between)
    top = np.argsort(values)[::-1][: num_classes - 1]
    pinv = (vectors[:, top] / values[top]) @ vectors[:, top].T
    return float(np.trace(within @ pinv) / num_classes)


def binary_variability(features: np.ndarray, labels: np.ndarray) -> float:
    """Closed form for two classes: ν = 2 δᵀ Σ_w δ / ‖δ‖⁴ with δ = μ₁ − μ₂."""
    means, within, _ = class_moments(features, labels)
    delta = means[0] - means[1]
    return float(2 * delta @ within @ delta / (delta @ delta) ** 2)


def trace_ratio(features: np.ndarray, labels: np.ndarray) -> float:
    _, within, between = class_moments(features, labels)
    return float(np.trace(within) / np.trace(between))


def pool(hidden: np.ndarray, input_ids: np.ndarray, attention: np.ndarray, special: np.ndarray | None,
         pooling: str) -> np.ndarray:
    """Pool (N, T, d) token states sequence by sequence with explicit loops."""
    hidden = np.asarray(hidden, dtype=np.float64)
    pooled = []
    for n in range(hidden.shape[0]):
        attended = np.flatnonzero(attention[n])
        if pooling == "mean":
            keep = [t for t in attended if not special[n, t]]
        elif pooling == "mean_all":
            keep = list(attended)
        elif pooling == "first":
            keep = [attended[0]]
        elif pooling == "last":
            keep = [attended[-1]]
        else:
            raise ValueError(pooling)
        pooled.append(hidden[n, keep].mean(0))
    return np.stack(pooled)


def relative_error(actual: float, expected: float) -> float:
    return abs(actual - expected) / abs(expected)
