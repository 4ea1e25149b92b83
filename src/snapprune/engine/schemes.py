"""Quantisation schemes: every fact about a weight grid, declared once.

A scheme fixes the integer codes' range, how the weights of one group (a row's run of
``group_size`` consecutive input columns; the whole row when ``group_size`` is ``None``) set
the group's scale (and zero point or minimum), and how codes map back to values. The
quantisers (GPTQ, round-to-nearest), the exporters and the report all read it from here.

Two families of grids:

- ``minmax`` (``w4g128``, ``w8``, ``w4g32-asym``, …): the formulas of compressed-tensors /
  llm-compressor, which vLLM serves. Symmetric: ``scale = max|w| / ((2^b - 1) / 2)``, codes in
  ``[-2^(b-1), 2^(b-1) - 1]``, value ``code · scale``. Asymmetric: the range is first widened to
  hold 0, ``scale = (max - min) / (2^b - 1)``, an integer zero point ``zp``, value
  ``(code - zp) · scale``. Zero is exactly on both grids.
- llama.cpp's block types (``q4_0``, ``q5_0``, ``q8_0``, ``iq4_nl``, ``q4_1``, ``q5_1``):
  blocks of 32 with float16 scales, each type declared once in ``engine.blocks`` (its levels,
  its formula, its bytes); a scheme of that name delegates its grid to the type. Their
  scales come from llama.cpp's formula, or, given an importance per column (``fit``'s
  ``importance``: the Hessian diagonal), from a search that minimises the weighted error.
  The K-quants and ``iq4_xs`` (``engine.kquants``) are the same with super-blocks of 256: a
  group is a sub-block (16 or 32 columns), but one fit (``fit_groups``) sees a whole
  super-block, since the sub-block scales are integers on the super-block's factor.

Codes are rounded to the nearest point of the stored grid (halves to even) and clamped to the
range, so a weight moved by GPTQ's error feedback past the group's range lands on its edge.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import SnapPruneError
from .blocks import BLOCK, BLOCK_TYPES, BlockType, Params, divide
from .kquants import SUPER_BLOCK_TYPES

GGUF_BLOCK = BLOCK
"""Values per llama.cpp quantisation block."""
FIT_BATCH = 1 << 16
"""Weights per batched fit on CPU (``Scheme.fit_all``): the search's tensors then stay in
cache and still amortise its per-call cost (larger batches measured slower per weight)."""


@dataclass(frozen=True)
class GroupParams:
    """A group's grid: ``scale`` (rows,) and, for asymmetric grids, ``zero`` (rows,): the
    integer zero point (minmax) or the float16 minimum (``q4_1``, ``q5_1``). A K-quant's
    sub-block also carries its super-block's float16 factors ``d`` and ``dmin`` (rows,), which
    its ``scale`` (``d · sc``) and ``zero`` (``−dmin · m``) are integer multiples of."""

    scale: torch.Tensor
    zero: torch.Tensor | None = None
    d: torch.Tensor | None = None
    dmin: torch.Tensor | None = None


@dataclass(frozen=True)
class Scheme:
    """A weight quantisation scheme. ``group_size`` ``None``: one group per output row
    (per-channel). ``grid``: ``minmax`` or a llama.cpp block type's name; ``block``: that
    type (``engine.blocks``), which then holds every fact of the grid."""

    name: str
    bits: int
    group_size: int | None
    symmetric: bool
    grid: str = "minmax"
    block: BlockType | None = None

    @property
    def gguf(self) -> bool:
        """One of llama.cpp's block types (blocks of 32, float16 scales)."""
        return self.block is not None

    @property
    def gguf_type(self) -> str | None:
        """gguf-py's ``GGMLQuantizationType`` member that stores this grid (``None``: not
        GGUF)."""
        return None if self.block is None else self.block.gguf_type

    @property
    def qmin(self) -> int:
        if self.block is not None:
            return self.block.qmin
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        if self.block is not None:
            return self.block.qmax
        return 2 ** (self.bits - 1) - 1

    @property
    def exact_zero(self) -> bool:
        """Whether 0 is a point of every group's grid (pruned weights can stay exactly 0)."""
        return True if self.block is None else self.block.exact_zero

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight, scales included (float16 scales; per-channel: ~b)."""
        if self.block is not None:
            return self.block.bits_per_weight
        if self.group_size is None:
            return float(self.bits)
        extra = 16 if self.symmetric else 16 + self.bits  # the integer zero point
        return self.bits + extra / self.group_size

    @property
    def searchable(self) -> bool:
        """Whether ``fit`` can search scales by an importance (llama.cpp's block types)."""
        return self.block is not None

    def groups(self, cols: int) -> int:
        """Groups per row: ``ceil(cols / group_size)`` (the last may be shorter)."""
        return 1 if self.group_size is None else math.ceil(cols / self.group_size)

    def group_width(self, cols: int) -> int:
        return cols if self.group_size is None else self.group_size

    def fit_width(self, cols: int) -> int:
        """Columns one fit sees: a group, or a whole super-block of groups (K-quants)."""
        if self.block is not None:
            return self.block.span
        return self.group_width(cols)

    def holds(self, cols: int) -> bool:
        """Whether rows of ``cols`` inputs are whole blocks (super-blocks) of this grid."""
        return self.block is None or cols % self.block.span == 0

    def check_width(self, cols: int, name: str = "this layer") -> None:
        """llama.cpp's blocks need whole blocks of 32 (super-blocks of 256) per row."""
        if not self.holds(cols):
            span = self.block.span
            fix = ("a mix (Q4_K_M, ...) or --target-size gives such rows llama.cpp's fallback "
                   "type" if span > GGUF_BLOCK else
                   f"shrink with multiple_of {GGUF_BLOCK} or 64")
            raise SnapPruneError(
                f"{self.name} quantises blocks of {span} inputs, but {name} has {cols}; "
                f"widths must be multiples of {span} ({fix})")

    # -- the grid -------------------------------------------------------------------------

    def fit_groups(self, w: torch.Tensor, scale_dtype: torch.dtype = torch.float16,
                   importance: torch.Tensor | None = None) -> list[GroupParams]:
        """The grids of the groups in one fit's columns (``fit_width``): one group, or a
        super-block's sub-blocks, fitted together."""
        if self.block is None or self.block.subs == 1:
            return [self.fit(w, scale_dtype, importance)]
        w = w.to(torch.float32)
        p = self.block.fit(w) if importance is None else self.block.search(w, importance)
        return [GroupParams(p.scale[:, j], None if p.zero is None else p.zero[:, j], p.d,
                            p.dmin) for j in range(self.block.subs)]

    def fit_all(self, w: torch.Tensor, scale_dtype: torch.dtype = torch.float16,
                importance: torch.Tensor | None = None) -> list[GroupParams]:
        """Every group's grid of ``w`` (rows × cols), in natural order: exactly what
        ``fit_groups`` gives span by span (``engine.gptq.group_params``). A block type fits
        each row of each span on its own, so the spans are a batch dimension: one search call
        for all of them (on CPU, per ``FIT_BATCH`` weights of rows) instead of one per span,
        since the search is many small tensor operations whose cost is more per call than
        per weight (``importance``: (cols,), each span gets its part)."""
        cols = w.shape[1]
        if self.block is None:  # compressed-tensors' formulas: cheap, and the last may be short
            width = self.group_width(cols)
            return [self.fit(w[:, start:start + width], scale_dtype,
                             None if importance is None else importance[start:start + width])
                    for start in range(0, cols, width)]
        self.check_width(cols)
        rows = w.shape[0]
        step = rows if w.is_cuda else max(1, FIT_BATCH // cols)
        parts = [self._fit_spans(w[r:r + step], importance) for r in range(0, rows, step)]
        return parts[0] if len(parts) == 1 else [_cat_rows(g) for g in zip(*parts, strict=True)]

    def _fit_spans(self, w: torch.Tensor, importance: torch.Tensor | None) -> list[GroupParams]:
        """``fit_all`` of a block type on some rows: the spans as a batch dimension."""
        cols, span = w.shape[1], self.block.span
        spans = w.to(torch.float32).reshape(w.shape[0], cols // span, span)
        p = self.block.fit(spans) if importance is None else self.block.search(
            spans, importance.reshape(cols // span, span))
        if self.block.subs == 1:  # Params: rows × spans
            return [GroupParams(p.scale[:, s], None if p.zero is None else p.zero[:, s])
                    for s in range(cols // span)]
        return [GroupParams(p.scale[:, s, j], None if p.zero is None else p.zero[:, s, j],
                            p.d[:, s], None if p.dmin is None else p.dmin[:, s])
                for s in range(cols // span) for j in range(self.block.subs)]

    def fit(self, w: torch.Tensor, scale_dtype: torch.dtype = torch.float16,
            importance: torch.Tensor | None = None) -> GroupParams:
        """The grid of each row of ``w`` (rows × group columns, float32). ``importance``
        (group columns,): the block types' scales searched to minimise the error weighted by
        it (``engine.blocks``); ``None``: the data-free formula."""
        w = w.to(torch.float32)
        if self.block is not None and self.block.subs > 1:
            raise ValueError(f"{self.name} fits whole super-blocks: use fit_groups")
        if self.block is not None:
            p = self.block.fit(w) if importance is None else self.block.search(w, importance)
            return GroupParams(p.scale, p.zero)
        if importance is not None:
            raise SnapPruneError(f"{self.name} takes compressed-tensors' scale formula; the "
                                 "scale search is for llama.cpp's block types")
        low = torch.clamp(w.min(1).values, max=0.0)
        high = torch.clamp(w.max(1).values, min=0.0)
        levels = 2**self.bits - 1
        if self.symmetric:
            scale = torch.maximum(low.abs(), high) / (levels / 2)
            return GroupParams(_rounded(scale, scale_dtype))
        scale = _rounded((high - low) / levels, scale_dtype)
        zero = torch.clamp(self.qmin - low / scale, self.qmin, self.qmax).round()
        return GroupParams(scale, zero)

    def codes(self, w: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """Nearest codes (float tensor of integers) of ``w`` (rows × k) on ``params``'
        grid; ``params`` hold one value per row."""
        if self.block is not None:
            return self.block.codes(w, Params(params.scale, params.zero))
        raw = divide(w, params.scale[:, None])
        if not self.symmetric:
            raw = raw + params.zero[:, None]
        return torch.clamp(raw.round(), self.qmin, self.qmax)

    def values(self, codes: torch.Tensor, params: GroupParams) -> torch.Tensor:
        """The weights ``codes`` stand for (float32)."""
        if self.block is not None:
            return self.block.values(codes, Params(params.scale, params.zero))
        scale = params.scale[:, None].to(torch.float32)
        if self.symmetric:
            return codes * scale
        return (codes - params.zero[:, None]) * scale

    def zero_code(self, params: GroupParams) -> torch.Tensor:
        """Per row, the code whose value is exactly 0 (``exact_zero`` grids only)."""
        if not self.exact_zero:
            raise SnapPruneError(f"{self.name}'s grid has no exact zero")
        if self.block is not None:
            return self.block.zero_code(Params(params.scale, params.zero))
        return torch.zeros_like(params.scale) if self.symmetric else params.zero


def _cat_rows(parts: tuple[GroupParams, ...]) -> GroupParams:
    """One group's grid from its grids on consecutive chunks of rows."""
    def cat(values: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if values[0] is None else torch.cat(values)  # type: ignore[arg-type]

    return GroupParams(torch.cat([p.scale for p in parts]), cat([p.zero for p in parts]),
                       cat([p.d for p in parts]), cat([p.dmin for p in parts]))


def _rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as stored in ``dtype``, back in float32; a zero scale (an all-zero group) becomes
    the dtype's smallest step, as compressed-tensors stores it, so codes stay finite."""
    stored = x.to(dtype).to(torch.float32)
    return torch.where(stored == 0, torch.tensor(torch.finfo(dtype).eps), stored)


assert set(SUPER_BLOCK_TYPES) <= set(BLOCK_TYPES)  # defined there, registered here
_NAMED = {name: Scheme(name, block.bits, block.block, not block.affine, name, block)
          for name, block in BLOCK_TYPES.items()}
_PATTERN = re.compile(r"^w(?P<bits>[2-8])(?:g(?P<group>\d+))?(?P<asym>-asym|-sym)?$")
BITS = (2, 3, 4, 8)
"""Bit widths of the ``minmax`` schemes (2 for ablations)."""


GGUF_SCHEMES = tuple(_NAMED)
"""llama.cpp's block types, by name."""


def parse_scheme(name: str) -> Scheme:
    """A scheme by the name users know: a llama.cpp block type (``q4_0``, ``iq4_nl``, ...), or
    ``w{bits}[g{group}][-asym]`` (``w4g128``, ``w8``, ``w4g32-asym``, ``w3g128``)."""
    if isinstance(name, Scheme):
        return name
    text = str(name).strip().lower()
    if text in _NAMED:
        return _NAMED[text]
    match = _PATTERN.match(text)
    if match is None:
        raise SnapPruneError(
            f"unknown quantisation scheme {name!r}; use {', '.join(GGUF_SCHEMES)}, or "
            "w<bits>[g<group>]"
            "[-asym] with bits in 2, 3, 4, 8 (e.g. w4g128, w8, w4g32-asym)")
    bits = int(match["bits"])
    if bits not in BITS:
        raise SnapPruneError(f"scheme {name!r}: {bits}-bit weights are not supported; use "
                             f"{', '.join(map(str, BITS))} bits")
    group = int(match["group"]) if match["group"] else None
    if group is not None and (group < 8 or group & (group - 1)):
        raise SnapPruneError(f"scheme {name!r}: group size {group} must be a power of two "
                             ">= 8 (32, 64, 128 are usual)")
    return Scheme(text, bits, group, match["asym"] != "-asym", "minmax")


SCHEME_NAMES = (*GGUF_SCHEMES, "w8", "w4g128", "w4g64", "w4g32", "w4g128-asym",
                "w3g128", "w2g64")
"""Examples for help texts (any ``w{bits}[g{group}][-asym]`` is accepted)."""
