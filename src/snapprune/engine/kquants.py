"""llama.cpp's super-block types: the K-quants (``q2_k`` … ``q6_k``) and ``iq4_xs``, every
fact about each declared once, on its class, registered beside the blocks of 32
(``engine.blocks.BLOCK_TYPES``).

A super-block holds 256 weights of a row in sub-blocks of 16 or 32. Each sub-block ``j`` has an
integer scale ``sc_j`` (4, 6 or 8 bits) and, for the affine types, an integer minimum ``m_j``;
the super-block has float16 factors ``d`` (and ``dmin``). llama.cpp reads a weight as

- affine (``q2_k``, ``q4_k``, ``q5_k``): ``(d · sc_j) · q − dmin · m_j``, ``q`` in ``[0, 2^b)``;
- symmetric (``q3_k``, ``q6_k``, ``iq4_xs``): ``(d · sc_j) · level(q)``, ``sc_j`` signed; the
  levels ``q − 2^(b−1)``, or llama.cpp's 16 non-linear ones for ``iq4_xs``.

So each sub-block is a grid of the kind ``engine.blocks`` knows (an effective scale ``d · sc_j``
and minimum ``−dmin · m_j``, both exact in float32), and GPTQ and rounding work on sub-blocks
as groups; only the fit sees the whole super-block. The fit: each sub-block's float grid first
(the formula, or ``BlockType.search`` weighted by the importance), then the integer sub-scales
on a float16 ``d`` (largest sub-scale to the widest integer, llama.cpp's rule), then, with an
importance, candidate ``d`` (and ``dmin``) around that one, each followed by a weighted
least-squares ``d`` (``dmin``) for the codes it gives; the formula's super-block among them, so
the search never returns a worse weighted error than the formula.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from .blocks import BLOCK_TYPES, BlockType, Params, divide, half, signed_max

QK_K = 256
"""Weights per super-block."""
D_STEPS = torch.linspace(-0.15, 0.15, 13).tolist()
"""Relative changes of the super-block factor tried by the search (each then re-fitted)."""


class SuperParams:
    """A super-block's grid, per row: effective sub-block ``scale`` and ``zero`` (rows × subs,
    the minimum as added: ``−dmin · m_j``), and the stored factors ``d`` (and ``dmin``)."""

    __slots__ = ("d", "dmin", "scale", "zero")

    def __init__(self, scale, zero, d, dmin) -> None:
        self.scale, self.zero, self.d, self.dmin = scale, zero, d, dmin


class _Grid(BlockType):
    """A sub-block's float grid (not registered: no ``name``)."""

    block_bytes = 0


class _Affine(_Grid):
    """``code · scale + zero`` with ``zero ≤ 0`` (llama.cpp stores ``−zero`` unsigned)."""

    affine = True

    def __init__(self, bits: int) -> None:
        self.bits, self.qmax = bits, 2**bits - 1
        self.extremes = (self.qmax,)

    def formula(self, w):
        low = w.min(-1).values.clamp(max=0.0)
        return Params((w.max(-1).values - low) / self.qmax, low)

    def search(self, w, importance):
        p = super().search(w, importance)
        return Params(p.scale, p.zero.clamp(max=0.0))


class _Symmetric(_Grid):
    """``(code − 2^(b−1)) · scale``; the value of largest magnitude on the lowest level."""

    def __init__(self, bits: int) -> None:
        self.bits, self.qmax, self.offset = bits, 2**bits - 1, 2 ** (bits - 1)
        self.extremes = (-self.offset, self.offset - 1)

    def formula(self, w):
        return Params(signed_max(w) / -float(self.offset))


class SuperBlockType(BlockType):
    """One llama.cpp super-block type; a subclass declares ``grid`` (a sub-block's grid),
    ``sub`` (its width), ``scale_bits`` and its byte layout (``pack``)."""

    grid: ClassVar[BlockType]
    sub: ClassVar[int]
    scale_bits: ClassVar[int]

    @property
    def block(self) -> int:
        return self.sub

    @property
    def span(self) -> int:
        return QK_K

    @property
    def subs(self) -> int:
        return QK_K // self.sub

    @property
    def affine(self) -> bool:  # type: ignore[override]
        return self.grid.affine

    @property
    def exact_zero(self) -> bool:
        return self.grid.exact_zero

    @property
    def qmin(self) -> int:  # type: ignore[override]
        return self.grid.qmin

    @property
    def qmax(self) -> int:  # type: ignore[override]
        return self.grid.qmax

    @property
    def offset(self) -> int:  # type: ignore[override]
        return self.grid.offset

    @property
    def scale_range(self) -> tuple[int, int]:
        """The integer sub-scales' range (signed for the symmetric types)."""
        if self.affine:
            return 0, 2**self.scale_bits - 1
        return -(2 ** (self.scale_bits - 1)), 2 ** (self.scale_bits - 1) - 1

    # -- one sub-block's grid: the sub-block grid's own rules ------------------------------

    def level(self, codes):
        return self.grid.level(codes)

    def nearest(self, x):
        return self.grid.nearest(x)

    def codes(self, w, params):
        return self.grid.codes(w, params)

    def values(self, codes, params):
        return self.grid.values(codes, params)

    def zero_code(self, params):
        return self.grid.zero_code(params)

    # -- the super-block fit ---------------------------------------------------------------

    def _split(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(-1, self.sub)

    def fit(self, w: torch.Tensor) -> SuperParams:  # type: ignore[override]
        """The data-free grid of each row of ``w`` (… × 256: any leading shape, e.g. rows ×
        super-blocks, each fitted on its own): each sub-block's formula, then the integer
        sub-scales on ``d`` = the largest over the widest integer."""
        lead = w.shape[:-1]
        w = w.to(torch.float32).reshape(-1, QK_K)
        rows = w.shape[0]
        p = self.grid.formula(self._split(w))
        scale = p.scale.reshape(rows, self.subs)
        zero = None if p.zero is None else p.zero.reshape(rows, self.subs)
        return _shaped(self._on_integers(scale, zero, *self._factors(scale, zero)), lead)

    def search(self, w: torch.Tensor, importance: torch.Tensor) -> SuperParams:  # type: ignore[override]
        """Each row's grid minimising the ``importance``-weighted error, never worse than
        ``fit``'s. ``w`` … × 256 (any leading shape: each row of each super-block fitted on
        its own, so a layer's super-blocks are searched in one call, in fewer and larger
        tensor operations); ``importance`` broadcast to ``w``: (256,), or per leading index
        (rows × super-blocks × 256 against (super-blocks, 256): each its own columns)."""
        lead = w.shape[:-1]
        w = w.to(torch.float32).reshape(-1, QK_K)
        rows = w.shape[0]
        v = importance.to(torch.float32).clamp(min=0).expand(*lead, QK_K).reshape(rows, QK_K)
        best = self.fit(w)
        best_error = self.weighted_error(w, best, v)
        p = self.grid.search(self._split(w), self._split(v))
        scale = p.scale.reshape(rows, self.subs)
        zero = None if p.zero is None else p.zero.reshape(rows, self.subs)
        d, dmin = self._factors(scale, zero)
        for step in D_STEPS:
            for min_step in (D_STEPS if self.affine else (0.0,)):
                candidate = self._on_integers(
                    scale, zero, d * (1 + step), None if dmin is None else dmin * (1 + min_step))
                candidate = self._refit_factors(w, candidate, v)
                error = self.weighted_error(w, candidate, v)
                better = error < best_error
                best = _choose(better, candidate, best)
                best_error = torch.where(better, error, best_error)
        return _shaped(best, lead)

    def _factors(self, scale, zero) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unrounded ``d`` (and ``dmin``): the largest sub-scale (minimum) on the widest
        integer — the one of largest magnitude on the most negative, for signed scales."""
        low, high = self.scale_range
        if self.affine:
            return scale.max(-1).values / high, (-zero).max(-1).values / high
        return signed_max(scale) / low, None

    def _on_integers(self, scale, zero, d, dmin) -> SuperParams:
        """Sub-scales (and minima) rounded to integers on float16 ``d`` (``dmin``)."""
        low, high = self.scale_range
        d = half(d)
        sc = torch.clamp(divide(scale, d[:, None]).round(), low, high)
        if not self.affine:
            return SuperParams(d[:, None] * sc, None, d, None)
        dmin = half(dmin)
        m = torch.clamp(divide(-zero, dmin[:, None]).round(), low, high)
        return SuperParams(d[:, None] * sc, -(dmin[:, None] * m), d, dmin)

    def _integers(self, p: SuperParams) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The integer sub-scales (and minima) a grid stands for (exact: ``d · sc`` is)."""
        sc = divide(p.scale, p.d[:, None]).round()
        m = None if p.zero is None else divide(-p.zero, p.dmin[:, None]).round()
        return sc, m

    def _refit_factors(self, w, p: SuperParams, v) -> SuperParams:
        """For the codes ``p`` gives, the weighted least-squares ``d`` (and ``dmin``) with the
        integer sub-scales fixed, float16-stored; a singular system keeps ``p``'s. ``v``:
        (256,) or per row (rows × 256)."""
        rows = w.shape[0]
        sc, m = self._integers(p)
        codes = self.codes(self._split(w), _flat(p)).reshape(rows, self.subs, self.sub)
        ww = w.reshape(rows, self.subs, self.sub)
        vv = v.reshape(-1, self.subs, self.sub)
        # The weighted products share their first factor (``v · a``), computed once.
        if not self.affine:
            basis = self.level(codes) * sc[..., None]
            vb = vv * basis
            top, bottom = (vb * ww).sum((1, 2)), (vb * basis).sum((1, 2))
            ok = bottom > 0
            d = torch.where(ok, top / torch.where(ok, bottom, 1.0), p.d)
            return self._rebuilt(sc, None, d, None)
        a = codes * sc[..., None]
        b = -m[..., None].expand_as(a)
        va, vb = vv * a, vv * b
        aa, ab, bb = (va * a).sum((1, 2)), (va * b).sum((1, 2)), (vb * b).sum((1, 2))
        aw, bw = (va * ww).sum((1, 2)), (vb * ww).sum((1, 2))
        det = aa * bb - ab * ab
        ok = det > 1e-12 * (aa * bb).clamp(min=1e-30)
        safe = torch.where(ok, det, 1.0)
        d = torch.where(ok, (aw * bb - ab * bw) / safe, p.d)
        dmin = torch.where(ok, (aa * bw - ab * aw) / safe, p.dmin)
        return self._rebuilt(sc, m, d, dmin)

    def _rebuilt(self, sc, m, d, dmin) -> SuperParams:
        d = half(d)
        if m is None:
            return SuperParams(d[:, None] * sc, None, d, None)
        dmin = half(dmin)
        return SuperParams(d[:, None] * sc, -(dmin[:, None] * m), d, dmin)

    def weighted_error(self, w, params, importance):  # type: ignore[override]
        """Per row, ``Σ_j v_j (w_j − q_j)²`` over the super-block (``params``: SuperParams;
        ``w`` … × 256, ``importance`` broadcast to it)."""
        ws = self._split(w)
        flat = _flat(params)
        error = (ws - self.values(self.codes(ws, flat), flat)).reshape(w.shape)
        return (error * error * importance).sum(-1)

    # -- the grid as a linear function of ``d`` (and ``dmin``): the refit after GPTQ ----------

    def _expanded(self, scales, zeros, supers):
        """Per group: the factors ``d`` (``dmin``) repeated and the integer sub-scales
        (minima) they multiply."""
        d = supers[..., 0].repeat_interleave(self.subs, 1)
        sc = divide(scales, d).round()
        if not self.affine:
            return d, sc, None, None
        dmin = supers[..., 1].repeat_interleave(self.subs, 1)
        return d, sc, dmin, divide(-zeros, dmin).round()

    def linear_form(self, codes, scales, zeros, supers=None):
        _, sc, _, m = self._expanded(scales, zeros, supers)
        level = self.level(codes.to(torch.float32))
        bases = [level * sc.repeat_interleave(self.sub, 1)]
        if self.affine:
            bases.append(-m.repeat_interleave(self.sub, 1).expand_as(level))
        theta = supers.permute(0, 2, 1).reshape(supers.shape[0], -1)  # all d, then all dmin
        return bases, theta, QK_K

    def from_linear(self, theta, scales, zeros, supers=None):
        n = supers.shape[1]
        _, sc, _, m = self._expanded(scales, zeros, supers)
        d = half(theta[:, :n])
        new_scales = d.repeat_interleave(self.subs, 1) * sc
        if not self.affine:
            return new_scales, None, d[..., None]
        dmin = half(theta[:, n:])
        new_zeros = -(dmin.repeat_interleave(self.subs, 1) * m)
        return new_scales, new_zeros, torch.stack([d, dmin], 2)

    # -- bytes ---------------------------------------------------------------------------

    def pack_super(self, codes: np.ndarray, sc: np.ndarray, m: np.ndarray | None,
                   d: np.ndarray, dmin: np.ndarray | None) -> np.ndarray:
        """One row's super-blocks as llama.cpp lays them out: ``codes`` (n × 256),
        ``sc``/``m`` (n × subs, integers), ``d``/``dmin`` (n,) → n × block_bytes bytes."""
        raise NotImplementedError

    def pack(self, codes, scales, zeros, supers=None):
        """``rows × cols`` codes, ``rows × sub-blocks`` effective scales (and minima) and
        ``rows × super-blocks × (1|2)`` factors ``d`` (``dmin``) as llama.cpp's blocks."""
        rows, cols = codes.shape
        n = rows * (cols // QK_K)
        d = supers[..., 0].reshape(n)
        dmin = supers[..., 1].reshape(n) if self.affine else None
        p = SuperParams(scales.reshape(n, self.subs).to(torch.float32),
                        None if zeros is None else zeros.reshape(n, self.subs).to(torch.float32),
                        d.to(torch.float32), None if dmin is None else dmin.to(torch.float32))
        sc, m = self._integers(p)
        data = self.pack_super(
            codes.to(torch.int32).reshape(n, QK_K).numpy(), sc.to(torch.int32).numpy(),
            None if m is None else m.to(torch.int32).numpy(), d.to(torch.float16).numpy(),
            None if dmin is None else dmin.to(torch.float16).numpy())
        assert data.shape == (n, self.block_bytes), data.shape
        return data.reshape(rows, -1)


def _shaped(p: SuperParams, lead: torch.Size) -> SuperParams:
    """``p`` (per row of a 2-D batch) with the leading shape ``lead`` of the weights fitted."""
    def shape(x: torch.Tensor | None, *tail: int) -> torch.Tensor | None:
        return None if x is None else x.reshape(*lead, *tail)

    return SuperParams(shape(p.scale, p.scale.shape[-1]), shape(p.zero, p.scale.shape[-1]),
                       shape(p.d), shape(p.dmin))


def _flat(p: SuperParams) -> Params:
    return Params(p.scale.reshape(-1), None if p.zero is None else p.zero.reshape(-1))


def _choose(better: torch.Tensor, a: SuperParams, b: SuperParams) -> SuperParams:
    def pick(x, y):
        return None if x is None else torch.where(better.reshape(-1, *([1] * (x.dim() - 1))),
                                                  x, y)

    return SuperParams(pick(a.scale, b.scale), pick(a.zero, b.zero), pick(a.d, b.d),
                       pick(a.dmin, b.dmin))


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _u8(x: np.ndarray) -> np.ndarray:
    return x.astype(np.uint8)


def _scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """llama.cpp's 12 bytes of eight 6-bit scales and minima (``get_scale_min_k4``)."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = _u8((sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6))
    out[:, 4:8] = _u8((m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6))
    out[:, 8:12] = _u8((sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4))
    return out


def _nibbles_k4(codes: np.ndarray) -> np.ndarray:
    """q4_k/q5_k's low nibbles: byte ``32j + l`` holds code ``64j + l`` low, ``64j + 32 + l``
    high."""
    q = codes.reshape(-1, 4, 2, 32) & 0xF
    return _u8(q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _two_bit_planes(low2: np.ndarray) -> np.ndarray:
    """2-bit values at positions ``128h + 32s + l`` into byte ``32h + l`` at bit ``2s``."""
    n = low2.shape[0]
    q = low2.reshape(n, 2, 4, 32) << (2 * np.arange(4)).reshape(1, 1, 4, 1)
    return _u8(q.sum(2)).reshape(n, 64)


class Q2_K(SuperBlockType):
    """16 sub-blocks of 16, 2-bit codes, 4-bit sub-scales and minima: 2.625 bits a weight."""

    name, gguf_type, bits = "q2_k", "Q2_K", 2
    grid, sub, scale_bits, block_bytes = _Affine(2), 16, 4, 84

    def pack_super(self, codes, sc, m, d, dmin):
        scales = _u8(sc | (m << 4))
        return np.concatenate([scales, _two_bit_planes(codes), _f16(d), _f16(dmin)], 1)


class Q3_K(SuperBlockType):
    """16 sub-blocks of 16, levels −4…3, signed 6-bit sub-scales: 3.4375 bits a weight."""

    name, gguf_type, bits = "q3_k", "Q3_K", 3
    grid, sub, scale_bits, block_bytes = _Symmetric(3), 16, 6, 110
    file_type = "MOSTLY_Q3_K_S"  # llama.cpp names no file of one K type; the nearest

    def pack_super(self, codes, sc, m, d, dmin):
        n = codes.shape[0]
        high = (codes >> 2).reshape(n, 2, 4, 32) << (np.arange(2).reshape(1, 2, 1, 1) * 4
                                                     + np.arange(4).reshape(1, 1, 4, 1))
        hmask = _u8(high.sum((1, 2)))
        s = sc + 32  # stored unsigned, 0…63
        raw = np.empty((n, 12), dtype=np.int64)
        raw[:, 0:4] = (s[:, 0:4] & 0xF) | ((s[:, 8:12] & 0xF) << 4)
        raw[:, 4:8] = (s[:, 4:8] & 0xF) | ((s[:, 12:16] & 0xF) << 4)
        raw[:, 8:12] = ((s[:, 0:4] >> 4) | ((s[:, 4:8] >> 4) << 2) | ((s[:, 8:12] >> 4) << 4)
                        | ((s[:, 12:16] >> 4) << 6))
        return np.concatenate([hmask, _two_bit_planes(codes & 3), _u8(raw), _f16(d)], 1)


class Q4_K(SuperBlockType):
    """8 sub-blocks of 32, 4-bit codes, 6-bit sub-scales and minima: 4.5 bits a weight."""

    name, gguf_type, bits = "q4_k", "Q4_K", 4
    grid, sub, scale_bits, block_bytes = _Affine(4), 32, 6, 144
    file_type = "MOSTLY_Q4_K_S"  # llama.cpp names no file of one K type; the nearest

    def pack_super(self, codes, sc, m, d, dmin):
        return np.concatenate([_f16(d), _f16(dmin), _scales_k4(sc, m), _nibbles_k4(codes)], 1)


class Q5_K(SuperBlockType):
    """8 sub-blocks of 32, 5-bit codes, 6-bit sub-scales and minima: 5.5 bits a weight."""

    name, gguf_type, bits = "q5_k", "Q5_K", 5
    grid, sub, scale_bits, block_bytes = _Affine(5), 32, 6, 176
    file_type = "MOSTLY_Q5_K_S"  # llama.cpp names no file of one K type; the nearest

    def pack_super(self, codes, sc, m, d, dmin):
        q = codes.reshape(-1, 4, 2, 32)
        # byte l: bit 2j the fifth bit of code 64j + l, bit 2j+1 that of code 64j + 32 + l
        high = (q >> 4) << (2 * np.arange(4).reshape(1, 4, 1, 1)
                            + np.arange(2).reshape(1, 1, 2, 1))
        qh = _u8(high.sum((1, 2)))
        return np.concatenate([_f16(d), _f16(dmin), _scales_k4(sc, m), qh, _nibbles_k4(codes)],
                              1)


class Q6_K(SuperBlockType):
    """16 sub-blocks of 16, levels −32…31, signed 8-bit sub-scales: 6.5625 bits a weight."""

    name, gguf_type, bits = "q6_k", "Q6_K", 6
    grid, sub, scale_bits, block_bytes = _Symmetric(6), 16, 8, 210

    def pack_super(self, codes, sc, m, d, dmin):
        n = codes.shape[0]
        q = codes.reshape(n, 2, 4, 32)  # half h, quarter k, l: position 128h + 32k + l
        low = q & 0xF
        ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4),
                             low[:, :, 1] | (low[:, :, 3] << 4)], 2)
        high = (q >> 4) << (2 * np.arange(4).reshape(1, 1, 4, 1))
        qh = high.sum(2)
        return np.concatenate([_u8(ql).reshape(n, 128), _u8(qh).reshape(n, 64),
                               sc.astype(np.int8).view(np.uint8), _f16(d)], 1)


class IQ4_XS(SuperBlockType):
    """8 sub-blocks of 32 on ``iq4_nl``'s 16 non-linear levels, signed 6-bit sub-scales:
    4.25 bits a weight."""

    name, gguf_type, bits = "iq4_xs", "IQ4_XS", 4
    grid, sub, scale_bits, block_bytes = BLOCK_TYPES["iq4_nl"], 32, 6, 136

    def pack_super(self, codes, sc, m, d, dmin):
        n = codes.shape[0]
        s = sc + 32
        scales_h = ((s >> 4) << (2 * np.arange(8))).sum(1).astype("<u2").reshape(n, 1)
        scales_l = _u8((s[:, 0::2] & 0xF) | ((s[:, 1::2] & 0xF) << 4))
        q = codes.reshape(n, 8, 2, 16)
        qs = _u8(q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
        return np.concatenate([_f16(d), scales_h.view(np.uint8), scales_l, qs], 1)


SUPER_BLOCK_TYPES = {name: t for name, t in BLOCK_TYPES.items()
                     if isinstance(t, SuperBlockType)}
"""The super-block types, by name."""
