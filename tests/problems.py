"""Small random pruning problems and brute-force references, shared by the engine tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snapprune import LayerStats


@dataclass
class Problem:
    weight: torch.Tensor  # rows × cols, float32
    inputs: torch.Tensor  # N × cols, float32
    stats: LayerStats


def make_problem(rows: int, cols: int, tokens: int = 256, seed: int = 0) -> Problem:
    """Correlated inputs whose columns differ in scale by up to ~two orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    scales = torch.exp(1.2 * torch.randn(cols, generator=gen))
    x = (torch.randn(tokens, cols, generator=gen) @ mixing) * scales
    w = torch.randn(rows, cols, generator=gen)
    return Problem(w, x, LayerStats.from_inputs(x, dtype=torch.float64))


def damped_design(x: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``A`` with ``AᵀA = 2XᵀX/N + λI``: the damped least-squares problem as a tall matrix."""
    x = x.double()
    n, cols = x.shape
    scaled = x * (2.0 / n) ** 0.5
    lam = percdamp * scaled.square().sum(0).mean()
    return torch.cat([scaled, lam.sqrt() * torch.eye(cols, dtype=torch.float64)])


def lstsq_optimum(w: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, percdamp: float):
    """Each row's optimum with its masked weights forced to zero, by ``lstsq`` on kept columns."""
    a = damped_design(x, percdamp)
    w = w.double()
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        keep = ~mask[r]
        if keep.any():
            target = a @ w[r]
            out[r, keep] = torch.linalg.lstsq(a[:, keep], target[:, None]).solution[:, 0]
    return out


def damped_hessian64(x: torch.Tensor, percdamp: float) -> torch.Tensor:
    a = damped_design(x, percdamp)
    return a.T @ a


def relative_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> float:
    """Largest row-wise relative difference, for messages."""
    diff = (actual.double() - expected.double()).norm(dim=1)
    scale = expected.double().norm(dim=1).clamp_min(1e-12)
    worst = (diff / scale).max().item()
    assert worst <= tol, f"relative difference {worst:.3g} exceeds {tol}"
    return worst
