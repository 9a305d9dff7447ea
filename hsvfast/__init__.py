"""hsvfast: hidden-state variability of every layer of a language model, in one pass.

Xie et al. (Findings of EMNLP 2022, arXiv:2210.10041): the layer whose pooled hidden
states have the smallest within-class spread relative to between-class spread
(ν = tr(Σ_w Σ_b†)/C) is already specialised for the task; put the classifier there.
"""
__version__ = "0.1.0"

from ._kernels import backend, compiled_with_cuda
from .layers import find_blocks
from .metrics import trace_ratio, variability
from .pooling import POOLINGS
from .report import Report
from .scoring import report_from, score
from .storage import load_statistics, merge
from .statistics import Statistics
from .planning import Plan, plan
from .surgery import add_adapters, freeze, truncate
from .classifier import Classifier
from .training import apply, evaluate, train

__all__ = [
    "__version__", "score", "variability", "trace_ratio", "backend", "compiled_with_cuda",
    "Report", "Statistics", "find_blocks", "POOLINGS",
    "report_from", "load_statistics", "merge",
    "Plan", "plan", "truncate", "freeze", "add_adapters", "Classifier", "train", "evaluate", "apply",
]
