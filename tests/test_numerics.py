"""Bad numerics do not abort long runs: damping is raised and recorded; sparsity is counted on
the mask, whatever the dtype does to small weights."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import C4_FILE
from test_cli import _run
from tiny_models import tiny_model, token_batch

from snapprune import LayerStats, SnapPruneError, prune_model, prune_weight
from snapprune.engine.factor import MAX_PERCDAMP


def indefinite_stats(cols: int = 32, dip: float = 0.05, seed: int = 0) -> LayerStats:
    """Statistics whose Hessian has one eigenvalue of ``−dip · mean(diag H)``: not positive
    definite after the default damping (0.01), positive definite after 0.1. Float round-off in
    long accumulations of nearly collinear inputs does this to real layers."""
    gen = torch.Generator().manual_seed(seed)
    stats = LayerStats(cols, dtype=torch.float64)
    stats.add(torch.randn(4 * cols, cols, generator=gen, dtype=torch.float64))
    h = stats.hessian
    values, vectors = torch.linalg.eigh(h)
    values[0] = -dip * h.diagonal().mean()
    stats._xxt = (vectors * values) @ vectors.T * (stats.nsamples / 2)
    return stats


@pytest.mark.parametrize("method", ["thanos", "sparsegpt"])
def test_not_positive_definite_after_default_damping_raises_it_with_a_warning(method):
    stats = indefinite_stats()
    assert torch.linalg.eigvalsh(stats.hessian)[0] < -0.01 * stats.hessian.diagonal().mean()
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match=r"percdamp 0.01; used 0.1 for this layer"):
        res = prune_weight(w, stats, method=method, sparsity=0.5, blocksize=16)
    assert res.percdamp == pytest.approx(0.1)
    assert res.mask.sum().item() == 128 and torch.isfinite(res.weight).all()
    assert (res.weight[res.mask] == 0).all()


def test_healthy_layers_keep_the_requested_damping_silently():
    stats = LayerStats.from_inputs(torch.randn(256, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = prune_weight(torch.randn(4, 16), stats, method="thanos", sparsity=0.5,
                           percdamp=0.02)
    assert res.percdamp == 0.02
    assert prune_weight(torch.randn(4, 16), stats, method="wanda", sparsity=0.5).percdamp is None


def test_hopeless_hessian_is_refused_in_one_line():
    stats = indefinite_stats(dip=2 * MAX_PERCDAMP)
    with pytest.raises(SnapPruneError, match="not positive definite even at percdamp") as info:
        prune_weight(torch.randn(4, 32), stats, method="thanos", sparsity=0.5)
    assert "\n" not in str(info.value)


def test_singular_layers_in_a_model_are_pruned_and_their_damping_recorded():
    """One window of 8 tokens for 64-wide layers: every Hessian is singular; with no damping
    requested, each layer gets the first step up (0.01) and says so in its record."""
    model = tiny_model("llama")
    with pytest.warns(RuntimeWarning, match="used 0.01"):
        run = prune_model(model, token_batch(1, 8), method="thanos", sparsity=0.5,
                          percdamp=0.0, progress=False)
    assert {r.percdamp for r in run.layers} == {0.01}
    assert run.achieved_sparsity == 0.5
    assert all(math.isfinite(r.error) for r in run.layers)


def test_cli_prints_the_damping_warning_as_one_line_and_records_it(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "sparsegpt",
                     "--sparsity", 0.5, "--percdamp", 0, "--calib", C4_FILE, "--nsamples", 1,
                     "--seqlen", 8, "--out", out, "--quiet")
    assert code == 0, err
    warned = [line for line in err.splitlines() if "percdamp" in line]
    assert warned and all(line.startswith("snapprune: warning: damped Hessian") for line in warned)
    layers = json.loads((out / "snapprune_report.json").read_text())["layers"]
    assert {layer["percdamp"] for layer in layers} == {0.01}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparsity_counts_the_mask_not_zeros_of_the_cast_weight(dtype):
    """Weights that are zero already (or round to zero in half precision) are not 'removed'."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=gen)
    w[:, :20] = 0.0  # 62.5% zeros before pruning
    res = prune_weight(w.to(dtype), None, method="magnitude", sparsity=0.5)
    assert res.sparsity == 0.5
    assert (res.weight == 0).float().mean().item() == pytest.approx(0.625)
    model = tiny_model("opt").to(dtype)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.fc1.weight[:, :8] = 0.0
    run = prune_model(model, None, method="magnitude", sparsity=0.3, progress=False)
    assert run.achieved_sparsity == pytest.approx(0.3, abs=1e-3)
