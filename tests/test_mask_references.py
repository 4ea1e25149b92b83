"""Mask selection against slow references written from each rule's definition.

The solver tests check the update for the mask the engine chose; these check the choice itself.
Every reference works in float64 with explicit inverses and plain Python loops, shares no code
with the engine, and breaks ties by position (row-major order first), as ``masks`` documents.
"""

from __future__ import annotations

import math

import pytest
import torch
from problems import damped_hessian64, make_problem

from snapprune import LayerStats, prune_weight

PERCDAMP = 0.01


def wanda_scores(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Wanda's score ``|W_ij|·‖x_j‖`` (squared: the same order)."""
    return w.double().square() * x.double().square().sum(0)


def obs_scores(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """OBS with every column free: ``W_ij² / [H⁻¹]_jj`` (explicit inverse)."""
    return w.double().square() / torch.linalg.inv(damped_hessian64(x, PERCDAMP)).diagonal()


def lowest_by_position(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` lowest entries, ties to the earlier row-major position."""
    flat = scores.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (flat[i], i))
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view_as(scores)


def update_block(w: torch.Tensor, hd: torch.Tensor, block: torch.Tensor, i1: int) -> None:
    """Thanos's update for one block by its definition: per row, remove the block's masked
    weights optimally with the columns ``[i1, cols)`` free (explicit inverse of ``H_FF``)."""
    hinv = torch.linalg.inv(hd[i1:, i1:])
    for r in range(w.shape[0]):
        q = block[r].nonzero().squeeze(1)
        if q.numel():
            lam = torch.linalg.solve(hinv[q][:, q], w[r, i1 + q])
            w[r, i1:] -= lam @ hinv[q]
            w[r, i1 + q] = 0.0


def reference_thanos_unstructured(w, x, sparsity, blocksize):
    """Global residual mask: at each block, score every still-free weight on the *updated*
    ``W``; remove the block's part of the lowest ``total − removed`` of them."""
    w = w.double().clone()
    hd = damped_hessian64(x, PERCDAMP)
    rows, cols = w.shape
    total = math.floor(sparsity * rows * cols + 1e-9)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(cols, i1 + blocksize)
        free = wanda_scores(w[:, i1:], x[:, i1:])
        block = lowest_by_position(free, total - int(mask.sum()))[:, : i2 - i1]
        update_block(w, hd, block, i1)
        mask[:, i1:i2] = block
    return mask


def reference_thanos_nm(w, x, n, m, blocksize, metric="wanda"):
    """N:M: in every row and group of ``m`` columns of a block, the ``n`` lowest scores of the
    *updated* ``W`` on entering the block."""
    w = w.double().clone()
    hd = damped_hessian64(x, PERCDAMP)
    rows, cols = w.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(cols, i1 + blocksize)
        if metric == "obs":
            scores = w[:, i1:i2].square() / torch.linalg.inv(hd[i1:, i1:]).diagonal()[: i2 - i1]
        else:
            scores = wanda_scores(w[:, i1:i2], x[:, i1:i2])
        block = torch.zeros(rows, i2 - i1, dtype=torch.bool)
        for r in range(rows):
            for g in range(0, i2 - i1, m):
                group = scores[r, g : g + m].tolist()
                for j in sorted(range(m), key=lambda j: (group[j], j))[:n]:
                    block[r, g + j] = True
        update_block(w, hd, block, i1)
        mask[:, i1:i2] = block
    return mask


def reference_structured(scores: torch.Tensor, sparsity: float, alpha: float):
    """Outlier rows: the ``⌊α·rows⌋`` highest total saliencies. Columns: the ``s`` lowest
    saliencies summed over the *other* rows, ``s = round(p·rows·cols / (rows − outliers))``."""
    rows, cols = scores.shape
    n_out = math.floor(alpha * rows + 1e-9)
    totals = scores.sum(1).tolist()
    outliers = set(sorted(range(rows), key=lambda r: (-totals[r], r))[:n_out])
    kept = [r for r in range(rows) if r not in outliers]
    s = round(sparsity * rows * cols / (rows - n_out))
    col_totals = [sum(scores[r, j].item() for r in kept) for j in range(cols)]
    removed = sorted(range(cols), key=lambda j: (col_totals[j], j))[:s]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in kept:
        mask[r, removed] = True
    return mask, sorted(outliers)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("sparsity,blocksize", [(0.5, 8), (0.6, 16), (0.3, 12)])
def test_thanos_residual_mask_is_chosen_on_updated_weights(seed, sparsity, blocksize):
    p = make_problem(12, 40, seed=seed)
    res = prune_weight(p.weight, p.stats, method="thanos", sparsity=sparsity,
                       blocksize=blocksize)
    expected = reference_thanos_unstructured(p.weight, p.inputs, sparsity, blocksize)
    assert torch.equal(res.mask, expected), f"{(res.mask != expected).sum()} entries differ"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 8), (4, 8, 16), (1, 4, 12)])
@pytest.mark.parametrize("metric", ["wanda", "obs"])
def test_thanos_nm_mask_is_chosen_on_updated_weights(seed, n, m, blocksize, metric):
    p = make_problem(10, 48, seed=seed)
    res = prune_weight(p.weight, p.stats, method="thanos", pattern=f"{n}:{m}",
                       blocksize=blocksize, metric=metric)
    expected = reference_thanos_nm(p.weight, p.inputs, n, m, blocksize, metric)
    assert torch.equal(res.mask, expected), f"{(res.mask != expected).sum()} entries differ"


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.25])
@pytest.mark.parametrize("method,metric", [("thanos", "wanda"), ("sparsegpt", "obs"),
                                           ("wanda", "wanda"), ("thanos", "obs")])
def test_structured_outlier_rows_and_columns_follow_the_definition(seed, alpha, method, metric):
    # Heavy-tailed rows: outlier rows carry most of the saliency, so summing the column
    # scores over them (a classic slip) changes which columns look cheapest.
    p = make_problem(20, 32, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    w = p.weight * torch.exp(1.5 * torch.randn(20, 1, generator=gen))
    res = prune_weight(w, p.stats, method=method, pattern="structured", sparsity=0.3,
                       alpha=alpha, blocksize=8, metric=metric)
    scores = wanda_scores(w, p.inputs) if metric == "wanda" else obs_scores(w, p.inputs)
    expected, outliers = reference_structured(scores, 0.3, alpha)
    assert torch.equal(res.mask, expected)
    assert (~res.mask.any(1)).nonzero().squeeze(1).tolist() == outliers


def test_obs_metric_is_the_diagonal_of_the_inverse_over_the_free_columns():
    """``obs`` = ``W² / [(H_FF)⁻¹]_jj``; with no update, every column is free (``F`` = all)."""
    p = make_problem(10, 24, seed=5)
    scores = obs_scores(p.weight, p.inputs)
    for method in ("magnitude", "wanda"):
        res = prune_weight(p.weight, p.stats, method=method, metric="obs", sparsity=0.5)
        if method == "magnitude":  # lowest across the layer
            assert torch.equal(res.mask, lowest_by_position(scores, 120))
        else:  # lowest within each row
            for r in range(10):
                assert torch.equal(res.mask[r], lowest_by_position(scores[r:r + 1], 12)[0])


def test_ties_are_broken_by_position():
    """Equal scores: the earlier position goes first (documented in ``masks``)."""
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0, 2.0, 2.0, -2.0, 2.0],
                      [3.0, 3.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0]])
    nm = prune_weight(w, None, method="magnitude", pattern="2:4")
    assert nm.mask.tolist() == [[True, True, False, False, True, True, False, False]] * 2
    flat = prune_weight(w, None, method="magnitude", sparsity=0.25)
    assert flat.mask.nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [0, 3]]
    stats = LayerStats.from_inputs(torch.ones(4, 8))
    rows = prune_weight(w, stats, method="wanda", sparsity=0.25)
    assert rows.mask.tolist() == [[True, True, False, False, False, False, False, False],
                                  [False, False, False, False, True, True, False, False]]
    square = torch.ones(4, 6)
    structured = prune_weight(square, LayerStats.from_inputs(torch.ones(3, 6)),
                              method="wanda", pattern="structured", sparsity=0.25, alpha=0.25)
    assert (~structured.mask.any(1)).tolist() == [True, False, False, False]
    assert structured.mask[1].tolist() == [True, True, False, False, False, False]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wanda_leftover_removals_go_to_rows_with_the_lowest_next_candidate(seed):
    """``k = p·rows·cols`` need not split evenly over rows: each row removes ``k // rows``, and
    the ``k % rows`` rows whose next candidate scores lowest remove one more."""
    rows, cols, sparsity = 9, 14, 0.37
    p = make_problem(rows, cols, seed=seed)
    res = prune_weight(p.weight, p.stats, method="wanda", sparsity=sparsity)
    scores = wanda_scores(p.weight, p.inputs)
    k = math.floor(sparsity * rows * cols)
    base, extra = divmod(k, rows)
    next_scores = [sorted(scores[r].tolist())[base] for r in range(rows)]
    lucky = set(sorted(range(rows), key=lambda r: (next_scores[r], r))[:extra])
    for r in range(rows):
        count = base + (r in lucky)
        assert torch.equal(res.mask[r], lowest_by_position(scores[r:r + 1], count)[0]), r
