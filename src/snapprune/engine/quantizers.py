"""The quantiser registry and ``quantize_weight``: one weight matrix in, its quantised version
out, on the same Hessian as pruning and, after pruning, on the same factor. Each quantiser
declares itself once (name, summary, whether it needs the Hessian), as pruning methods do; the
command line, settings checks and the estimate read the declaration.

Scales: ``absmax`` is each grid's data-free formula; ``search`` (llama.cpp's block types, with
calibration statistics) picks each block's scale to minimise the error weighted by the
Hessian diagonal, then the quantiser rounds (or runs GPTQ) on the grid so chosen."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import SnapPruneError
from .core import reconstruction_error
from .factor import damped_hessian, inverse_cholesky_upper
from .gptq import gptq_blockwise, round_to_nearest
from .refit import refit_block_scales
from .schemes import GroupParams, Scheme, parse_scheme
from .stats import LayerStats


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
    supers: torch.Tensor | None = None
    """K-quants: each super-block's float16 factors, rows × super-blocks × (``d`` [,
    ``dmin``]); the group ``scales`` (``zeros``) are integer multiples of them."""


def stack_params(params: list[GroupParams], scheme: Scheme):
    """``(scales, zeros, supers)`` of a row's groups, in natural order (``QuantResult``)."""
    scales = torch.stack([p.scale for p in params], 1)
    zeros = None if params[0].zero is None else torch.stack([p.zero for p in params], 1)
    supers = None
    if params[0].d is not None:
        first = params[:: scheme.block.subs]
        factors = [torch.stack([p.d for p in first], 1)]
        if first[0].dmin is not None:
            factors.append(torch.stack([p.dmin for p in first], 1))
        supers = torch.stack(factors, 2)
    return scales, zeros, supers


def unstack_params(scales, zeros, supers, scheme: Scheme) -> list[GroupParams]:
    """The inverse of ``stack_params``."""
    subs = 1 if scheme.block is None else scheme.block.subs

    def factor(g: int, k: int):
        return None if supers is None or supers.shape[2] <= k else supers[:, g // subs, k]

    return [GroupParams(scales[:, g], None if zeros is None else zeros[:, g], factor(g, 0),
                        factor(g, 1)) for g in range(scales.shape[1])]


QuantizeFn = Callable[..., tuple[torch.Tensor, torch.Tensor, list[GroupParams], float | None]]
"""``(w, stats, scheme, *, scale_dtype, mask, act_order, blocksize, percdamp, upper,
importance, refit) -> (values, codes, group params, damping used)``; ``w`` is a float32 copy it
may change; ``importance``: per column, what the scale search weights (``None``: formulas);
``refit``: whether a quantiser that can re-fit its scales afterwards does (GPTQ)."""

SCALES = ("search", "absmax")
"""How group scales are chosen: a search weighted by the Hessian diagonal, or the formula."""


@dataclass(frozen=True)
class Quantizer:
    """What a quantiser is, in one place. ``needs_hessian``: it needs calibration statistics;
    ``scales``: how it chooses scales unless told (where the scheme can search)."""

    name: str
    summary: str
    needs_hessian: bool
    quantize: QuantizeFn
    scales: str = "absmax"


def scales_for(quantizer: Quantizer, scheme: Scheme, scales: str | None) -> str:
    """The scale choice a quantiser uses on ``scheme``: as asked, else its own default where
    the scheme can search, else the formula; a search it cannot do is refused."""
    if scales is None:
        return quantizer.scales if scheme.searchable else "absmax"
    if scales not in SCALES:
        raise SnapPruneError(f"unknown scale choice {scales!r}; choose {', '.join(SCALES)}")
    if scales == "search" and not quantizer.needs_hessian:
        raise SnapPruneError(f"{quantizer.name} has no calibration statistics to weight a scale "
                             "search; use method weighted-rtn or gptq, or scales absmax")
    if scales == "search" and not scheme.searchable:
        raise SnapPruneError(f"{scheme.name} takes compressed-tensors' scale formula; the scale "
                             "search is for llama.cpp's block types (use scales absmax)")
    return scales


def _round_to_nearest(w, stats, scheme, *, scale_dtype, mask, importance, **_options):
    values, codes, params = round_to_nearest(w, scheme, scale_dtype, mask, importance)
    return values, codes, params, None


def _gptq(w, stats, scheme, *, scale_dtype, mask, act_order, blocksize, percdamp, upper,
          importance, refit=True):
    hessian = stats.hessian.to(w.device)
    damped, dead = damped_hessian(hessian, percdamp)
    w[:, dead] = 0.0
    target = w.clone() if refit and importance is not None and scheme.block is not None \
        else None
    natural_damped = damped
    order = None
    if act_order:
        order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
        damped, hessian = damped[order][:, order], hessian[order][:, order]
        upper = None
    used = percdamp
    if upper is None:
        upper, used = inverse_cholesky_upper(damped, hessian, percdamp)
    values, codes, params = gptq_blockwise(w, upper.to(w.device), scheme, scale_dtype,
                                           mask=mask, order=order, blocksize=blocksize,
                                           importance=importance)
    if target is not None:  # the searched scales re-fitted for GPTQ's codes (engine/refit.py)
        scales, zeros, supers = stack_params(params, scheme)
        params = unstack_params(*refit_block_scales(target, codes, scales, zeros,
                                                    natural_damped, scheme.block, supers),
                                scheme)
        width = scheme.group_width(w.shape[1])
        values = torch.cat([scheme.values(codes[:, g * width:(g + 1) * width], p)
                            for g, p in enumerate(params)], 1)
        w.copy_(values)
    return values, codes, params, used


_QUANTIZERS: dict[str, Quantizer] = {}


def register_quantizer(quantizer: Quantizer) -> Quantizer:
    if quantizer.name in _QUANTIZERS and _QUANTIZERS[quantizer.name] is not quantizer:
        raise SnapPruneError(f"a quantiser named {quantizer.name!r} is already registered")
    _QUANTIZERS[quantizer.name] = quantizer
    return quantizer


def quantizer_names() -> tuple[str, ...]:
    return tuple(_QUANTIZERS)


def get_quantizer(name: str) -> Quantizer:
    try:
        return _QUANTIZERS[name]
    except KeyError:
        raise SnapPruneError(f"unknown quantiser {name!r}; choose "
                             f"{', '.join(_QUANTIZERS)}") from None


register_quantizer(Quantizer("gptq", "GPTQ on each layer's Hessian, errors spread forward, on "
                             "block scales searched by the Hessian diagonal", True, _gptq,
                             "search"))
register_quantizer(Quantizer("rtn", "round-to-nearest on the formula's scales, no data", False,
                             _round_to_nearest))
register_quantizer(Quantizer("weighted-rtn", "round-to-nearest on block scales searched by the "
                             "Hessian diagonal (what llama.cpp's --imatrix does)", True,
                             _round_to_nearest, "search"))


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
    scales: str | None = None,
    refit: bool = True,
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
    of the cut-out layer (its Hessian restricted to the kept columns). ``scales``: ``search``
    or ``absmax`` (``None``: the quantiser's own choice, ``scales_for``). ``refit``: with
    GPTQ on searched scales, each block's scale re-fitted for GPTQ's codes under the Hessian
    afterwards (``engine/refit.py``; ``False`` leaves the searched scales). The input is not
    modified.
    """
    if keep_columns is not None:
        return _on_kept_columns(weight, stats, scheme, keep_columns, method=method, mask=mask,
                                act_order=act_order, blocksize=blocksize, percdamp=percdamp,
                                scale_dtype=scale_dtype, error=error, scales=scales,
                                refit=refit)
    scheme = parse_scheme(scheme)
    quantizer = get_quantizer(method)
    if weight.dim() != 2 or not torch.is_floating_point(weight):
        raise SnapPruneError(f"expected a 2-D floating-point weight, got {tuple(weight.shape)} "
                             f"{weight.dtype}")
    cols = weight.shape[1]
    scheme.check_width(cols)
    if mask is not None and not scheme.exact_zero and bool(mask.any()):
        raise SnapPruneError(f"{scheme.name}'s grid has no exact zero, so pruned weights "
                             "would not stay 0; use q4_0, q5_0 or q8_0 (or a w* scheme) for "
                             "a pruned model")
    if quantizer.needs_hessian and stats is None:
        raise SnapPruneError(f"{quantizer.name} needs the layer's calibration statistics (its "
                             "Hessian); use method rtn for data-free quantisation")
    if stats is not None and stats.columns != cols:
        raise SnapPruneError(f"statistics are for {stats.columns} input columns but the weight "
                             f"has {cols}")
    scales = scales_for(quantizer, scheme, scales)
    start = time.perf_counter()
    w = weight.detach().to(torch.float32).clone()
    original = w.clone()
    mask = None if mask is None else mask.to(w.device)
    importance = (torch.diagonal(stats.hessian).to(w.device, torch.float32)
                  if scales == "search" else None)
    values, codes, params, used = quantizer.quantize(
        w, stats, scheme, scale_dtype=scale_dtype, mask=mask, act_order=act_order,
        blocksize=blocksize, percdamp=percdamp, upper=upper, importance=importance,
        refit=refit)
    if w.is_cuda:
        torch.cuda.synchronize(w.device)
    seconds = time.perf_counter() - start
    quality = (reconstruction_error(original, values, stats.hessian)
               if stats is not None and stats.has_hessian and error else math.nan)
    scales, zeros, supers = stack_params(params, scheme)
    return QuantResult(values.to(weight.dtype), codes.to(torch.int16), scales, zeros, scheme,
                       quality, seconds, used, supers)


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
