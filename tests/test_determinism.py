"""Deterministic mode: results that do not depend on batching, threads or the split of windows
over processes — bit for bit, not within a tolerance."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import C4_FILE, WIKI_TEST
from test_cli import _run
from test_distributed import _torchrun, _weights
from tiny_models import tiny_model, token_batch

from snapprune.engine import LayerStats, determinism, prune_weight
from snapprune.engine.factor import damped_hessian, inverse_cholesky_upper
from snapprune.models.prune import prune_model
from snapprune.models.settings import PruneSettings


def _windows(count: int = 6, tokens: int = 200, columns: int = 48) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    scale = torch.logspace(-2, 2, columns)  # wide dynamic range, like real activations
    return torch.randn(count, tokens, columns, generator=generator) * scale


def _stats(batches, deterministic: bool) -> LayerStats:
    stats = LayerStats(batches[0].shape[-1], deterministic=deterministic)
    for batch in batches:
        stats.add(batch)
    return stats


def test_statistics_do_not_depend_on_batching_or_the_split_over_ranks():
    x = _windows()
    whole = _stats([x], True)
    for split in ([x[:2], x[2:4], x[4:]], [x[i : i + 1] for i in range(6)], [x[:5], x[5:]]):
        other = _stats(split, True)
        assert torch.equal(other.hessian, whole.hessian)
        assert torch.equal(other.sq_norms, whole.sq_norms)
    # Two "ranks" with three windows each, their sums added (what all_reduce does).
    first, second = _stats([x[:3]], True), _stats([x[3:]], True)
    first._xxt += second._xxt
    first._sq += second._sq
    first.nsamples += second.nsamples
    assert torch.equal(first.hessian, whole.hessian)
    assert torch.equal(first.sq_norms, whole.sq_norms)


def test_deterministic_statistics_match_their_definition():
    x = _windows().double().reshape(-1, 48)
    stats = _stats([_windows()], True)
    expected = 2.0 / x.shape[0] * x.T @ x
    assert stats.hessian.dtype == torch.float32 and stats.nsamples == x.shape[0]
    # Each window's 200 products are summed in float32 (the BLAS kernel's order, which differs
    # between CPUs), then exactly in float64: the error of each entry is within the classic
    # bound for a float32 sum of n terms, n·2⁻²⁴·Σ|terms| (plus the final float32 rounding),
    # where the entries that cancel make a relative tolerance meaningless.
    bound = 200 * 2.0**-24 * (2.0 / x.shape[0] * x.abs().T @ x.abs()) + 2.0**-24 * expected.abs()
    assert ((stats.hessian.double() - expected).abs() <= bound).all()
    assert ((stats.hessian.double() - expected).abs() > 0).any()  # float32, not exact
    torch.testing.assert_close(stats.sq_norms.double(), (x * x).mean(0), rtol=1e-5, atol=0)
    # Flattened windows, when told how many they are, sum the same, bit for bit.
    told = LayerStats(48, deterministic=True)
    told.add(_windows().reshape(-1, 48), windows=6)
    assert torch.equal(told.hessian, stats.hessian) and torch.equal(told.sq_norms, stats.sq_norms)
    # Rows that are not whole windows are summed as one part.
    routed = LayerStats(48, deterministic=True)
    routed.add(_windows().reshape(-1, 48)[:1001], windows=6)
    torch.testing.assert_close(routed.hessian.double(),
                               2.0 / 1001 * x[:1001].T @ x[:1001], rtol=1e-4, atol=1e-3)
    # A 2-D input is otherwise one window; the product buffer is freed by finish().
    flat = LayerStats(48, deterministic=True)
    flat.add(_windows().reshape(-1, 48))
    assert flat._product is not None
    flat.finish()
    assert flat._product is None
    # One float32 product over all 1,200 tokens: its round-off, not the windows' exact sum.
    torch.testing.assert_close(flat.hessian.double(), expected, rtol=1e-4, atol=1e-3)


def test_default_statistics_are_unchanged_float32_sums():
    x = _windows()
    stats = _stats([x[:4], x[4:]], False)
    assert stats._xxt.dtype == torch.float32
    flat = x.reshape(-1, 48)
    expected = torch.zeros(48, 48).addmm_(flat[: 4 * 200].T, flat[: 4 * 200])
    expected.addmm_(flat[4 * 200 :].T, flat[4 * 200 :])
    assert torch.equal(stats._xxt, expected)


def test_mode_is_torchs_switch_and_is_restored(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not determinism.enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with determinism.deterministic():
        assert determinism.enabled() and torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        threads = torch.get_num_threads()
        with determinism.whole_matrix_threads(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == threads
    assert not determinism.enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    threads = torch.get_num_threads()
    with determinism.whole_matrix_threads(torch.device("cpu")):
        assert torch.get_num_threads() == threads  # untouched outside the mode


def _with_threads(threads: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def wide_problem():
    """A Hessian wide enough that LAPACK blocks its factorisation by thread count."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 1024, generator=generator) * torch.logspace(-1, 1, 1024)
    stats = LayerStats.from_inputs(x)
    weight = torch.randn(96, 1024, generator=generator)
    return stats, weight


def test_factorisation_is_the_same_on_one_and_two_threads(wide_problem):
    stats, _ = wide_problem
    damped = damped_hessian(stats.hessian, 0.01)[0]
    with determinism.deterministic():
        one = _with_threads(1, lambda: inverse_cholesky_upper(damped)[0])
        two = _with_threads(2, lambda: inverse_cholesky_upper(damped)[0])
    assert torch.equal(one, two)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "structured"])
def test_thanos_is_the_same_on_one_and_two_threads(wide_problem, pattern):
    stats, weight = wide_problem
    sparsity = None if pattern == "2:4" else 0.5

    def prune():
        return prune_weight(weight, stats, method="thanos", pattern=pattern,
                            sparsity=sparsity, alpha=0.1 if pattern == "structured" else 0.0)

    with determinism.deterministic():
        one, two = _with_threads(1, prune), _with_threads(2, prune)
    assert torch.equal(one.weight, two.weight)


@pytest.mark.parametrize("family", ["llama", "opt"])  # OPT's MLP sees windows flattened
def test_pipeline_is_bit_identical_for_any_batch_size(family):
    ids = token_batch(6, 32)
    weights = []
    for batch_size in (6, 4, 1):
        model = tiny_model(family)
        with determinism.deterministic():
            run = prune_model(model, ids, PruneSettings("thanos", sparsity=0.5),
                              batch_size=batch_size, progress=False)
        assert run.deterministic
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in other)


@pytest.mark.parametrize("calibration", ["routed", "all-experts"])
def test_a_mixture_is_bit_identical_for_any_batch_size(calibration):
    """Each expert's statistics are reduced one calibration window at a time, like a dense
    layer's (its routed tokens of each window), so batching does not move them; starved
    experts' every-token statistics too."""
    from tiny_models import tiny_moe_model

    from snapprune.models import experts

    ids = token_batch(6, 32)
    weights = []
    for batch_size in (6, 4, 1):
        model = tiny_moe_model("qwen2_moe")
        with determinism.deterministic(), experts.calibration(calibration, 16):
            prune_model(model, ids, PruneSettings("thanos", sparsity=0.5),
                        batch_size=batch_size, progress=False)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in other)


ARGS = ("--method", "thanos", "--pattern", "2:4", "--calib", C4_FILE, "--nsamples", 6,
        "--seqlen", 64, "--batch-size", 2, "--no-samples", "--quiet", "--deterministic",
        "--eval", WIKI_TEST, "--eval-seqlen", 64, "--max-windows", 4)


@pytest.mark.slow
def test_two_processes_are_bit_identical_to_one(tiny_dir, tmp_path, capsys):
    """1 process × 2 threads, batches 2 + 2 + 2, against 2 processes × 1 thread, batches 2 + 1
    each: the same weights, bit for bit."""
    one, two = tmp_path / "one", tmp_path / "two"
    code, err = _with_threads(2, lambda: _run(capsys, "prune", "--model", tiny_dir, *ARGS,
                                              "--out", one))
    assert code == 0, err
    done = _torchrun(2, "prune", "--model", tiny_dir, *ARGS, "--out", two)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report_one = json.loads((one / "snapprune_report.json").read_text())
    report_two = json.loads((two / "snapprune_report.json").read_text())
    assert report_one["deterministic"] and report_two["deterministic"]
    ppl = [next(iter(r["perplexity"].values()))["perplexity"] for r in (report_one, report_two)]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-6)
