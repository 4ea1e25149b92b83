"""What the structure search aims at: one budget (parameters, GGUF size or decode speed) and
how widely it looks (``steps.search``; the costs in ``models.structure_budget``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..engine import get_method
from ..engine.mixes import PLAIN_EMBEDDING_TYPE
from ..engine.schemes import parse_scheme
from ..errors import SnapPruneError
from .settings import DEPTH_SCORES, WIDTH_ALLOCATIONS

BUDGETS = {"target_params": "params", "target_size": "bytes", "target_decode": "read"}
"""Each target field and the currency it limits (``structure_budget.Cost``)."""


@dataclass(frozen=True)
class SearchSettings:
    """A budget, exactly one of: ``target_params`` (a count, or a fraction of the dense
    model's below 1), ``target_size`` (MB of the GGUF file with every decoder matrix at
    ``gguf_type``), ``target_decode`` (× the dense model's decode speed, by the bytes read per
    token at ``gguf_type``). The search tries ``points`` removed-block counts, and for each
    ``points`` removed-attention counts (``attention`` off: none), the MLP width filling the
    rest of the budget (at most ``max_mlp`` of the neurons removed); with ``heads``, each of
    those also with 1 … all-but-one query heads removed per key/value group; each structure is
    cut with
    ``method`` (depth scored by ``score``, widths by ``allocation``), repaired, and scored by
    its loss on ``windows`` calibration windows it was not cut on; the least loss wins."""

    target_params: float | None = None
    target_size: float | None = None
    target_decode: float | None = None
    gguf_type: str | None = None
    embedding_type: str | None = None
    """The type the token embedding and output matrix are counted in (default: a quantize
    step's ``embedding_type`` in the same job, else ``q8_0`` as a plain type writes them)."""
    method: str = "thanos"
    score: str = "angular"
    allocation: str = "uniform"
    points: int = 3
    attention: bool = True
    heads: bool = False
    max_mlp: float = 0.75
    windows: int = 8
    multiple_of: int = 32

    kind: ClassVar[str] = "search"
    needs_calibration: ClassVar[bool] = True

    @property
    def pattern(self) -> str:
        return "structure"

    @property
    def target(self) -> tuple[str, float]:
        """``(currency, value)`` of the one target given."""
        for name, currency in BUDGETS.items():
            value = getattr(self, name)
            if value is not None:
                return currency, value
        raise SnapPruneError("give a target: target_params, target_size or target_decode")

    def counting_type(self, quantize_scheme: str | None) -> str:
        """The llama.cpp type sizes are counted in: this setting, else the job's quantisation
        type, else ``q4_0``."""
        return self.gguf_type or quantize_scheme or "q4_0"

    def embedding_counting_type(self, quantize_embedding: str | None) -> str:
        """The llama.cpp type the embedding and output matrix are counted in."""
        return self.embedding_type or quantize_embedding or PLAIN_EMBEDDING_TYPE

    def resolved(self) -> SearchSettings:
        self.check()
        return self

    def check(self) -> None:
        given = [name for name in BUDGETS if getattr(self, name) is not None]
        if len(given) != 1:
            raise SnapPruneError("give exactly one target: --target-params N (or a fraction), "
                                 "--target-size MB or --target-decode X")
        value = getattr(self, given[0])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value <= 0:
            raise SnapPruneError(f"{given[0]} must be a positive number, got {value!r}")
        if self.target_decode is not None and self.target_decode <= 1:
            raise SnapPruneError(f"target_decode is a speed-up over the dense model: more "
                                 f"than 1, got {self.target_decode!r}")
        for name in ("gguf_type", "embedding_type"):
            value = getattr(self, name)
            scheme = parse_scheme(value) if value is not None else None
            if scheme is not None and (not scheme.gguf or scheme.block is None):
                raise SnapPruneError(f"{name} {value} is not a llama.cpp block type; sizes "
                                     "are counted in one (q4_0, q8_0, iq4_nl, ...)")
        get_method(self.method)
        if self.score not in DEPTH_SCORES:
            raise SnapPruneError(f"unknown block score {self.score!r}; choose one of "
                                 f"{', '.join(DEPTH_SCORES)}")
        if self.allocation not in WIDTH_ALLOCATIONS:
            raise SnapPruneError(f"unknown allocation {self.allocation!r}; choose one of "
                                 f"{', '.join(WIDTH_ALLOCATIONS)}")
        for name, low in (("points", 1), ("windows", 1), ("multiple_of", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SnapPruneError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.max_mlp, (int, float)) or not 0 < self.max_mlp < 1:
            raise SnapPruneError(f"max_mlp (the most of the MLP neurons removed) must be in "
                                 f"(0, 1), got {self.max_mlp!r}")
        if not isinstance(self.attention, bool):
            raise SnapPruneError(f"attention must be true or false, got {self.attention!r}")
        if not isinstance(self.heads, bool):
            raise SnapPruneError(f"heads must be true or false, got {self.heads!r}")
