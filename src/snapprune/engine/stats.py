"""Streaming calibration statistics of one linear layer's inputs."""

from __future__ import annotations

import torch

from ..errors import SnapPruneError


class LayerStats:
    """Accumulates ``H = 2/N · Σ x xᵀ`` and ``‖x_j‖²/N`` over batches of layer inputs.

    Raw sums are kept and divided by ``N`` only when read, so any split of the same token vectors
    into batches gives the same statistics (up to float summation order). ``hessian=False``
    keeps the norms only (for Wanda without layer errors: no ``columns²`` matrix, no products).

    ``deterministic=True`` removes the "up to": each window (leading index of a 3-D batch; a
    2-D input is one window) is reduced on its own in ``dtype`` and added into float64 sums,
    which hold the float32 terms exactly unless one is below 2⁻²⁹ of the running sum — so the
    statistics do not depend on batching or on the split of windows over ranks
    (``determinism``). It costs a float64 accumulator and one ``columns²`` buffer.
    """

    def __init__(
        self,
        columns: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        hessian: bool = True,
        deterministic: bool = False,
    ) -> None:
        if columns <= 0:
            raise SnapPruneError(f"LayerStats needs a positive column count, got {columns}")
        if dtype not in (torch.float32, torch.float64):
            raise SnapPruneError("LayerStats accumulates in float32 or float64; pass one of them")
        self.columns = columns
        self.dtype = dtype
        self.deterministic = deterministic
        sums = torch.float64 if deterministic else dtype
        self._xxt = (torch.zeros(columns, columns, dtype=sums, device=device) if hessian
                     else None)
        self._sq = torch.zeros(columns, dtype=sums, device=device)
        self._product: torch.Tensor | None = None  # deterministic: one window's xᵀx
        self.nsamples = 0

    @property
    def device(self) -> torch.device:
        return self._sq.device

    @property
    def has_hessian(self) -> bool:
        return self._xxt is not None

    def add(self, x: torch.Tensor, windows: int | None = None) -> None:
        """Add a batch of inputs of shape ``(..., columns)``; every leading index is a token.

        ``windows``: how many calibration windows a 2-D ``x`` holds, equal-length and in order
        (OPT's MLP sees them flattened; a 3-D ``x`` is ``(windows, tokens, columns)``); only
        deterministic mode, which reduces each window on its own, needs it. Rows that do not
        split into ``windows`` equal parts are reduced as one part (no batch invariance then).
        """
        if x.shape[-1] != self.columns:
            raise SnapPruneError(
                f"input has {x.shape[-1]} features but the layer has {self.columns} columns"
            )
        if not self.deterministic:
            count = 1
        elif x.dim() >= 3:  # its own windows (a mixture's expert: one window's routed tokens)
            count = x[..., 0].numel() // x.shape[-2]
        else:
            count = windows or 1
        if x[..., 0].numel() % count:  # not whole windows
            count = 1
        parts = x.reshape(count, -1, self.columns).to(device=self.device, dtype=self.dtype)
        sq = (parts * parts).sum(1)
        # Any NaN/Inf in x shows in its column's sum of squares: a cheap, complete check.
        if not torch.isfinite(sq).all():
            raise SnapPruneError(
                "calibration activations contain NaN or Inf; check the model's weights and dtype "
                "(try dtype float32)"
            )
        for part, part_sq in zip(parts, sq, strict=True):
            self._add_window(part, part_sq)
        self.nsamples += parts.shape[0] * parts.shape[1]

    def _add_window(self, x: torch.Tensor, sq: torch.Tensor) -> None:
        if not self.deterministic:
            if self._xxt is not None:
                self._xxt.addmm_(x.T, x)
            self._sq += sq
            return
        if self._xxt is not None:
            if self._product is None:
                self._product = torch.empty(self.columns, self.columns, dtype=self.dtype,
                                            device=self.device)
            torch.mm(x.T, x, out=self._product)
            self._xxt += self._product
        self._sq += sq

    def set_hessian(self, hessian: torch.Tensor, sq_norms: torch.Tensor) -> None:
        """Statistics given directly (``H`` and ``‖x_j‖²/N``), e.g. a layer's restricted to
        the input columns that remain after others are cut out."""
        if hessian.shape != (self.columns, self.columns) or sq_norms.shape != (self.columns,):
            raise SnapPruneError(f"statistics of {self.columns} columns need a "
                                 f"{self.columns}² Hessian and {self.columns} norms")
        self.nsamples = 2
        self._xxt = hessian.to(device=self.device, dtype=self._sq.dtype).clone()
        self._sq = sq_norms.to(device=self.device, dtype=self._sq.dtype) * 2

    def sums(self) -> list[torch.Tensor]:
        """The raw sums (``Σ x²``, and ``Σ x xᵀ`` when gathered), which add up across
        processes: summing them in place over ranks (and ``nsamples``) gives the statistics
        of all ranks' inputs."""
        return [self._sq] + ([self._xxt] if self._xxt is not None else [])

    def finish(self) -> None:
        """Free the per-window product buffer once every input is in (adding more later
        allocates it again)."""
        self._product = None

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
        return (self._xxt * (2.0 / self.nsamples)).to(self.dtype)

    @property
    def sq_norms(self) -> torch.Tensor:
        """Mean squared input per column, ``Σ x_j² / N``."""
        self._require_samples()
        return (self._sq / self.nsamples).to(self.dtype)

    @classmethod
    def from_inputs(cls, x: torch.Tensor, **kwargs) -> LayerStats:
        """Statistics of one tensor of inputs, for tests and one-off use."""
        stats = cls(x.shape[-1], **kwargs)
        stats.add(x)
        return stats
