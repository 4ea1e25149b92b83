"""The method registry: one declaration per pruning method, read by the engine, the pipeline,
the command line and the sweep. Adding a method is one new module under ``methods/`` and one
line in ``methods/__init__.py`` (or ``register_method`` from user code)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import SnapPruneError
from .masks import Pattern
from .problem import LayerProblem

PruneFn = Callable[[LayerProblem], torch.Tensor]
"""Zero (and update) ``problem.weight`` in place; return the mask (``True`` = removed)."""

CostFn = Callable[[int, int, Pattern, int], float]
"""``(rows, cols, pattern, blocksize) ->`` relative time to prune one layer."""


@dataclass(frozen=True)
class Method:
    """What a method is, in one place.

    ``updates_weights``: it changes the kept weights (needs the Hessian factor).
    ``blocksize_patterns``: pattern kinds (``unstructured``, ``nm``, ``structured``) whose result
    depends on the block size; elsewhere the sweep folds cells that differ only in it.
    ``cost``: the method's estimate of its time per layer (see ``layer_cost``), when the
    generic one is far off.
    """

    name: str
    summary: str
    default_metric: str
    updates_weights: bool
    prune: PruneFn
    blocksize_patterns: frozenset[str] = frozenset()
    cost: CostFn | None = None

    def needs_activations(self, metric: str) -> bool:
        """Whether calibration data is needed at all (magnitude scores need none)."""
        return self.updates_weights or metric != "magnitude"

    def needs_hessian(self, metric: str) -> bool:
        """Whether the damped Hessian enters the result (so ``percdamp`` matters)."""
        return self.updates_weights or metric == "obs"

    def layer_cost(self, rows: int, cols: int, pattern: Pattern, blocksize: int,
                   metric: str) -> float:
        """Relative time to prune a ``rows × cols`` layer, to share a block's layers out over
        ranks: the method's ``cost``, else ``rows × cols²`` with the Hessian (the trailing
        updates), ``rows × cols`` without (scores and a selection)."""
        if self.cost is not None:
            return self.cost(rows, cols, pattern, blocksize)
        return float(rows * cols * (cols if self.needs_hessian(metric) else 1))

    def uses_blocksize(self, pattern: Pattern) -> bool:
        return pattern.kind in self.blocksize_patterns


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Make ``method`` available to ``prune_weight``, ``prune_model``, the CLI and sweeps."""
    if not method.name or not method.name.replace("_", "").replace("-", "").isalnum():
        raise SnapPruneError(f"method name {method.name!r} must be a plain word")
    if method.name in _REGISTRY and not replace and _REGISTRY[method.name] is not method:
        raise SnapPruneError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SnapPruneError(
            f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}"
        ) from None
