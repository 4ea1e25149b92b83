"""Depth pruning (``prune-depth``): scores against their definitions, a removed block equal to
the model with that block skipped, the repair equal to a float64 least-squares reference, the
cut model reloaded by transformers and llama.cpp, refusals before any work."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import C4_FILE
from test_cli import _run
from test_export import LLAMA_CPP, NO_LLAMA_CPP, assert_runs_in_llama_cpp_like
from tiny_models import DEEP_LAYERS, deep_llama, tiny_model, token_batch
from transformers import AutoModelForCausalLM

from snapprune.engine.depth import RepairProblem, angular_distance, kl_from_logits
from snapprune.errors import SnapPruneError
from snapprune.jobs import CalibrationSpec, EvaluationSpec, Job, OutputSpec
from snapprune.models.adapters import adapter_for
from snapprune.models.capture import capture_block_inputs
from snapprune.models.depth import (
    BlockScore,
    NoAttention,
    attention_free,
    choose_attention,
    choose_blocks,
    cut_blocks,
    depth_model,
    remove_attention,
    removed_runs,
    score_blocks,
)
from snapprune.models.settings import DepthSettings, QuantizeSettings, ShrinkSettings
from snapprune.run import execute

LAYERS = DEEP_LAYERS


def _skipping(model, skipped: set[int]):
    """The model with the blocks in ``skipped`` passing their input through (forward hooks):
    the definition of removing them."""
    blocks = adapter_for(model).decoder_blocks(model)
    handles = []
    for index in skipped:
        def passthrough(_module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        handles.append(blocks[index].register_forward_hook(passthrough, with_kwargs=True))
    return handles


# -- the maths, against definitions ------------------------------------------------------------


def test_angular_distance_and_kl_follow_their_definitions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for t in range(5):
        x, y = a[t].tolist(), b[t].tolist()
        dot = sum(p * q for p, q in zip(x, y, strict=True))
        cos = dot / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))
        assert angular_distance(a, b)[t].item() == pytest.approx(math.acos(cos) / math.pi,
                                                                   abs=1e-12)
    assert angular_distance(a, 3 * a).abs().max() < 1e-7  # scale does not turn the stream
    assert angular_distance(a, -a).sub(1).abs().max() < 1e-7
    p_logits, q_logits = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    for t in range(4):
        p = torch.softmax(p_logits[t].double(), 0).tolist()
        q = torch.softmax(q_logits[t].double(), 0).tolist()
        reference = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        assert kl_from_logits(p_logits, q_logits)[t].item() == pytest.approx(reference, 1e-10)
    assert kl_from_logits(p_logits, p_logits).abs().max() < 1e-12


def test_the_repair_solve_equals_ridge_least_squares_from_the_definition():
    """Δ minimises ‖E − A Δᵀ‖² + λ‖Δ‖² (λ = percdamp · mean diag AᵀA): the augmented
    least-squares problem [A; √λ I] Δᵀ = [E; 0], solved by lstsq in float64."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 40, 6, generator=g)
    e = torch.randn(2, 40, 3, generator=g)
    problem = RepairProblem(6, 3)
    problem.add(a[0], e[0])
    problem.add(a[1], e[1])  # batches add up
    A, E = a.reshape(-1, 6).double(), e.reshape(-1, 3).double()
    for percdamp in (0.0, 0.01, 0.5):
        lam = percdamp * (A * A).sum(0).mean()
        stacked = torch.cat([A, lam.sqrt() * torch.eye(6, dtype=torch.float64)])
        target = torch.cat([E, torch.zeros(6, 3, dtype=torch.float64)])
        reference = torch.linalg.lstsq(stacked, target).solution.T
        torch.testing.assert_close(problem.solve(percdamp), reference, rtol=1e-9, atol=1e-11)


def test_an_input_no_token_used_keeps_its_weight():
    a = torch.randn(30, 4)
    a[:, 2] = 0
    problem = RepairProblem(4, 2)
    problem.add(a, torch.randn(30, 2))
    delta = problem.solve(0.01)
    assert torch.isfinite(delta).all() and (delta[:, 2] == 0).all()


def test_choose_the_lowest_scores_and_group_runs():
    scores = [BlockScore(i, angular, 0.0, kl) for i, (angular, kl) in
              enumerate([(0.5, 0.1), (0.1, 0.9), (0.3, 0.2), (0.1, 0.05), (0.9, 0.3)])]
    assert choose_blocks(scores, 2, "angular") == [1, 3]
    assert choose_blocks(scores, 2, "kl") == [0, 3]
    assert choose_blocks(scores, 1, "angular") == [3]  # a tie goes to the later block
    assert removed_runs([7, 2, 3, 5]) == [(2, 3), (5,), (7,)]


# -- on models -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "qwen2"])
def test_a_removed_block_is_the_model_with_that_block_skipped(family):
    model = tiny_model(family) if family != "llama" else deep_llama()
    reference = copy.deepcopy(model)
    ids = token_batch(4, 24)
    count = len(adapter_for(model).decoder_blocks(model))
    removed = [1] if count == 3 else [1, 4]
    cut_blocks(model, removed)
    handles = _skipping(reference, set(removed))
    with torch.no_grad():
        expected = reference(ids).logits
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    assert len(adapter_for(model).decoder_blocks(model)) == count - len(removed)
    assert model.config.num_hidden_layers == count - len(removed)


def test_the_cut_model_decodes_with_its_kv_cache_like_without():
    """Each kept attention's ``layer_idx`` renumbered: the cache holds one slot per kept
    block, and decoding with it gives the full-sequence logits."""
    model = deep_llama()
    cut_blocks(model, [0, 3])
    ids = token_batch(1, 20)
    with torch.no_grad():
        full = model(ids).logits[0, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prefix.past_key_values).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    layers = [b.self_attn.layer_idx for b in model.model.layers]
    assert layers == list(range(LAYERS - 2))


def test_the_layer_types_follow_the_kept_blocks():
    model = tiny_model("qwen2")
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    cut_blocks(model, [1])
    assert model.config.layer_types == ["full_attention", "full_attention"]


def test_scores_are_measured_on_the_model():
    """A block made the identity (its writing projections zeroed) scores 0 on both measures
    and is removed first; the KL is that of the model with each block skipped."""
    model = deep_llama()
    blocks = model.model.layers
    with torch.no_grad():
        blocks[2].self_attn.o_proj.weight.zero_()
        blocks[2].mlp.down_proj.weight.zero_()
        blocks[4].mlp.down_proj.weight.mul_(30)  # skipping it moves the distribution far
    ids = token_batch(8, 24)
    inputs = capture_block_inputs(model, blocks, ids, torch.device("cpu"), 4)
    scores = score_blocks(model, inputs, torch.device("cpu"), kl=True, progress=False)
    assert scores[2].angular < 1e-6 and scores[2].kl < 1e-9 and scores[2].influence < 1e-9
    assert choose_blocks(scores, 1, "kl") == [2] == choose_blocks(scores, 1, "angular")
    with torch.no_grad():
        full = model(ids[:8]).logits[:, ::4]
        handles = _skipping(model, {4})
        skipped = model(ids[:8]).logits[:, ::4]
    for handle in handles:
        handle.remove()
    forward = kl_from_logits(full, skipped).mean().item()
    backward = kl_from_logits(skipped, full).mean().item()  # KL is not symmetric
    assert abs(scores[4].kl - forward) < 0.01 * abs(forward - backward)


def test_the_repair_is_least_squares_on_the_cut_stream():
    """Repairing block 1 before removed block 2: its down_proj becomes W + Δ, Δ the ridge
    least-squares fit of (full stream after block 2 − cut stream after block 1) on its inputs,
    written here from the definition with lstsq; the stream error falls."""
    model = deep_llama(seed=3)
    reference = copy.deepcopy(model)
    ids = token_batch(8, 24)
    settings = DepthSettings(blocks=1, score="angular", percdamp=0.05)
    blocks = reference.model.layers
    inputs = capture_block_inputs(reference, blocks, ids, torch.device("cpu"), 8)
    # a forced choice: the test fixes which block goes
    from snapprune.models import depth as depth_module

    original = depth_module.choose_blocks
    depth_module.choose_blocks = lambda scores, count, score: [2]
    try:
        _, run = depth_model(model, ids, settings, batch_size=8, progress=False)
    finally:
        depth_module.choose_blocks = original
    assert run.removed == [2] and run.repairs[0].block == 1 and not run.repairs[0].reason
    assert run.repairs[0].error_after < run.repairs[0].error_before
    with torch.no_grad():
        x = inputs.batches[0]
        x = inputs.run(blocks[0], x)
        seen = {}
        handle = blocks[1].mlp.down_proj.register_forward_hook(
            lambda m, i, o: seen.update(a=i[0]))
        cut = inputs.run(blocks[1], x)
        handle.remove()
        target = inputs.run(blocks[2], cut)
    A = seen["a"].reshape(-1, 128).double()
    E = (target - cut).reshape(-1, 64).double()
    lam = 0.05 * (A * A).sum(0).mean()
    stacked = torch.cat([A, lam.sqrt() * torch.eye(128, dtype=torch.float64)])
    padded = torch.cat([E, torch.zeros(128, 64, dtype=torch.float64)])
    delta = torch.linalg.lstsq(stacked, padded).solution.T
    expected = (blocks[1].mlp.down_proj.weight.double() + delta).float()
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, expected,
                               rtol=1e-5, atol=1e-6)


def test_repair_lowers_the_calibration_stream_error_and_no_repair_keeps_weights():
    model, plain = deep_llama(seed=5), deep_llama(seed=5)
    ids = token_batch(8, 24)
    _, run = depth_model(model, ids, DepthSettings(blocks=2), progress=False)
    repaired = [r for r in run.repairs if not r.reason]
    assert repaired and all(r.error_after < r.error_before for r in repaired)
    _, bare = depth_model(plain, ids, DepthSettings(blocks=2, repair=False), progress=False)
    assert bare.removed == run.removed
    kept = [i for i in range(LAYERS) if i not in bare.removed]
    source = deep_llama(seed=5)
    for new, old in enumerate(kept):
        assert torch.equal(plain.model.layers[new].mlp.down_proj.weight,
                           source.model.layers[old].mlp.down_proj.weight)
    assert all(r.reason == "repair switched off" for r in bare.repairs if r.block >= 0)
    assert len(bare.repairs) == len(removed_runs(bare.removed))


def test_a_leading_run_is_reported_unrepaired():
    model = deep_llama()
    model.model.layers[0].mlp.down_proj.weight.data.zero_()
    model.model.layers[0].self_attn.o_proj.weight.data.zero_()
    _, run = depth_model(model, token_batch(4, 16), DepthSettings(blocks=1), progress=False)
    assert run.removed == [0]
    assert run.repairs[0].block == -1 and "block 0" in run.repairs[0].reason


def _job(model_dir, *steps, fmt="hf") -> Job:
    return Job(model=str(model_dir), steps=steps,
               calibration=CalibrationSpec(str(C4_FILE), 8, 32),
               evaluation=EvaluationSpec(ppl=(), dense=False),
               output=OutputSpec(format=fmt, samples=False))


def test_the_saved_model_is_a_standard_config_with_the_same_logits(deep_dir, tmp_path):
    out = tmp_path / "shallow"
    outcome = execute(_job(deep_dir, DepthSettings(blocks=2, score="kl")), out, progress=False,
                      announce=False)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_hidden_layers == LAYERS - 2
    ids = token_batch(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, outcome.model(ids).logits)
    report = json.loads((out / "snapprune_report.json").read_text())
    depth = report["depth"]
    assert depth["blocks_before"] == LAYERS and depth["blocks_after"] == LAYERS - 2
    assert len(depth["scores"]) == LAYERS and len(depth["removed"]) == 2
    assert depth["parameters_after"] < depth["parameters_before"]


def test_depth_then_shrink_then_quantise_in_one_job_writes_a_gguf(deep_dir, tmp_path):
    out = tmp_path / "both"
    outcome = execute(_job(deep_dir, DepthSettings(blocks=1),
                           ShrinkSettings("thanos", mlp=0.25, multiple_of=32),
                           QuantizeSettings("q8_0"), fmt="gguf"),
                      out, progress=False, announce=False)
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")
    assert loaded.config.num_hidden_layers == LAYERS - 1
    assert loaded.config.intermediate_size == 96
    if LLAMA_CPP:
        assert_runs_in_llama_cpp_like(outcome.model, out / "model.gguf")


@pytest.mark.skipif(not LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_a_shallower_gguf_runs_in_llama_cpp(deep_dir, tmp_path):
    out = tmp_path / "gguf"
    outcome = execute(_job(deep_dir, DepthSettings(blocks=2), QuantizeSettings("q8_0"),
                           fmt="gguf"), out, progress=False, announce=False)
    assert_runs_in_llama_cpp_like(outcome.model, out / "model.gguf")


def test_too_many_blocks_is_refused_before_any_work(deep_dir, tmp_path, capsys):
    code, err = _run(capsys, "prune-depth", "--model", deep_dir, "--blocks", str(LAYERS),
                     "--calib", C4_FILE, "--nsamples", "2", "--seqlen", "16", "--no-eval",
                     "--out", tmp_path / "never")
    assert code == 2 and "remove at most 5" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("settings,fragment", [
    (DepthSettings(blocks=0), "nothing to remove"),
    (DepthSettings(blocks=-1, attention=2), "integer >= 0"),
    (DepthSettings(blocks=1, score="cosine"), "unknown block score"),
    (DepthSettings(blocks=1, percdamp=-1.0), "percdamp"),
])
def test_bad_settings_are_refused(settings, fragment):
    with pytest.raises(SnapPruneError, match=fragment):
        settings.check()


def test_a_projection_behind_a_norm_is_not_repaired():
    """OLMo-2 normalises the MLP's output before adding it to the stream: least squares on
    ``down_proj`` would not be exact there, so it is left alone and the report says why."""
    from transformers import Olmo2Config

    torch.manual_seed(0)
    config = Olmo2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.layers[2].post_feedforward_layernorm.weight.mul_(0.01)
        model.model.layers[2].post_attention_layernorm.weight.mul_(0.01)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    _, run = depth_model(model, token_batch(4, 16), DepthSettings(blocks=1), progress=False)
    assert run.removed == [2]
    assert "does not enter the stream straight" in run.repairs[0].reason
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight,
                       weights["model.layers.1.mlp.down_proj.weight"])


def test_depth_shrink_recover_quantise_in_one_recipe(deep_dir, tmp_path):
    """The whole flow as one job: distillation from the dense model to a student with fewer
    blocks and narrower MLPs (the logits need no equal depth), then GPTQ, written as GGUF."""
    from snapprune.models.settings import RecoverSettings

    recover = RecoverSettings(tokens=128, seqlen=16, batch_size=2, data=str(C4_FILE), lr=1e-3)
    out = tmp_path / "flow"
    outcome = execute(_job(deep_dir, DepthSettings(blocks=2),
                           ShrinkSettings("thanos", mlp=0.25, multiple_of=32), recover,
                           QuantizeSettings("q8_0"), fmt="gguf"),
                      out, progress=False, announce=False)
    assert outcome.job.kinds == ("prune-depth", "shrink", "recover", "quantize")
    run = outcome.run_of("recover")
    assert run.teacher is not None and len(run.curve) > 0
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")
    assert loaded.config.num_hidden_layers == LAYERS - 2
    assert loaded.config.intermediate_size == 96
    blockwise = RecoverSettings(tokens=128, seqlen=16, batch_size=2, data=str(C4_FILE),
                                hidden_weight=1.0)
    with pytest.raises(SnapPruneError, match="hidden-weight"):
        execute(_job(deep_dir, DepthSettings(blocks=1), blockwise), tmp_path / "refused",
                progress=False, announce=False)
    assert not (tmp_path / "refused").exists()


# -- attention sub-layers ------------------------------------------------------------------------


def _zero_attention(model, indices: set[int]):
    """The definition of removing a block's attention: its contribution to the stream is 0."""
    handles = []
    for index in indices:
        def zeroed(_module, _args, output):
            return (torch.zeros_like(output[0]), *output[1:])
        handles.append(model.model.layers[index].self_attn.register_forward_hook(zeroed))
    return handles


def test_a_removed_attention_is_the_block_with_attention_adding_nothing():
    model = deep_llama()
    reference = copy.deepcopy(model)
    for index in (0, 3):
        remove_attention(model, model.model.layers[index])
    handles = _zero_attention(reference, {0, 3})
    ids = token_batch(3, 20)
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    for handle in handles:
        handle.remove()
    assert isinstance(model.model.layers[3].self_attn, NoAttention)
    with torch.no_grad():  # the KV cache still counts positions through a block without one
        full = model(ids[:1]).logits[0, -1]
        prefix = model(ids[:1, :-1], use_cache=True)
        step = model(ids[:1, -1:], past_key_values=prefix.past_key_values).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_the_first_kept_block_keeps_its_attention_however_it_scores():
    """llama.cpp reads the head size from the first block's head count: a deci file whose first
    block has no attention does not load, so the first kept block is never a candidate."""
    scores = [BlockScore(i, 0.5, 0.5, attention_angular=a, attention_kl=a)
              for i, a in enumerate([0.0, 0.3, 0.1, 0.2])]
    assert choose_attention(scores, 1, "angular", removed=[]) == [2]
    assert choose_attention(list(reversed(scores)), 2, "kl", removed=[]) == [2, 3]
    assert choose_attention(scores, 1, "kl", removed=[0]) == [2]  # block 1 is now the first


def test_attention_scores_follow_their_definitions():
    model = deep_llama(seed=2)
    blocks = model.model.layers
    with torch.no_grad():
        blocks[1].self_attn.o_proj.weight.zero_()
    ids = token_batch(8, 24)
    inputs = capture_block_inputs(model, blocks, ids, torch.device("cpu"), 4)
    scores = score_blocks(model, inputs, torch.device("cpu"), kl=True, attention=True,
                          progress=False)
    assert scores[1].attention_angular < 1e-7 and scores[1].attention_kl < 1e-9
    assert choose_attention(scores, 1, "kl", removed=[]) == [1]
    assert choose_attention(scores, 1, "angular", removed=[1]) != [1]  # only kept blocks
    # block 4's attention alone skipped: the KL of the model with its output zeroed
    with torch.no_grad():
        full = model(ids[:8]).logits[:, ::4]
        handles = _zero_attention(model, {4})
        skipped = model(ids[:8]).logits[:, ::4]
    for handle in handles:
        handle.remove()
    assert scores[4].attention_kl == pytest.approx(kl_from_logits(full, skipped).mean().item(),
                                                   rel=1e-3)
    # and its angular distance: between the stream entering and that stream plus o_proj's
    x = inputs.batches[0]
    for block in blocks[:4]:
        x = inputs.run(block, x)
    seen = {}
    handle = blocks[4].self_attn.o_proj.register_forward_hook(lambda m, i, o: seen.update(o=o))
    with torch.no_grad():
        inputs.run(blocks[4], x)
    handle.remove()
    first = angular_distance(x, x + seen["o"]).mean().item()
    assert first == pytest.approx(scores[4].attention_angular, rel=0.3)


def test_removing_attention_repairs_the_blocks_own_mlp():
    model = deep_llama(seed=4)
    _, run = depth_model(model, token_batch(8, 24), DepthSettings(attention=2), progress=False)
    assert len(run.attention_removed) == 2 and run.removed == []
    repaired = [r for r in run.repairs if r.attention]
    assert len(repaired) == 2 and all(r.error_after < r.error_before for r in repaired)
    assert sum(attention_free(b) for b in model.model.layers) == 2


def test_an_attention_free_gguf_is_deci_and_runs_in_llama_cpp(deep_dir, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "deci"
    outcome = execute(_job(deep_dir, DepthSettings(blocks=1, attention=2),
                           QuantizeSettings("q8_0"), fmt="gguf"),
                      out, progress=False, announce=False)
    reader = GGUFReader(str(out / "model.gguf"))
    assert reader.fields["general.architecture"].contents() == "deci"
    heads = reader.fields["deci.attention.head_count"].contents()
    free = [i for i, b in enumerate(outcome.model.model.layers) if attention_free(b)]
    assert len(heads) == LAYERS - 1 and [i for i, h in enumerate(heads) if h == 0] == free
    names = {t.name for t in reader.tensors}
    for i in free:
        assert f"blk.{i}.attn_q.weight" not in names and f"blk.{i}.attn_norm.weight" not in names
    if LLAMA_CPP:
        assert_runs_in_llama_cpp_like(outcome.model, out / "model.gguf")


@pytest.mark.parametrize("args,fragment", [
    (["--attention", "2"], "not a multiple of 256"),  # hf: the Nemotron-NAS layout's widths
    (["--attention", "2", "--format", "compressed-tensors"], "no compressed-tensors form"),
    (["--attention", "6", "--format", "gguf"], "remove at most 5"),
    (["--blocks", "2", "--attention", "4", "--format", "gguf"], "remove at most 3"),
])
def test_attention_requests_that_cannot_be_written_are_refused(deep_dir, tmp_path, capsys, args,
                                                               fragment):
    code, err = _run(capsys, "prune-depth", "--model", deep_dir, *args, "--calib", C4_FILE,
                     "--nsamples", "2", "--seqlen", "16", "--no-eval", "--out", tmp_path / "no")
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "no").exists()


def test_attention_removal_needs_the_llama_family():
    with pytest.raises(SnapPruneError, match="LLaMA family"):
        depth_model(tiny_model("gpt2"), token_batch(2, 8), DepthSettings(attention=1),
                    progress=False)
