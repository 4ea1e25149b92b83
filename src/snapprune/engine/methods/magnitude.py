"""Magnitude pruning: the smallest ``|W|`` of the whole layer go, nothing is updated."""

from ..masks import lowest_k_mask
from ..problem import LayerProblem
from ..registry import Method
from .fixed_mask import prune_fixed_mask


def prune(problem: LayerProblem):
    return prune_fixed_mask(problem, lowest_k_mask)


METHOD = Method(
    name="magnitude",
    summary="|W|, lowest across the layer, no update (needs no calibration data)",
    default_metric="magnitude",
    updates_weights=False,
    prune=prune,
)
