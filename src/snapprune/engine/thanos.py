"""Thanos: block-wise multi-weight removal with the closed-form least-squares update.

For one row ``w`` removing the set ``Q`` of still-free columns, with ``R = (H_FF)⁻¹[Q, :]`` and
``R̂ = (H_FF)⁻¹[Q, Q]``: solve ``R̂ λ = w_Q``, then ``w_F ← w_F − λᵀ R`` (DESIGN.md §1–2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BlockMaskFn = Callable[[torch.Tensor, int, int], torch.Tensor]
"""``(W, i1, i2) -> mask of W[:, i1:i2]`` chosen on the current, already-updated ``W``."""

DEFAULT_SOLVE_BYTES = 512 * 2**20


def padded_solve(
    r_block: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_bytes: int = DEFAULT_SOLVE_BYTES,
    buckets: int = 8,
) -> torch.Tensor:
    """Solve every row's ``R̂ λ = w_Q`` with batched solves; return a dense ``Λ`` (rows × B).

    ``r_block`` is the ``B × B`` leading block of ``(H_FF)⁻¹[block rows]``; ``weights`` and
    ``mask`` are the block's columns. Rows are padded to a common ``q``: identity in ``R̂`` and
    zero in ``w_Q`` make the padded ``λ`` exactly zero. Rows are sorted by ``q`` and solved in
    vertical segments (about ``buckets`` of them, more if a segment's system would exceed
    ``max_bytes``), each padded only to its own largest ``q``: the cubic cost follows the rows'
    own counts rather than the block's maximum.
    """
    rows = mask.shape[0]
    counts = mask.sum(1)
    lam_dense = torch.zeros_like(weights)
    if rows == 0 or not bool(counts.any()):
        return lam_dense
    by_count = torch.argsort(counts)
    sorted_counts = counts[by_count].tolist()
    # Masked columns first in each row; the rest of the permutation is padding.
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    s1 = sorted_counts.index(next(c for c in sorted_counts if c > 0))
    step = max(1, -(-(rows - s1) // buckets))
    while s1 < rows:
        q = sorted_counts[min(rows, s1 + step) - 1]
        fit = max(1, max_bytes // (16 * q * q))
        s2 = min(rows, s1 + step, s1 + fit)
        q = sorted_counts[s2 - 1]
        seg = by_count[s1:s2]
        idx = order[seg, :q]
        valid = torch.arange(q, device=mask.device)[None, :] < counts[seg, None]
        r_hat = r_block[idx[:, :, None], idx[:, None, :]]
        r_hat.masked_fill_(~(valid[:, :, None] & valid[:, None, :]), 0.0)
        r_hat.diagonal(dim1=1, dim2=2).masked_fill_(~valid, 1.0)
        rhs = weights[seg].gather(1, idx).masked_fill_(~valid, 0.0)
        lam, _ = torch.linalg.solve_ex(r_hat, rhs.unsqueeze(-1))
        lam_dense[seg] = torch.zeros_like(weights[seg]).scatter_(1, idx, lam.squeeze(-1))
        s1 = s2
    return lam_dense


def thanos_blockwise(
    weight: torch.Tensor,
    upper: torch.Tensor,
    block_mask: BlockMaskFn,
    blocksize: int,
    *,
    max_solve_bytes: int = DEFAULT_SOLVE_BYTES,
) -> torch.Tensor:
    """Prune ``weight`` (float32, updated in place) block by block; return the mask.

    ``upper`` is the upper Cholesky factor of the damped ``H⁻¹``; the block's rows of
    ``(H[i1:, i1:])⁻¹`` are ``U_bbᵀ U[i1:i2, i1:]`` (``U_bb = U[i1:i2, i1:i2]``), so the update
    of all rows is ``W[:, i1:] −= (Λ U_bbᵀ) U[i1:i2, i1:]``: two matrix products, no inverse.
    """
    cols = weight.shape[1]
    mask = torch.zeros_like(weight, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(cols, i1 + blocksize)
        block = block_mask(weight, i1, i2)
        if not block.any():
            continue
        u_bb = upper[i1:i2, i1:i2]
        lam = padded_solve(u_bb.T @ u_bb, weight[:, i1:i2], block, max_bytes=max_solve_bytes)
        weight[:, i1:] -= (lam @ u_bb.T) @ upper[i1:i2, i1:]
        weight[:, i1:i2][block] = 0.0
        mask[:, i1:i2] = block
    return mask


def thanos_shared_columns(
    weight: torch.Tensor, upper: torch.Tensor, columns: torch.Tensor, rows: torch.Tensor
) -> None:
    """Remove the same ``columns`` from the selected ``rows`` of ``weight`` (in place), optimally.

    All rows share ``Q``, so one ``q × q`` system with the rows as right-hand sides serves all:
    ``R̂ Λᵀ = W[rows][:, Q]ᵀ``, then ``W[rows] −= Λ · H⁻¹[Q, :]``.
    """
    q_idx = columns.nonzero().squeeze(1)
    if q_idx.numel() == 0 or not rows.any():
        return
    r = upper[:, q_idx].T @ upper  # H⁻¹[Q, :] = U[:, Q]ᵀ U
    r_hat = r[:, q_idx]
    sub = weight[rows]
    lam = torch.linalg.solve(r_hat, sub[:, q_idx].T).T
    sub -= lam @ r
    sub[:, q_idx] = 0.0
    weight[rows] = sub
