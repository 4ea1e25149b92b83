"""``shrink --allocation sensitivity``: per-block widths from measured costs. The allocation
against brute force, the costs against their definition, the heterogeneous model against the
model with the same units zeroed, its deci GGUF in llama.cpp, and the refusals."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import C4_FILE
from test_cli import _run
from test_depth import _job as depth_job
from test_export import LLAMA_CPP, assert_runs_in_llama_cpp_like
from tiny_models import tiny_model, token_batch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from snapprune.engine.widths import CostCurve, allocate_counts
from snapprune.errors import SnapPruneError
from snapprune.models.blockloop import block_output
from snapprune.models.capture import capture_block_inputs
from snapprune.models.settings import QuantizeSettings, ShrinkSettings
from snapprune.models.shrink import plan_width, shrink_model
from snapprune.models.width_sensitivity import _counts, _limit, measure_and_allocate
from snapprune.run import execute

LAYERS = 6


def _llama(vocab: int = 512, seed: int = 0):
    """Eight query heads in two key/value groups: a head count per group left to allocate."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256,
                         num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config).eval()


def _settings(**changes) -> ShrinkSettings:
    return ShrinkSettings(**{"method": "thanos", "mlp": 0.25, "heads": 0.25, "multiple_of": 32,
                             "allocation": "sensitivity", **changes})


# -- the allocation, against brute force ------------------------------------------------------


def _random_curve(generator: torch.Generator, limit: int, points: int) -> CostCurve:
    counts = sorted({0, limit, *torch.randint(1, limit, (points,), generator=generator).tolist()})
    costs = [0.0, *torch.rand(len(counts) - 1, generator=generator).mul(3).tolist()]
    return CostCurve(tuple(counts), tuple(costs))  # not monotone, not convex


@pytest.mark.parametrize("seed", range(6))
def test_the_allocation_is_the_least_total_cost_of_all_allocations(seed):
    generator = torch.Generator().manual_seed(seed)
    curves = [_random_curve(generator, int(torch.randint(2, 6, (1,), generator=generator)), 2)
              for _ in range(4)]
    reach = sum(c.limit for c in curves)
    for total in range(reach + 1):
        counts = allocate_counts(curves, total)
        assert sum(counts) == total
        assert all(0 <= k <= c.limit for k, c in zip(counts, curves, strict=True))
        cost = sum(c.at(k) for k, c in zip(counts, curves, strict=True))
        best = min(sum(c.at(k) for k, c in zip(combo, curves, strict=True))
                   for combo in itertools.product(*[range(c.limit + 1) for c in curves])
                   if sum(combo) == total)
        assert cost == pytest.approx(best, abs=1e-12)


def test_a_curve_is_read_linearly_between_its_measured_counts():
    curve = CostCurve((0, 2, 6), (0.0, 1.0, 9.0))
    assert [curve.at(k) for k in range(7)] == [0.0, 0.5, 1.0, 3.0, 5.0, 7.0, 9.0]
    with pytest.raises(SnapPruneError, match="outside"):
        curve.at(7)
    with pytest.raises(SnapPruneError, match="increasing"):
        CostCurve((0, 3, 3), (0.0, 1.0, 2.0))


def test_a_total_beyond_every_limit_is_refused():
    with pytest.raises(SnapPruneError, match="exceeds"):
        allocate_counts([CostCurve((0, 2), (0.0, 1.0))] * 2, 5)


def test_each_block_may_lose_a_bounded_share_and_keeps_one_unit():
    assert _limit(48, 0.3) == 36  # 2.5 x the uniform share
    assert _limit(48, 0.5) == 43  # at most 90 %
    assert _limit(2, 0.5) == 1  # always one unit kept, one allowed
    assert _counts(36)[0] == 0 and _counts(36)[-1] == 36 and len(_counts(36)) == 13


# -- the measured costs, against their definition ----------------------------------------------


@torch.no_grad()
def test_the_costs_are_each_tokens_output_error_over_its_stream():
    model = _llama()
    ids = token_batch(8, 24)
    blocks = model.model.layers
    settings = _settings()
    plan = plan_width(model, settings)
    inputs = capture_block_inputs(model, blocks, ids, torch.device("cpu"), 8)
    found = measure_and_allocate(model, inputs, plan, settings, torch.device("cpu"),
                                 progress=False)
    # Block 2 by hand: its input is the dense stream through blocks 0 and 1.
    x = inputs.batches[0]
    for block in blocks[:2]:
        x = block_output(inputs.run(block, x))
    seen = {}
    handle = blocks[2].mlp.down_proj.register_forward_hook(
        lambda _m, inp, _o: seen.update(x=inp[0]))
    out = block_output(inputs.run(blocks[2], x))
    handle.remove()
    stream = out.pow(2).sum(-1).reshape(-1)  # each token's stream leaving the block
    acts = seen["x"].reshape(-1, 256)
    weight = blocks[2].mlp.down_proj.weight
    curve = found.mlp[2]
    assert curve.counts == _counts(_limit(8, 0.25))
    for count, cost in zip(curve.counts[1:], curve.costs[1:], strict=True):
        # the method's cut of ``count`` units of 32 neurons, its error measured by hand
        from snapprune.engine import LayerStats, prune_weight
        from snapprune.engine.units import lowest_units

        result = prune_weight(weight, LayerStats.from_inputs(acts), method="thanos",
                              pattern="structured", sparsity=count * 32 / 256,
                              choose_columns=lambda s, k=count: lowest_units(s, 1, k * 32))
        error = ((acts @ (result.weight - weight).T) ** 2).sum(-1)
        assert cost == pytest.approx(float((error / stream).mean()), rel=1e-3)
    assert sum(found.mlp_counts) == 2 * LAYERS  # the uniform total: 64 of 256 neurons each
    assert sum(found.head_counts) == LAYERS  # one query head per group each


@torch.no_grad()
def test_the_allocation_follows_the_measured_costs():
    """A block whose MLP output is scaled up 30x costs more to cut: it loses fewer neurons."""
    model = _llama()
    model.model.layers[3].mlp.down_proj.weight.mul_(30.0)
    settings = _settings(heads=0.0)
    _, run = shrink_model(model, token_batch(8, 24), settings, progress=False)
    widths = run.plan.mlp_blocks
    assert widths[3] == max(widths) and widths[3] > 192
    assert sum(256 - w for w in widths) == 64 * LAYERS


# -- the heterogeneous model ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["thanos", "wanda"])
@torch.no_grad()
def test_the_heterogeneous_model_equals_the_model_with_units_zeroed(method):
    model = _llama()
    ids = token_batch(4, 32)
    model.model.layers[1].mlp.down_proj.weight.mul_(30.0)  # widths that differ
    model.model.layers[3].self_attn.o_proj.weight.mul_(30.0)  # and head counts
    smaller, run = shrink_model(model, ids, _settings(method=method), progress=False)
    plan = run.plan
    assert len(set(plan.mlp_blocks)) > 1 and len(set(plan.heads_blocks)) > 1
    for index, block in enumerate(smaller.model.layers):
        assert block.mlp.down_proj.in_features == plan.mlp_at(index)
        assert block.mlp.gate_proj.out_features == plan.mlp_at(index)
        assert block.self_attn.q_proj.out_features == plan.heads_at(index) * 32
        assert block.self_attn.k_proj.out_features == 2 * 32
        assert block.self_attn.num_key_value_groups == plan.heads_at(index) // 2
        assert plan.mlp_at(index) % 32 == 0
    torch.testing.assert_close(smaller(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)
    assert run.parameters_after < run.parameters_before


# -- through the command line and into llama.cpp -------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = tmp_path_factory.mktemp("heads8_llama")
    model = _llama(len(tokenizer))
    with torch.no_grad():  # blocks that cost more to cut: widths and head counts differ
        model.model.layers[2].mlp.down_proj.weight.mul_(30.0)
        model.model.layers[4].self_attn.o_proj.weight.mul_(30.0)
        for block in model.model.layers:  # sharp attention: llama.cpp's rope order matters
            block.self_attn.q_proj.weight.mul_(8.0)
            block.self_attn.k_proj.weight.mul_(8.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _job(model_dir, *steps, fmt="gguf"):
    return depth_job(model_dir, *steps, fmt=fmt)


def test_per_block_widths_are_written_as_deci_and_run_in_llama_cpp(llama_dir, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "deci"
    outcome = execute(_job(llama_dir, _settings(), QuantizeSettings("q8_0")), out,
                      progress=False, announce=False)
    reader = GGUFReader(str(out / "model.gguf"))
    assert reader.fields["general.architecture"].contents() == "deci"
    layers = outcome.model.model.layers
    ffn = reader.fields["deci.feed_forward_length"].contents()
    heads = reader.fields["deci.attention.head_count"].contents()
    kv = reader.fields["deci.attention.head_count_kv"].contents()
    assert ffn == [b.mlp.down_proj.in_features for b in layers] and len(set(ffn)) > 1
    assert heads == [b.self_attn.q_proj.out_features // 32 for b in layers]
    assert heads[4] == 8 and len(set(heads)) > 1
    assert kv == [2] * LAYERS
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    for i, block in enumerate(layers):
        assert shapes[f"blk.{i}.ffn_down.weight"][0] == block.mlp.down_proj.in_features
    report = json.loads((out / "snapprune_report.json").read_text())
    width = report["width"]
    assert width["mlp"]["per_block"] == ffn and width["heads"]["per_block"] == heads
    assert len(width["sensitivity"]["mlp_curves"]) == LAYERS
    assert (out / "widths.png").stat().st_size > 0
    if LLAMA_CPP:
        assert_runs_in_llama_cpp_like(outcome.model, out / "model.gguf")


def test_a_uniform_allocation_stays_plain_llama(llama_dir, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "plain"
    execute(_job(llama_dir, _settings(allocation="uniform"), QuantizeSettings("q8_0")), out,
            progress=False, announce=False)
    reader = GGUFReader(str(out / "model.gguf"))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert not (out / "widths.png").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--allocation", "sensitivity"], "--multiple-of 256"),  # hf: the Nemotron-NAS layout
    (["--allocation", "sensitivity", "--format", "gguf", "--multiple-of", "96"],
     "not a multiple of --multiple-of 96"),
    (["--allocation", "widest"], "invalid choice"),
])
def test_requests_that_cannot_be_written_are_refused(llama_dir, tmp_path, capsys, args,
                                                     fragment):
    code, err = _run(capsys, "shrink", "--model", llama_dir, "--mlp", "0.25", *args,
                     "--calib", C4_FILE, "--nsamples", "2", "--seqlen", "16", "--no-eval",
                     "--out", tmp_path / "no")
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "no").exists()


def test_per_block_widths_need_the_llama_family():
    with pytest.raises(SnapPruneError, match="LLaMA-family"):
        shrink_model(tiny_model("opt"), token_batch(2, 8), _settings(heads=0.0),
                     progress=False)
