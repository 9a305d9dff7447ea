"""Plots of reports: one report (ν and trace ratio per layer) and suites (a grid of reports)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from .optional import require

_NU_COLOUR, _TRACE_COLOUR = "#1f5aa6", "#c0582b"


def _pyplot():
    matplotlib = require("matplotlib", "plotting", "plot")
    matplotlib.use("Agg", force=False)
    return require("matplotlib.pyplot", "plotting", "plot")


def _title(report) -> str:
    model = (report.model_name or "model").rstrip("/").split("/")[-1]
    task = f" — {report.task}" if report.task else ""
    return f"{model}{task} (N = {report.num_examples:,}, {len(report.class_counts)} classes)"


def plot_report(report, path: Optional[str] = None, ax: Any = None, title: Optional[str] = None):
    plt = _pyplot()
    own_figure = ax is None
    if own_figure:
        figure, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    else:
        figure = ax.figure
    layers = report.layers
    best = report.marked_layer
    if "variability" in report.metrics:
        nu = report.metrics["variability"]
        ax.plot(layers, nu, "o-", color=_NU_COLOUR, label="ν (variability, left)")
        ax.set_yscale("log")
        from matplotlib.ticker import FormatStrFormatter

        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel("ν  (lower = better specialised)", color=_NU_COLOUR)
        if best is not None:
            ax.plot([best], [nu[layers.index(best)]], marker="*", markersize=18, color=_NU_COLOUR, zorder=5)
        # A layer whose class means coincide has ν = inf, which a line cannot show: mark it on the top edge.
        top = ax.get_xaxis_transform()  # x in data, y in axes fraction
        for layer, value in zip(layers, nu):
            if value == float("inf"):
                ax.plot([layer], [0.97], marker="^", markersize=8, color=_NU_COLOUR, transform=top, clip_on=False)
                ax.annotate("inf", xy=(layer, 0.97), xycoords=top, xytext=(0, -14), textcoords="offset points",
                            ha="center", fontsize=7, color=_NU_COLOUR)
    if best is not None:
        ax.axvline(best, color="0.6", linestyle="--", linewidth=1)
        ax.annotate(f"ℓ* = {best}", xy=(best, 1.0), xycoords=("data", "axes fraction"), xytext=(-4, -14),
                    textcoords="offset points", color="0.3", ha="right")
    ax.set_xlabel("layer (output of transformer block k)")
    ax.set_xticks(layers)
    ax.set_xlim(min(layers) - 0.3, max(layers) + 0.3)  # every scored layer, finite or not
    lines, labels = ax.get_legend_handles_labels()
    if "trace_ratio" in report.metrics:
        twin = ax.twinx()
        twin.plot(layers, report.metrics["trace_ratio"], "s--", color=_TRACE_COLOUR, alpha=0.8,
                  label="tr Σw / tr Σb (right)")
        twin.set_ylabel("trace ratio", color=_TRACE_COLOUR)
        more_lines, more_labels = twin.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    ax.legend(lines, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    ax.set_title(title or _title(report), fontsize=10, pad=22)
    ax.grid(alpha=0.3)
    if own_figure:
        figure.tight_layout()
        if path:
            figure.savefig(path)
            plt.close(figure)
    return figure


def plot_grid(reports: Dict[tuple, Any], tasks: Sequence[str], models: Sequence[str], path: str):
    """A grid of ν curves: one row per task, one column per model."""
    plt = _pyplot()
    figure, axes = plt.subplots(len(tasks), len(models), figsize=(4.6 * len(models), 3.2 * len(tasks)),
                                dpi=110, squeeze=False)
    for r, task in enumerate(tasks):
        for c, model in enumerate(models):
            ax = axes[r][c]
            report = reports.get((model, task))
            if report is None:
                ax.set_axis_off()
                ax.text(0.5, 0.5, "not scored", ha="center", va="center")
                continue
            plot_report(report, ax=ax, title=f"{task} · {model.rstrip('/').split('/')[-1]}")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
