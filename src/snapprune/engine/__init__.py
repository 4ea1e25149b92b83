"""The pure maths: statistics, the Hessian factor, scores, masks, solvers and the method
registry. Tensors in, tensors out; nothing here knows about models, files or devices' owners."""

from . import determinism
from .core import PruneResult, check_settings, prune_weight, reconstruction_error
from .masks import Pattern, parse_pattern
from .problem import LayerProblem
from .registry import Method, get_method, method_names, register_method, unregister_method
from .scores import METRICS
from .stats import LayerStats

__all__ = [
    "METRICS",
    "LayerProblem",
    "LayerStats",
    "Method",
    "Pattern",
    "PruneResult",
    "check_settings",
    "determinism",
    "get_method",
    "method_names",
    "parse_pattern",
    "prune_weight",
    "reconstruction_error",
    "register_method",
    "unregister_method",
]
