"""The shared rule of the methods without updates: score once, zero the mask, keep the rest."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..masks import nm_mask
from ..problem import LayerProblem

UnstructuredRule = Callable[[torch.Tensor, int], torch.Tensor]
"""``(scores, k) -> mask`` with exactly ``k`` entries: how the method compares weights."""


def prune_fixed_mask(problem: LayerProblem, unstructured: UnstructuredRule) -> torch.Tensor:
    """Pick the mask from the scores of the original weights, zero it, update nothing."""
    w, pat = problem.weight, problem.pattern
    scores = problem.scores(w)
    if pat.kind == "nm":
        mask = nm_mask(scores, pat.n, pat.m)
    elif pat.kind == "structured":
        mask = problem.structured_choice(scores).full()
    else:
        mask = unstructured(scores, problem.target_total)
    w[mask] = 0.0
    return mask
