"""llama.cpp's block types: blocks of 32 weights with float16 scales, every fact about each
type (its levels, its data-free scale formula, its byte layout) declared once, on its class.

A type is a subclass of ``BlockType``; defining it registers it (``BLOCK_TYPES``), as gguf-py
registers its quantisation classes. Two shapes of grid:

- **symmetric** (``q4_0``, ``q5_0``, ``q8_0``, ``iq4_nl``): value ``d · level(code)`` with one
  float16 scale ``d`` a block; the levels are the integers ``code - offset``, or, for
  ``iq4_nl``, llama.cpp's 16 non-linear levels.
- **affine** (``q4_1``, ``q5_1``): value ``code · d + m`` with a float16 minimum ``m`` (zero is
  generally not on the grid).

``fit`` is the data-free formula (llama.cpp's reference quantiser without an importance
matrix). ``search`` picks each block's scale (and minimum) to minimise the error weighted by an
importance per column, ``Σ_j v_j (w_j - q_j)²`` with ``v`` the Hessian diagonal (the mean
squared input of each column, what llama.cpp's ``--imatrix`` holds): candidates around the
formula's scale, each re-fitted in closed form (weighted least squares for the codes it
gives), the formula's own scale among them, so the search is never worse than the formula.
Codes are always rounded on the stored float16 grid, so what llama.cpp reads is exactly what
was chosen.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

BLOCK = 32
"""Values per llama.cpp quantisation block (the legacy types and ``iq4_nl``)."""
SEARCH_STEPS = torch.linspace(-0.3, 0.3, 31).tolist()
"""Relative changes of the formula's scale tried by ``search`` (each then re-fitted)."""

BLOCK_TYPES: dict[str, BlockType] = {}
"""Every block type, by the name users know (``q4_0``, ``iq4_nl``, ...)."""


class Params:
    """A block's grid, per row: ``scale`` ``d`` and, for affine types, the minimum ``m``."""

    __slots__ = ("scale", "zero")

    def __init__(self, scale: torch.Tensor, zero: torch.Tensor | None = None) -> None:
        self.scale, self.zero = scale, zero


def half(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float16 stores it, back in float32."""
    return x.to(torch.float16).to(torch.float32)


def divide(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w / scale`` with 0 where the scale is 0 (llama.cpp's ``id = d ? 1/d : 0``)."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(scale == 0, torch.zeros_like(w), w / safe)


def signed_max(w: torch.Tensor) -> torch.Tensor:
    """Per row, the value of largest magnitude, sign kept (the first of equal magnitudes)."""
    return w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1)


class BlockType:
    """One llama.cpp block type. Subclasses declare the class attributes and, where the
    default does not describe them, ``level``/``nearest``/``formula``/``pack``."""

    name: ClassVar[str]
    gguf_type: ClassVar[str]
    """gguf-py's ``GGMLQuantizationType`` member."""
    bits: ClassVar[int]
    qmin: ClassVar[int] = 0
    qmax: ClassVar[int]
    offset: ClassVar[int] = 0
    """Symmetric linear types: the code of level 0 (``level = code - offset``)."""
    affine: ClassVar[bool] = False
    block_bytes: ClassVar[int]
    extremes: ClassVar[tuple[int, ...]]
    """Levels the block's value of largest magnitude may be mapped to by the search."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            BLOCK_TYPES[cls.name] = cls()

    def __repr__(self) -> str:
        return f"<block type {self.name}>"

    # -- facts ----------------------------------------------------------------------------

    @property
    def block(self) -> int:
        return BLOCK

    @property
    def file_type(self) -> str:
        """gguf-py's ``LlamaFileType`` member of a file mostly of this type."""
        return f"MOSTLY_{self.gguf_type}"

    @property
    def span(self) -> int:
        """Weights one fit sees at once: a block (a super-block for the K-quants)."""
        return BLOCK

    @property
    def subs(self) -> int:
        """Groups (blocks with their own scale) in one span."""
        return 1

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / self.span

    @property
    def exact_zero(self) -> bool:
        """Whether 0 is a point of every block's grid (pruned weights can stay exactly 0)."""
        return not self.affine

    # -- the grid ---------------------------------------------------------------------------

    def level(self, codes: torch.Tensor) -> torch.Tensor:
        """Symmetric types: the multiple of ``d`` that ``codes`` stand for."""
        return codes - self.offset

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Symmetric types: the code whose level is nearest ``x`` (halves to even)."""
        return torch.clamp(x.round() + self.offset, self.qmin, self.qmax)

    def formula(self, w: torch.Tensor) -> Params:
        """The data-free grid of each row of ``w`` (unrounded scale)."""
        raise NotImplementedError

    def fit(self, w: torch.Tensor) -> Params:
        """The data-free grid (llama.cpp's formula), as float16 stores it."""
        p = self.formula(w.to(torch.float32))
        return Params(half(p.scale), None if p.zero is None else half(p.zero))

    def codes(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        """Nearest codes (float tensor of integers); ``params`` hold one value per row."""
        scale = params.scale[..., None]
        if self.affine:
            raw = divide(w - params.zero[..., None], scale)
            return torch.clamp(raw.round(), self.qmin, self.qmax)
        return self.nearest(divide(w, scale))

    def values(self, codes: torch.Tensor, params: Params) -> torch.Tensor:
        scale = params.scale[..., None].to(torch.float32)
        if self.affine:
            return codes * scale + params.zero[..., None]
        return self.level(codes) * scale

    def zero_code(self, params: Params) -> torch.Tensor:
        """Per row, the code whose value is exactly 0 (``exact_zero`` types only)."""
        return torch.full_like(params.scale, float(self.offset))

    # -- the weighted search ----------------------------------------------------------------

    def weighted_error(self, w: torch.Tensor, params: Params,
                       importance: torch.Tensor) -> torch.Tensor:
        """Per row, ``Σ_j v_j (w_j - q_j)²`` with ``q`` the nearest grid values."""
        error = w - self.values(self.codes(w, params), params)
        return (error * error * importance).sum(-1)

    def search(self, w: torch.Tensor, importance: torch.Tensor) -> Params:
        """Each row's grid minimising the ``importance``-weighted error (float16-stored),
        never worse than ``fit``'s: ``w`` rows × 32, ``importance`` (32,), non-negative."""
        w = w.to(torch.float32)
        v = importance.to(torch.float32, copy=False).clamp(min=0)
        base = self.fit(w)
        candidates = [self._refit(w, self._start(w, extreme, step), v)
                      for extreme in self.extremes for step in SEARCH_STEPS]
        best, best_error = base, self.weighted_error(w, base, v)
        for candidate in candidates:
            error = self.weighted_error(w, candidate, v)
            better = error < best_error
            best = Params(torch.where(better, candidate.scale, best.scale),
                          None if best.zero is None else
                          torch.where(better, candidate.zero, best.zero))
            best_error = torch.where(better, error, best_error)
        return best

    def _start(self, w: torch.Tensor, extreme: int, step: float) -> Params:
        """A candidate before its refit: the largest magnitude mapped near ``extreme``."""
        if self.affine:
            low, high = w.min(-1).values, w.max(-1).values
            return Params((high - low) / (extreme + step * extreme), low)
        return Params(signed_max(w) / (extreme * (1 + step)))

    def _refit(self, w: torch.Tensor, start: Params, v: torch.Tensor) -> Params:
        """For the codes ``start`` gives, the weighted least-squares scale (and minimum),
        float16-stored."""
        codes = self.codes(w, Params(half(start.scale),
                                     None if start.zero is None else half(start.zero)))
        if not self.affine:
            level = self.level(codes)
            top, bottom = (v * level * w).sum(-1), (v * level * level).sum(-1)
            scale = torch.where(bottom > 0, top / torch.where(bottom > 0, bottom, 1.0),
                                start.scale)
            return Params(half(scale))
        # [[Σv c², Σv c], [Σv c, Σv]] [d, m] = [Σv c w, Σv w]
        a, b, n = (v * codes * codes).sum(-1), (v * codes).sum(-1), v.sum(-1)
        cw, sw = (v * codes * w).sum(-1), (v * w).sum(-1)
        det = a * n - b * b
        ok = det > 1e-12 * (a * n).clamp(min=1e-30)
        safe = torch.where(ok, det, 1.0)
        scale = torch.where(ok, (cw * n - b * sw) / safe, start.scale)
        minimum = torch.where(ok, (a * sw - b * cw) / safe, start.zero)
        return Params(half(scale), half(minimum))

    # -- the grid as a linear function of its stored numbers (engine/refit.py) ----------------

    def linear_form(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    supers: torch.Tensor | None = None):
        """With ``codes`` fixed, the values are ``Σ_k θ_k B_k`` per block: the bases ``B``
        (rows × cols: the levels, and ones for the minimum), the current ``θ`` (rows ×
        k·blocks) and the span of one unknown."""
        c = codes.to(torch.float32)
        level = c if self.affine else self.level(c)
        if not self.affine:
            return [level], scales, self.span
        return [level, torch.ones_like(level)], torch.cat([scales, zeros], 1), self.span

    def from_linear(self, theta: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor | None, supers: torch.Tensor | None = None):
        """``(scales, zeros, supers)`` from a solved ``θ``, float16-stored."""
        blocks = scales.shape[1]
        return half(theta[:, :blocks]), (half(theta[:, blocks:]) if self.affine else None), None

    # -- bytes --------------------------------------------------------------------------------

    def pack(self, codes: torch.Tensor, scales: torch.Tensor,
             zeros: torch.Tensor | None, supers: torch.Tensor | None = None) -> np.ndarray:
        """``rows × cols`` codes and ``rows × blocks`` scales (and minima) as llama.cpp's
        blocks, ``rows × (blocks · block_bytes)`` bytes."""
        rows, cols = codes.shape
        blocks = cols // BLOCK
        c = codes.to(torch.int32).reshape(rows, blocks, BLOCK).numpy()
        parts = [_float16_bytes(scales, rows, blocks)]
        if self.affine:
            parts.append(_float16_bytes(zeros, rows, blocks))
        if self.bits == 8:
            parts.append(c.astype(np.int8).view(np.uint8))
        else:
            if self.bits == 5:  # the fifth bits: bit j of a little-endian uint32 for code j
                high = ((c >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
                parts.append(high.sum(-1, dtype=np.uint32).astype("<u4")[..., None]
                             .view(np.uint8))
            low = c & 0xF  # byte j: code j in its low nibble, code j + 16 in its high
            parts.append((low[..., :16] | (low[..., 16:] << 4)).astype(np.uint8))
        data = np.concatenate(parts, axis=2)
        assert data.shape[2] == self.block_bytes
        return data.reshape(rows, -1)


def _float16_bytes(x: torch.Tensor, rows: int, blocks: int) -> np.ndarray:
    return x.to(torch.float16).numpy().reshape(rows, blocks, 1).view(np.uint8)


class Q4_0(BlockType):
    name, gguf_type, bits = "q4_0", "Q4_0", 4
    qmax, offset, block_bytes = 15, 8, 18
    extremes = (-8, 7)

    def formula(self, w):  # d = m / -8, m the value of largest magnitude
        return Params(signed_max(w) / -8.0)


class Q5_0(BlockType):
    name, gguf_type, bits = "q5_0", "Q5_0", 5
    qmax, offset, block_bytes = 31, 16, 22
    extremes = (-16, 15)

    def formula(self, w):
        return Params(signed_max(w) / -16.0)


class Q8_0(BlockType):
    name, gguf_type, bits = "q8_0", "Q8_0", 8
    qmin, qmax, block_bytes = -128, 127, 34
    extremes = (127, -128)

    def formula(self, w):  # d = max|w| / 127
        return Params(w.abs().max(-1).values / 127.0)


class Q4_1(BlockType):
    name, gguf_type, bits = "q4_1", "Q4_1", 4
    qmax, affine, block_bytes = 15, True, 20
    extremes = (15,)

    def formula(self, w):  # d = (max - min) / 15, m = min
        low, high = w.min(-1).values, w.max(-1).values
        return Params((high - low) / 15.0, low)


class Q5_1(BlockType):
    name, gguf_type, bits = "q5_1", "Q5_1", 5
    qmax, affine, block_bytes = 31, True, 24
    extremes = (31,)

    def formula(self, w):
        low, high = w.min(-1).values, w.max(-1).values
        return Params((high - low) / 31.0, low)


IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
"""llama.cpp's 16 non-linear levels of ``iq4_nl`` (``kvalues_iq4nl``)."""


class IQ4_NL(BlockType):
    """Blocks of 32, 4-bit codes into 16 non-linear levels (denser near 0), one scale."""

    name, gguf_type, bits = "iq4_nl", "IQ4_NL", 4
    qmax, block_bytes = 15, 18
    extremes = (-127, 113)
    _levels = torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32)
    _midpoints = (_levels[1:] + _levels[:-1]) / 2

    @property
    def exact_zero(self) -> bool:
        return False  # no level is 0 (the nearest is 1 · d)

    def level(self, codes):
        return self._levels.to(codes.device)[codes.long()]

    def nearest(self, x):  # ties (exact midpoints, all odd/2) go to the upper level
        return torch.bucketize(x, self._midpoints.to(x.device), right=True).to(torch.float32)

    def formula(self, w):  # d = m / -127: the value of largest magnitude on the lowest level
        return Params(signed_max(w) / -127.0)

    def zero_code(self, params):
        raise ValueError("iq4_nl has no exact zero")
