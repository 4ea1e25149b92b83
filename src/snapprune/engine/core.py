"""``prune_weight``: one weight matrix in, its pruned version out. No model, no I/O."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..errors import SnapPruneError
from . import methods as _builtin_methods  # noqa: F401  (registers the built-in methods)
from .masks import Pattern, parse_pattern
from .problem import LayerProblem
from .registry import Method, get_method
from .scores import METRICS
from .stats import LayerStats
from .thanos_update import DEFAULT_SOLVE_BYTES


@dataclass
class PruneResult:
    """The pruned weight (input shape and dtype), its mask (True = removed) and its quality."""

    weight: torch.Tensor
    mask: torch.Tensor
    error: float
    """Relative reconstruction error ``‖(Ŵ−W)X‖² / ‖WX‖²`` on the calibration inputs."""
    seconds: float
    """Time spent choosing the mask and updating the weights (error evaluation excluded)."""
    percdamp: float | None = None
    """Damping fraction the factorisation used (raised from the request if it had to be);
    ``None`` for methods that never factor the Hessian."""
    upper: torch.Tensor | None = None
    """The upper Cholesky factor of the damped ``H⁻¹`` the method used (``None`` when it
    needed none): GPTQ after pruning reads the same factor (``quantize_weight(upper=)``)."""

    @property
    def sparsity(self) -> float:
        """Fraction of weights the mask removes. Counted on the mask, not on zeros of the
        returned weight: casting to fp16/bf16 can round tiny kept weights to zero."""
        return self.mask.sum().item() / self.mask.numel()


def reconstruction_error(
    original: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor
) -> float:
    """``‖(Ŵ−W)X‖² / ‖WX‖²`` from ``H ∝ X Xᵀ`` (the scale of ``H`` cancels)."""
    w = original.to(torch.float32)
    h = hessian.to(device=w.device, dtype=torch.float32)
    delta = pruned.to(torch.float32) - w
    num = ((delta @ h) * delta).sum().item()
    den = ((w @ h) * w).sum().item()
    if den <= 0:
        return 0.0 if num <= 0 else math.inf
    return max(num, 0.0) / den


def check_settings(
    method: str,
    pattern: str | Pattern,
    sparsity: float | None,
    alpha: float = 0.0,
    blocksize: int = 128,
    metric: str | None = None,
) -> tuple[Pattern, float]:
    """Validate a pruning request that does not depend on a weight; return the pattern and the
    target sparsity. Called before any work so that bad input fails fast."""
    metric = metric or get_method(method).default_metric
    if metric not in METRICS:
        raise SnapPruneError(f"unknown mask metric {metric!r}; choose one of {', '.join(METRICS)}")
    pat = parse_pattern(pattern)
    if not isinstance(blocksize, int) or blocksize < 1:
        raise SnapPruneError(f"blocksize must be a positive integer, got {blocksize}")
    if not 0.0 <= alpha < 1.0:
        raise SnapPruneError(f"alpha (outlier row fraction) must be in [0, 1), got {alpha}")
    if alpha and pat.kind != "structured":
        raise SnapPruneError("alpha (outlier rows) applies only to the structured pattern")
    if pat.kind == "nm":
        target = pat.n / pat.m
        if sparsity is not None and abs(sparsity - target) > 1e-9:
            raise SnapPruneError(
                f"pattern {pat} fixes sparsity at {target:g}; omit sparsity or pass {target:g}"
            )
        return pat, target
    if sparsity is None:
        raise SnapPruneError(f"the {pat} pattern needs a sparsity in [0, 1)")
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise SnapPruneError(f"sparsity must be in [0, 1), got {sparsity}")
    return pat, float(sparsity)


def _check_weight(
    weight: torch.Tensor,
    stats: LayerStats | None,
    method: Method,
    pattern: Pattern,
    blocksize: int,
    metric: str,
) -> None:
    """Checks that need the weight: shape, dtype, finiteness, widths."""
    if weight.dim() != 2:
        raise SnapPruneError(f"expected a 2-D weight matrix, got shape {tuple(weight.shape)}")
    if not torch.is_floating_point(weight):
        raise SnapPruneError(f"weight must be floating point, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise SnapPruneError(
            "the weight contains NaN or Inf; fix or reload the model before pruning"
        )
    cols = weight.shape[1]
    if stats is None:
        if method.needs_activations(metric):
            raise SnapPruneError(
                f"method {method.name!r} with metric {metric!r} needs calibration statistics"
            )
    elif stats.columns != cols:
        raise SnapPruneError(
            f"statistics are for {stats.columns} input columns but the weight has {cols}; "
            "for GPT-2 style Conv1D layers pass the transposed weight (snapprune.linear_weight)"
        )
    elif not stats.has_hessian and method.needs_hessian(metric):
        raise SnapPruneError(
            f"method {method.name!r} with metric {metric!r} needs the Hessian, but the "
            "statistics were gathered without it (LayerStats(hessian=False))"
        )
    if pattern.kind == "nm":
        if cols % pattern.m:
            raise SnapPruneError(
                f"{pattern} sparsity needs a width divisible by {pattern.m}, but this layer has "
                f"{cols} columns; choose another M or exclude the layer"
            )
        if method.uses_blocksize(pattern) and blocksize % pattern.m and blocksize < cols:
            raise SnapPruneError(
                f"blocksize {blocksize} must be a multiple of M={pattern.m} for {pattern}; "
                f"use e.g. {pattern.m * max(1, blocksize // pattern.m)}"
            )


def prune_weight(
    weight: torch.Tensor,
    stats: LayerStats | None,
    *,
    method: str,
    sparsity: float | None = None,
    pattern: str | Pattern = "unstructured",
    alpha: float = 0.0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    metric: str | None = None,
    max_solve_bytes: int = DEFAULT_SOLVE_BYTES,
    choose_columns=None,
    error: bool = True,
) -> PruneResult:
    """Prune one weight matrix (``rows × cols``, ``y = W x``) given its input statistics.

    ``method``: any registered method (built in: magnitude, wanda, sparsegpt, thanos; see
    ``registry``). ``pattern``: unstructured (``sparsity``
    in [0, 1)), ``"N:M"`` (N of every M consecutive inputs removed in each row) or structured
    (whole input columns; ``alpha`` = fraction of outlier rows kept dense). ``metric`` overrides
    the score that picks the mask (wanda, magnitude, obs). Computes in float32 on the weight's
    device and returns the weight in its own dtype. The input tensor is not modified.
    ``choose_columns`` (structured only): ``scores -> bool[cols]``, the columns to remove,
    chosen by the caller from the method's saliency (whole width units: ``engine.units``).
    ``error=False`` skips the reconstruction error (NaN): it costs two ``rows × cols²`` products,
    on a CPU often more than the pruning itself.
    """
    pat, target = check_settings(method, pattern, sparsity, alpha, blocksize, metric)
    if choose_columns is not None and pat.kind != "structured":
        raise SnapPruneError("choose_columns applies only to the structured pattern")
    declared = get_method(method)
    metric = metric or declared.default_metric
    _check_weight(weight, stats, declared, pat, blocksize, metric)

    start = time.perf_counter()
    original = weight.detach().to(torch.float32)
    problem = LayerProblem(
        weight=original.clone(), stats=stats, pattern=pat, sparsity=target, alpha=alpha,
        blocksize=blocksize, percdamp=percdamp, metric=metric, max_solve_bytes=max_solve_bytes,
        choose_columns=choose_columns)
    if target == 0.0:
        mask = torch.zeros_like(problem.weight, dtype=torch.bool)
    else:
        mask = declared.prune(problem)
    w = problem.weight
    if w.is_cuda:
        torch.cuda.synchronize(w.device)
    seconds = time.perf_counter() - start

    quality = (reconstruction_error(original, w, problem.hessian)
               if stats is not None and stats.has_hessian and error else math.nan)
    used = problem.damping_log[-1] if problem.damping_log else None
    return PruneResult(weight=w.to(weight.dtype), mask=mask, error=quality, seconds=seconds,
                       percdamp=used, upper=problem.__dict__.get("upper"))
