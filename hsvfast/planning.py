"""From scores to a plan: where the classifier goes, which layers are tuned, frozen, dropped.

Rules for the head layer ℓ* (the paper does not state its own; argmin is the natural reading):

* ``"argmin"`` — the layer with the lowest ν.
* ``"earliest"`` — the shallowest layer whose ν is within ``tolerance`` (relative) of the minimum:
  ν(ℓ) ≤ min ν · (1 + tolerance). About as specialised, and cheaper: more layers are dropped.

Then, as in the paper's Fig. 2: layers above ℓ* are dropped (for training and inference), the
``num_tuned`` layers ending at ℓ* are tuned, and the layers below them are frozen.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from .layers import layer_parts, modules_of_layers
from .report import Report

RULES = ("argmin", "earliest")


@dataclass(frozen=True)
class Plan:
    """What to build: the head at ``head_layer``, ``tuned_layers`` trained, the rest frozen or dropped.

    ``flops_fraction`` is the fraction of the blocks' forward FLOPs kept, (ℓ*+1)/L (embeddings and
    head are negligible next to the blocks). ``trainable_parameters`` counts the tuned blocks'
    parameters when the plan was made with the model at hand (the classifier head comes on top).
    """

    head_layer: int
    tuned_layers: List[int]
    frozen_layers: List[int]
    dropped_layers: List[int]
    num_blocks: int
    rule: str
    tolerance: float
    flops_fraction: float
    trainable_parameters: Optional[int] = None
    model_name: Optional[str] = None
    scores: Dict[str, List[Optional[float]]] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Plan":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"not a hsvfast plan: unknown fields {sorted(unknown)}")
        return cls(**data)

    def save(self, path: "str | Path") -> None:
        """Write the plan as JSON (atomically: an earlier file there stays whole until this one is)."""
        from .storage import write_text_atomically

        write_text_atomically(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: "str | Path") -> "Plan":
        return cls.from_dict(json.loads(Path(path).read_text()))


#: Layers tuned when ``plan`` is not told how many (fewer where the head layer has fewer at and below it).
DEFAULT_NUM_TUNED = 2


def plan(
    report: Report,
    num_tuned: Optional[int] = None,
    rule: str = "argmin",
    tolerance: float = 0.05,
    model: Optional[nn.Module] = None,
) -> Plan:
    """Turn a :class:`Report` into a :class:`Plan` (see the module docstring for the rules).

    Args:
        report: scores with ``"variability"`` (from :func:`hsvfast.score`).
        num_tuned: layers to tune, ending at the head layer. Default: 2, or 1 when the head is layer 0.
            A number given is kept exactly (more than the head layer has at and below it is an error).
        rule: ``"argmin"`` or ``"earliest"``.
        tolerance: for ``"earliest"``, the relative distance from the minimum ν a layer may have.
        model: the model the report scored; when given, ``trainable_parameters`` is counted.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not 0 <= tolerance < math.inf:
        raise ValueError(f"tolerance must be a finite number >= 0 (a relative distance from the minimum ν), "
                         f"got {tolerance!r}")
    tolerance = float(tolerance)  # a NumPy scalar would not go into the plan's JSON
    if num_tuned is not None:
        if isinstance(num_tuned, bool) or not isinstance(num_tuned, numbers.Integral) or num_tuned < 0:
            raise ValueError(f"num_tuned must be a non-negative integer (or None for the default), got {num_tuned!r}")
        num_tuned = int(num_tuned)
    if "variability" not in report.metrics:
        raise ValueError("the report has no 'variability' scores to plan from")
    scored = [(v, layer) for v, layer in zip(report.metrics["variability"], report.layers) if not math.isnan(v)]
    if not scored:
        raise ValueError("no layer has a defined variability")
    best = min(v for v, _ in scored)
    if best == math.inf:
        raise ValueError("ν is inf at every scored layer: no layer separates the classes (their means coincide), "
                         "so there is no layer to put the classifier on. Check the labels and the pooling.")
    if rule == "argmin":
        head = min(scored)[1]
    else:
        head = min(layer for v, layer in scored if v <= best * (1 + tolerance))
    num_blocks = report.num_blocks or max(report.layers) + 1
    if num_tuned is None:
        num_tuned = min(DEFAULT_NUM_TUNED, head + 1)
    if num_tuned > head + 1:
        raise ValueError(
            f"num_tuned={num_tuned} is more than the {head + 1} layers at and below the head layer {head}; "
            f"pass num_tuned <= {head + 1}"
        )
    tuned = list(range(head - num_tuned + 1, head + 1))
    trainable = None
    if model is not None:
        trainable = sum(p.numel() for m in modules_of_layers(layer_parts(model), tuned) for p in m.parameters())
    return Plan(
        head_layer=head,
        tuned_layers=tuned,
        frozen_layers=list(range(0, head - num_tuned + 1)),
        dropped_layers=list(range(head + 1, num_blocks)),
        num_blocks=num_blocks,
        rule=rule,
        tolerance=tolerance,
        flops_fraction=(head + 1) / num_blocks,
        trainable_parameters=trainable,
        model_name=report.model_name,
        scores={"layers": list(report.layers), "variability": [v if math.isfinite(v) else None
                                                               for v in report.metrics["variability"]]},
    )
