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
from .engine.quantizers import quantize_weight
from .engine.schemes import parse_scheme
from .errors import SnapPruneError
from .jobs import CalibrationSpec, EvaluationSpec, Execution, Job, OutputSpec, read_recipe
from .models.layout import linear_weight, set_linear_weight
from .models.prune import PruneRun, prune_model
from .models.quantize import QuantizeRun, quantize_model
from .models.settings import PruneSettings, QuantizeSettings, RecoverSettings, ShrinkSettings
from .models.shrink import ShrinkRun, shrink_model
from .recovery import RecoverRun, recover
from .run import Outcome, execute


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("snapprune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


__version__ = _version()

__all__ = [
    "METRICS",
    "CalibrationSpec",
    "EvaluationSpec",
    "Execution",
    "Job",
    "LayerProblem",
    "LayerStats",
    "Method",
    "Outcome",
    "OutputSpec",
    "PruneResult",
    "PruneRun",
    "PruneSettings",
    "QuantizeRun",
    "QuantizeSettings",
    "RecoverRun",
    "RecoverSettings",
    "ShrinkRun",
    "ShrinkSettings",
    "SnapPruneError",
    "execute",
    "get_method",
    "linear_weight",
    "method_names",
    "parse_pattern",
    "parse_scheme",
    "prune_model",
    "prune_weight",
    "quantize_model",
    "quantize_weight",
    "read_recipe",
    "reconstruction_error",
    "recover",
    "register_method",
    "set_linear_weight",
    "shrink_model",
]
