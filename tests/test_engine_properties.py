"""Property test: random shapes, methods, patterns and metrics keep the engine's invariants."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from problems import make_problem

from snapprune import prune_weight

PATTERNS = st.sampled_from(["unstructured", "2:4", "1:4", "4:8", "structured"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 32),
    groups=st.integers(1, 6),
    method=st.sampled_from(["magnitude", "wanda", "sparsegpt", "thanos"]),
    metric=st.sampled_from([None, "wanda", "magnitude", "obs"]),
    pattern=PATTERNS,
    sparsity=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.6, 0.9]),
    alpha=st.sampled_from([0.0, 0.1, 0.3]),
    blocksize=st.sampled_from([8, 16, 24, 128]),
    seed=st.integers(0, 2**16),
)
def test_invariants(rows, groups, method, metric, pattern, sparsity, alpha, blocksize, seed):
    cols = 8 * groups
    p = make_problem(rows, cols, tokens=64, seed=seed)
    nm = pattern not in ("unstructured", "structured")
    kwargs = {"sparsity": None if nm else sparsity, "alpha": alpha if pattern == "structured"
              else 0.0}
    if pattern == "structured" and round(sparsity * rows * cols / (
            rows - math.floor(alpha * rows + 1e-9))) >= cols:
        return  # impossible request: covered by the error tests
    res = prune_weight(p.weight, p.stats, method=method, pattern=pattern, metric=metric,
                       blocksize=blocksize, **kwargs)
    assert res.weight.shape == p.weight.shape and res.weight.dtype == p.weight.dtype
    assert res.mask.shape == p.weight.shape and res.mask.dtype == torch.bool
    assert torch.isfinite(res.weight).all()
    assert (res.weight[res.mask] == 0).all()
    assert res.error >= 0 and math.isfinite(res.error)
    if method in ("magnitude", "wanda"):
        assert torch.equal(res.weight[~res.mask], p.weight[~res.mask])
    if nm:
        n, m = (int(v) for v in pattern.split(":"))
        assert (res.mask.reshape(rows, -1, m).sum(2) == n).all()
    elif pattern == "unstructured":
        assert res.mask.sum().item() == math.floor(Fraction(str(sparsity)) * rows * cols)
    else:
        n_out = math.floor(alpha * rows + 1e-9)
        dense_rows = ~res.mask.any(1)
        cols_removed = res.mask.any(0)
        # Exactly the outlier rows stay dense (all rows when no whole column can go).
        assert dense_rows.sum().item() == (n_out if cols_removed.any() else rows)
        pruned_rows = res.mask[~dense_rows]
        assert torch.equal(pruned_rows, cols_removed.expand_as(pruned_rows))
        if n_out:  # outlier rows (and any row left dense) are untouched
            assert torch.equal(res.weight[dense_rows], p.weight[dense_rows])
