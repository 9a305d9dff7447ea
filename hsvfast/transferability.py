"""The family of transferability metrics, all from the statistics of one streaming pass.

Each needs the per-class statistics of :class:`hsvfast.Statistics` (``mode="per_class"``, the
default without ``class_counts``); formulas in the README ("Which metric?") and ``statistics.md``.

| name | direction | definition |
|---|---|---|
| ``nc1`` | lower | Papyan et al.: (1/C) tr(Σ_W Σ_B†), Σ_W = W/N (sample-weighted), Σ_B around the global mean |
| ``hscore`` | higher | Bao et al.: tr(T† B) = tr(cov(f)† cov(E[f|y])) (TLlib's ``h_score``) |
| ``logme`` | higher | You et al.: LogME evidence on uncentred features, no bias, averaged over one-hot classes |
| ``gbc`` | higher | Pándy et al.: −Σ_{c≠c'} exp(−D_B(c, c')), diagonal per-class Gaussians |
| ``probe_loss`` | lower | mean squared error of a closed-form ridge regression onto one-hot labels |
"""
from __future__ import annotations

import math

import torch

#: True when lower is better.
LOWER_IS_BETTER = {"nc1": True, "hscore": False, "logme": False, "gbc": False, "probe_loss": True}

#: Relative floor of the diagonal GBC variances (a constant feature would give log 0).
GBC_VARIANCE_FLOOR = 1e-12
#: Ridge of ``probe_loss``, relative to the mean eigenvalue of the Gram matrix.
PROBE_RIDGE = 1e-3


def _require_per_class(moments, name: str) -> None:
    if moments.mode != "per_class":
        raise ValueError(
            f"metric {name!r} needs per-class statistics, but these were accumulated in mode "
            f"{moments.mode!r}; leave class_counts out (and metrics selected) when scoring"
        )


def _absolute_means(moments) -> torch.Tensor:
    return moments.means + moments.origin


def within_scatter(moments) -> torch.Tensor:
    """W = Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ (pooled, sample-weighted)."""
    n = moments.counts
    return moments.second.sum(0) - (moments.centred * n.unsqueeze(1)).T @ moments.centred


def _global_mean(moments) -> torch.Tensor:
    n = moments.counts
    return (moments.means * n.unsqueeze(1)).sum(0) / n.sum()


def _pinv_trace(numerator: torch.Tensor, directions: torch.Tensor) -> float:
    """tr(X Y†) with Y = D Dᵀ given by its factor D (d×k): exact rank, thin SVD."""
    u, s, _ = torch.linalg.svd(directions, full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return math.inf
    keep = s > max(directions.shape) * torch.finfo(s.dtype).eps * s[0]
    u, s = u[:, keep], s[keep]
    return float((((numerator @ u) * u).sum(0) / (s * s)).sum())


def nc1(moments) -> float:
    _require_per_class(moments, "nc1")
    c, total = moments.counts.shape[0], float(moments.counts.sum())
    spread = (moments.means - _global_mean(moments)).T / math.sqrt(c)  # Σ_B = spread spreadᵀ
    return _pinv_trace(within_scatter(moments) / total, spread) / c


def hscore(moments) -> float:
    _require_per_class(moments, "hscore")
    n = moments.counts
    deviations = moments.means - _global_mean(moments)
    between = (deviations * n.unsqueeze(1)).T @ deviations
    total = within_scatter(moments) + between
    values, vectors = torch.linalg.eigh(total)
    keep = values > max(total.shape) * torch.finfo(values.dtype).eps * values[-1]
    projected = (vectors[:, keep].T @ deviations.T) ** 2  # (k, C)
    return float((projected / values[keep].unsqueeze(1) * n.unsqueeze(0)).sum())


def _raw_gram(moments) -> torch.Tensor:
    means = _absolute_means(moments)
    return within_scatter(moments) + (means * moments.counts.unsqueeze(1)).T @ means


def logme(moments, iterations: int = 11, tolerance: float = 0.01, epsilon: float = 1e-5) -> float:
    """LogME with thuml/LogME's fixed point (start α = β = 1, ≤ 11 steps, stop when λ moves < 1 %)."""
    _require_per_class(moments, "logme")
    n_total, dim = float(moments.counts.sum()), moments.means.shape[1]
    sigma, vectors = torch.linalg.eigh(_raw_gram(moments))
    sigma = sigma.clamp(min=0.0)  # all d eigenvalues, zeros included (N < d)
    targets = (_absolute_means(moments) * moments.counts.unsqueeze(1)) @ vectors  # (C, d): Vᵀ Fᵀ y_c
    evidences = []
    for c in range(moments.counts.shape[0]):
        p2, yy = targets[c] ** 2, float(moments.counts[c])
        alpha, beta = 1.0, 1.0
        lam = alpha / beta
        for _ in range(iterations):
            gamma = float((sigma / (sigma + lam)).sum())
            m2 = float((p2 / (sigma + lam) ** 2).sum())                        # |m|²
            residual = yy - 2 * float((p2 / (sigma + lam)).sum()) + float((sigma * p2 / (sigma + lam) ** 2).sum())
            alpha = gamma / (m2 + epsilon)
            beta = (n_total - gamma) / (residual + epsilon)
            new_lam = alpha / beta
            if abs(new_lam - lam) / lam < tolerance:
                break
            lam = new_lam
        evidence = (dim / 2 * math.log(alpha) + n_total / 2 * math.log(beta)
                    - 0.5 * float(torch.log(alpha + beta * sigma).sum()) - beta / 2 * (residual + epsilon)
                    - alpha / 2 * (m2 + epsilon) - n_total / 2 * math.log(2 * math.pi))
        evidences.append(evidence / n_total)
    return sum(evidences) / len(evidences)


def gbc(moments) -> float:
    _require_per_class(moments, "gbc")
    n = moments.counts.unsqueeze(1)
    diagonal = torch.diagonal(moments.second, dim1=1, dim2=2)  # Σ x² per class and dimension
    variances = diagonal / n - moments.centred ** 2
    variances = variances.clamp(min=GBC_VARIANCE_FLOOR * float(variances.max().clamp(min=1e-300)))
    means, total, c = moments.means, 0.0, moments.counts.shape[0]
    for a in range(c):
        for b in range(c):
            if a == b:
                continue
            pooled = (variances[a] + variances[b]) / 2
            distance = (0.125 * ((means[a] - means[b]) ** 2 / pooled).sum()
                        + 0.5 * (torch.log(pooled) - 0.5 * (torch.log(variances[a]) + torch.log(variances[b]))).sum())
            total -= math.exp(-float(distance))
    return total


def probe_loss(moments, ridge: float = PROBE_RIDGE) -> float:
    _require_per_class(moments, "probe_loss")
    gram = _raw_gram(moments)
    dim, n_total = gram.shape[0], float(moments.counts.sum())
    regulariser = ridge * float(torch.trace(gram)) / dim
    sums = (_absolute_means(moments) * moments.counts.unsqueeze(1)).T  # (d, C) = Fᵀ Y
    weights = torch.linalg.solve(gram + regulariser * torch.eye(dim, dtype=gram.dtype, device=gram.device), sums)
    loss = n_total - 2 * float((weights * sums).sum()) + float((weights * (gram @ weights)).sum())
    return loss / n_total


METRICS = {"nc1": nc1, "hscore": hscore, "logme": logme, "gbc": gbc, "probe_loss": probe_loss}

