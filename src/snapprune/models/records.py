"""What a block-wise run did: one record per layer, and where the time and memory went."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    sparsity: float
    error: float
    """Relative reconstruction error ``‖(Ŵ−W)X‖² / ‖WX‖²``; NaN when not measured."""
    seconds: float
    role: str = ""
    percdamp: float | None = None
    """Damping the factorisation used: the request, or more if it had to be raised."""


@dataclass
class RunRecord:
    """Fields every block-wise run shares (pruning, shrinking, quantising)."""

    layers: list[LayerRecord] = field(default_factory=list)
    calibration_seconds: float = 0.0
    solver_seconds: float = 0.0
    total_seconds: float = 0.0
    peak_memory_bytes: int = 0
    activations: str = ""
    """Where the calibration activations lived between blocks ("" when none were needed)."""
    activation_bytes: int = 0
    """Size of this process's calibration activations (one block's inputs)."""
    layer_errors: bool = True
    """Whether each layer's reconstruction error was computed (else NaN)."""
    deterministic: bool = False
    """Whether the run was in deterministic mode (``engine.determinism``): bit-identical for
    any thread, batch or process count."""
    ranks: list[dict] = field(default_factory=list)
    """Per process under ``torchrun``: its rank, activations, solver and calibration seconds,
    peak memory (empty for one process)."""
    architecture: dict = field(default_factory=dict)
    experts: dict[int, list[dict]] = field(default_factory=dict)
    """Per block of a mixture of experts: each expert's routed calibration tokens and where
    its statistics came from (``experts.gather_with_experts``)."""
    data_seconds: float = 0.0
    """Making the calibration token ids (reading and tokenising the text), once per
    workbench."""

    @property
    def achieved_sparsity(self) -> float:
        """Removed weights (by the masks) over weights, across the recorded layers."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0


def mean_layer_error(layers: list[LayerRecord]) -> float | None:
    """The mean of the layers' measured reconstruction errors (``None`` when none was)."""
    errors = [r.error for r in layers if math.isfinite(r.error)]
    return sum(errors) / len(errors) if errors else None
