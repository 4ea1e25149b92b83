"""``shrink``: whole neurons and heads cut out; the smaller model equals the zeroed one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import C4_FILE
from problems import lstsq_optimum, make_problem, relative_close
from test_cli import _run
from tiny_models import tiny_model, token_batch
from transformers import AutoModelForCausalLM, LlamaConfig

from snapprune import SnapPruneError, prune_weight
from snapprune.engine.units import lowest_units
from snapprune.models.settings import ShrinkSettings
from snapprune.models.shrink import plan_width, shrink_model

METHODS = ("magnitude", "wanda", "sparsegpt", "thanos")


def mha_llama():
    """LLaMA-1/2-7B style attention: as many key/value heads as query heads."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config).eval()


CASES = [("llama", 0.3, 0.5), ("qwen2", 0.3, 0.5), ("mistral", 0.5, 0.5), ("mha", 0.3, 0.5),
         ("opt", 0.3, 0.0), ("gpt2", 0.3, 0.0), ("gpt_neox", 0.4, 0.0)]


@pytest.mark.parametrize("family,mlp,heads", CASES)
@pytest.mark.parametrize("method", ["thanos", "wanda"])
@torch.no_grad()
def test_shrunk_model_equals_the_model_with_units_zeroed(family, mlp, heads, method):
    model = mha_llama() if family == "mha" else tiny_model(family)
    ids = token_batch(4, 32)
    smaller, run = shrink_model(model, ids, ShrinkSettings(method=method, mlp=mlp, heads=heads),
                                progress=False)
    # ``model`` now holds the same network with the removed units zeroed in place.
    torch.testing.assert_close(smaller(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert run.parameters_after < run.parameters_before
    removed = run.removed[0]
    if mlp:
        assert len(removed["mlp"]) == run.plan.mlp_old - run.plan.mlp_new
    if heads:
        assert len(removed["heads"]) == run.plan.heads_old - run.plan.heads_new


def expected_parameters(model, plan) -> int:
    """Parameter count after the cut, from the definition: per block, each removed neuron
    takes one row of every MLP input layer (and its bias) and one column of the output
    layer; each removed query head takes ``head_dim`` rows of q (and of k, v without GQA)
    and ``head_dim`` columns of o."""
    config = model.config
    hidden = config.hidden_size
    blocks = config.num_hidden_layers
    gated = hasattr(model.model.layers[0].mlp, "gate_proj")
    per_neuron = (3 if gated else 2) * hidden
    heads_removed = plan.heads_old - plan.heads_new
    qkv = 1 if plan.kv_new == plan.kv_old else 3
    bias = 1 if model.model.layers[0].self_attn.q_proj.bias is not None else 0
    per_head = plan.head_dim * (hidden * (qkv + 1) + bias * qkv)
    removed = (plan.mlp_old - plan.mlp_new) * per_neuron + heads_removed * per_head
    return sum(p.numel() for p in model.parameters()) - blocks * removed


@pytest.mark.parametrize("family", ["llama", "qwen2", "mha"])
def test_config_widths_and_parameter_count(family):
    model = mha_llama() if family == "mha" else tiny_model(family)
    plan = plan_width(model, ShrinkSettings(mlp=0.3, heads=0.5))
    expected = expected_parameters(model, plan)
    smaller, run = shrink_model(model, token_batch(2, 16), ShrinkSettings(mlp=0.3, heads=0.5),
                                progress=False)
    assert smaller.config.intermediate_size == 96  # 128 · 0.7 = 89.6 → multiple of 32
    assert smaller.config.num_attention_heads == 2 and smaller.config.head_dim == 16
    # GQA keeps its 2 key/value groups; without GQA k and v lose the heads q loses (4 → 2).
    assert smaller.config.num_key_value_heads == 2
    assert sum(p.numel() for p in smaller.parameters()) == expected == run.parameters_after
    layer = smaller.model.layers[0]
    assert layer.mlp.down_proj.weight.shape == (64, 96)
    assert layer.self_attn.q_proj.weight.shape == (32, 64)


@pytest.mark.parametrize("groups,per_group", [(1, 3), (2, 1), (4, 1)])
def test_unit_choice_and_thanos_update_follow_their_definitions(groups, per_group):
    """Units (``unit_size`` columns) ranked by saliency summed over rows and their columns, the
    lowest ``per_group`` of each group removed; Thanos's update is each row's least-squares
    optimum without them."""
    p = make_problem(12, 32, seed=groups)
    unit = 4
    res = prune_weight(p.weight, p.stats, method="thanos", pattern="structured",
                       sparsity=per_group * groups * unit / 32,
                       choose_columns=lambda s: lowest_units(s, unit, per_group, groups))
    scores = (p.weight.double().square() * p.inputs.double().square().sum(0)).sum(0)
    units = scores.reshape(-1, unit).sum(1).reshape(groups, -1)
    removed = []
    for g in range(groups):
        ranked = sorted(range(units.shape[1]), key=lambda u: (units[g, u].item(), u))
        removed += [g * units.shape[1] + u for u in ranked[:per_group]]
    columns = torch.zeros(32, dtype=torch.bool)
    for u in removed:
        columns[u * unit:(u + 1) * unit] = True
    assert torch.equal(res.mask, columns.expand(12, 32))
    relative_close(res.weight, lstsq_optimum(p.weight, p.inputs, res.mask, 0.01), 1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_shrinks(method):
    model = tiny_model("llama")
    smaller, run = shrink_model(model, token_batch(2, 16),
                                ShrinkSettings(method=method, mlp=0.25, heads=0.5),
                                progress=False)
    assert smaller.config.intermediate_size == 96
    errors = [r.error for r in run.layers]
    assert len(errors) == 2 * 3
    if method == "magnitude":  # no calibration data, so no reconstruction error to report
        assert all(math.isnan(e) for e in errors)
    else:
        assert all(math.isfinite(e) and e > 0 for e in errors)


def test_thanos_reconstructs_better_than_the_baselines():
    errors = {}
    for method in ("wanda", "sparsegpt", "thanos"):
        _, run = shrink_model(tiny_model("llama"), token_batch(4, 32),
                              ShrinkSettings(method=method, mlp=0.3), progress=False)
        errors[method] = sum(r.error for r in run.layers)
    assert errors["thanos"] < errors["sparsegpt"] < errors["wanda"]


@pytest.mark.parametrize("family,settings,fragment", [
    ("llama", dict(heads=0.9), "would leave a key/value group empty"),
    ("llama", dict(heads=0.1), "removes no head"),
    ("llama", dict(mlp=0.01, multiple_of=64), "rounds to no removal"),
    ("llama", dict(mlp=1.0), "[0, 1)"),
    ("llama", dict(mlp=0.3, alpha=0.1), "cannot be cut out"),
    ("llama", dict(), "nothing to remove"),
    ("opt", dict(heads=0.5), "derives the head width from the hidden size"),
    ("phi", dict(mlp=0.3), "has no width adapter"),
    ("phi3", dict(mlp=0.3), "has no width adapter"),
])
def test_refusals(family, settings, fragment):
    model = tiny_model(family)
    with pytest.raises(SnapPruneError) as info:
        plan_width(model, ShrinkSettings(**settings))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_cli_shrink_saves_a_model_plain_transformers_loads(tiny_dir, tmp_path, capsys):
    out = tmp_path / "small"
    code, err = _run(capsys, "shrink", "--model", tiny_dir, "--method", "thanos", "--mlp", 0.3,
                     "--heads", 0.5, "--calib", C4_FILE, "--nsamples", 2, "--seqlen", 64,
                     "--out", out, "--quiet")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 96 and config["num_attention_heads"] == 2
    report = json.loads((out / "snapprune_report.json").read_text())
    width = report["width"]
    assert width["mlp"] == {"old": 128, "new": 96} and width["heads"]["new"] == 2
    assert width["parameters"]["after"] < width["parameters"]["before"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == width["parameters"]["after"]
    with torch.no_grad():
        assert torch.isfinite(reloaded(token_batch(1, 16)).logits).all()


@pytest.mark.parametrize("args,fragment", [
    (["--heads", "0.9"], "key/value group empty"),
    (["--mlp", "1.2"], "[0, 1)"),
    (["--mlp", "0.3", "--alpha", "0.1"], "cannot be cut out"),
])
def test_cli_refusals_are_one_line_and_write_nothing(tiny_dir, tmp_path, capsys, args,
                                                      fragment):
    out = tmp_path / "out"
    code, err = _run(capsys, "shrink", "--model", tiny_dir, "--method", "thanos", *args,
                     "--calib", C4_FILE, "--nsamples", 1, "--seqlen", 16, "--out", out,
                     "--quiet")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert not out.exists()
