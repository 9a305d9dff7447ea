"""Metrics derived from the per-class statistics, and the same maths for a feature matrix.

``variability`` is the paper's ν (Xie et al. 2022, eq. 3), exactly as the official
``compute_nc`` defines it — class-balanced Σ_w, Σ_b around the unweighted mean of
class means, biased covariances, ν = tr(Σ_w Σ_b†)/C — but computed without a d×d
pseudo-inverse: with Q a C×(C−1) orthonormal basis orthogonal to the all-ones
vector and μ the C×d class means, M = μᵀQ satisfies MMᵀ = C·Σ_b, and with the thin
SVD M = U S Vᵀ, ν = Σ_k u_kᵀ Σ_w u_k / s_k². This is exact (Σ_b has rank ≤ C−1
by construction, so no round-off direction is ever inverted) and costs O(d²C).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, Hashable, List, Optional, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from .statistics import ClassMoments

from .transferability import LOWER_IS_BETTER as _FAMILY_DIRECTIONS
from .transferability import METRICS as _FAMILY

#: Direction of each metric: True when lower values mean a better-specialised layer.
LOWER_IS_BETTER = {"variability": True, "trace_ratio": True, **_FAMILY_DIRECTIONS}
#: Metrics ``score`` computes when none are named.
DEFAULT_METRICS = ("variability", "trace_ratio")


def helmert_basis(num_classes: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """C×(C−1) orthonormal columns, each orthogonal to the all-ones vector (Helmert contrasts)."""
    q = torch.zeros(num_classes, num_classes - 1, dtype=dtype)  # built on the host: 2C tiny writes
    for k in range(1, num_classes):
        q[:k, k - 1] = 1.0 / math.sqrt(k * (k + 1))
        q[k, k - 1] = -k / math.sqrt(k * (k + 1))
    return q.to(device)


def between_class_directions(means: torch.Tensor):
    """Thin SVD of M = μᵀQ: orthonormal directions U (d×r) and singular values s (r).

    Σ_b = U diag(s²/C) Uᵀ exactly. Singular values at or below max(d, C)·eps·s_max
    are round-off of a rank-deficient Σ_b (class means on a lower-dimensional affine
    subspace) and are dropped, as a pseudo-inverse with that cut-off would.
    """
    num_classes, dim = means.shape
    m = means.T @ helmert_basis(num_classes, means.dtype, means.device)  # d×(C−1)
    # A thin d×(C−1) SVD is microseconds in LAPACK but a slow, synchronising solver call on a GPU.
    u, s, _ = torch.linalg.svd(m.cpu(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0].to(means.device), s[:0].to(means.device)
    keep = s > max(dim, num_classes) * torch.finfo(s.dtype).eps * s[0]
    return u[:, keep].to(means.device), s[keep].to(means.device)


def variability_from_moments(means: torch.Tensor, within_quadratic: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """ν = (1/C) tr(Σ_w Σ_b†) from class means (C×d) and Σ_w as a quadratic form.

    ``within_quadratic(U)`` returns u_kᵀ Σ_w u_k for the columns of U (d×r); passing
    the form instead of Σ_w keeps the cost at one pass over the second moments.

    Returns ``inf`` when all class means coincide (Σ_b = 0): no between-class
    separation at all. (The official code's pinv would return 0 there.)
    """
    u, s = between_class_directions(means)
    if s.numel() == 0:
        return math.inf
    return float((within_quadratic(u) / (s * s)).sum())


def trace_ratio_from_moments(means: torch.Tensor, within_trace: float) -> float:
    """tr(Σ_w) / tr(Σ_b) with the paper's class-balanced Σ_w and Σ_b."""
    num_classes = means.shape[0]
    centred = means - means.mean(0, keepdim=True)
    between_trace = float((centred * centred).sum()) / num_classes
    return math.inf if between_trace == 0.0 else within_trace / between_trace


def check_metric_names(names: Sequence[str]) -> List[str]:
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in LOWER_IS_BETTER]
    if unknown or not names:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(LOWER_IS_BETTER)}")
    return names


def layer_metrics(moments: "ClassMoments", names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Metrics of one layer from :meth:`Statistics.class_moments` (default: ν and the trace ratio)."""
    names = check_metric_names(names) if names is not None else (
        list(DEFAULT_METRICS) if moments.has_covariance else ["trace_ratio"])
    result = {}
    for name in names:
        if name == "variability":
            result[name] = variability_from_moments(moments.means, moments.within_quadratic)
        elif name == "trace_ratio":
            result[name] = trace_ratio_from_moments(moments.means, moments.within_trace)
        else:
            result[name] = _FAMILY[name](moments)
    return result


def _feature_statistics(features: Any, labels: Sequence[Hashable], second_moments: bool):
    from .statistics import Statistics  # local: statistics imports nothing from here

    features = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    if features.dim() != 2:
        raise ValueError(f"features must be a (num_examples, hidden_size) matrix, got shape {tuple(features.shape)}")
    if len(labels) != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {len(labels)} labels")
    stats = Statistics([0], device=features.device, second_moments=second_moments)
    stats.add_features(features, labels)
    stats.check_complete()
    return stats


def variability(features: Any, labels: Sequence[Hashable]) -> float:
    """The paper's ν for a feature matrix you already hold (NumPy or torch, N×d).

    Same code path as :func:`hsvfast.score`: the rows are folded into the streaming
    statistics (float64) and ν is read out with the exact rank-(C−1) projection.
    Lower is better specialised.
    """
    stats = _feature_statistics(features, labels, second_moments=True)
    return layer_metrics(stats.class_moments(0))["variability"]


def trace_ratio(features: Any, labels: Sequence[Hashable]) -> float:
    """tr(Σ_w)/tr(Σ_b) (class-balanced) for a feature matrix (N×d). Lower is better."""
    stats = _feature_statistics(features, labels, second_moments=False)
    return layer_metrics(stats.class_moments(0))["trace_ratio"]


def metric(name: str, features: Any, labels: Sequence[Hashable]) -> float:
    """Any metric of :data:`LOWER_IS_BETTER` for a feature matrix (N×d), through the streaming code."""
    check_metric_names([name])
    stats = _feature_statistics(features, labels, second_moments=name != "trace_ratio")
    return layer_metrics(stats.class_moments(0), [name])[name]


def nc1(features: Any, labels: Sequence[Hashable]) -> float:
    """Papyan et al.'s NC1 (sample-weighted) for a feature matrix. Lower is better."""
    return metric("nc1", features, labels)


def hscore(features: Any, labels: Sequence[Hashable]) -> float:
    """H-score (Bao et al. 2019; TLlib's ``h_score``) for a feature matrix. Higher is better."""
    return metric("hscore", features, labels)


def logme(features: Any, labels: Sequence[Hashable]) -> float:
    """LogME (You et al. 2021; thuml/LogME conventions) for a feature matrix. Higher is better."""
    return metric("logme", features, labels)


def gbc(features: Any, labels: Sequence[Hashable]) -> float:
    """Gaussian Bhattacharyya coefficient (diagonal) for a feature matrix. Higher is better."""
    return metric("gbc", features, labels)


def probe_loss(features: Any, labels: Sequence[Hashable]) -> float:
    """Closed-form ridge-probe loss onto one-hot labels for a feature matrix. Lower is better."""
    return metric("probe_loss", features, labels)
