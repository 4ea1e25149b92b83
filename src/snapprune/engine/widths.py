"""Per-block removal counts from measured costs: the allocation behind ``shrink --allocation
sensitivity``.

Each block's cost of removing ``k`` units (MLP neurons in steps of ``multiple_of``, or query
heads per key/value group) is measured at a few counts and read between them by linear
interpolation. The allocation minimises the summed cost over the blocks subject to removing
exactly ``total`` units in all, each block within its own limit — an exact dynamic programme
over the blocks (the curves need not be convex, so a greedy exchange could stop short).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SnapPruneError


@dataclass(frozen=True)
class CostCurve:
    """One block's measured cost at some removal counts (``counts[0] == 0`` with cost 0)."""

    counts: tuple[int, ...]
    costs: tuple[float, ...]

    def __post_init__(self) -> None:
        if (len(self.counts) != len(self.costs) or not self.counts or self.counts[0] != 0
                or any(b <= a for a, b in zip(self.counts, self.counts[1:], strict=False))):
            raise SnapPruneError("a cost curve needs strictly increasing counts from 0, one "
                                 "cost each")

    @property
    def limit(self) -> int:
        """The most units this block may lose: the last measured count."""
        return self.counts[-1]

    def at(self, count: int) -> float:
        """The cost at ``count`` units: measured, or linear between the measured neighbours."""
        if not 0 <= count <= self.limit:
            raise SnapPruneError(f"count {count} is outside the measured 0..{self.limit}")
        for (a, ca), (b, cb) in zip(zip(self.counts, self.costs, strict=True),
                                    zip(self.counts[1:], self.costs[1:], strict=True),
                                    strict=False):
            if a <= count <= b:
                return ca + (cb - ca) * (count - a) / (b - a)
        return self.costs[0]  # count == 0 with a single point


def allocate_counts(curves: list[CostCurve], total: int) -> list[int]:
    """Per-block counts summing to ``total`` with the least summed cost (ties: the first
    found scanning blocks in order and counts upwards); refuses a total no allocation reaches."""
    reach = sum(c.limit for c in curves)
    if not 0 <= total <= reach:
        raise SnapPruneError(f"removing {total} units exceeds what the blocks may lose "
                             f"({reach}); lower the fraction")
    inf = float("inf")
    best = torch.full((total + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices: list[torch.Tensor] = []
    for curve in curves:
        table = torch.tensor([curve.at(k) for k in range(curve.limit + 1)],
                             dtype=torch.float64)
        # candidate[j, k]: reaching j units in all with k of them from this block
        j = torch.arange(total + 1)[:, None]
        k = torch.arange(curve.limit + 1)[None, :]
        before = torch.where(j - k >= 0, best[(j - k).clamp(min=0)],
                             torch.tensor(inf, dtype=torch.float64))
        candidate = before + table[None, :]
        best, pick = candidate.min(dim=1)  # min returns the first minimum: the lowest k
        choices.append(pick)
    counts = []
    left = total
    for pick in reversed(choices):
        k = int(pick[left])
        counts.append(k)
        left -= k
    return counts[::-1]
