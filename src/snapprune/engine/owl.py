"""OWL's non-uniform layer-wise sparsity (Yin et al., 2024, "Outlier Weighed Layerwise
Sparsity"): blocks that hold more outlier weights keep more of them.

A weight's outlier score is Wanda's ``|W_ij| · ‖x_j‖`` (``‖x_j‖`` the input column's norm on
the calibration text). A block's outlier ratio is the share of its layers' scores above
``threshold`` × their mean (the scores of all its pruned layers taken together). The ratios
are mapped linearly onto densities spanning ``2 · lam`` (the fewest outliers at the low end),
shifted so that the blocks' sparsities average exactly the target (OWL's own mapping).
"""

from __future__ import annotations

import torch

from ..errors import SnapPruneError


def outlier_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's score of every weight (``rows × cols``): ``|W| · ‖x_j‖``."""
    return weight.abs().to(torch.float32) * sq_norms.to(weight.device,
                                                        torch.float32).sqrt()[None, :]


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    """The share of the scores (all tensors together) above ``threshold`` × their mean."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    return float((flat > threshold * flat.mean()).double().mean())


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-block sparsities averaging ``target``, spanning ``2 · lam`` by the outlier ratios;
    refuses a spread that would leave ``[0, 1)``."""
    if not lam >= 0:
        raise SnapPruneError(f"the OWL spread (lambda) must be >= 0, got {lam}")
    r = torch.tensor(ratios, dtype=torch.float64)
    if len(ratios) < 2 or r.max() == r.min():
        return [target] * len(ratios)
    density = (r - r.min()) / (r.max() - r.min()) * (2 * lam)
    sparsity = 1 - (density - density.mean() + (1 - target))
    if sparsity.min() < 0 or sparsity.max() >= 1:
        raise SnapPruneError(f"sparsity {target:g} spread by OWL lambda {lam:g} reaches "
                             f"{float(sparsity.min()):.3f}..{float(sparsity.max()):.3f}, "
                             "outside [0, 1); lower --owl-lambda")
    return sparsity.tolist()
