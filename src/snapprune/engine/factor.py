"""The Hessian's damping and its one factorisation per layer."""

from __future__ import annotations

import warnings

import torch

from ..errors import SnapPruneError
from .determinism import whole_matrix_threads


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


MAX_PERCDAMP = 1.0
"""Damping is raised ×10 from the requested fraction up to this bound (100% of the mean
diagonal) before a layer is given up on."""


def _try_inverse_factor(damped: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor of ``damped⁻¹`` in float32 (float64 when float32 round-off breaks
    positive definiteness), or ``None`` when the matrix is not positive definite."""
    with whole_matrix_threads(damped.device):
        return _inverse_factor(damped)


def _inverse_factor(damped: torch.Tensor) -> torch.Tensor | None:
    for dtype in (torch.float32, torch.float64):
        h = damped.to(dtype)
        lower, info = torch.linalg.cholesky_ex(h)
        if info.item() != 0:
            continue
        hinv = torch.cholesky_inverse(lower)
        upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
        if info.item() == 0 and torch.isfinite(upper).all():
            return upper.to(torch.float32)
    return None


def inverse_cholesky_upper(
    damped: torch.Tensor, hessian: torch.Tensor | None = None, percdamp: float = 0.0
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``), computed once per layer, and the
    damping fraction actually used.

    Rows ``i1:i2`` of the inverse of any trailing block ``H[i1:, i1:]`` are then
    ``U[i1:i2, i1:i2]ᵀ U[i1:i2, i1:]`` (docs/engine.md), so no second inverse is ever needed.
    When ``damped`` is not positive definite and the undamped ``hessian`` is given, the damping
    is raised ×10 (up to ``MAX_PERCDAMP``) with one warning, rather than aborting a long run.
    """
    upper = _try_inverse_factor(damped)
    if upper is not None:
        return upper, percdamp
    if hessian is not None:
        tried = percdamp
        while tried < MAX_PERCDAMP:
            tried = min(MAX_PERCDAMP, tried * 10 if tried > 0 else 0.01)
            upper = _try_inverse_factor(damped_hessian(hessian, tried)[0])
            if upper is not None:
                warnings.warn(
                    f"damped Hessian not positive definite at percdamp {percdamp:g}; "
                    f"used {tried:g} for this layer (recorded in the report)",
                    RuntimeWarning, stacklevel=2)
                return upper, tried
    raise SnapPruneError(
        "the damped Hessian is not positive definite even at percdamp "
        f"{MAX_PERCDAMP:g}; use more calibration samples or exclude the layer"
    )


def trailing_inverse_diagonal(upper: torch.Tensor, i1: int) -> torch.Tensor:
    """``diag((H[i1:, i1:])⁻¹)``: column sums of squares of ``U[i1:, i1:]``."""
    return upper[i1:, i1:].square().sum(0)
