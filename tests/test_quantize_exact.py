"""The quantisers against references written from their definitions, and the grids against
the formats' own libraries (compressed-tensors, gguf-py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from problems import make_problem

from snapprune import LayerStats, SnapPruneError
from snapprune.engine.blocks import IQ4_NL_LEVELS
from snapprune.engine.factor import damped_hessian, inverse_cholesky_upper
from snapprune.engine.quantizers import quantize_weight
from snapprune.engine.schemes import GGUF_SCHEMES, GroupParams, Scheme, parse_scheme

PERCDAMP = 0.01


def _raw(scheme: Scheme, x: torch.Tensor, scale: torch.Tensor, zero) -> torch.Tensor:
    """The value a code is rounded from, in float64, written from each grid's definition
    (linear grids)."""
    x, scale = x.double(), scale.double()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    offset = {"q4_0": 8, "q5_0": 16}.get(scheme.grid)
    if offset is not None:
        return torch.where(scale == 0, float(offset), x / safe + offset)
    if scheme.grid in ("q4_1", "q5_1"):
        return torch.where(scale == 0, 0.0, (x - zero.double()) / safe)
    if scheme.grid == "q8_0" or scheme.symmetric:
        return torch.where(scale == 0, 0.0, x / safe)
    return x / safe + zero.double()


def _value(scheme: Scheme, code: torch.Tensor, scale, zero) -> torch.Tensor:
    scale = scale.double()
    if scheme.grid == "iq4_nl":
        return torch.tensor(IQ4_NL_LEVELS, dtype=torch.float64)[code.long()] * scale
    offset = {"q4_0": 8, "q5_0": 16}.get(scheme.grid)
    if offset is not None:
        return (code - offset) * scale
    if scheme.grid in ("q4_1", "q5_1"):
        return code * scale + zero.double()
    if scheme.grid == "q8_0" or scheme.symmetric:
        return code * scale
    return (code - zero.double()) * scale


def _nearest(scheme: Scheme, x: torch.Tensor, p, tie: float):
    """The nearest code by definition and whether ``x`` is within ``tie`` of a boundary."""
    if scheme.grid == "iq4_nl":  # non-linear: the level at the least distance
        levels = torch.tensor(IQ4_NL_LEVELS, dtype=torch.float64)
        safe = torch.where(p.scale == 0, torch.ones_like(p.scale), p.scale).double()
        distance = (x.double()[:, None] / safe[:, None] - levels).abs()
        two = distance.topk(2, dim=1, largest=False)
        code = torch.where(p.scale == 0, 8.0, two.indices[:, 0].double())
        near = (two.values[:, 1] - two.values[:, 0]) < 2 * tie
        return code, near & (p.scale != 0)
    raw = _raw(scheme, x, p.scale, p.zero)
    code = torch.clamp(torch.round(raw), scheme.qmin, scheme.qmax)
    near = ((raw - raw.floor() - 0.5).abs() < tie) & (raw > scheme.qmin - 0.5) & \
        (raw < scheme.qmax + 0.5)
    return code, near


def reference_gptq(w, hessian, scheme, *, mask=None, act_order=False, prefer=None,
                   scale_dtype=torch.float16, tie=2e-4, search=None, prefer_grid=None):
    """GPTQ from its definition (the OBS update with a fixed order), in float64: the explicit
    inverse of the damped Hessian over the columns not yet quantised, updated by removing each
    quantised column; one column at a time. Where the rounding is within ``tie`` of a
    boundary, ``prefer`` (the implementation's code) decides, and the entry is counted.
    ``search``: each group's grid from the scale search weighted by the Hessian diagonal
    (default: where the scheme can search, as GPTQ does unless told). The search is
    discontinuous (a code flipping at a rounding boundary), so float32 and float64 weights may
    pick different grids of nearly equal error: given ``prefer_grid`` (the implementation's
    ``(scales, zeros)``), the reference takes the implementation's grid after checking that,
    on the reference's own weights, it is within 1 % of the reference search's weighted
    error, and that such differences are rare (under 5 % of a group's rows)."""
    search = scheme.searchable if search is None else search
    importance = torch.diagonal(hessian).float() if search else None

    def fit(part, start):
        v = None if importance is None else importance[start:start + part.shape[1]]
        ours = scheme.fit(part, scale_dtype, v)
        if v is None or prefer_grid is None:
            return ours
        g = start // width
        zeros = prefer_grid[1]
        theirs = GroupParams(prefer_grid[0][:, g], None if zeros is None else zeros[:, g])

        def error(params):
            q = scheme.values(scheme.codes(part, params), params)
            return ((part - q) ** 2 * v).sum(1)

        differ = ours.scale != theirs.scale
        if ours.zero is not None:
            differ |= ours.zero != theirs.zero
        assert differ.float().mean() < 0.05, (g, int(differ.sum()))
        assert (error(theirs) <= error(ours) * 1.01 + 1e-12).all(), g
        return theirs

    w = w.double().clone()
    rows, cols = w.shape
    width = scheme.group_width(cols)
    damped = hessian.double().clone()
    dead = torch.diagonal(damped) == 0
    damped[dead, dead] = 1.0
    damped += torch.eye(cols, dtype=torch.float64) * PERCDAMP * torch.diagonal(damped).mean()
    w[:, dead] = 0.0
    hinv = torch.linalg.inv(damped)
    order = (torch.argsort(torch.diagonal(hessian.float()), descending=True, stable=True)
             .tolist() if act_order else list(range(cols)))
    params = {}
    if act_order:
        base = w.float() if mask is None else w.float().masked_fill(mask, 0.0)
        for g in range(scheme.groups(cols)):
            params[g] = fit(base[:, g * width : (g + 1) * width], g * width)
    codes = torch.zeros(rows, cols, dtype=torch.float64)
    ties = 0
    remaining = list(order)
    for j in order:
        g = j // width
        if g not in params:
            part = w[:, j : j + width].float()
            if mask is not None:
                part = part.masked_fill(mask[:, j : j + width], 0.0)
            params[g] = fit(part, j)
        p = params[g]
        code, near = _nearest(scheme, w[:, j], p, tie)
        if prefer is not None:
            code = torch.where(near, prefer[:, j].double(), code)
        ties += int(near.sum())
        if mask is not None:
            code = torch.where(mask[:, j], torch.as_tensor(scheme.zero_code(p)).double(), code)
        q = _value(scheme, code, p.scale, p.zero)
        codes[:, j] = code
        remaining.remove(j)
        error = (w[:, j] - q) / hinv[j, j]
        w[:, remaining] -= error[:, None] * hinv[j, remaining][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
        w[:, j] = q
    return w, codes, params, ties


CASES = [(s, act) for s in ("w8", "w4", "w4g32", "w4g64", "w4g128", "w4g32-asym",
                            "w4g128-asym", "w3g32", "w3g64-asym", "w2g32", "q4_0", "q4_1",
                            "q8_0", "q5_0", "q5_1", "iq4_nl")
         for act in (False, True)]


@pytest.mark.parametrize("name,act_order", CASES)
def test_gptq_equals_its_definition(name, act_order):
    scheme = parse_scheme(name)
    problem = make_problem(24, 256, tokens=512, seed=3)
    # GPTQ itself: the scales as the search left them (the refit after it: test_blocks.py)
    result = quantize_weight(problem.weight, problem.stats, scheme, act_order=act_order,
                             percdamp=PERCDAMP, blocksize=64, refit=False)
    values, codes, params, ties = reference_gptq(problem.weight, problem.stats.hessian, scheme,
                                                 act_order=act_order, prefer=result.codes,
                                                 prefer_grid=(result.scales, result.zeros))
    assert ties < 0.002 * codes.numel()  # ties are rare: the comparison is not vacuous
    assert torch.equal(result.codes.double(), codes)
    for g, p in params.items():
        torch.testing.assert_close(result.scales[:, g], p.scale, rtol=2e-3, atol=1e-7)
    torch.testing.assert_close(result.weight.double(), values, rtol=0, atol=1e-4)
    # Every code is in range and the values are exactly the grid's.
    assert result.codes.min() >= scheme.qmin and result.codes.max() <= scheme.qmax
    width = scheme.group_width(256)
    for g in range(scheme.groups(256)):
        part = slice(g * width, (g + 1) * width)
        zero = None if result.zeros is None else result.zeros[:, g]
        expected = _value(scheme, result.codes[:, part].double(), result.scales[:, g][:, None],
                          None if zero is None else zero[:, None])
        torch.testing.assert_close(result.weight[:, part].double(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "iq4_nl", "q4_1"])
def test_gptq_on_the_formulas_scales_equals_its_definition(name):
    """``scales absmax``: GPTQ on llama.cpp's formula, the baseline of the search."""
    scheme = parse_scheme(name)
    problem = make_problem(24, 256, tokens=512, seed=4)
    result = quantize_weight(problem.weight, problem.stats, scheme, percdamp=PERCDAMP,
                             blocksize=64, scales="absmax")
    _, codes, _, ties = reference_gptq(problem.weight, problem.stats.hessian, scheme,
                                       prefer=result.codes, search=False)
    assert ties < 0.002 * codes.numel()
    assert torch.equal(result.codes.double(), codes)


@pytest.mark.parametrize("name", ["q4_0", "iq4_nl", "q5_1"])
def test_weighted_rtn_rounds_on_the_searched_grid_and_beats_plain_rtn(name):
    scheme = parse_scheme(name)
    problem = make_problem(32, 256, tokens=512, seed=6)
    weighted = quantize_weight(problem.weight, problem.stats, scheme, method="weighted-rtn")
    plain = quantize_weight(problem.weight, problem.stats, scheme, method="rtn")
    v = torch.diagonal(problem.stats.hessian).float()
    for g in range(8):
        part = problem.weight[:, g * 32:(g + 1) * 32].float()
        grid = scheme.fit(part, importance=v[g * 32:(g + 1) * 32])
        assert torch.equal(weighted.scales[:, g], grid.scale)
        assert torch.equal(weighted.codes[:, g * 32:(g + 1) * 32].double(),
                           scheme.codes(part, grid).double())
    assert weighted.error < plain.error
    gptq = quantize_weight(problem.weight, problem.stats, scheme)
    assert gptq.error < weighted.error


@pytest.mark.parametrize("name", [*GGUF_SCHEMES, "w4g64", "w8", "w4g32-asym"])
@pytest.mark.parametrize("searched", [False, True])
def test_all_groups_fitted_at_once_are_each_span_fitted_alone(name, searched, monkeypatch):
    """``fit_all`` (one batched fit, in chunks of rows) is exactly ``fit_groups`` span by span,
    and RTN on it rounds each group, pruned weights on the grid's zero, as GPTQ's groups do."""
    from snapprune.engine import schemes

    scheme = parse_scheme(name)
    searched = searched and scheme.searchable
    cols = 2 * max(scheme.fit_width(128), 64)  # two super-blocks, or two to four groups
    width = scheme.fit_width(cols)  # one fit's columns: a group, a super-block, or the row
    problem = make_problem(21, cols, tokens=512, seed=12)
    gen = torch.Generator().manual_seed(1)
    w = problem.weight * torch.exp(torch.randn(21, 1, generator=gen))
    w[0], w[1, :40] = 0.0, 0.0  # an empty row, empty blocks
    x = problem.inputs.clone()
    x[:, :40] = 0.0  # columns calibration never reached
    stats = LayerStats.from_inputs(x)
    importance = torch.diagonal(stats.hessian).float() if searched else None

    def span_by_span(weight):
        return [p for start in range(0, cols, width)
                for p in scheme.fit_groups(weight[:, start:start + width], torch.float16,
                                           None if importance is None else
                                           importance[start:start + width])]

    monkeypatch.setattr(schemes, "FIT_BATCH", 8 * cols)  # chunks of 8 rows: 8, 8 and 5
    together, alone = scheme.fit_all(w, torch.float16, importance), span_by_span(w)
    assert len(together) == len(alone) == scheme.groups(cols)
    for a, b in zip(together, alone, strict=True):
        for x, y in ((a.scale, b.scale), (a.zero, b.zero), (a.d, b.d), (a.dmin, b.dmin)):
            assert (x is None) == (y is None)
            assert x is None or torch.equal(x, y)
    if scheme.exact_zero:  # RTN on those grids, with pruned weights
        mask = torch.rand(21, cols, generator=gen) < 0.3
        result = quantize_weight(w, stats, scheme, mask=mask, error=False,
                                 method="weighted-rtn" if searched else "rtn")
        group = scheme.group_width(cols)
        for g, p in enumerate(span_by_span(w.masked_fill(mask, 0.0))):
            part = slice(g * group, (g + 1) * group)
            codes = torch.where(mask[:, part], scheme.zero_code(p)[:, None],
                                scheme.codes(w[:, part], p))
            assert torch.equal(result.codes[:, part].float(), codes)
            assert torch.equal(result.weight[:, part], scheme.values(codes, p))


def test_scale_choices_that_cannot_work_are_refused():
    problem = make_problem(4, 64, seed=1)
    with pytest.raises(SnapPruneError, match="no calibration statistics"):
        quantize_weight(problem.weight, None, "q4_0", method="rtn", scales="search")
    with pytest.raises(SnapPruneError, match="compressed-tensors' scale formula"):
        quantize_weight(problem.weight, problem.stats, "w4g32", scales="search")
    with pytest.raises(SnapPruneError, match="unknown scale choice"):
        quantize_weight(problem.weight, problem.stats, "q4_0", scales="mse")
    # Unless told, each quantiser takes its own choice where the scheme can search.
    assert quantize_weight(problem.weight, problem.stats, "w4g32").error > 0


@pytest.mark.parametrize("name", ["w4g32", "q4_0", "w4g128-asym", "q8_0", "q5_0"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_joint_quantisation_keeps_every_pruned_weight_exactly_zero(name, pattern):
    from snapprune import prune_weight

    problem = make_problem(16, 128, tokens=256, seed=5)
    pruned = prune_weight(problem.weight, problem.stats, method="thanos", pattern=pattern,
                          sparsity=0.5 if pattern == "unstructured" else None)
    result = quantize_weight(pruned.weight, problem.stats, name, mask=pruned.mask,
                             upper=pruned.upper, blocksize=32, refit=False)
    refitted = quantize_weight(pruned.weight, problem.stats, name, mask=pruned.mask,
                               upper=pruned.upper, blocksize=32)
    assert (refitted.weight[pruned.mask] == 0).all()  # the refit keeps pruned weights at 0
    assert (result.weight[pruned.mask] == 0).all()
    if pattern == "2:4":
        zeros = (result.weight == 0).reshape(16, -1, 4).sum(2)
        assert (zeros >= 2).all()  # every group of 4 still holds at least its 2 zeros
    _, codes, _, _ = reference_gptq(pruned.weight, problem.stats.hessian,
                                         parse_scheme(name), mask=pruned.mask,
                                         prefer=result.codes,
                                         prefer_grid=(result.scales, result.zeros))
    assert torch.equal(result.codes.double(), codes)
    # Joint beats pruning then rounding: the kept weights absorb the rounding errors.
    rtn = quantize_weight(pruned.weight, problem.stats, name, mask=pruned.mask, method="rtn")
    assert result.error < rtn.error


def test_the_pruning_factor_is_the_quantisers_factor():
    problem = make_problem(8, 96, seed=2)
    damped, _ = damped_hessian(problem.stats.hessian.float(), PERCDAMP)
    upper, _ = inverse_cholesky_upper(damped)
    a = quantize_weight(problem.weight, problem.stats, "w4g32", upper=upper)
    b = quantize_weight(problem.weight, problem.stats, "w4g32")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight)


def test_gptq_beats_round_to_nearest_on_every_grid():
    problem = make_problem(32, 256, tokens=512, seed=7)
    for name in ("q4_0", "w4g128", "w3g64", "q8_0"):
        gptq = quantize_weight(problem.weight, problem.stats, name)
        rtn = quantize_weight(problem.weight, problem.stats, name, method="rtn")
        assert gptq.error < rtn.error, name


def test_minmax_grids_are_compressed_tensors_own():
    """Scales and zero points as compressed-tensors computes them (its observer formula)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=gen) * torch.rand(6, 1, generator=gen)
    w[0] = w[0].abs() + 0.1  # a row without negative values: the range widened to hold 0
    for name, bits, symmetric in (("w4g64", 4, True), ("w4g64-asym", 4, False),
                                  ("w8", 8, True), ("w3g64-asym", 3, False)):
        args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="channel")
        scale, zero = calculate_qparams(w.min(1).values, w.max(1).values, args)
        params = parse_scheme(name).fit(w, torch.float32)
        torch.testing.assert_close(params.scale, scale.float(), rtol=1e-6, atol=0)
        if not symmetric:
            assert torch.equal(params.zero, zero.float().round())


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0"])
def test_gguf_grids_are_llama_cpps_own(name):
    """Block scale (and minimum) bit for bit as gguf-py's port of llama.cpp's quantiser
    stores them; every weight at least as close to its value as llama.cpp's rounding puts it
    (that rounding uses an unrounded 1/d, ours the stored float16 d)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    qtype = GGMLQuantizationType[name.upper()]
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(8, 128, generator=gen) * torch.exp(torch.randn(8, 1, generator=gen)))
    data = quantize(w.numpy(), qtype)
    block_bytes = data.shape[1] // 4
    blocks = data.reshape(8, 4, block_bytes)
    stored_d = torch.from_numpy(blocks[:, :, :2].copy().view(np.float16).astype(np.float32))
    scheme = parse_scheme(name)
    ours = quantize_weight(w, None, scheme, method="rtn")
    torch.testing.assert_close(ours.scales, stored_d[..., 0], rtol=0, atol=0)
    if name == "q4_1":
        stored_m = torch.from_numpy(blocks[:, :, 2:4].copy().view(np.float16)
                                    .astype(np.float32))
        torch.testing.assert_close(ours.zeros, stored_m[..., 0], rtol=0, atol=0)
    theirs = torch.from_numpy(dequantize(data, qtype).reshape(8, 128))
    assert ((ours.weight - w).abs() <= (theirs - w).abs() + 1e-6).all()
    assert (ours.weight != theirs).float().mean() < 0.01  # they differ only at near-ties


def test_bad_requests_are_refused_in_one_line():
    w = torch.randn(4, 40)
    stats_w = torch.randn(64, 40)
    from snapprune import LayerStats

    stats = LayerStats.from_inputs(stats_w)
    for name, fragment in (("w5g128", "not supported"), ("w4g100", "power of two"),
                           ("q7_k", "unknown quantisation scheme"), ("", "unknown")):
        with pytest.raises(SnapPruneError, match=fragment):
            parse_scheme(name)
    with pytest.raises(SnapPruneError, match="blocks of 32"):
        quantize_weight(w, stats, "q4_0")
    with pytest.raises(SnapPruneError, match=r"blocks of 256 inputs.*fallback"):
        quantize_weight(torch.randn(4, 576), None, "q4_k", method="rtn")
    with pytest.raises(SnapPruneError, match="no exact zero"):
        quantize_weight(torch.randn(4, 64), None, "q4_1", method="rtn",
                        mask=torch.rand(4, 64) < 0.5)
    with pytest.raises(SnapPruneError, match="needs the layer's calibration statistics"):
        quantize_weight(torch.randn(4, 64), None, "q4_0")


def test_scheme_facts():
    assert parse_scheme("w4g128").bits_per_weight == 4 + 16 / 128
    assert parse_scheme("q4_0").bits_per_weight == 4.5
    assert parse_scheme("q8_0").bits_per_weight == 8.5
    assert parse_scheme("q4_1").bits_per_weight == 5.0
    assert parse_scheme("w8").group_size is None and parse_scheme("w8").symmetric
    assert not parse_scheme("w4g32-asym").symmetric
    assert parse_scheme("w4g128").groups(576) == math.ceil(576 / 128)  # the last one shorter
