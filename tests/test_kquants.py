"""The super-block types (K-quants and ``iq4_xs``), each against its definition and against
the runtimes: the bytes snapprune packs, decoded by gguf-py's dequantiser and by llama.cpp's
own (``dequantize_row_*`` in the ggml library llama-cpp-python ships), are exactly the values
snapprune chose; every integer sub-scale is in its range and every value is the definition's
``d · sc · level − dmin · m``; the weighted scale search is never worse than the formula;
GPTQ on each grid is the OBS update from its definition, in float64."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from problems import make_problem
from test_export import LLAMA_CPP, NO_LLAMA_CPP

from snapprune.engine.blocks import IQ4_NL_LEVELS, divide
from snapprune.engine.kquants import QK_K, SUPER_BLOCK_TYPES
from snapprune.engine.quantizers import quantize_weight
from snapprune.engine.schemes import parse_scheme

TYPES = sorted(SUPER_BLOCK_TYPES)
FACTS = {  # name: (bytes, sub-block width, code bits, sub-scale range, affine), from ggml-common.h
    "q2_k": (84, 16, 2, (0, 15), True),
    "q3_k": (110, 16, 3, (-32, 31), False),
    "q4_k": (144, 32, 4, (0, 63), True),
    "q5_k": (176, 32, 5, (0, 63), True),
    "q6_k": (210, 16, 6, (-128, 127), False),
    "iq4_xs": (136, 32, 4, (-32, 31), False),
}


def _weights(rows: int = 12, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Weights with the rows that break quantisers: zero, constant, one outlier, tiny, wide."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0] = 0.0
    w[1] = 0.02
    w[2, 7] = 3.0
    w[3] *= 1e-6
    w[4] *= 40.0
    w[5] = w[5].abs()  # no negative weight: the affine grids' minimum clamps at 0
    return w


def _definition_values(name: str, codes: torch.Tensor, result) -> torch.Tensor:
    """The weights llama.cpp's definition gives for the codes and the integer scales, in
    float64, from ``d``, ``dmin`` and the integer ``sc``/``m`` recovered (and checked) here."""
    kind = SUPER_BLOCK_TYPES[name]
    supers = result.supers.double()
    d = supers[..., 0].repeat_interleave(kind.subs, 1)
    sc = (result.scales.double() / d).nan_to_num(0.0).round()
    assert torch.equal(d * sc, result.scales.double())  # an integer multiple of d, exactly
    low, high = FACTS[name][3]
    assert sc.min() >= low and sc.max() <= high
    q = codes.double()
    if name == "iq4_xs":
        level = torch.tensor(IQ4_NL_LEVELS, dtype=torch.float64)[codes.long()]
    elif kind.affine:
        level = q
    else:
        level = q - 2 ** (FACTS[name][2] - 1)
    values = level * (d * sc).repeat_interleave(kind.sub, 1)
    if kind.affine:
        dmin = supers[..., 1].repeat_interleave(kind.subs, 1)
        m = (-result.zeros.double() / dmin).nan_to_num(0.0).round()
        assert torch.equal(-(dmin * m), result.zeros.double())
        assert m.min() >= low and m.max() <= high
        values = values - (dmin * m).repeat_interleave(kind.sub, 1)
    return values


def _packed(result) -> np.ndarray:
    return result.scheme.block.pack(result.codes, result.scales, result.zeros, result.supers)


@pytest.mark.parametrize("name", TYPES)
def test_the_facts_are_llama_cpps(name):
    kind = SUPER_BLOCK_TYPES[name]
    size, sub, bits, scale_range, affine = FACTS[name]
    assert (kind.block_bytes, kind.sub, kind.bits, kind.scale_range, kind.affine) == \
        (size, sub, bits, scale_range, affine)
    assert kind.span == QK_K and kind.subs == QK_K // sub
    assert kind.bits_per_weight == size * 8 / QK_K
    scheme = parse_scheme(name)
    assert scheme.group_size == sub and scheme.fit_width(1024) == QK_K
    assert scheme.holds(512) and not scheme.holds(576)


@pytest.mark.parametrize("method", ["rtn", "weighted-rtn", "gptq"])
@pytest.mark.parametrize("name", TYPES)
def test_values_are_the_definitions_and_gguf_py_reads_them_back(name, method):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    problem = make_problem(12, 512, tokens=1024, seed=5)
    problem.weight.copy_(_weights())
    result = quantize_weight(problem.weight, problem.stats, name, method=method)
    assert result.codes.min() >= result.scheme.qmin
    assert result.codes.max() <= result.scheme.qmax
    values = _definition_values(name, result.codes, result)
    assert torch.equal(result.weight.double(), values.float().double())
    data = _packed(result)
    assert data.shape == (12, 2 * FACTS[name][0])
    theirs = dequantize(data, GGMLQuantizationType[result.scheme.gguf_type])
    assert torch.equal(torch.from_numpy(np.asarray(theirs, dtype=np.float32)), result.weight)


def _ggml():
    import llama_cpp

    return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))


@pytest.mark.skipif(not LLAMA_CPP, reason=NO_LLAMA_CPP)
@pytest.mark.parametrize("name", TYPES)
def test_llama_cpp_reads_back_exactly_the_values_chosen(name):
    problem = make_problem(12, 768, tokens=1024, seed=6)
    problem.weight.copy_(_weights(12, 768, seed=1))
    result = quantize_weight(problem.weight, problem.stats, name, method="gptq")
    data = np.ascontiguousarray(_packed(result))
    suffix = name.replace("_k", "_K")
    function = getattr(_ggml(), f"dequantize_row_{suffix}")
    function.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    out = np.empty(result.weight.numel(), dtype=np.float32)
    function(data.ctypes.data, out.ctypes.data, out.size)
    assert torch.equal(torch.from_numpy(out).reshape(result.weight.shape), result.weight)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("seed", range(4))
def test_the_weighted_search_is_never_worse_than_the_formula(name, seed):
    kind = SUPER_BLOCK_TYPES[name]
    g = torch.Generator().manual_seed(100 + seed)
    w = _weights(16, QK_K, seed)
    w[8:] = torch.randn(8, QK_K, generator=g) ** 3 * 0.1  # heavy tails
    importance = torch.rand(QK_K, generator=g) ** 4 * 10
    importance[:17] = 0.0  # columns never seen in calibration
    base, found = kind.fit(w), kind.search(w, importance)
    better = kind.weighted_error(w, found, importance)
    assert (better <= kind.weighted_error(w, base, importance)).all()
    # and the search is not idle: it finds a better grid for most rows of a non-flat weight
    assert (better < kind.weighted_error(w, base, importance)).float().mean() > 0.5


def _nearest_by_definition(name, x, scale, zero, prefer, tie=2e-4):
    """The code whose value is nearest ``x`` (float64, every code tried); where the two
    nearest are within ``tie`` (relative to the scale), the implementation's code decides."""
    kind = SUPER_BLOCK_TYPES[name]
    q = torch.arange(kind.qmin, kind.qmax + 1, dtype=torch.float64)
    if name == "iq4_xs":
        level = torch.tensor(IQ4_NL_LEVELS, dtype=torch.float64)
    elif kind.affine:
        level = q
    else:
        level = q - kind.offset
    values = level[None, :] * scale.double()[:, None]
    if zero is not None:
        values = values + zero.double()[:, None]
    distance = (x.double()[:, None] - values).abs()
    two = distance.topk(2, dim=1, largest=False)
    near = (two.values[:, 1] - two.values[:, 0]) < tie * scale.double().abs().clamp(min=1e-12)
    code = torch.where(near, prefer.double(), q[two.indices[:, 0]])
    return code, values.gather(1, code.long()[:, None] - kind.qmin).squeeze(1), int(near.sum())


@pytest.mark.parametrize("name", TYPES)
def test_gptq_on_each_grid_equals_its_definition(name):
    """The OBS update with the damped inverse Hessian in float64, one column at a time, each
    super-block's grid fitted (the formula) from the weights when its first column comes up."""
    scheme = parse_scheme(name)
    problem = make_problem(10, 512, tokens=1024, seed=9)
    result = quantize_weight(problem.weight, problem.stats, name, method="gptq",
                             scales="absmax", blocksize=64)
    w = problem.weight.double().clone()
    rows, cols = w.shape
    hessian = problem.stats.hessian.double()
    damped = hessian + torch.eye(cols, dtype=torch.float64) * 0.01 * hessian.diagonal().mean()
    hinv = torch.linalg.inv(damped)
    codes = torch.zeros(rows, cols, dtype=torch.float64)
    params, ties = [], 0
    for j in range(cols):
        if j % QK_K == 0:
            params += scheme.fit_groups(w[:, j:j + QK_K].float())
        p = params[j // scheme.group_size]
        code, value, near = _nearest_by_definition(name, w[:, j], p.scale, p.zero,
                                                   result.codes[:, j])
        ties += near
        codes[:, j] = code
        error = (w[:, j] - value) / hinv[j, j]
        w[:, j + 1:] -= error[:, None] * hinv[j, j + 1:][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
        w[:, j] = value
    assert ties < 0.002 * codes.numel()
    assert torch.equal(result.codes.double(), codes)
    torch.testing.assert_close(result.weight.double(), w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TYPES)
def test_the_refit_after_gptq_solves_the_output_least_squares_in_d(name):
    """With codes and integer sub-scales fixed, the refit's ``d`` (``dmin``) is the float64
    least-squares solution under the Hessian (before float16 rounding), and lowers the layer's
    output error."""
    from snapprune.engine.refit import output_error

    kind = SUPER_BLOCK_TYPES[name]
    problem = make_problem(8, 512, tokens=1024, seed=11)
    before = quantize_weight(problem.weight, problem.stats, name, refit=False)
    after = quantize_weight(problem.weight, problem.stats, name)
    assert torch.equal(after.codes, before.codes)
    h = problem.stats.hessian.double()
    h = h + torch.eye(512, dtype=torch.float64) * 0.01 * h.diagonal().mean()  # as GPTQ damps
    d = before.supers[..., 0].double().repeat_interleave(kind.subs, 1)
    sc = divide(before.scales.double(), d).round()
    q = before.codes.double()
    lev = (torch.tensor(IQ4_NL_LEVELS, dtype=torch.float64)[before.codes.long()]
           if name == "iq4_xs" else q if kind.affine else q - kind.offset)
    n = 512 // QK_K
    for r in range(8):
        columns = []
        for b in range(n):
            part = slice(b * QK_K, (b + 1) * QK_K)
            basis = torch.zeros(512, dtype=torch.float64)
            basis[part] = lev[r, part] * sc[r, b * kind.subs:(b + 1) * kind.subs] \
                .repeat_interleave(kind.sub)
            columns.append(basis)
        if kind.affine:
            dmin = before.supers[..., 1].double().repeat_interleave(kind.subs, 1)
            m = divide(-before.zeros.double(), dmin).round()
            for b in range(n):
                basis = torch.zeros(512, dtype=torch.float64)
                basis[b * QK_K:(b + 1) * QK_K] = -m[r, b * kind.subs:(b + 1) * kind.subs] \
                    .repeat_interleave(kind.sub)
                columns.append(basis)
        a = torch.stack(columns, 1)
        theta = torch.linalg.solve(a.T @ h @ a, a.T @ h @ problem.weight[r].double())
        expected = theta.float().half().float()
        got = after.supers[r].permute(1, 0).reshape(-1)
        torch.testing.assert_close(got, expected, rtol=2e-3, atol=1e-7)
    assert output_error(problem.weight, after.weight, h) < \
        output_error(problem.weight, before.weight, h)
