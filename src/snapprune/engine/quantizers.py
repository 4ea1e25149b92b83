"""``quantize_weight``: one weight matrix in, its quantised version out (GPTQ or
round-to-nearest), on the same Hessian as pruning and, after pruning, on the same factor."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..errors import SnapPruneError
from .core import reconstruction_error
from .factor import damped_hessian, inverse_cholesky_upper
from .gptq import gptq_blockwise, round_to_nearest
from .schemes import GroupParams, Scheme, parse_scheme
from .stats import LayerStats

QUANT_METHODS = ("gptq", "rtn")


@dataclass
class QuantResult:
    """The quantised weight (the grid's values, input dtype), its integer codes and each
    natural group's grid, and its quality."""

    weight: torch.Tensor
    codes: torch.Tensor
    """Integer codes (int16, rows × cols), natural column order."""
    scales: torch.Tensor
    """Group scales (float32 holding the stored dtype's values), rows × groups."""
    zeros: torch.Tensor | None
    """Integer zero points (minmax asymmetric) or float16 minima (``q4_1``), rows × groups."""
    scheme: Scheme
    error: float
    """Relative reconstruction error ``‖(Ŵ−W)X‖² / ‖WX‖²`` of the quantised against the given
    weight (NaN without statistics or when not measured)."""
    seconds: float
    percdamp: float | None = None


def _stack(params: list[GroupParams]) -> tuple[torch.Tensor, torch.Tensor | None]:
    scales = torch.stack([p.scale for p in params], 1)
    zeros = None if params[0].zero is None else torch.stack([p.zero for p in params], 1)
    return scales, zeros


def quantize_weight(
    weight: torch.Tensor,
    stats: LayerStats | None,
    scheme: str | Scheme,
    *,
    method: str = "gptq",
    mask: torch.Tensor | None = None,
    act_order: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    upper: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
    keep_columns: torch.Tensor | None = None,
    error: bool = True,
) -> QuantResult:
    """Quantise one weight matrix (``rows × cols``, ``y = W x``) on ``scheme``'s grid.

    ``gptq`` needs the layer's statistics (its Hessian); ``upper`` passes the factor the
    pruning step already computed for the same statistics and damping (natural order only).
    ``mask`` (``True`` = pruned): those weights stay exactly 0 and N:M patterns stay N:M;
    schemes whose grid has no exact zero (``q4_1``) refuse it. ``act_order``: columns in
    decreasing Hessian diagonal, group grids fitted up front and kept in natural order.
    Columns never active in calibration (``H_jj = 0``) are set to 0 first, as GPTQ does.
    ``scale_dtype``: how the format stores the minmax scales (llama.cpp's grids are always
    float16). ``keep_columns``: the input columns that remain once removed ones are cut out
    (``shrink``): the others must be 0 and stay 0; groups, codes and the GPTQ factor are those
    of the cut-out layer (its Hessian restricted to the kept columns). The input is not
    modified.
    """
    if keep_columns is not None:
        return _on_kept_columns(weight, stats, scheme, keep_columns, method=method, mask=mask,
                                act_order=act_order, blocksize=blocksize, percdamp=percdamp,
                                scale_dtype=scale_dtype, error=error)
    scheme = parse_scheme(scheme)
    if method not in QUANT_METHODS:
        raise SnapPruneError(f"unknown quantiser {method!r}; choose {', '.join(QUANT_METHODS)}")
    if weight.dim() != 2 or not torch.is_floating_point(weight):
        raise SnapPruneError(f"expected a 2-D floating-point weight, got {tuple(weight.shape)} "
                             f"{weight.dtype}")
    cols = weight.shape[1]
    scheme.check_width(cols)
    if mask is not None and not scheme.exact_zero and bool(mask.any()):
        raise SnapPruneError(f"{scheme.name}'s grid has no exact zero, so pruned weights "
                             "would not stay 0; use q4_0 or q8_0 (or a w* scheme) for a "
                             "pruned model")
    if method == "gptq" and stats is None:
        raise SnapPruneError("GPTQ needs the layer's calibration statistics (its Hessian); "
                             "use method rtn for data-free quantisation")
    if stats is not None and stats.columns != cols:
        raise SnapPruneError(f"statistics are for {stats.columns} input columns but the weight "
                             f"has {cols}")
    start = time.perf_counter()
    w = weight.detach().to(torch.float32).clone()
    original = w.clone()
    mask = None if mask is None else mask.to(w.device)
    used = None
    if method == "rtn":
        values, codes, params = round_to_nearest(w, scheme, scale_dtype, mask)
    else:
        hessian = stats.hessian.to(w.device)
        damped, dead = damped_hessian(hessian, percdamp)
        w[:, dead] = 0.0
        order = None
        if act_order:
            order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
            damped, hessian = damped[order][:, order], hessian[order][:, order]
            upper = None
        if upper is None:
            upper, used = inverse_cholesky_upper(damped, hessian, percdamp)
        else:
            used = percdamp
        values, codes, params = gptq_blockwise(w, upper.to(w.device), scheme, scale_dtype,
                                               mask=mask, order=order, blocksize=blocksize)
    if w.is_cuda:
        torch.cuda.synchronize(w.device)
    seconds = time.perf_counter() - start
    quality = (reconstruction_error(original, values, stats.hessian)
               if stats is not None and stats.has_hessian and error else math.nan)
    scales, zeros = _stack(params)
    return QuantResult(values.to(weight.dtype), codes.to(torch.int16), scales, zeros, scheme,
                       quality, seconds, used)


def _on_kept_columns(weight, stats, scheme, keep, *, error: bool, **options) -> QuantResult:
    """Quantise the cut-out layer ``weight[:, keep]`` and put it back among zero columns."""
    keep = torch.as_tensor(keep, device=weight.device).long()
    if bool((weight.index_select(1, _complement(keep, weight.shape[1])) != 0).any()):
        raise SnapPruneError("the columns to be cut out must already be zero")
    sub_stats = None
    if stats is not None:
        sub_stats = LayerStats(len(keep), dtype=stats.dtype, device=stats.device)
        sub_stats.set_hessian(stats.hessian[keep][:, keep], stats.sq_norms[keep])
    mask = options.pop("mask")
    part = quantize_weight(weight[:, keep], sub_stats, scheme,
                           mask=None if mask is None else mask[:, keep], error=False,
                           **options)
    full = torch.zeros_like(weight)
    full[:, keep] = part.weight
    quality = (reconstruction_error(weight, full, stats.hessian)
               if stats is not None and stats.has_hessian and error else math.nan)
    part.weight, part.error = full, quality
    return part


def _complement(keep: torch.Tensor, total: int) -> torch.Tensor:
    removed = torch.ones(total, dtype=torch.bool, device=keep.device)
    removed[keep] = False
    return removed.nonzero().squeeze(1)
