"""Width units: whole MLP neurons or attention heads, chosen from a layer's saliency.

A unit is ``unit_size`` consecutive input columns of the layer that consumes it (one column of
``down_proj`` per neuron, ``head_dim`` columns of ``o_proj`` per head). Units are split into
``groups`` equal consecutive groups (key/value groups under grouped-query attention) and the
same number is removed from each, so the model keeps a standard shape.
"""

from __future__ import annotations

import torch

from ..errors import SnapPruneError


def unit_scores(scores: torch.Tensor, unit_size: int) -> torch.Tensor:
    """A unit's saliency: the element scores summed over every row and the unit's columns."""
    cols = scores.shape[1]
    if cols % unit_size:
        raise SnapPruneError(f"{cols} columns do not split into units of {unit_size}")
    return scores.sum(0).reshape(cols // unit_size, unit_size).sum(1)


def lowest_units(scores: torch.Tensor, unit_size: int, per_group: int,
                 groups: int = 1) -> torch.Tensor:
    """Columns of the ``per_group`` lowest-scoring units of every group (ties: earlier unit)."""
    units = unit_scores(scores, unit_size)
    if units.numel() % groups:
        raise SnapPruneError(f"{units.numel()} units do not split into {groups} groups")
    size = units.numel() // groups
    if not 0 <= per_group < size:
        raise SnapPruneError(
            f"removing {per_group} of every {size} units would leave a group empty")
    order = torch.argsort(units.reshape(groups, size), dim=1, stable=True)[:, :per_group]
    removed = torch.zeros(groups, size, dtype=torch.bool, device=scores.device)
    removed.scatter_(1, order, True)
    return removed.reshape(-1).repeat_interleave(unit_size)
