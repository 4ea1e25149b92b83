"""Solvers against brute force; masks against their definitions."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from problems import damped_hessian64, lstsq_optimum, make_problem, relative_close

from snapprune import prune_weight

PERCDAMP = 0.01


def assert_nm(mask: torch.Tensor, n: int, m: int) -> None:
    groups = mask.reshape(mask.shape[0], -1, m).sum(2)
    assert (groups == n).all(), "every group of M must lose exactly N weights"


@pytest.mark.parametrize("rows,cols", [(8, 12), (32, 48), (17, 40)])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_thanos_one_block_is_rowwise_lstsq_optimum(rows, cols, sparsity):
    p = make_problem(rows, cols, seed=rows + cols)
    res = prune_weight(p.weight, p.stats, method="thanos", sparsity=sparsity, blocksize=cols)
    assert res.mask.sum().item() == math.floor(Fraction(str(sparsity)) * rows * cols)
    expected = lstsq_optimum(p.weight, p.inputs, res.mask, PERCDAMP)
    relative_close(res.weight, expected, 1e-4)
    assert (res.weight[res.mask] == 0).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_thanos_nm_one_block_is_optimum(n, m):
    p = make_problem(24, 32, seed=n * 10 + m)
    res = prune_weight(p.weight, p.stats, method="thanos", pattern=f"{n}:{m}", blocksize=32)
    assert_nm(res.mask, n, m)
    relative_close(res.weight, lstsq_optimum(p.weight, p.inputs, res.mask, PERCDAMP), 1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.25])
def test_structured_thanos_is_optimum_and_keeps_outliers(alpha):
    rows, cols = 20, 40
    p = make_problem(rows, cols, seed=3)
    res = prune_weight(p.weight, p.stats, method="thanos", pattern="structured", sparsity=0.3,
                       alpha=alpha, blocksize=16)
    outliers = ~res.mask.any(1)
    assert outliers.sum().item() == math.floor(alpha * rows)
    removed_cols = res.mask[~outliers].all(0)
    assert (res.mask[~outliers] == removed_cols).all(), "all non-outlier rows share columns"
    assert removed_cols.sum().item() == round(0.3 * rows * cols / (rows - outliers.sum().item()))
    assert torch.equal(res.weight[outliers], p.weight[outliers])
    expected = lstsq_optimum(p.weight, p.inputs, res.mask, PERCDAMP)
    relative_close(res.weight[~outliers], expected[~outliers], 1e-4)


def slow_thanos_update(w: torch.Tensor, hd: torch.Tensor, mask: torch.Tensor, b: int):
    """The research code's way: re-invert ``H[i1:, i1:]`` for every block, solve row by row."""
    w = w.double().clone()
    cols = w.shape[1]
    for i1 in range(0, cols, b):
        i2 = min(cols, i1 + b)
        hinv = torch.linalg.inv(hd[i1:, i1:])
        for r in range(w.shape[0]):
            q = mask[r, i1:i2].nonzero().squeeze(1)
            if q.numel():
                lam = torch.linalg.solve(hinv[q][:, q], w[r, i1 + q])
                w[r, i1:] -= lam @ hinv[q]
                w[r, i1 + q] = 0
    return w


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None),
                                              ("unstructured", 0.6)])
@pytest.mark.parametrize("blocksize", [8, 12, 32])
def test_thanos_blocks_match_reinverting_reference(pattern, sparsity, blocksize):
    """The Cholesky identity gives the same weights as re-inverting per block (cols=44: ragged)."""
    p = make_problem(16, 44, seed=blocksize)
    res = prune_weight(p.weight, p.stats, method="thanos", pattern=pattern, sparsity=sparsity,
                       blocksize=blocksize)
    expected = slow_thanos_update(p.weight, damped_hessian64(p.inputs, PERCDAMP), res.mask,
                                  blocksize)
    relative_close(res.weight, expected, 1e-4)


def test_thanos_global_residual_mask_first_block_and_exact_total():
    rows, cols, b = 16, 48, 16
    p = make_problem(rows, cols, seed=11)
    res = prune_weight(p.weight, p.stats, method="thanos", sparsity=0.5, blocksize=b)
    assert res.mask.sum().item() == rows * cols // 2
    scores = p.weight.abs() * p.inputs.square().sum(0).sqrt()
    k = rows * cols // 2
    thresh = scores.flatten().kthvalue(k).values
    assert torch.equal(res.mask[:, :b], scores[:, :b] <= thresh)
    # Rows and columns vary: the mask is global, not per row.
    assert res.mask.sum(1).unique().numel() > 1


def slow_sparsegpt(w, hd, sparsity, blocksize, nm=None):
    """SparseGPT by its definition: OBS per column with frozen earlier columns, explicit inverses.

    Mask chosen on entering each block (or each group of M for n:m) by the OBS score ``W² / U_jj²``,
    ``U_jj² = [(H[j:, j:])⁻¹]_00`` (SparseGPT's ``W²/diag(Hinv1)²``), each block
    taking its share of ``floor(p·rows·cols)``.
    """
    w = w.double().clone()
    rows, cols = w.shape
    hinvs = [torch.linalg.inv(hd[j:, j:]) for j in range(cols)]
    d = torch.tensor([h[0, 0].item() for h in hinvs], dtype=torch.float64)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(cols, i1 + blocksize)
        if nm is None:
            k = math.floor(sparsity * rows * i2 + 1e-9) - math.floor(sparsity * rows * i1 + 1e-9)
            score = (w[:, i1:i2] ** 2 / d[i1:i2]).flatten()
            chosen = torch.zeros(score.numel(), dtype=torch.bool)
            chosen[score.argsort()[:k]] = True
            mask[:, i1:i2] = chosen.view(rows, i2 - i1)
        for j in range(i1, i2):
            if nm is not None and (j - i1) % nm[1] == 0:
                score = w[:, j : j + nm[1]] ** 2 / d[j : j + nm[1]]
                idx = score.argsort(dim=1)[:, : nm[0]]
                mask[:, j : j + nm[1]].scatter_(1, idx, True)
            for r in mask[:, j].nonzero().squeeze(1).tolist():
                w[r, j:] -= w[r, j] / hinvs[j][0, 0] * hinvs[j][0]
                w[r, j] = 0
    return w, mask


@pytest.mark.parametrize("pattern,blocksize", [("unstructured", 16), ("unstructured", 48),
                                               ("2:4", 8), ("4:8", 16)])
def test_sparsegpt_matches_direct_obs(pattern, blocksize):
    p = make_problem(12, 40 if pattern == "unstructured" else 48, seed=blocksize)
    nm = None if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
    res = prune_weight(p.weight, p.stats, method="sparsegpt", pattern=pattern,
                       sparsity=0.5 if nm is None else None, blocksize=blocksize)
    expected, mask = slow_sparsegpt(p.weight, damped_hessian64(p.inputs, PERCDAMP), 0.5,
                                    blocksize, nm)
    assert torch.equal(res.mask, mask)
    relative_close(res.weight, expected, 1e-4)


@pytest.mark.parametrize("sparsity,blocksize", [(0.3, 5), (0.45, 7)])
def test_sparsegpt_blocks_share_an_exact_total(sparsity, blocksize):
    """``p·rows·B`` not whole: each block takes its share of ``⌊p·rows·cols⌋``, not its own
    rounded count, so the layer total is exact and the masks match the direct OBS pass."""
    rows, cols = 7, 25
    p = make_problem(rows, cols, seed=blocksize)
    res = prune_weight(p.weight, p.stats, method="sparsegpt", sparsity=sparsity,
                       blocksize=blocksize)
    assert res.mask.sum().item() == math.floor(sparsity * rows * cols + 1e-9)
    expected, mask = slow_sparsegpt(p.weight, damped_hessian64(p.inputs, PERCDAMP), sparsity,
                                    blocksize)
    assert torch.equal(res.mask, mask)
    relative_close(res.weight, expected, 1e-4)


def test_wanda_is_row_balanced_and_update_free():
    rows, cols = 10, 37  # 0.5·370 = 185: five rows remove one extra weight
    p = make_problem(rows, cols, seed=5)
    res = prune_weight(p.weight, p.stats, method="wanda", sparsity=0.5)
    counts = res.mask.sum(1)
    assert counts.sum().item() == 185 and set(counts.tolist()) == {18, 19}
    scores = p.weight.abs() * p.inputs.square().sum(0).sqrt()
    for r in range(rows):  # each row removes its lowest scores
        assert scores[r][res.mask[r]].max() < scores[r][~res.mask[r]].min()
    assert torch.equal(res.weight[~res.mask], p.weight[~res.mask])


def test_magnitude_removes_smallest_in_layer():
    p = make_problem(9, 20, seed=6)
    res = prune_weight(p.weight, None, method="magnitude", sparsity=0.45)
    assert res.mask.sum().item() == 81
    assert p.weight.abs()[res.mask].max() < p.weight.abs()[~res.mask].min()
    assert torch.equal(res.weight[~res.mask], p.weight[~res.mask])


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "thanos"])
@pytest.mark.parametrize("metric", ["wanda", "magnitude", "obs"])
def test_every_method_accepts_every_metric_and_pattern(method, metric):
    p = make_problem(16, 32, seed=7)
    for pattern, sparsity in [("unstructured", 0.5), ("2:4", None), ("structured", 0.25)]:
        res = prune_weight(p.weight, p.stats, method=method, metric=metric, pattern=pattern,
                           sparsity=sparsity, blocksize=8,
                           alpha=0.125 if pattern == "structured" else 0.0)
        assert (res.weight[res.mask] == 0).all()
        assert res.mask.float().mean().item() == pytest.approx(0.5 if pattern != "structured"
                                                               else 0.25, abs=0.02)
        assert math.isfinite(res.error) and res.error >= 0


def test_error_is_relative_output_error():
    p = make_problem(12, 24, seed=8)
    res = prune_weight(p.weight, p.stats, method="sparsegpt", sparsity=0.5, blocksize=8)
    x = p.inputs.double()
    direct = ((res.weight.double() - p.weight.double()) @ x.T).square().sum() / (
        (p.weight.double() @ x.T).square().sum())
    assert res.error == pytest.approx(direct.item(), rel=1e-4)


def test_thanos_beats_baselines_on_reconstruction():
    p = make_problem(32, 48, tokens=512, seed=9)
    errors = {m: prune_weight(p.weight, p.stats, method=m, pattern="2:4", blocksize=16).error
              for m in ("wanda", "sparsegpt", "thanos")}
    assert errors["thanos"] < errors["sparsegpt"] < errors["wanda"]


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None)])
def test_segmented_solve_equals_single_batch(pattern, sparsity):
    p = make_problem(32, 48, seed=10)
    whole = prune_weight(p.weight, p.stats, method="thanos", pattern=pattern, sparsity=sparsity,
                         blocksize=16)
    parts = prune_weight(p.weight, p.stats, method="thanos", pattern=pattern, sparsity=sparsity,
                         blocksize=16, max_solve_bytes=1)
    torch.testing.assert_close(whole.weight, parts.weight, rtol=1e-5, atol=1e-6)
    assert torch.equal(whole.mask, parts.mask)


@pytest.fixture(params=["lu", "cholesky"])
def factorisation(request, monkeypatch):
    """Both batched factorisations (the CPU uses LU, CUDA Cholesky), run on the CPU."""
    from snapprune.engine import thanos_update as thanos

    monkeypatch.setattr(thanos, "CHOLESKY_DEVICES", {"cpu"} if request.param == "cholesky"
                        else set())
    return request.param


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None)])
def test_every_solver_path_reaches_the_optimum(factorisation, pattern, sparsity):
    p = make_problem(40, 32, seed=11)
    res = prune_weight(p.weight, p.stats, method="thanos", pattern=pattern, sparsity=sparsity,
                       blocksize=32)
    relative_close(res.weight, lstsq_optimum(p.weight, p.inputs, res.mask, PERCDAMP), 1e-4)


def test_rows_cholesky_rejects_are_solved_by_lu(monkeypatch):
    """Round-off can make a gathered R̂ indefinite; those rows fall back to pivoted LU."""
    from snapprune.engine import thanos_update as thanos

    monkeypatch.setattr(thanos, "CHOLESKY_DEVICES", {"cpu"})
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 6, generator=gen)
    r_block = base @ base.T + 6 * torch.eye(6)
    r_block[4, 4] = -3.0  # any R̂ holding column 4 is indefinite: Cholesky rejects it
    weights = torch.randn(5, 6, generator=gen)
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[0, [0, 4]] = mask[1, [1, 2]] = mask[2, [3, 4, 5]] = mask[3, 4] = True
    lam = thanos.padded_solve(r_block, weights, mask)
    for row in range(5):
        q = mask[row].nonzero().squeeze(1)
        expected = torch.zeros(6)
        if q.numel():
            expected[q] = torch.linalg.solve(r_block[q][:, q], weights[row, q])
        torch.testing.assert_close(lam[row], expected, rtol=1e-5, atol=1e-6)


def _partition_costs(counts: list[int]):
    """Every split of the sorted positive counts into consecutive segments, with its cost."""
    from snapprune.engine.thanos_update import segment_cost

    values = [c for c in counts if c > 0]
    n = len(values)
    for cuts in range(1 << max(0, n - 1)):
        bounds = [0] + [i + 1 for i in range(n - 1) if cuts >> i & 1] + [n]
        yield sum(segment_cost(b - a, values[b - 1]) for a, b in itertools.pairwise(bounds))


@pytest.mark.parametrize("seed", range(6))
def test_segment_plan_is_exact_and_optimal(seed):
    from snapprune.engine.thanos_update import plan_segments, segment_cost

    gen = torch.Generator().manual_seed(seed)
    counts = sorted(torch.randint(0, 60, (11,), generator=gen).tolist())
    counts[: seed % 3] = [0] * (seed % 3)
    counts.sort()
    plan = plan_segments(counts, max_bytes=2**40)
    covered = [i for s1, s2, _ in plan for i in range(s1, s2)]
    assert covered == [i for i, c in enumerate(counts) if c > 0]  # each nonzero row once
    assert all(q == counts[s2 - 1] for _s1, s2, q in plan)  # padded to its largest count
    cost = sum(segment_cost(s2 - s1, q) for s1, s2, q in plan)
    assert cost == pytest.approx(min(_partition_costs(counts)), rel=1e-12)
    limit = 24 * 60 * 60 * 2  # systems of 2 rows at most, at the largest count
    small = plan_segments(counts, max_bytes=limit)
    assert all((s2 - s1) * 24 * q * q <= limit for s1, s2, q in small)
    assert [i for s1, s2, _ in small for i in range(s1, s2)] == covered
