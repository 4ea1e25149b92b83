"""``prune_weight``: one weight matrix in, its pruned version out. No model, no I/O."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .errors import SnapPruneError
from .factor import damped_hessian, inverse_cholesky_upper, trailing_inverse_diagonal
from .masks import (
    Pattern,
    lowest_k_mask,
    nm_mask,
    parse_pattern,
    row_balanced_mask,
    structured_mask,
    target_count,
)
from .scores import METRICS, saliency
from .sparsegpt import sparsegpt_blockwise
from .stats import LayerStats
from .thanos import DEFAULT_SOLVE_BYTES, thanos_blockwise, thanos_shared_columns

METHODS = ("magnitude", "wanda", "sparsegpt", "thanos")
DEFAULT_METRIC = {"magnitude": "magnitude", "wanda": "wanda", "sparsegpt": "obs", "thanos": "wanda"}
UPDATING_METHODS = ("sparsegpt", "thanos")


@dataclass
class PruneResult:
    """The pruned weight (input shape and dtype), its mask (True = removed) and its quality."""

    weight: torch.Tensor
    mask: torch.Tensor
    error: float
    """Relative reconstruction error ``‖(Ŵ−W)X‖² / ‖WX‖²`` on the calibration inputs."""
    seconds: float
    """Time spent choosing the mask and updating the weights (error evaluation excluded)."""

    @property
    def sparsity(self) -> float:
        """Fraction of exactly-zero entries in the returned weight."""
        return (self.weight == 0).sum().item() / self.weight.numel()


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
    if method not in METHODS:
        raise SnapPruneError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    metric = metric or DEFAULT_METRIC[method]
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
    method: str,
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
        if method != "magnitude" or metric != "magnitude":
            raise SnapPruneError(
                f"method {method!r} with metric {metric!r} needs calibration statistics"
            )
    elif stats.columns != cols:
        raise SnapPruneError(
            f"statistics are for {stats.columns} input columns but the weight has {cols}; "
            "for GPT-2 style Conv1D layers pass the transposed weight (snapprune.linear_weight)"
        )
    if pattern.kind == "nm":
        if cols % pattern.m:
            raise SnapPruneError(
                f"{pattern} sparsity needs a width divisible by {pattern.m}, but this layer has "
                f"{cols} columns; choose another M or exclude the layer"
            )
        if method in UPDATING_METHODS and blocksize % pattern.m and blocksize < cols:
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
) -> PruneResult:
    """Prune one weight matrix (``rows × cols``, ``y = W x``) given its input statistics.

    ``method``: magnitude, wanda, sparsegpt or thanos. ``pattern``: unstructured (``sparsity``
    in [0, 1)), ``"N:M"`` (N of every M consecutive inputs removed in each row) or structured
    (whole input columns; ``alpha`` = fraction of outlier rows kept dense). ``metric`` overrides
    the score that picks the mask (wanda, magnitude, obs). Computes in float32 on the weight's
    device and returns the weight in its own dtype. The input tensor is not modified.
    """
    pat, target = check_settings(method, pattern, sparsity, alpha, blocksize, metric)
    metric = metric or DEFAULT_METRIC[method]
    _check_weight(weight, stats, method, pat, blocksize, metric)

    start = time.perf_counter()
    original = weight.detach().to(torch.float32)
    w = original.clone()
    hessian = stats.hessian.to(w.device) if stats is not None else None
    if target == 0.0:
        mask = torch.zeros_like(w, dtype=torch.bool)
    elif method in UPDATING_METHODS:
        mask = _prune_with_updates(w, stats, hessian, method, pat, target, alpha, blocksize,
                                   percdamp, metric, max_solve_bytes)
    else:
        mask = _prune_without_updates(w, stats, hessian, pat, target, alpha, metric, method,
                                      percdamp)
    if w.is_cuda:
        torch.cuda.synchronize(w.device)
    seconds = time.perf_counter() - start

    error = reconstruction_error(original, w, hessian) if hessian is not None else math.nan
    return PruneResult(weight=w.to(weight.dtype), mask=mask, error=error, seconds=seconds)


def _column_norms(stats: LayerStats | None, device: torch.device) -> torch.Tensor | None:
    return stats.sq_norms.to(device=device, dtype=torch.float32) if stats is not None else None


def _prune_without_updates(
    w: torch.Tensor,
    stats: LayerStats | None,
    hessian: torch.Tensor | None,
    pat: Pattern,
    target: float,
    alpha: float,
    metric: str,
    method: str,
    percdamp: float,
) -> torch.Tensor:
    """Magnitude and Wanda: pick the mask once, zero it, never update the rest."""
    hinv_diag = dead = None
    if metric == "obs":
        damped, dead = damped_hessian(hessian, percdamp)
        hinv_diag = trailing_inverse_diagonal(inverse_cholesky_upper(damped), 0)
    scores = saliency(w, metric, sq_norms=_column_norms(stats, w.device), hinv_diag=hinv_diag,
                      dead=dead)
    if pat.kind == "nm":
        mask = nm_mask(scores, pat.n, pat.m)
    elif pat.kind == "structured":
        mask = structured_mask(scores, target, alpha).full()
    elif method == "wanda":
        mask = row_balanced_mask(scores, target_count(target, w.numel()))
    else:
        mask = lowest_k_mask(scores, target_count(target, w.numel()))
    w[mask] = 0.0
    return mask


def _prune_with_updates(
    w: torch.Tensor,
    stats: LayerStats,
    hessian: torch.Tensor,
    method: str,
    pat: Pattern,
    target: float,
    alpha: float,
    blocksize: int,
    percdamp: float,
    metric: str,
    max_solve_bytes: int,
) -> torch.Tensor:
    """SparseGPT and Thanos share the damped Hessian and its one Cholesky factor."""
    rows, _cols = w.shape
    damped, dead = damped_hessian(hessian, percdamp)
    upper = inverse_cholesky_upper(damped)
    sq_norms = _column_norms(stats, w.device)

    if pat.kind == "structured":
        # The mask is fixed up front on the original weights (DESIGN.md §2).
        scores = saliency(w, metric, sq_norms=sq_norms,
                          hinv_diag=trailing_inverse_diagonal(upper, 0), dead=dead)
        smask = structured_mask(scores, target, alpha)
        if method == "thanos":
            thanos_shared_columns(w, upper, smask.columns, ~smask.outlier_rows)
            return smask.full()
        full = smask.full()
        return sparsegpt_blockwise(
            w, upper, blocksize, select_block=lambda _w1, _d, i1, i2: full[:, i1:i2].clone()
        )

    if method == "thanos":
        if pat.kind == "nm":
            def block_mask(weight: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
                hd = trailing_inverse_diagonal(upper, i1)[: i2 - i1] if metric == "obs" else None
                scores = saliency(weight[:, i1:i2], metric, sq_norms=sq_norms[i1:i2],
                                  hinv_diag=hd, dead=dead[i1:i2])
                return nm_mask(scores, pat.n, pat.m)
        else:
            total = target_count(target, w.numel())
            removed = [0]

            def block_mask(weight: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
                # Global residual mask: the lowest of all still-free weights, block's share.
                hd = trailing_inverse_diagonal(upper, i1) if metric == "obs" else None
                free = saliency(weight[:, i1:], metric, sq_norms=sq_norms[i1:], hinv_diag=hd,
                                dead=dead[i1:])
                block = lowest_k_mask(free, total - removed[0])[:, : i2 - i1]
                removed[0] += int(block.sum().item())
                return block

        return thanos_blockwise(w, upper, block_mask, blocksize, max_solve_bytes=max_solve_bytes)

    # SparseGPT: OBS score W²/[U_jj]² by default, mask picked adaptively per block.
    def block_scores(w1: torch.Tensor, d: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
        return saliency(w1, metric, sq_norms=sq_norms[i1:i2], hinv_diag=d, dead=dead[i1:i2])

    if pat.kind == "nm":
        return sparsegpt_blockwise(
            w, upper, blocksize, m=pat.m,
            nm_select=lambda wg, d, j: nm_mask(block_scores(wg, d, j, j + pat.m), pat.n, pat.m),
        )

    def select_block(w1: torch.Tensor, d: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
        # Each block removes its share of floor(p·rows·cols), so the layer total is exact.
        k = target_count(target, rows * i2) - target_count(target, rows * i1)
        return lowest_k_mask(block_scores(w1, d, i1, i2), k)

    return sparsegpt_blockwise(w, upper, blocksize, select_block=select_block)
