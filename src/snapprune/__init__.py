"""snapprune: post-training pruning of large language models (Thanos and its baselines)."""

from .engine import (
    METRICS,
    LayerProblem,
    LayerStats,
    Method,
    PruneResult,
    get_method,
    method_names,
    parse_pattern,
    prune_weight,
    reconstruction_error,
    register_method,
)
from .errors import SnapPruneError
from .models.layout import linear_weight, set_linear_weight
from .models.pipeline import PruneRun, PruneSettings, prune_model
from .models.width import ShrinkRun, WidthSettings, shrink_model

__version__ = "0.1.0"

__all__ = [
    "METRICS",
    "LayerProblem",
    "LayerStats",
    "Method",
    "PruneResult",
    "PruneRun",
    "PruneSettings",
    "ShrinkRun",
    "SnapPruneError",
    "WidthSettings",
    "get_method",
    "linear_weight",
    "method_names",
    "parse_pattern",
    "prune_model",
    "prune_weight",
    "reconstruction_error",
    "register_method",
    "set_linear_weight",
    "shrink_model",
]
