"""Block scales re-fitted after GPTQ, for the codes it chose, under the layer's Hessian.

GPTQ fixes every weight's code with each block's scale chosen before its columns came up. With
the codes fixed, a row's values are linear in its blocks' scales (and minimums): ``q = A θ``,
``A``'s column for block ``b`` holding the levels of the codes in ``b`` (and, for affine types,
ones for the minimum). The layer's output error ``(w - Aθ)ᵀ H (w - Aθ)`` is then minimised in
closed form by ``θ = (AᵀHA)⁻¹ AᵀH w`` — one small solve per row (two unknowns a block for
affine types), against the weights GPTQ was given, under the same damped Hessian. The scales
are stored as float16, so they are rounded after the solve; a row whose solve is singular (a
block no calibration token reached) keeps its scales. For the K-quants the integer sub-block
scales stay and the super-block's float16 factors ``d`` (and ``dmin``) are solved for the same
way: the values are linear in them too.
"""

from __future__ import annotations

import torch

from .blocks import BlockType


def refit_block_scales(weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor | None, hessian: torch.Tensor, block: BlockType,
                       supers: torch.Tensor | None = None):
    """``(scales, zeros, supers)`` minimising the output error of ``block``'s values of
    ``codes`` (rows × cols) against ``weight`` under ``hessian``: the float16 block scales
    (and minima), or, for a super-block type, its factors ``d`` (and ``dmin``) with the
    integer sub-scales kept (``block.linear_form`` says which numbers the values are linear
    in)."""
    bases, old, width = block.linear_form(codes, scales, zeros, supers)
    theta = solve_linear(weight, bases, old, hessian, width)
    return block.from_linear(theta, scales, zeros, supers)


def solve_linear(weight: torch.Tensor, bases: list[torch.Tensor], old: torch.Tensor,
                 hessian: torch.Tensor, width: int) -> torch.Tensor:
    """Per row, ``θ`` minimising ``(w − Σ_k θ_kb B_k)ᵀ H (w − …)``: basis ``k`` (rows × cols)
    restricted to span ``b`` of ``width`` columns, one unknown each; ``old`` (rows × k·spans)
    is kept along singular directions and for rows whose solve is not finite."""
    rows, cols = weight.shape
    spans = cols // width
    h = hessian.to(torch.float64)
    w = weight.to(torch.float64)
    # design[r, u, j]: unknown u = (basis k, span b), nonzero on span b's columns only
    per_span = [basis.to(torch.float64).reshape(rows, spans, width) for basis in bases]
    h4 = h.reshape(spans, width, spans, width)
    gram_parts, rhs_parts = [], []
    hw = (w @ h).reshape(rows, spans, width)  # (H w_r) by span
    for left in per_span:
        row = []
        for right in per_span:
            # Σ_{i∈b, k∈c} left[r,b,i] H[b,i,c,k] right[r,c,k]
            row.append(torch.einsum("rbi,bick,rck->rbc", left, h4, right))
        gram_parts.append(torch.cat(row, 2))
        rhs_parts.append((left * hw).sum(2))
    gram = torch.cat(gram_parts, 1)  # rows × U × U
    rhs = torch.cat(rhs_parts, 1)  # rows × U
    old = old.to(torch.float64)
    diagonal = torch.diagonal(gram, dim1=1, dim2=2)
    ridge = 1e-9 * diagonal.mean(1, keepdim=True).clamp(min=1e-30)
    # Solved for the change from the current values: a singular direction keeps its value.
    system = gram + torch.diag_embed(ridge.expand_as(diagonal))
    change = torch.linalg.solve(system, (rhs - (gram @ old[..., None])[..., 0])[..., None])
    theta = old + change[..., 0]
    ok = torch.isfinite(theta).all(1, keepdim=True)
    return torch.where(ok, theta, old).to(torch.float32)


def output_error(weight: torch.Tensor, values: torch.Tensor, hessian: torch.Tensor) -> float:
    """``Σ_r (w_r - q_r)ᵀ H (w_r - q_r)``, float64."""
    e = (weight - values).to(torch.float64)
    return float(((e @ hessian.to(torch.float64)) * e).sum())
