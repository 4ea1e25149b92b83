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
from .engine.quantizers import Quantizer, get_quantizer, quantize_weight, register_quantizer
from .engine.schemes import parse_scheme
from .errors import SnapPruneError
from .jobs import CalibrationSpec, EvaluationSpec, Execution, Job, OutputSpec
from .models.layout import linear_weight, set_linear_weight
from .models.prune import PruneRun, prune_model
from .models.quantize import QuantizeRun, quantize_model
from .models.settings import PruneSettings, QuantizeSettings, RecoverSettings, ShrinkSettings
from .models.shrink import ShrinkRun, shrink_model
from .recipes import read_recipe
from .recovery import RecoverRun, recover
from .run import Outcome, execute
from .version import __version__

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
    "Quantizer",
    "RecoverRun",
    "RecoverSettings",
    "ShrinkRun",
    "ShrinkSettings",
    "SnapPruneError",
    "__version__",
    "execute",
    "get_method",
    "get_quantizer",
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
    "register_quantizer",
    "set_linear_weight",
    "shrink_model",
]
