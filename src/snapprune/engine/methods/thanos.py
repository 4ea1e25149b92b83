"""Thanos: many weights of a row at once, closed-form least-squares update, block by block."""

from __future__ import annotations

import torch

from ..masks import Pattern, lowest_k_leading_mask, nm_mask
from ..problem import LayerProblem
from ..registry import Method
from ..thanos_update import thanos_blockwise, thanos_shared_columns


def prune(problem: LayerProblem) -> torch.Tensor:
    w, pat = problem.weight, problem.pattern
    if pat.kind == "structured":
        # One mask for the layer, chosen on the original weights; one shared exact solve.
        smask = problem.structured_choice(problem.scores(w))
        thanos_shared_columns(w, problem.upper, smask.columns, ~smask.outlier_rows)
        return smask.full()

    if pat.kind == "nm":
        def block_mask(weight: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
            return nm_mask(problem.scores(weight[:, i1:i2], i1), pat.n, pat.m)
    else:
        removed = [0]

        def block_mask(weight: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
            # Global residual mask: the lowest of all still-free (already updated) weights,
            # of which this block takes its part.
            free = problem.scores(weight[:, i1:], i1)
            block = lowest_k_leading_mask(free, problem.target_total - removed[0], i2 - i1)
            removed[0] += int(block.sum().item())
            return block

    per_row = (lambda width: pat.n * width // pat.m) if pat.kind == "nm" else None
    return thanos_blockwise(w, problem.upper, block_mask, problem.blocksize,
                            max_solve_bytes=problem.max_solve_bytes, per_row=per_row)


def cost(rows: int, cols: int, pattern: Pattern, blocksize: int) -> float:
    """Trailing updates ``rows × cols²``, plus (not structured: one shared solve there) each
    row's solve over the weights it removes from each block, ~B/2 unknowns at 50%:
    ``(2/3)(B/2)³`` per row and block, ``rows × cols × B²/12`` in all. At 576 inputs and
    B = 128 the solves outweigh the updates 2.4 : 1; SmolLM2's per-layer times fit it to ~20%."""
    updates = rows * cols * cols
    if pattern.kind == "structured":
        return float(updates)
    return float(updates + rows * cols * blocksize**2 / 12)


METHOD = Method(
    name="thanos",
    summary="many weights of a row at once, closed-form least-squares update (this project's "
            "core)",
    default_metric="wanda",
    updates_weights=True,
    prune=prune,
    blocksize_patterns=frozenset({"unstructured", "nm"}),
    cost=cost,
)
