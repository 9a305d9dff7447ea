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
from typing import TYPE_CHECKING, Any, Dict, Hashable, List, Optional, Sequence

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


def check_metric_names(names: "str | Sequence[str]") -> List[str]:
    """The metric names asked for, in order, once each; a single name may be given as a string."""
    names = list(dict.fromkeys([names] if isinstance(names, str) else names))
    unknown = [n for n in names if n not in LOWER_IS_BETTER]
    if unknown or not names:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(LOWER_IS_BETTER)}")
    return names


def layer_metrics(moments: "ClassMoments", names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Metrics of one layer from :meth:`Statistics.class_moments` (default: ν and the trace ratio)."""
    return metrics_of_layers([moments], names)[0]


def metrics_of_layers(moments: Sequence["ClassMoments"], names: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    """Metrics of many layers (``Statistics.all_class_moments()``); ν and the trace ratio of all at once.

    ν and the trace ratio need a few numbers on the host (the small SVD runs there); on a
    GPU every read is a synchronisation, so computing layer by layer would cost several
    round trips per layer. Here the traces and M matrices of all layers come back in one
    copy, the SVDs run as one batched call, and all ν come back in a second copy.
    """
    if not moments:
        return []
    names = check_metric_names(names) if names is not None else (
        list(DEFAULT_METRICS) if moments[0].has_covariance else ["trace_ratio"])
    core = [n for n in names if n in ("variability", "trace_ratio")]
    values: List[Dict[str, float]] = [{} for _ in moments]
    groups: Dict[Any, List[int]] = {}  # layers stacked together: same shape, same device
    for i, m in enumerate(moments):
        groups.setdefault((tuple(m.means.shape), m.means.device), []).append(i)
    for indices in groups.values() if core else ():
        for i, result in zip(indices, _core_metrics([moments[i] for i in indices], core)):
            values[i].update(result)
    return [{name: values[i][name] if name in core else _FAMILY[name](m) for name in names}
            for i, m in enumerate(moments)]


def _core_metrics(moments: Sequence["ClassMoments"], names: Sequence[str]) -> List[Dict[str, float]]:
    """ν and/or the trace ratio of layers whose means have one shape and device.

    Trace ratio: tr Σ_w / tr Σ_b, both class-balanced (inf when all class means coincide).
    ν: with M = μᵀQ (d×(C−1)) and its thin SVD M = U S Vᵀ, Σ_b = U diag(s²/C) Uᵀ exactly and
    ν = Σ_k u_kᵀ Σ_w u_k / s_k². Singular values at or below max(d, C)·eps·s_max are round-off
    of a rank-deficient Σ_b (class means on a lower-dimensional affine subspace) and are
    dropped, as a pseudo-inverse with that cut-off would; with none left (all class means
    equal, Σ_b = 0) ν is inf, where the official code's pinv would return 0.
    """
    # Means relative to the first class (the metrics are translation invariant): classes whose
    # means coincide give exact zeros here, so Σ_b = 0 is recognised as such, not as round-off.
    means = torch.stack([m.means for m in moments])  # (L, C, d)
    means = means - means[:, :1]
    layers, num_classes, dim = means.shape
    centred = means - means.mean(1, keepdim=True)
    between_trace = (centred * centred).sum((1, 2)) / num_classes
    within_trace = torch.stack([m.within_trace_tensor for m in moments])
    wanted = [between_trace, within_trace]
    if "variability" in names:
        wanted.append((means.transpose(1, 2) @ helmert_basis(num_classes, means.dtype, means.device)).reshape(-1))
    host = torch.cat(wanted).cpu()  # the one device-to-host copy of the first step
    between, within = host[:layers].tolist(), host[layers : 2 * layers].tolist()
    results = [{} for _ in moments]
    if "trace_ratio" in names:
        for result, b, w in zip(results, between, within):
            result["trace_ratio"] = math.inf if b == 0.0 else w / b
    if "variability" in names:
        products = host[2 * layers :].view(layers, dim, num_classes - 1)  # M of every layer
        u, s, _ = torch.linalg.svd(products, full_matrices=False)  # batched thin SVDs on the host
        # Round-off directions (see the docstring) get weight 0 instead of being cut out: one shape for all layers.
        keep = s > max(dim, num_classes) * torch.finfo(s.dtype).eps * s[:, :1]
        inverse_squares = torch.where(keep, 1.0 / (s * s), 0.0)
        u, inverse_squares = u.to(means.device), inverse_squares.to(means.device)
        nu = torch.stack([(m.within_quadratic(u[i]) * inverse_squares[i]).sum() for i, m in enumerate(moments)])
        for result, value, kept in zip(results, nu.tolist(), keep.any(1).tolist()):
            result["variability"] = value if kept else math.inf
    return results


def _feature_statistics(features: Any, labels: Sequence[Hashable], second_moments: bool):
    from .statistics import Statistics  # local: statistics imports nothing from here

    features = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    stats = Statistics([0], device=features.device, second_moments=second_moments)
    stats.add_features(features, labels)  # checks the shape and the number of labels
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
