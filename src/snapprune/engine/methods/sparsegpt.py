"""SparseGPT (Frantar & Alistarh, 2023): one weight at a time, OBS update, lazy blocks."""

from __future__ import annotations

import torch

from ..masks import lowest_k_mask, nm_mask, target_count
from ..problem import LayerProblem
from ..registry import Method
from ..sparsegpt_update import sparsegpt_blockwise


def prune(problem: LayerProblem) -> torch.Tensor:
    w, pat, upper = problem.weight, problem.pattern, problem.upper
    if pat.kind == "structured":
        # The mask is fixed up front on the original weights (docs/engine.md).
        full = problem.structured_choice(problem.scores(w)).full()
        return sparsegpt_blockwise(w, upper, problem.blocksize,
                                   select_block=lambda _w1, _d, i1, i2: full[:, i1:i2].clone())

    # OBS with SparseGPT's own free set: column j's removal updates columns [j, cols), so its
    # denominator is [(H[j:, j:])⁻¹]_00 = U_jj² (``d``).
    if pat.kind == "nm":
        return sparsegpt_blockwise(
            w, upper, problem.blocksize, m=pat.m,
            nm_select=lambda wg, d, j: nm_mask(problem.scores(wg, j, hinv_diag=d), pat.n, pat.m),
        )

    def select_block(w1: torch.Tensor, d: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
        # Each block removes its share of floor(p·rows·cols), so the layer total is exact.
        rows = w.shape[0]
        k = target_count(problem.sparsity, rows * i2) - target_count(problem.sparsity, rows * i1)
        return lowest_k_mask(problem.scores(w1, i1, hinv_diag=d), k)

    return sparsegpt_blockwise(w, upper, problem.blocksize, select_block=select_block)


METHOD = Method(
    name="sparsegpt",
    summary="one weight at a time with the OBS update (Frantar & Alistarh, 2023)",
    default_metric="obs",
    updates_weights=True,
    prune=prune,
    blocksize_patterns=frozenset({"unstructured", "nm", "structured"}),
)
