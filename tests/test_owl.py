"""``prune --allocation owl``: OWL's per-block sparsities. The outlier ratio and the mapping
against their definitions, the pruning pass using each block's own sparsity, the refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import C4_FILE
from test_cli import _run
from tiny_models import tiny_model, token_batch

from snapprune.engine.owl import outlier_ratio, outlier_scores, owl_sparsities
from snapprune.errors import SnapPruneError
from snapprune.models.prune import prune_model
from snapprune.models.settings import PruneSettings


def test_the_outlier_ratio_follows_its_definition():
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(6, 5, generator=generator), torch.randn(3, 4, generator=generator)]
    norms = [torch.rand(5, generator=generator) * 4, torch.rand(4, generator=generator) * 4]
    scores = [outlier_scores(w, n) for w, n in zip(weights, norms, strict=True)]
    values = [abs(float(w[i, j])) * float(n[j]) ** 0.5
              for w, n in zip(weights, norms, strict=True)
              for i in range(w.shape[0]) for j in range(w.shape[1])]
    assert torch.cat([s.reshape(-1) for s in scores]).tolist() == pytest.approx(values)
    mean = sum(values) / len(values)
    for threshold in (0.5, 1.0, 2.0):
        expected = sum(v > threshold * mean for v in values) / len(values)
        assert outlier_ratio(scores, threshold) == pytest.approx(expected)


def test_the_sparsities_average_the_target_and_span_twice_lambda():
    ratios = [0.02, 0.05, 0.01, 0.08, 0.03]
    sparsities = owl_sparsities(ratios, 0.6, 0.1)
    assert sum(sparsities) / len(sparsities) == pytest.approx(0.6)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.2)
    # linear in the ratio, the most outliers pruned least
    for r, s in zip(ratios, sparsities, strict=True):
        assert s == pytest.approx(sparsities[2] - (r - 0.01) / 0.07 * 0.2)
    assert sparsities.index(min(sparsities)) == 3
    assert owl_sparsities([0.04] * 3, 0.5, 0.1) == [0.5] * 3
    with pytest.raises(SnapPruneError, match="owl-lambda"):
        owl_sparsities([0.0, 1.0], 0.9, 0.2)


@torch.no_grad()
def test_each_block_is_pruned_to_its_own_sparsity_from_the_dense_models_ratios():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    ids = token_batch(4, 32)
    settings = PruneSettings("wanda", sparsity=0.5, allocation="owl", owl_lambda=0.1,
                             owl_threshold=3.0)
    run = prune_model(model, ids, settings, progress=False)
    blocks = dense.model.layers
    assert len(run.owl.ratios) == len(blocks)
    # block 1's ratio by hand: its layers' inputs on the dense model's stream
    norms, handles = {}, []
    for name, module in blocks[1].named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(
                lambda m, inp, _o, n=name: norms.update(
                    {n: inp[0].reshape(-1, inp[0].shape[-1]).pow(2).mean(0)})))
    dense(ids)
    for handle in handles:
        handle.remove()
    scores = [outlier_scores(dict(blocks[1].named_modules())[n].weight, sq)
              for n, sq in norms.items()]
    assert run.owl.ratios[1] == pytest.approx(outlier_ratio(scores, 3.0), abs=1e-6)
    assert run.owl.sparsities == pytest.approx(owl_sparsities(run.owl.ratios, 0.5, 0.1))
    for record in run.layers:
        index = int(record.name.split(".")[2])
        assert record.sparsity == pytest.approx(run.owl.sparsities[index], abs=0.01)
    assert run.achieved_sparsity == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("args,fragment", [
    (["--allocation", "owl", "--pattern", "2:4"], "fixes each layer's"),
    (["--allocation", "owl", "--sparsity", "0.9", "--owl-lambda", "0.2"], "owl-lambda"),
    (["--allocation", "owl", "--owl-threshold", "0"], "threshold must be > 0"),
])
def test_owl_requests_that_cannot_run_are_refused(tiny_dir, tmp_path, capsys, args, fragment):
    code, err = _run(capsys, "prune", "--model", tiny_dir, *args, "--calib", C4_FILE,
                     "--nsamples", "2", "--seqlen", "16", "--no-eval", "--out", tmp_path / "no")
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "no").exists()


def test_the_report_states_every_blocks_ratio_and_sparsity(tiny_dir, tmp_path, capsys):
    out = tmp_path / "owl"
    code, err = _run(capsys, "prune", "--model", tiny_dir, "--method", "wanda", "--allocation",
                     "owl", "--calib", C4_FILE, "--nsamples", "4", "--seqlen", "32",
                     "--no-eval", "--out", out)
    assert code == 0, err
    report = json.loads((out / "snapprune_report.json").read_text())
    owl = report["allocation"]
    assert owl["allocation"] == "owl" and owl["lambda"] == 0.08 and owl["threshold"] == 5.0
    assert len(owl["sparsities"]) == len(owl["outlier_ratios"]) >= 2
    assert sum(owl["sparsities"]) / len(owl["sparsities"]) == pytest.approx(0.5)


def test_a_streamed_run_refuses_owl_before_any_work(tmp_path):
    from snapprune.models.streaming import stream_prune

    with pytest.raises(SnapPruneError, match="no --stream"):
        stream_prune(tmp_path / "absent", tmp_path / "out", lambda model: None,
                     PruneSettings("wanda", allocation="owl"))
    assert not (tmp_path / "out").exists()
