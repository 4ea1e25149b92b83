"""SparseGPT: column-by-column OBS removal with lazy batched updates (Frantar & Alistarh, 2023)."""

from __future__ import annotations

from collections.abc import Callable

import torch

BlockSelectFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]
"""``(W1, d, i1, i2) -> block mask``, ``d = diag(U[i1:i2, i1:i2])²`` (OBS denominators)."""


def sparsegpt_blockwise(
    weight: torch.Tensor,
    upper: torch.Tensor,
    blocksize: int,
    *,
    select_block: BlockSelectFn | None = None,
    nm_select: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
    m: int = 0,
) -> torch.Tensor:
    """Prune ``weight`` (float32, updated in place) with SparseGPT's published update.

    Either ``select_block`` picks the whole block's mask adaptively on entering the block
    (unstructured, structured), or ``nm_select(W1[:, i:i+m], d[i:i+m], i1+i)`` picks each group of
    ``m`` columns when the loop reaches it (n:m). Returns the mask.
    """
    _rows, cols = weight.shape
    mask = torch.zeros_like(weight, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(cols, i1 + blocksize)
        w1 = weight[:, i1:i2].clone()
        hinv1 = upper[i1:i2, i1:i2]
        d = hinv1.diagonal().square()
        mask1 = (
            select_block(w1, d, i1, i2)
            if select_block is not None
            else torch.zeros_like(w1, dtype=torch.bool)
        )
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if nm_select is not None and i % m == 0:
                mask1[:, i : i + m] = nm_select(w1[:, i : i + m], d[i : i + m], i1 + i)
            w = w1[:, i]
            err = torch.where(mask1[:, i], w, 0.0) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w1[mask1] = 0.0
        weight[:, i1:i2] = w1
        weight[:, i2:] -= err1 @ upper[i1:i2, i2:]
        mask[:, i1:i2] = mask1
    return mask
