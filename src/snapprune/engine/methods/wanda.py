"""Wanda (Sun et al., 2024): ``|W|·‖x‖``, compared within each output row, nothing updated."""

from ..masks import row_balanced_mask
from ..problem import LayerProblem
from ..registry import Method
from .fixed_mask import prune_fixed_mask


def prune(problem: LayerProblem):
    return prune_fixed_mask(problem, row_balanced_mask)


METHOD = Method(
    name="wanda",
    summary="|W|·‖x‖ compared within each output row, no update",
    default_metric="wanda",
    updates_weights=False,
    prune=prune,
)
