"""snapprune: post-training pruning of large language models (Thanos and its baselines)."""

from .engine import METHODS, PruneResult, prune_weight, reconstruction_error
from .errors import SnapPruneError
from .layout import linear_weight, set_linear_weight
from .masks import parse_pattern
from .pipeline import PruneRun, PruneSettings, prune_model
from .scores import METRICS
from .stats import LayerStats

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "METRICS",
    "LayerStats",
    "PruneResult",
    "PruneRun",
    "PruneSettings",
    "SnapPruneError",
    "linear_weight",
    "parse_pattern",
    "prune_model",
    "prune_weight",
    "reconstruction_error",
    "set_linear_weight",
]
