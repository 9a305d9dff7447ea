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


# --------------------------------------------- the transferability family, as their papers/code define them


def nc1(features, labels) -> float:
    """Papyan et al.: Σ_W sample-weighted over all examples, Σ_B around the global mean."""
    features, labels = np.asarray(features, np.float64), np.asarray(labels)
    classes = np.unique(labels)
    global_mean = features.mean(0)
    means = np.stack([features[labels == c].mean(0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    within = centred.T @ centred / len(features)
    deviations = means - global_mean
    between = deviations.T @ deviations / len(classes)
    values, vectors = np.linalg.eigh(between)
    top = np.argsort(values)[::-1][: len(classes) - 1]
    return float(np.trace(within @ (vectors[:, top] / values[top]) @ vectors[:, top].T) / len(classes))


def hscore(features, labels) -> float:
    """TLlib's h_score: np.cov of the features and of the class-mean-replaced features, pinv."""
    f, y = np.asarray(features, np.float64), np.asarray(labels)
    covf = np.cov(f, rowvar=False)
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(0)
    covg = np.cov(g, rowvar=False)
    return float(np.trace(np.linalg.pinv(covf, rcond=1e-15) @ covg))


def logme(features, labels) -> float:
    """LogME as thuml/LogME computes it for N > D: SVD of FᵀF, fixed point on explicit residuals."""
    f, y = np.asarray(features, np.float64), np.asarray(labels)
    n, d = f.shape
    v, s, vh = np.linalg.svd(f.T @ f, full_matrices=True)
    evidences = []
    for c in np.unique(y):
        target = (y == c).astype(np.float64)
        alpha, beta, epsilon = 1.0, 1.0, 1e-5
        lam = alpha / beta
        tmp = vh @ (f.T @ target)
        for _ in range(11):
            gamma = (beta * s / (alpha + beta * s)).sum()
            m = v @ (tmp * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            alpha = gamma / (alpha_de + epsilon)
            beta_de = ((target - f @ m) ** 2).sum()
            beta = (n - gamma) / (beta_de + epsilon)
            new_lam = alpha / beta
            if abs(new_lam - lam) / lam < 0.01:
                break
            lam = new_lam
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * s))
                    - beta / 2 * (beta_de + epsilon) - alpha / 2 * (alpha_de + epsilon) - n / 2 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def gbc(features, labels, floor=1e-12) -> float:
    f, y = np.asarray(features, np.float64), np.asarray(labels)
    classes = np.unique(y)
    means = [f[y == c].mean(0) for c in classes]
    variances = [f[y == c].var(0) for c in classes]
    top = max(v.max() for v in variances)
    variances = [np.maximum(v, floor * top) for v in variances]
    total = 0.0
    for a in range(len(classes)):
        for b in range(len(classes)):
            if a != b:
                pooled = (variances[a] + variances[b]) / 2
                distance = (np.sum((means[a] - means[b]) ** 2 / pooled) / 8
                            + 0.5 * np.sum(np.log(pooled / np.sqrt(variances[a] * variances[b]))))
                total -= np.exp(-distance)
    return float(total)


def probe_loss(features, labels, ridge=1e-3) -> float:
    f, y = np.asarray(features, np.float64), np.asarray(labels)
    targets = (y[:, None] == np.unique(y)[None, :]).astype(np.float64)
    gram = f.T @ f
    weights = np.linalg.solve(gram + ridge * np.trace(gram) / f.shape[1] * np.eye(f.shape[1]), f.T @ targets)
    return float(((targets - f @ weights) ** 2).sum() / len(f))
