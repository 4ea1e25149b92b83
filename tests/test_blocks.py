"""llama.cpp's block types against their definitions and gguf-py's own dequantisers: the bytes
snapprune packs decode to exactly the values it chose; the weighted scale search is never
worse than the formula; the formulas are gguf-py's port of llama.cpp's quantiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from snapprune.engine.blocks import BLOCK_TYPES, IQ4_NL_LEVELS, Params
from snapprune.engine.schemes import parse_scheme

TYPES = sorted(n for n, t in BLOCK_TYPES.items() if t.span == 32)  # super-blocks: test_kquants.py


def _weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Heavy-tailed rows of different magnitudes, as real layers have."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.exp(torch.randn(rows, 1, generator=gen))
    outliers = torch.rand(rows, cols, generator=gen) < 0.02
    return torch.where(outliers, w * 6, w)


def _importance(cols: int, seed: int) -> torch.Tensor:
    """A Hessian diagonal: positive, spread over two orders of magnitude, a few dead columns."""
    gen = torch.Generator().manual_seed(seed + 1000)
    v = torch.exp(2 * torch.randn(cols, generator=gen))
    v[torch.rand(cols, generator=gen) < 0.05] = 0.0
    return v


def _blockwise(kind, w: torch.Tensor, importance: torch.Tensor | None):
    """Codes, scales and minima of every block of ``w`` (rows × cols)."""
    cols = w.shape[1]
    codes, scales, zeros = [], [], []
    for start in range(0, cols, 32):
        part = w[:, start:start + 32]
        p = kind.fit(part) if importance is None else kind.search(part,
                                                                  importance[start:start + 32])
        codes.append(kind.codes(part, p))
        scales.append(p.scale)
        zeros.append(p.zero)
    stack = torch.stack(scales, 1)
    return (torch.cat(codes, 1), stack,
            None if zeros[0] is None else torch.stack(zeros, 1))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("searched", [False, True])
def test_the_packed_bytes_decode_in_gguf_py_to_exactly_our_values(name, searched):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    kind = BLOCK_TYPES[name]
    w = _weights(8, 128, seed=3)
    codes, scales, zeros = _blockwise(kind, w, _importance(128, 3) if searched else None)
    assert codes.min() >= kind.qmin and codes.max() <= kind.qmax
    assert len(codes.unique()) > (kind.qmax - kind.qmin) // 2  # the codes span the grid
    values = torch.cat([kind.values(codes[:, b * 32:(b + 1) * 32],
                                    Params(scales[:, b], None if zeros is None else zeros[:, b]))
                        for b in range(4)], 1)
    data = kind.pack(codes, scales, zeros)
    assert data.dtype == np.uint8 and data.shape == (8, 4 * kind.block_bytes)
    theirs = dequantize(data, GGMLQuantizationType[kind.gguf_type]).reshape(8, 128)
    assert torch.equal(torch.from_numpy(theirs.astype(np.float32)), values)


def _formula_reference(name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each type's data-free scale (and minimum), written from llama.cpp's definitions."""
    w = w.double()
    signed = w.gather(1, w.abs().argmax(1, keepdim=True)).squeeze(1)
    low, high = w.min(1).values, w.max(1).values
    scale, zero = {
        "q4_0": (signed / -8, None), "q5_0": (signed / -16, None),
        "q8_0": (w.abs().max(1).values / 127, None), "iq4_nl": (signed / -127, None),
        "q4_1": ((high - low) / 15, low), "q5_1": ((high - low) / 31, low)}[name]
    half = lambda x: x.to(torch.float16).float()  # noqa: E731
    return half(scale), None if zero is None else half(zero)


def _nearest_reference(name: str, w: torch.Tensor, scale, zero) -> torch.Tensor:
    """The nearest level by its definition (argmin of the distance), in float64."""
    kind = BLOCK_TYPES[name]
    if name == "iq4_nl":
        levels = torch.tensor(IQ4_NL_LEVELS, dtype=torch.float64)
        grid = scale.double()[:, None, None] * levels
    elif kind.affine:
        codes = torch.arange(kind.qmax + 1, dtype=torch.float64)
        grid = scale.double()[:, None, None] * codes + zero.double()[:, None, None]
    else:
        codes = torch.arange(kind.qmin, kind.qmax + 1, dtype=torch.float64)
        grid = scale.double()[:, None, None] * (codes - kind.offset)
    distance = (w.double()[:, :, None] - grid).abs()
    best = distance.argmin(2).double()
    return best if name == "iq4_nl" or kind.affine else best + kind.qmin


@pytest.mark.parametrize("name", TYPES)
def test_formula_and_rounding_are_their_definitions(name):
    kind = BLOCK_TYPES[name]
    w = _weights(64, 32, seed=5)
    scale, zero = _formula_reference(name, w)
    p = kind.fit(w)
    assert torch.equal(p.scale, scale)
    assert (p.zero is None) == (zero is None) and (zero is None or torch.equal(p.zero, zero))
    codes = kind.codes(w, p)
    reference = _nearest_reference(name, w, p.scale, p.zero)
    values = kind.values(codes, p).double()
    ref_values = kind.values(reference.float(), p).double()
    # Equal codes, or an exact tie between two levels (equally near).
    differ = codes.double() != reference
    assert differ.float().mean() < 0.01
    torch.testing.assert_close((values - w.double()).abs()[differ],
                               (ref_values - w.double()).abs()[differ], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["q5_0", "q5_1"])
def test_the_formulas_are_gguf_pys_port_of_llama_cpp(name):
    """Scales (and minima) bit for bit as gguf-py's quantiser stores them."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    kind = BLOCK_TYPES[name]
    w = _weights(8, 128, seed=1)
    data = quantize(w.numpy(), GGMLQuantizationType[kind.gguf_type]).reshape(8, 4, -1)
    stored = torch.from_numpy(data[..., :2].copy().view(np.float16).astype(np.float32))[..., 0]
    _, scales, zeros = _blockwise(kind, w, None)
    assert torch.equal(scales, stored)
    if kind.affine:
        minima = torch.from_numpy(data[..., 2:4].copy().view(np.float16).astype(np.float32))
        assert torch.equal(zeros, minima[..., 0])


@pytest.mark.parametrize("name", TYPES)
def test_the_weighted_search_is_never_worse_than_the_formula(name):
    """Property, over many blocks and importances: per row, the searched grid's weighted error
    is at most the formula's; and on average clearly lower (the search does something)."""
    kind = BLOCK_TYPES[name]
    gains = []
    for seed in range(12):
        w = _weights(48, 32, seed)
        v = _importance(32, seed)
        searched, formula = kind.search(w, v), kind.fit(w)
        a = kind.weighted_error(w, searched, v)
        b = kind.weighted_error(w, formula, v)
        assert (a <= b).all(), (seed, (a - b).max())
        gains.append(float((1 - a / b.clamp(min=1e-30)).mean()))
    assert np.mean(gains) > 0.03, gains


def _least_squares_step(kind, w: torch.Tensor, v: torch.Tensor) -> Params:
    """From the definition: the formula's codes, then the scale (and minimum) that minimise
    the weighted error for those codes, by the normal equations in float64, float16-stored."""
    p = kind.fit(w)
    codes = kind.codes(w, p).double()
    w64, v64 = w.double(), v.double()
    if kind.affine:
        design = torch.stack([codes, torch.ones_like(codes)], -1)  # rows × 32 × 2
        gram = torch.einsum("rjk,j,rjl->rkl", design, v64, design)
        rhs = torch.einsum("rjk,j,rj->rk", design, v64, w64)
        solved = torch.linalg.solve(gram, rhs)
        return Params(solved[:, 0].half().float(), solved[:, 1].half().float())
    level = kind.level(codes.float()).double()
    scale = (v64 * level * w64).sum(1) / (v64 * level * level).sum(1)
    return Params(scale.half().float())


@pytest.mark.parametrize("name", TYPES)
def test_the_search_is_never_worse_than_one_weighted_least_squares_step(name):
    """The search's floor, written from the definition: re-fitting the formula's codes by
    weighted least squares (then rounding afresh) is one of the grids it must beat."""
    kind = BLOCK_TYPES[name]
    for seed in range(6):
        w = _weights(64, 32, seed + 20)
        v = _importance(32, seed + 20) + 1e-3  # no dead column: the normal equations solve
        step = _least_squares_step(kind, w, v)
        searched = kind.weighted_error(w, kind.search(w, v), v)
        assert (searched <= kind.weighted_error(w, step, v) * (1 + 1e-6)).all(), seed


@pytest.mark.parametrize("name", TYPES)
def test_a_block_no_calibration_token_reached_keeps_the_formula(name):
    """All importance zero (columns never active): nothing to weigh, the formula's grid."""
    kind = BLOCK_TYPES[name]
    w = _weights(16, 32, seed=4)
    searched, formula = kind.search(w, torch.zeros(32)), kind.fit(w)
    assert torch.equal(searched.scale, formula.scale)
    assert searched.zero is None or torch.equal(searched.zero, formula.zero)


def test_the_search_weights_by_importance():
    """A column with all the importance is reproduced more closely than by the formula."""
    kind = BLOCK_TYPES["q4_0"]
    w = _weights(256, 32, seed=9)
    v = torch.full((32,), 1e-3)
    v[5] = 1.0
    searched, formula = kind.search(w, v), kind.fit(w)
    error = lambda p: (w - kind.values(kind.codes(w, p), p))[:, 5].abs().mean()  # noqa: E731
    assert error(searched) < 0.5 * error(formula)


def test_scheme_facts_of_the_new_types():
    assert parse_scheme("q5_0").bits_per_weight == 5.5
    assert parse_scheme("q5_1").bits_per_weight == 6.0
    assert parse_scheme("iq4_nl").bits_per_weight == 4.5
    assert not parse_scheme("iq4_nl").exact_zero and not parse_scheme("q5_1").exact_zero
    assert parse_scheme("q5_0").exact_zero
    assert {parse_scheme(n).gguf_type for n in TYPES} == {
        "Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1", "IQ4_NL"}


def _refit_reference(kind, w, codes, hessian):
    """The output-error least squares of every row's block scales (and minimums) for fixed
    codes, from its definition: a dense design matrix and the normal equations, float64."""
    rows, cols = w.shape
    blocks = cols // 32
    h = hessian.double()
    units = 2 * blocks if kind.affine else blocks
    out = torch.empty(rows, units, dtype=torch.float64)
    for r in range(rows):
        design = torch.zeros(cols, units, dtype=torch.float64)
        for b in range(blocks):
            part = slice(b * 32, (b + 1) * 32)
            c = codes[r, part].double()
            design[part, b] = c if kind.affine else kind.level(codes[r, part]).double()
            if kind.affine:
                design[part, blocks + b] = 1.0
        gram = design.T @ h @ design
        out[r] = torch.linalg.solve(gram, design.T @ h @ w[r].double())
    return out[:, :blocks], (out[:, blocks:] if kind.affine else None)


@pytest.mark.parametrize("name", TYPES)
def test_the_refit_after_gptq_is_the_output_least_squares(name):
    from problems import make_problem

    from snapprune.engine.quantizers import quantize_weight
    from snapprune.engine.refit import output_error, refit_block_scales

    kind = BLOCK_TYPES[name]
    problem = make_problem(12, 128, tokens=512, seed=8)
    before = quantize_weight(problem.weight, problem.stats, name, refit=False)
    hessian = problem.stats.hessian
    scales, zeros, _ = refit_block_scales(problem.weight, before.codes, before.scales,
                                          before.zeros, hessian, kind)
    ref_scales, ref_zeros = _refit_reference(kind, problem.weight, before.codes, hessian)
    torch.testing.assert_close(scales.double(), ref_scales, rtol=1e-3, atol=1e-7)
    if kind.affine:
        torch.testing.assert_close(zeros.double(), ref_zeros, rtol=1e-3, atol=1e-5)

    def values(s, z):
        return torch.cat([kind.values(before.codes[:, b * 32:(b + 1) * 32].float(),
                                      Params(s[:, b], None if z is None else z[:, b]))
                          for b in range(4)], 1)

    old = output_error(problem.weight, values(before.scales, before.zeros), hessian)
    new = output_error(problem.weight, values(scales, zeros), hessian)
    assert new < old  # the search's scales were not yet optimal for GPTQ's codes
    after = quantize_weight(problem.weight, problem.stats, name)  # the default refits
    assert torch.equal(after.codes, before.codes)
    assert after.error < before.error
