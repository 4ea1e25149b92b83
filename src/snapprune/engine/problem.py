"""One layer's pruning problem: the weight, its statistics, the request, and the Hessian factor
computed at most once, on first use, for whichever method needs it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .factor import damped_hessian, inverse_cholesky_upper, trailing_inverse_diagonal
from .masks import Pattern, StructuredMask, structured_mask, target_count
from .scores import saliency
from .stats import LayerStats


@dataclass
class LayerProblem:
    """What a method's ``prune`` function receives. ``weight`` is a float32 working copy that
    methods zero (and update) in place; they return the mask (``True`` = removed)."""

    weight: torch.Tensor
    stats: LayerStats | None
    pattern: Pattern
    sparsity: float
    alpha: float
    blocksize: int
    percdamp: float
    metric: str
    max_solve_bytes: int
    choose_columns: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Structured only: ``scores -> removed columns`` chosen by the caller (whole width units,
    see ``width``) instead of the lowest columns for ``sparsity`` with ``alpha`` outliers."""
    damping_log: list[float] = field(default_factory=list)
    """Damping fractions tried by the factorisation, the last one used (see ``factor``)."""

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def cols(self) -> int:
        return self.weight.shape[1]

    @property
    def target_total(self) -> int:
        """Exact number of weights to remove for an unstructured request."""
        return target_count(self.sparsity, self.weight.numel())

    @cached_property
    def hessian(self) -> torch.Tensor:
        return self.stats.hessian.to(self.weight.device)

    @cached_property
    def _damped(self) -> tuple[torch.Tensor, torch.Tensor]:
        return damped_hessian(self.hessian, self.percdamp)

    @property
    def dead(self) -> torch.Tensor:
        """Input columns that were always zero in calibration (``H_jj = 0``, equivalently a
        zero mean square)."""
        if not self.stats.has_hessian:
            return self.sq_norms == 0
        return self._damped[1]

    @cached_property
    def upper(self) -> torch.Tensor:
        """Upper Cholesky factor of the damped ``H⁻¹`` (one factorisation per layer)."""
        upper, used = inverse_cholesky_upper(self._damped[0], self.hessian, self.percdamp)
        self.damping_log.append(used)
        return upper

    @cached_property
    def sq_norms(self) -> torch.Tensor | None:
        if self.stats is None:
            return None
        return self.stats.sq_norms.to(device=self.weight.device, dtype=torch.float32)

    def structured_choice(self, scores: torch.Tensor) -> StructuredMask:
        """The structured mask from scores of the whole layer: the caller's unit rule when
        given, else outlier rows and the lowest columns (``masks.structured_mask``)."""
        if self.choose_columns is not None:
            columns = self.choose_columns(scores)
            return StructuredMask(columns, torch.zeros(self.rows, dtype=torch.bool,
                                                       device=columns.device))
        return structured_mask(scores, self.sparsity, self.alpha)

    def scores(self, weight: torch.Tensor, i1: int = 0, *, hinv_diag=None) -> torch.Tensor:
        """Saliency of ``weight`` = columns ``i1 : i1 + weight.shape[1]`` of the layer.

        For the ``obs`` metric the denominator is ``[(H_FF)⁻¹]_jj`` with ``F = [i1, cols)``,
        the columns still free to compensate (see ``scores.saliency``), unless the caller
        passes its own ``hinv_diag`` (SparseGPT's per-column ``F = [j, cols)``).
        """
        i2 = i1 + weight.shape[1]
        needs_inverse = self.metric == "obs" and hinv_diag is None
        if needs_inverse:
            hinv_diag = trailing_inverse_diagonal(self.upper, i1)[: i2 - i1]
        sq = self.sq_norms[i1:i2] if self.sq_norms is not None else None
        dead = self.dead[i1:i2] if self.stats is not None else None
        return saliency(weight, self.metric, sq_norms=sq, hinv_diag=hinv_diag, dead=dead)
