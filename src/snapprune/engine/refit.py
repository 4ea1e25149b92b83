"""Block scales re-fitted after GPTQ, for the codes it chose, under the layer's Hessian.

GPTQ fixes every weight's code with each block's scale chosen before its columns came up. With
the codes fixed, a row's values are linear in its blocks' scales (and minimums): ``q = A θ``,
``A``'s column for block ``b`` holding the levels of the codes in ``b`` (and, for affine types,
ones for the minimum). The layer's output error ``(w - Aθ)ᵀ H (w - Aθ)`` is then minimised in
closed form by ``θ = (AᵀHA)⁻¹ AᵀH w`` — one small solve per row (two unknowns a block for
affine types), against the weights GPTQ was given, under the same damped Hessian. The scales
are stored as float16, so they are rounded after the solve; a row whose solve is singular (a
block no calibration token reached) keeps its scales.
"""

from __future__ import annotations

import torch

from .blocks import BlockType, half


def refit_block_scales(weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor | None, hessian: torch.Tensor,
                       block: BlockType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(scales, zeros)`` (rows × blocks, float16-stored) minimising the output error of
    ``block``'s values of ``codes`` (rows × cols) against ``weight`` under ``hessian``."""
    rows, cols = weight.shape
    width = block.block
    blocks = cols // width
    h = hessian.to(torch.float64)
    w = weight.to(torch.float64)
    level = (codes.to(torch.float64) if block.affine
             else block.level(codes.to(torch.float32)).to(torch.float64))
    bases = [level] + ([torch.ones_like(level)] if block.affine else [])
    # design[r, u, j]: unknown u = (basis k, block b), nonzero on block b's columns only
    per_block = [basis.reshape(rows, blocks, width) for basis in bases]
    h4 = h.reshape(blocks, width, blocks, width)
    gram_parts, rhs_parts = [], []
    hw = (w @ h).reshape(rows, blocks, width)  # (H w_r) by block
    for left in per_block:
        row = []
        for right in per_block:
            # Σ_{i∈b, k∈c} left[r,b,i] H[b,i,c,k] right[r,c,k]
            row.append(torch.einsum("rbi,bick,rck->rbc", left, h4, right))
        gram_parts.append(torch.cat(row, 2))
        rhs_parts.append((left * hw).sum(2))
    gram = torch.cat(gram_parts, 1)  # rows × U × U
    rhs = torch.cat(rhs_parts, 1)  # rows × U
    old = torch.cat([scales.to(torch.float64)] +
                    ([zeros.to(torch.float64)] if block.affine else []), 1)
    diagonal = torch.diagonal(gram, dim1=1, dim2=2)
    ridge = 1e-9 * diagonal.mean(1, keepdim=True).clamp(min=1e-30)
    # Solved for the change from the current scales: a singular direction keeps its value.
    system = gram + torch.diag_embed(ridge.expand_as(diagonal))
    change = torch.linalg.solve(system, (rhs - (gram @ old[..., None])[..., 0])[..., None])
    theta = old + change[..., 0]
    ok = torch.isfinite(theta).all(1, keepdim=True)
    theta = torch.where(ok, theta, old).to(torch.float32)
    new_scales = half(theta[:, :blocks])
    new_zeros = half(theta[:, blocks:]) if block.affine else None
    return new_scales, new_zeros


def output_error(weight: torch.Tensor, values: torch.Tensor, hessian: torch.Tensor) -> float:
    """``Σ_r (w_r - q_r)ᵀ H (w_r - q_r)``, float64."""
    e = (weight - values).to(torch.float64)
    return float(((e @ hessian.to(torch.float64)) * e).sum())
