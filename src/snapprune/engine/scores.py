"""Saliency scores that decide which weights go first (lower = removed earlier).

All three are returned in squared form, which ranks weights exactly as the published scores do
(squaring is monotone on non-negative scores) and can be summed over rows or columns for the
structured regime: Wanda ``(|W|·‖x‖)²``, magnitude ``W²``, OBS ``W² / [H⁻¹]_jj``.
"""

from __future__ import annotations

import torch

from ..errors import SnapPruneError

METRICS = ("wanda", "magnitude", "obs")


def saliency(
    weight: torch.Tensor,
    metric: str,
    *,
    sq_norms: torch.Tensor | None = None,
    hinv_diag: torch.Tensor | None = None,
    dead: torch.Tensor | None = None,
) -> torch.Tensor:
    """Element-wise saliency of ``weight`` (rows × cols); column vectors broadcast over rows.

    ``dead`` flags input columns that were always zero: removing their weights costs nothing on
    the calibration data, so the data-aware metrics score them 0 (OBS would not by itself, since
    the Hessian's fix ``H_jj = 1`` gives them a finite denominator).
    """
    w2 = weight.square()
    if metric == "magnitude":
        return w2
    if metric == "wanda":
        if sq_norms is None:
            raise SnapPruneError("the wanda metric needs calibration statistics (input norms)")
        return w2.mul_(sq_norms)
    if metric == "obs":
        if hinv_diag is None:
            raise SnapPruneError("the obs metric needs calibration statistics (the Hessian)")
        scores = w2.div_(hinv_diag)
        return scores if dead is None else scores.masked_fill(dead, 0.0)
    raise SnapPruneError(f"unknown mask metric {metric!r}; choose one of {', '.join(METRICS)}")
