"""Thanos: block-wise multi-weight removal with the closed-form least-squares update.

For one row ``w`` removing the set ``Q`` of still-free columns, with ``R = (H_FF)⁻¹[Q, :]`` and
``R̂ = (H_FF)⁻¹[Q, Q]``: solve ``R̂ λ = w_Q``, then ``w_F ← w_F − λᵀ R`` (docs/engine.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .determinism import whole_matrix_threads

BlockMaskFn = Callable[[torch.Tensor, int, int], torch.Tensor]
"""``(W, i1, i2) -> mask of W[:, i1:i2]`` chosen on the current, already-updated ``W``."""

DEFAULT_SOLVE_BYTES = 512 * 2**20

# Cost of one batched solve of ``n`` rows padded to ``q`` unknowns, in seconds: a fixed cost per
# call plus gathering (q²) and factoring (q³) per row. Measured on this project's CPU
# (``python benchmarks/layer_speed.py --solve-costs``); only the ratios matter, and they decide
# speed, never results (padding is exact), but fixed constants keep every run bit-identical.
SEGMENT_CALL_SECONDS = 2.0e-4
SEGMENT_ROW_Q2_SECONDS = 2.0e-9
SEGMENT_ROW_Q3_SECONDS = 3.0e-11


def segment_cost(rows: int, q: int) -> float:
    return SEGMENT_CALL_SECONDS + rows * q * q * (SEGMENT_ROW_Q2_SECONDS
                                                  + q * SEGMENT_ROW_Q3_SECONDS)


def plan_segments(sorted_counts: list[int], max_bytes: int) -> list[tuple[int, int, int]]:
    """Split rows sorted by their count ``q`` into ``(start, stop, q)`` segments, each padded to
    its largest ``q``, minimising the modelled cost (``segment_cost``): many small segments
    waste calls, few large ones waste padded cubic work. Exact dynamic programme over the
    distinct counts; a segment also stops where its systems would exceed ``max_bytes``."""
    rows = len(sorted_counts)
    ends, values = [], []  # distinct counts and where their run of rows ends
    for i, c in enumerate(sorted_counts):
        if values and values[-1] == c:
            ends[-1] = i + 1
        else:
            values.append(c)
            ends.append(i + 1)
    first = next((i for i, v in enumerate(values) if v > 0), len(values))
    starts = [0, *ends[:-1]]
    best = {first: (0.0, -1)}
    for i in range(first, len(values)):
        cost, choice = None, -1
        for j in range(first, i + 1):
            n = ends[i] - starts[j]
            c = best[j][0] + segment_cost(n, values[i])
            if cost is None or c < cost:
                cost, choice = c, j
        best[i + 1] = (cost, choice)
    segments = []
    i = len(values)
    while i > first:
        j = best[i][1]
        segments.append((starts[j], ends[i - 1], values[i - 1]))
        i = j
    out = within_bytes(list(reversed(segments)), max_bytes)
    assert not out or out[-1][1] == rows
    return out


SOLVE_BYTES_PER_ENTRY = 24
"""Working memory per entry of a batched system: ``R̂`` and its factor (4 bytes each) and the
flat gather index (8), with room to spare."""


def within_bytes(spans: list[tuple[int, int, int]], max_bytes: int) -> list[tuple[int, int, int]]:
    """Split ``(start, stop, q)`` spans so that no batched solve's working set exceeds
    ``max_bytes`` (one row at a time at the least)."""
    out = []
    for s1, s2, q in spans:
        fit = max(1, max_bytes // (SOLVE_BYTES_PER_ENTRY * q * q))
        out += [(a, min(s2, a + fit), q) for a in range(s1, s2, fit)]
    return out


def padded_solve(
    r_block: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_bytes: int = DEFAULT_SOLVE_BYTES,
    uniform: int | None = None,
) -> torch.Tensor:
    """Solve every row's ``R̂ λ = w_Q`` with batched solves (``_solve_rows``); return a dense
    ``Λ`` (rows × B).

    ``r_block`` is the ``B × B`` leading block of ``(H_FF)⁻¹[block rows]`` (symmetric positive
    definite, so are its principal submatrices ``R̂``); ``weights`` and ``mask`` are the block's
    columns. Padding uses indices ``B + t``: ``R̂`` is extended by an identity block and ``w`` by
    zeros, and the ``t``-th padded slot of a row takes index ``B + t``, so gathering builds
    every padded system (identity on the padding, zeros beside it) without any masking, and
    padded unknowns solve to exactly zero. Rows are sorted by ``q`` and solved in segments
    padded to their own largest ``q`` (``plan_segments``).
    ``uniform``: every row removes this many (N:M), so no counting, sorting or planning is
    needed.
    """
    rows, width = mask.shape
    if rows == 0:
        return torch.zeros_like(weights)
    if uniform is not None:
        order, spans = None, within_bytes([(0, rows, uniform)] if uniform else [], max_bytes)
    else:
        counts = mask.sum(1)
        order = torch.argsort(counts, stable=True)
        mask, weights = mask[order], weights[order]
        spans = plan_segments(counts[order].tolist(), max_bytes)
    q_max = max((q for _, _, q in spans), default=0)
    positions = _removed_positions(mask, q_max)
    r_ext = torch.block_diag(r_block, torch.eye(q_max, dtype=r_block.dtype,
                                                device=r_block.device))
    w_ext = torch.cat([weights, weights.new_zeros(rows, q_max)], 1)

    flat = r_ext.flatten()
    side = r_ext.shape[0]

    def solve(task):
        s1, s2, q = task
        idx = positions[s1:s2, :q]
        # R̂ through one flat index: cheaper than indexing rows and columns separately.
        lin = (idx * side).unsqueeze(2) + idx.unsqueeze(1)
        r_hat = flat.index_select(0, lin.flatten()).view(s2 - s1, q, q)
        return s1, s2, idx, _solve_rows(r_hat, w_ext[s1:s2].gather(1, idx).unsqueeze(-1))

    lam = weights.new_zeros(rows, width + q_max)
    for s1, s2, idx, x in map(solve, spans):
        lam[s1:s2].scatter_(1, idx, x.squeeze(-1))
    lam = lam[:, :width]
    if order is None:
        return lam
    return torch.empty_like(lam).index_copy_(0, order, lam)


def _removed_positions(mask: torch.Tensor, q_max: int) -> torch.Tensor:
    """Per row, its removed columns in ascending order, then distinct padding indices
    ``width + t`` up to ``q_max`` entries (a row's removals beyond ``q_max`` are dropped)."""
    rows, width = mask.shape
    slots = torch.arange(q_max, device=mask.device)
    positions = (width + slots).repeat(rows, 1)
    # Each removed column goes to its rank among the row's removals; kept ones to a spare slot.
    rank = torch.where(mask, mask.cumsum(1) - 1, q_max).clamp_(max=q_max)
    spare = torch.cat([positions, positions.new_empty(rows, 1)], 1)
    columns = torch.arange(width, device=mask.device).expand(rows, width)
    return spare.scatter_(1, rank, columns)[:, :q_max]


CHOLESKY_DEVICES = {"cuda"}
"""Where the batched solves use Cholesky. On the CPU, torch's batched Cholesky costs more than
pivoted LU (it zeroes the other triangle in a separate pass: 1,536 systems of 64 unknowns take
~27 ms + 5 ms of triangular solves against ~19 + 3 ms for LU, ``benchmarks/layer_speed.py``)."""


def _solve_rows(r_hat: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched ``r_hat x = rhs`` (symmetric positive definite): by Cholesky where that is the
    cheaper factorisation, re-solving any row it rejects (round-off on an ill-conditioned
    block) with pivoted LU; by pivoted LU elsewhere."""
    if r_hat.device.type not in CHOLESKY_DEVICES:
        return torch.linalg.solve_ex(r_hat, rhs)[0]
    factor, info = torch.linalg.cholesky_ex(r_hat)
    x = torch.linalg.solve_triangular(
        factor.mT, torch.linalg.solve_triangular(factor, rhs, upper=False), upper=True)
    failed = info != 0
    if bool(failed.any()):
        x[failed] = torch.linalg.solve(r_hat[failed], rhs[failed])
    return x


def thanos_blockwise(
    weight: torch.Tensor,
    upper: torch.Tensor,
    block_mask: BlockMaskFn,
    blocksize: int,
    *,
    max_solve_bytes: int = DEFAULT_SOLVE_BYTES,
    per_row: Callable[[int], int] | None = None,
) -> torch.Tensor:
    """Prune ``weight`` (float32, updated in place) block by block; return the mask.

    ``per_row(width)``: when every row removes the same known number of a block's ``width``
    columns (N:M), that number, which spares the solver all counting.

    ``upper`` is the upper Cholesky factor of the damped ``H⁻¹``; the block's rows of
    ``(H[i1:, i1:])⁻¹`` are ``U_bbᵀ U[i1:i2, i1:]`` (``U_bb = U[i1:i2, i1:i2]``), so the update
    of all rows is ``W[:, i1:] −= (Λ U_bbᵀ) U[i1:i2, i1:]``: two matrix products, no inverse.
    """
    cols = weight.shape[1]
    mask = torch.zeros_like(weight, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(cols, i1 + blocksize)
        block = block_mask(weight, i1, i2)
        u_bb = upper[i1:i2, i1:i2]
        lam = padded_solve(u_bb.T @ u_bb, weight[:, i1:i2], block, max_bytes=max_solve_bytes,
                           uniform=None if per_row is None else per_row(i2 - i1))
        weight[:, i1:] -= (lam @ u_bb.T) @ upper[i1:i2, i1:]
        weight[:, i1:i2].masked_fill_(block, 0.0)
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
    with whole_matrix_threads(weight.device):
        lam = torch.linalg.solve(r_hat, sub[:, q_idx].T).T
    sub -= lam @ r
    sub[:, q_idx] = 0.0
    weight[rows] = sub
