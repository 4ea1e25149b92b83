"""Mask selection from saliency scores: pure functions, ``True`` = weight removed.

Ties are broken by position everywhere: among equal scores the weight (row, column) that comes
first in row-major order is removed first, and among equal-scoring outlier rows the first row
is kept dense. Stable sorts make that hold on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SnapPruneError


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: ``unstructured``, ``nm`` (n of every m removed) or ``structured``."""

    kind: str
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """``"unstructured"``, ``"structured"`` or ``"N:M"`` with ``0 < N < M``."""
    if isinstance(pattern, Pattern):
        return pattern
    text = str(pattern).strip().lower()
    if text in ("unstructured", "structured"):
        return Pattern(text)
    if ":" in text:
        left, _, right = text.partition(":")
        if left.isdigit() and right.isdigit() and 0 < int(left) < int(right):
            return Pattern("nm", int(left), int(right))
        raise SnapPruneError(
            f"pattern {pattern!r} is not a valid N:M; use two integers with 0 < N < M, e.g. 2:4"
        )
    raise SnapPruneError(
        f"unknown pattern {pattern!r}; use unstructured, structured or N:M (e.g. 2:4, 4:8)"
    )


def target_count(sparsity: float, total: int) -> int:
    """``floor(sparsity · total)``, robust to float round-off such as 0.29 · 100 = 28.999…"""
    return min(total, math.floor(sparsity * total + 1e-9))


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact ``k``-th smallest of a 1-D tensor (1-based); see ``kth_with_counts``."""
    return kth_with_counts(values, k)[0]


def kth_with_counts(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    """The exact ``k``-th smallest of a 1-D tensor (1-based), and how many values are below it
    and equal to it, via a sampled bracket.

    A random sample (fixed seed; the result does not depend on it) brackets the answer; one
    counting pass and a selection over the few values inside the bracket replace a selection
    over all of them, and the counts come from the bracket too. Falls back to ``kthvalue`` on
    the whole tensor when the bracket misses, so the result is always exact.
    """
    n = values.numel()
    if n > 1 << 16:
        gen = torch.Generator(device=values.device).manual_seed(0)
        picks = torch.randint(n, (1 << 14,), generator=gen, device=values.device)
        sample = torch.sort(values[picks]).values
        rank = k / n * sample.numel()
        margin = 4.0 * sample.numel() ** 0.5 + 8
        lo = sample[max(0, int(rank - margin))]
        hi = sample[min(sample.numel() - 1, int(rank + margin))]
        below = int((values < lo).sum().item())
        inside = values[(values >= lo) & (values <= hi)]
        if below < k <= below + inside.numel():
            threshold = torch.kthvalue(inside, k - below).values
            less, equal = _less_and_equal(inside, threshold)
            return threshold, below + less, equal
    threshold = torch.kthvalue(values, k).values
    return threshold, *_less_and_equal(values, threshold)


def _less_and_equal(values: torch.Tensor, threshold: torch.Tensor) -> tuple[int, int]:
    """How many values are below and equal to ``threshold``: one host transfer for both."""
    less, equal = torch.stack([(values < threshold).sum(), (values == threshold).sum()]).tolist()
    return less, equal


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly ``k`` lowest entries of the whole tensor (ties broken by position)."""
    flat = scores.flatten()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = kth_smallest(flat, k)
    mask = flat < threshold
    ties = (flat == threshold).nonzero().squeeze(1)
    mask[ties[: k - int(mask.sum().item())]] = True
    return mask.view_as(scores)


def lowest_k_leading_mask(scores: torch.Tensor, k: int, width: int) -> torch.Tensor:
    """``lowest_k_mask(scores, k)[:, :width]`` for a 2-D ``scores``, without building the mask
    of the other columns: they are only ranked. (Thanos's block takes its part of the residual
    mask over all free columns.)"""
    rows, cols = scores.shape
    if k <= 0:
        return torch.zeros(rows, width, dtype=torch.bool, device=scores.device)
    if k >= scores.numel():
        return torch.ones(rows, width, dtype=torch.bool, device=scores.device)
    flat = scores.flatten()
    threshold, less, equal = kth_with_counts(flat, k)
    head = scores[:, :width]
    mask = head < threshold
    needed = k - less
    if needed == equal:  # every tie is in
        return mask | (head == threshold)
    ties = (flat == threshold).nonzero().squeeze(1)[:needed]  # the first ones by position
    tie_rows, tie_cols = ties // cols, ties % cols
    inside = tie_cols < width
    mask[tie_rows[inside], tie_cols[inside]] = True
    return mask


ROW_CHUNK_ELEMENTS = 1 << 22
"""Rows are ranked this many scores at a time: the sort's 64-bit indices stay small."""


def row_balanced_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` entries in all, spread evenly over rows (Wanda compares within each output row).

    Each row removes ``k // rows``; the ``k % rows`` remaining removals go to the rows whose next
    candidate scores lowest, so the total is exact even when ``rows`` does not divide ``k``.
    """
    rows, cols = scores.shape
    base, extra = divmod(k, rows)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    next_scores = scores.new_empty(rows)
    next_cols = torch.empty(rows, dtype=torch.long, device=scores.device)
    step = max(1, ROW_CHUNK_ELEMENTS // cols)
    for r1 in range(0, rows, step):
        chunk = scores[r1 : r1 + step]
        order = torch.argsort(chunk, dim=1, stable=True)
        mask[r1 : r1 + step].scatter_(1, order[:, :base], True)
        if extra:
            next_cols[r1 : r1 + step] = order[:, base]
            next_scores[r1 : r1 + step] = chunk.gather(1, order[:, base : base + 1]).squeeze(1)
    if extra:
        chosen = torch.argsort(next_scores, stable=True)[:extra]
        mask[chosen, next_cols[chosen]] = True
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every row and every group of ``m`` consecutive columns, the ``n`` lowest scores."""
    rows, cols = scores.shape
    if cols % m:
        raise SnapPruneError(
            f"{n}:{m} sparsity needs a width divisible by {m}, but this layer has {cols} columns; "
            "choose another M or exclude the layer"
        )
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.argsort(groups, dim=2, stable=True)[:, :, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


@dataclass(frozen=True)
class StructuredMask:
    """Removed input columns (for every non-outlier row) and outlier rows kept dense."""

    columns: torch.Tensor  # bool [cols]
    outlier_rows: torch.Tensor  # bool [rows]

    def full(self) -> torch.Tensor:
        return (~self.outlier_rows)[:, None] & self.columns[None, :]


def structured_mask(scores: torch.Tensor, sparsity: float, alpha: float) -> StructuredMask:
    """Outlier rows by total saliency, then the lowest-saliency columns of the other rows.

    The column count ``s`` makes the layer's total sparsity as close to ``sparsity`` as whole
    columns allow: ``s = round(sparsity · rows · cols / (rows − outliers))``.
    """
    rows, cols = scores.shape
    n_out = math.floor(alpha * rows + 1e-9)
    outliers = torch.zeros(rows, dtype=torch.bool, device=scores.device)
    if n_out:
        outliers[torch.argsort(scores.sum(1), descending=True, stable=True)[:n_out]] = True
    s = round(sparsity * rows * cols / (rows - n_out))
    if s >= cols:
        raise SnapPruneError(
            f"structured sparsity {sparsity} with alpha {alpha} would remove every column of a "
            f"{rows}x{cols} layer; lower the sparsity or alpha"
        )
    columns = torch.zeros(cols, dtype=torch.bool, device=scores.device)
    if s:
        col_scores = scores[~outliers].sum(0)
        columns[torch.argsort(col_scores, stable=True)[:s]] = True
    return StructuredMask(columns, outliers)
