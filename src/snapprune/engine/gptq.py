"""GPTQ (Frantar et al., 2023): quantise one column at a time and spread each column's
rounding error over the columns not yet quantised, through the upper Cholesky factor ``U``
of the damped inverse Hessian (the factor Thanos and SparseGPT already compute).

For column ``j`` (in processing order) with current weights ``w_j``, grid values ``q_j``:

    e = (w_j - q_j) / U[j, j]          W[:, j+1:] -= e ⊗ U[j, j+1:]

which is the optimal (OBS) update of the remaining columns for fixing ``w_j`` at ``q_j``, the
Schur complement of ``H⁻¹`` being carried by ``U``'s rows (docs/engine.md). Updates are applied
lazily: within a block of ``B`` columns immediately, to the columns after it once per block
(one matrix product).

Groups: a group's grid is fitted from its current weights when its first column comes up
(columns in natural order; a K-quant's super-block of groups at once, when its first column
comes up), or, with activation order, fitted up front from the weights as
given and kept in natural order (``static`` groups: a format stores one scale per natural
group and no permutation). Pruned weights (``mask``) are held at exactly 0: their code is the
grid's zero, and moving them back to 0 is an error spread like any other.

``importance`` (one value per natural column: the Hessian diagonal) makes each group's grid
a scale search weighted by it (``Scheme.fit``), on the weights the grid is fitted from.
"""

from __future__ import annotations

import torch

from .schemes import GroupParams, Scheme


def _part(importance: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if importance is None else importance[start:stop]


def group_params(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype,
                 mask: torch.Tensor | None = None,
                 importance: torch.Tensor | None = None) -> list[GroupParams]:
    """Every group's grid, fitted on ``weight`` (masked entries counted as 0), all spans in
    one batched fit (``Scheme.fit_all``: the same grids as span by span)."""
    w = weight if mask is None else weight.masked_fill(mask, 0.0)
    return scheme.fit_all(w, scale_dtype, importance)


def round_to_nearest(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype,
                     mask: torch.Tensor | None = None, importance: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, list[GroupParams]]:
    """RTN: every weight to its group's nearest grid point; ``(values, codes, params)``."""
    params = group_params(weight, scheme, scale_dtype, mask, importance)
    width = scheme.group_width(weight.shape[1])
    codes = torch.empty_like(weight)
    values = torch.empty_like(weight)
    for g, p in enumerate(params):
        part = slice(g * width, (g + 1) * width)
        codes[:, part] = scheme.codes(weight[:, part], p)
        if mask is not None:
            codes[:, part] = torch.where(mask[:, part], scheme.zero_code(p)[:, None],
                                         codes[:, part])
        values[:, part] = scheme.values(codes[:, part], p)
    return values, codes, params


def gptq_blockwise(
    weight: torch.Tensor,
    upper: torch.Tensor,
    scheme: Scheme,
    scale_dtype: torch.dtype,
    *,
    mask: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    blocksize: int = 128,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[GroupParams]]:
    """Quantise ``weight`` (rows × cols, float32, modified in place into its values) column
    by column; ``upper``: upper Cholesky factor of the damped ``H⁻¹`` of the columns in
    processing order (``H[order][:, order]`` with ``order``). Returns ``(values, codes,
    params)`` with values and codes in natural column order and one ``GroupParams`` per
    natural group."""
    cols = weight.shape[1]
    width = scheme.group_width(cols)
    span = scheme.fit_width(cols)  # columns fitted at once: a group, or a super-block
    static = order is not None
    params: list[GroupParams | None]
    params = group_params(weight, scheme, scale_dtype, mask, importance) if static else \
        [None] * scheme.groups(cols)
    w = weight[:, order] if static else weight
    keep_zero = None
    if mask is not None:
        keep_zero = mask[:, order] if static else mask
    natural = order.tolist() if static else range(cols)
    if not static and span < cols and span % blocksize and blocksize % span:
        blocksize = span * max(1, blocksize // span)  # fits never straddle a block
    codes = torch.empty_like(w)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block = w[:, i1:i2].clone()
        errors = torch.empty_like(block)
        u = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = natural[j] // width
            if params[g] is None:  # a natural-order fit starts here: on its weights now
                ahead = torch.cat([block[:, i:], w[:, i2:]], 1)[:, :min(span, cols - j)]
                fitted = scheme.fit_groups(ahead if keep_zero is None else ahead.masked_fill(
                    keep_zero[:, j : j + ahead.shape[1]], 0.0), scale_dtype,
                    _part(importance, j, j + ahead.shape[1]))
                params[g : g + len(fitted)] = fitted
            p = params[g]
            column = block[:, i]
            code = scheme.codes(column[:, None], p).squeeze(1)
            if keep_zero is not None:
                code = torch.where(keep_zero[:, j], scheme.zero_code(p), code)
            value = scheme.values(code[:, None], p).squeeze(1)
            codes[:, j] = code
            error = (column - value) / u[i, i]
            block[:, i:] -= error[:, None] * u[i, i:][None, :]
            block[:, i] = value
            errors[:, i] = error
        w[:, i1:i2] = block
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
    if static:
        inverse = torch.argsort(order)
        w, codes = w[:, inverse], codes[:, inverse]
    weight.copy_(w)
    return weight, codes, params  # type: ignore[return-value]
