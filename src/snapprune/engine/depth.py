"""The maths of removing whole decoder blocks: how much a block changes the residual stream,
how far a cut model's next-token distributions move, and the closed-form repair.

Tensors in, tensors out. The scores follow the depth-pruning literature: ShortGPT's block
influence (one minus the mean cosine of the stream before and after a block) and Gromov et
al.'s angular distance (``arccos`` of that cosine over π, in [0, 1]); a block whose output
points where its input did changes the model least. The measured alternative is the KL
divergence of the model's next-token distributions with the block skipped from the full
model's. The repair is least squares: the output projection that writes into the stream just
before a removed run of blocks is re-fitted so that the stream it leaves reproduces the full
model's stream *after* the removed run.
"""

from __future__ import annotations

import torch

from ..errors import SnapPruneError


def angular_distance(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per token: ``arccos(cos(before, after)) / π`` over the last axis, in [0, 1] (0: the
    block left the token's direction as it was). Computed in float64."""
    a, b = before.double(), after.double()
    cosine = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
    return torch.arccos(cosine.clamp(-1.0, 1.0)) / torch.pi


def kl_from_logits(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per position: ``KL(p_reference ‖ p_other)`` of the softmax distributions over the last
    axis, in nats, computed in float64 (the same measure as llama.cpp's ``--kl-divergence``)."""
    log_p = torch.log_softmax(reference.double(), dim=-1)
    log_q = torch.log_softmax(other.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class RepairProblem:
    """Accumulates the normal equations of ``min_Δ Σ_t ‖e_t − Δ a_t‖² + λ‖Δ‖²``.

    ``a_t``: the output projection's input (the MLP's hidden activations) for token ``t``;
    ``e_t``: the target stream minus the stream the block leaves now. The solution ``Δ`` is
    added to the projection's weight ``W`` (``out = W a``), so the block's output moves by
    ``Δ a_t`` towards the target: ``W' = W + Eᵀ A (AᵀA + λI)⁻¹``. The ridge term ``λ`` (a
    fraction ``percdamp`` of the mean diagonal of ``AᵀA``, as for the pruning Hessian) pulls
    the change towards zero where the calibration text says little. Sums in float64.
    """

    def __init__(self, inputs: int, outputs: int, device: torch.device | str | None = None):
        self.gram = torch.zeros(inputs, inputs, dtype=torch.float64, device=device)
        self.cross = torch.zeros(inputs, outputs, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, activations: torch.Tensor, residual: torch.Tensor) -> None:
        """One batch: ``activations`` ``(..., inputs)`` and ``residual`` ``(..., outputs)``
        (target minus current stream), token for token."""
        a = activations.reshape(-1, activations.shape[-1]).double()
        e = residual.reshape(-1, residual.shape[-1]).double()
        if a.shape[0] != e.shape[0]:
            raise SnapPruneError(f"repair: {a.shape[0]} activation rows for {e.shape[0]} "
                                 "residual rows")
        self.gram += a.T @ a
        self.cross += a.T @ e
        self.tokens += a.shape[0]

    def solve(self, percdamp: float) -> torch.Tensor:
        """``Δ`` (``outputs × inputs``, float64): the least-squares change of the weight."""
        if self.tokens == 0:
            raise SnapPruneError("repair: no calibration token reached the layer")
        diagonal = torch.diagonal(self.gram)
        damp = percdamp * diagonal.mean().clamp_min(1e-12)
        gram = self.gram + damp * torch.eye(self.gram.shape[0], dtype=torch.float64,
                                            device=self.gram.device)
        dead = diagonal == 0  # inputs no token used: keep their weights
        gram[dead, :] = 0
        gram[:, dead] = 0
        gram[dead, dead] = 1
        cross = self.cross.clone()
        cross[dead] = 0
        factor = torch.linalg.cholesky(gram)
        return torch.cholesky_solve(cross, factor).T


def residual_explained(before: float, after: float) -> float:
    """The share of the stream's squared error the repair removed (1: all of it)."""
    return 1.0 - after / before if before > 0 else 0.0
