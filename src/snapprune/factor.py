"""The Hessian's damping and its one factorisation per layer."""

from __future__ import annotations

import torch

from .errors import SnapPruneError


def damped_hessian(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(H + λI, dead)`` in float32, with ``λ = percdamp · mean(diag H)``.

    A column whose input is always zero (``H_jj = 0``) gets ``H_jj = 1`` first: it is decoupled
    from every other column, so the factorisation stays positive definite and no update ever
    reaches it. ``dead`` flags those columns.
    """
    if not torch.isfinite(hessian).all():
        raise SnapPruneError(
            "calibration statistics contain NaN or Inf; check the model's activations "
            "(try float32 calibration)"
        )
    if percdamp < 0:
        raise SnapPruneError(f"percdamp must be >= 0, got {percdamp}")
    h = hessian.to(torch.float32).clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * diag.mean()
    return h, dead


def inverse_cholesky_upper(damped: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``), computed once per layer.

    Rows ``i1:i2`` of the inverse of any trailing block ``H[i1:, i1:]`` are then
    ``U[i1:i2, i1:i2]ᵀ U[i1:i2, i1:]`` (DESIGN.md §2), so no second inverse is ever needed.
    Falls back to float64 when float32 round-off breaks positive definiteness.
    """
    for dtype in (torch.float32, torch.float64):
        h = damped.to(dtype)
        lower, info = torch.linalg.cholesky_ex(h)
        if info.item() != 0:
            continue
        hinv = torch.cholesky_inverse(lower)
        upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
        if info.item() == 0 and torch.isfinite(upper).all():
            return upper.to(torch.float32)
    raise SnapPruneError(
        "the damped Hessian is not positive definite; raise percdamp (e.g. --percdamp 0.1) "
        "or use more calibration samples"
    )


def trailing_inverse_diagonal(upper: torch.Tensor, i1: int) -> torch.Tensor:
    """``diag((H[i1:, i1:])⁻¹)``: column sums of squares of ``U[i1:, i1:]``."""
    return upper[i1:, i1:].square().sum(0)
