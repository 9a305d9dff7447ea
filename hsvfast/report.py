"""The result of scoring: per-layer metrics, frozen, JSON-ready."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, List, Optional

from .metrics import LOWER_IS_BETTER
from .statistics import label_text


@dataclass(frozen=True)
class Report:
    """Per-layer scores of one model on one labelled corpus.

    Attributes:
        layers: scored block indices (layer k = output of transformer block k).
        metrics: metric name → one value per entry of ``layers``. ``"variability"``
            is the paper's ν (lower = the layer separates the classes better relative
            to their spread); ``"trace_ratio"`` is tr(Σ_w)/tr(Σ_b) (lower is better).
        class_counts: examples scored per label.
        pooling: how token states were pooled (see :mod:`hsvfast.pooling`).
        model_name: the model's ``name_or_path`` when it has one.
        num_examples: sequences scored; num_skipped: sequences with no token to pool.
        backend: implementation that pooled the activations (``cpp``, ``cuda``, ``torch``).
        version: the hsvfast version that made the report.
        num_blocks: how many transformer blocks the model has (scored or not).
        task: what was scored (e.g. the data file), for titles and tables.
        hidden_size: the largest hidden size d of the scored layers (see :attr:`sample_note`).
        stats: the underlying :class:`hsvfast.Statistics` (not serialised).
    """

    layers: List[int]
    metrics: Dict[str, List[float]]
    class_counts: Dict[Hashable, int]
    pooling: str
    model_name: Optional[str]
    num_examples: int
    num_skipped: int
    backend: str
    version: str
    num_blocks: Optional[int] = None
    task: Optional[str] = None
    hidden_size: Optional[int] = None
    stats: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Report":
        """Rebuild a report from :meth:`to_dict` output (labels come back as strings; no stats)."""
        def value(v: Optional[float]) -> float:
            return math.inf if v is None else float(v)

        missing = [k for k in ("layers", "metrics", "class_counts", "pooling", "num_examples") if k not in data]
        if missing:
            raise ValueError(f"not a hsvfast report: no {', '.join(map(repr, missing))} (a report is what "
                             "Report.to_dict or `hsvfast score --out` writes)")
        uneven = [name for name, values in data["metrics"].items() if len(values) != len(data["layers"])]
        if uneven:
            raise ValueError(f"not a consistent report: metric {uneven[0]!r} has {len(data['metrics'][uneven[0]])} "
                             f"values for {len(data['layers'])} layers")
        return cls(
            layers=list(data["layers"]),
            metrics={name: [value(v) for v in values] for name, values in data["metrics"].items()},
            class_counts=dict(data["class_counts"]),
            pooling=data["pooling"],
            model_name=data.get("model_name"),
            num_examples=int(data["num_examples"]),
            num_skipped=int(data.get("num_skipped", 0)),
            backend=data.get("backend", "unknown"),
            version=data.get("hsvfast_version", "unknown"),
            num_blocks=data.get("num_blocks"),
            task=data.get("task"),
            hidden_size=data.get("hidden_size"),
        )

    @property
    def best_layer(self) -> int:
        """The layer with the lowest ν (the paper's ℓ*); without ν, the best by the first metric (in its
        direction). Where ν is inf at every layer (class means that coincide) this is the first layer,
        :attr:`has_best_layer` is False, and :func:`hsvfast.plan` refuses the report."""
        name = "variability" if "variability" in self.metrics else next(iter(self.metrics))
        values = self.metrics[name]
        sign = 1.0 if LOWER_IS_BETTER[name] else -1.0
        finite = [(sign * v, layer) for v, layer in zip(values, self.layers) if not math.isnan(v)]
        if not finite:
            raise ValueError(f"no layer has a defined {name}")
        return min(finite)[1]

    @property
    def has_best_layer(self) -> bool:
        """False when ν is inf at every layer (the class means coincide everywhere): no layer separates the
        classes, and tables, plots and the CLI mark none."""
        return not all(v == math.inf for v in self.metrics.get("variability", [0.0]))

    @property
    def marked_layer(self) -> Optional[int]:
        """The layer tables and plots mark as ℓ*: :attr:`best_layer`, or None without one (:attr:`has_best_layer`)."""
        return self.best_layer if self.has_best_layer else None

    @property
    def sample_note(self) -> Optional[str]:
        """A caution when some class has fewer examples than the hidden size d, else None.

        Each class mean then carries estimation noise in all d directions, which ν reads as
        separation between the classes: ν comes out low, more so the smaller the sample, so its
        level is only comparable between layers of runs of one size.
        """
        if "variability" not in self.metrics or not self.hidden_size or not self.class_counts:
            return None
        label, smallest = min(self.class_counts.items(), key=lambda kv: kv[1])
        if smallest >= self.hidden_size:
            return None
        examples = "example" if smallest == 1 else "examples"
        return (f"Class {label_text(label)} has {smallest:,} {examples}, fewer than the hidden size "
                f"d = {self.hidden_size}: "
                "ν is biased low at this sample size (noise in the class means reads as separation). Compare "
                "layers within this run, not ν levels across sample sizes, and score a few thousand examples "
                "per class for decisions.")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (non-finite values become None; label keys become strings)."""
        def clean(v: float) -> Optional[float]:
            return v if math.isfinite(v) else None

        return {
            "hsvfast_version": self.version,
            "model_name": self.model_name,
            "pooling": self.pooling,
            "backend": self.backend,
            "task": self.task,
            "num_blocks": self.num_blocks,
            "hidden_size": self.hidden_size,
            "layers": list(self.layers),
            "best_layer": self.best_layer,
            "metrics": {name: [clean(v) for v in values] for name, values in self.metrics.items()},
            "class_counts": {str(label): int(n) for label, n in self.class_counts.items()},
            "num_examples": self.num_examples,
            "num_skipped": self.num_skipped,
        }

    def to_markdown(self) -> str:
        """A per-layer table; the best layer (lowest ν) is marked with ◀."""
        names = [n for n in ("variability", "trace_ratio") if n in self.metrics]
        names += [n for n in self.metrics if n not in names]
        best = self.marked_layer
        lines = ["| layer | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for i, layer in enumerate(self.layers):
            cells = " | ".join(f"{self.metrics[n][i]:.4g}" for n in names)
            lines.append(f"| {layer}{' ◀' if layer == best else ''} | {cells} |")
        return "\n".join(lines)

    def to_csv(self) -> str:
        """One row per layer: layer, each metric, and whether it is the best layer."""
        names = list(self.metrics)
        best = self.marked_layer
        lines = [",".join(["layer", *names, "best"])]
        for i, layer in enumerate(self.layers):
            lines.append(",".join([str(layer), *(repr(float(self.metrics[n][i])) for n in names), str(layer == best)]))
        return "\n".join(lines) + "\n"

    def plot(self, path: "str | None" = None, ax: Any = None):
        """ν per layer (log scale) with the trace ratio on a second axis and ℓ* marked.

        Writes a PNG to ``path`` when given; returns the matplotlib figure. Needs matplotlib.
        """
        from .plotting import plot_report

        return plot_report(self, path, ax)

