"""Streaming calibration statistics of one linear layer's inputs."""

from __future__ import annotations

import torch

from ..errors import SnapPruneError


class LayerStats:
    """Accumulates ``H = 2/N · Σ x xᵀ`` and ``‖x_j‖²/N`` over batches of layer inputs.

    Raw sums are kept and divided by ``N`` only when read, so any split of the same token vectors
    into batches gives the same statistics (up to float summation order). ``hessian=False``
    keeps the norms only (for Wanda without layer errors: no ``columns²`` matrix, no products).
    """

    def __init__(
        self,
        columns: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        hessian: bool = True,
    ) -> None:
        if columns <= 0:
            raise SnapPruneError(f"LayerStats needs a positive column count, got {columns}")
        if dtype not in (torch.float32, torch.float64):
            raise SnapPruneError("LayerStats accumulates in float32 or float64; pass one of them")
        self.columns = columns
        self.dtype = dtype
        self._xxt = (torch.zeros(columns, columns, dtype=dtype, device=device) if hessian
                     else None)
        self._sq = torch.zeros(columns, dtype=dtype, device=device)
        self.nsamples = 0

    @property
    def device(self) -> torch.device:
        return self._sq.device

    @property
    def has_hessian(self) -> bool:
        return self._xxt is not None

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs of shape ``(..., columns)``; every leading index is a token."""
        if x.shape[-1] != self.columns:
            raise SnapPruneError(
                f"input has {x.shape[-1]} features but the layer has {self.columns} columns"
            )
        x = x.reshape(-1, self.columns).to(device=self.device, dtype=self.dtype)
        sq = (x * x).sum(0)
        # Any NaN/Inf in x shows in its column's sum of squares: a cheap, complete check.
        if not torch.isfinite(sq).all():
            raise SnapPruneError(
                "calibration activations contain NaN or Inf; check the model's weights and dtype "
                "(try --dtype float32)"
            )
        if self._xxt is not None:
            self._xxt.addmm_(x.T, x)
        self._sq += sq
        self.nsamples += x.shape[0]

    def _require_samples(self) -> None:
        if self.nsamples == 0:
            raise SnapPruneError(
                "no calibration inputs were added to LayerStats; call .add(x) first"
            )

    @property
    def hessian(self) -> torch.Tensor:
        """``H = 2/N · Σ x xᵀ`` (``columns × columns``)."""
        self._require_samples()
        if self._xxt is None:
            raise SnapPruneError("these statistics were gathered without the Hessian "
                                 "(hessian=False); gather them again with it")
        return self._xxt * (2.0 / self.nsamples)

    @property
    def sq_norms(self) -> torch.Tensor:
        """Mean squared input per column, ``Σ x_j² / N``."""
        self._require_samples()
        return self._sq / self.nsamples

    @classmethod
    def from_inputs(cls, x: torch.Tensor, **kwargs) -> LayerStats:
        """Statistics of one tensor of inputs, for tests and one-off use."""
        stats = cls(x.shape[-1], **kwargs)
        stats.add(x)
        return stats
