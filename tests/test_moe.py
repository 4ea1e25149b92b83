"""Mixtures of experts: each expert pruned and quantised on exactly the tokens routed to it.

References are written from transformers' own fused modules: a hook on the original (fused)
experts module records what the router sent where, and each expert's inputs are routed by hand
from that record — never through snapprune's per-expert layers.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json

import pytest
import torch
from conftest import C4_FILE
from tiny_models import MOE_FAMILIES, tiny_moe_model, token_batch
from transformers import AutoModelForCausalLM, AutoTokenizer

from snapprune import SnapPruneError, prune_model
from snapprune.engine import LayerStats, determinism, prune_weight
from snapprune.engine.quantizers import quantize_weight
from snapprune.export.gguf import FAMILIES as GGUF_FAMILIES
from snapprune.jobs import CalibrationSpec, EvaluationSpec, Job, OutputSpec
from snapprune.models import experts
from snapprune.models.adapters import adapter_for, fused_experts
from snapprune.models.blockloop import gather_layer_stats
from snapprune.models.capture import capture_block_inputs
from snapprune.models.quantize import quantize_model
from snapprune.models.settings import ExpertSettings, PruneSettings, QuantizeSettings
from snapprune.models.targets import target_layers
from snapprune.run import execute

CALIBRATION = token_batch(8, 32)


def _routed_by_hand(family: str, block: int = 0):
    """``(hidden states, top-k index, top-k weights, fused module)`` entering block
    ``block``'s experts in the original fused model, run with transformers' eager loop."""
    model = tiny_moe_model(family)
    model.config._experts_implementation = "eager"
    fused = model.model.layers[block].mlp.experts
    seen = {}

    def record(_module, args):
        seen.setdefault("calls", []).append([a.detach().clone() for a in args])

    handle = fused.register_forward_pre_hook(record)
    with torch.no_grad():
        for start in range(0, CALIBRATION.shape[0], 8):
            model(CALIBRATION[start:start + 8], use_cache=False)
    handle.remove()
    hidden, index, weights = (torch.cat(parts).detach()
                              for parts in zip(*seen["calls"], strict=True))
    return hidden, index, weights, fused


def _expert_inputs(hidden, index, fused, expert: int):
    """The inputs of an expert's gate/up and down projections, routed from the record."""
    x = hidden[(index == expert).any(-1)]
    if hasattr(fused, "gate_up_proj_bias"):  # gpt-oss: (in, out), biased, its own gating
        pairs = x @ fused.gate_up_proj[expert] + fused.gate_up_proj_bias[expert]
        return x, fused._apply_gate(pairs).detach()
    width = fused.gate_up_proj.shape[1] // 2
    gate, up = fused.gate_up_proj[expert, :width], fused.gate_up_proj[expert, width:]
    return x, (fused.act_fn(x @ gate.T) * (x @ up.T)).detach()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_unfolded_experts_compute_the_fused_model_and_fold_back_unchanged(family):
    reference = tiny_moe_model(family)
    reference.config._experts_implementation = "eager"
    model = tiny_moe_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = adapter_for(model)
    assert adapter.moe is not None and adapter.family != "generic"
    roles = adapter.layer_roles(model.model.layers[0])
    assert roles["mlp.experts.3.down_proj"] == "expert.out"
    assert roles["mlp.experts.0.gate_proj"] == roles["mlp.experts.0.up_proj"] == "expert.in"
    assert adapter.moe.router not in roles  # the router is never pruned
    assert adapter.coverage(model.model.layers[0])[1] == []
    with torch.no_grad():
        torch.testing.assert_close(model(CALIBRATION[:2]).logits,
                                   reference(CALIBRATION[:2]).logits, rtol=0, atol=0)
    with fused_experts(model):
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
    assert isinstance(model.model.layers[0].mlp.experts, experts.ExpertLinears)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_each_experts_statistics_are_those_of_the_tokens_routed_to_it(family):
    hidden, index, _, fused = _routed_by_hand(family)
    model = tiny_moe_model(family)
    blocks = adapter_for(model).decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, CALIBRATION, torch.device("cpu"))
    named = target_layers(model)[0]
    records: list[dict] = []
    stats = gather_layer_stats(blocks[0], named, inputs, torch.device("cpu"),
                               expert_records=records)
    counts = [e["tokens"] for e in records[0]["per_expert"]]
    for expert in range(fused.gate_up_proj.shape[0]):
        x, a = _expert_inputs(hidden, index, fused, expert)
        assert counts[expert] == x.shape[0] > 0
        for name, inputs_by_hand in (("gate_proj", x), ("up_proj", x), ("down_proj", a)):
            got = stats[f"model.layers.0.mlp.experts.{expert}.{name}"]
            want = LayerStats.from_inputs(inputs_by_hand)
            assert got.nsamples == want.nsamples
            torch.testing.assert_close(got.hessian, want.hessian, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got.sq_norms, want.sq_norms, rtol=1e-4, atol=1e-6)


def test_a_starved_expert_falls_back_to_every_tokens_statistics_and_says_so():
    hidden, index, _, fused = _routed_by_hand("mixtral")
    counts = [int((index == e).any(-1).sum()) for e in range(4)]
    starved = min(range(4), key=counts.__getitem__)
    model = tiny_moe_model("mixtral")
    blocks = adapter_for(model).decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, CALIBRATION, torch.device("cpu"))
    named = target_layers(model)[0]
    records: list[dict] = []
    with experts.calibration("routed", min_tokens=counts[starved] + 1):
        stats = gather_layer_stats(blocks[0], named, inputs, torch.device("cpu"),
                                   expert_records=records)
    per_expert = records[0]["per_expert"]
    assert [e["statistics"] for e in per_expert] == [
        "all tokens" if e == starved or counts[e] <= counts[starved] else "routed"
        for e in range(4)]
    width = fused.gate_up_proj.shape[1] // 2
    gate = fused.gate_up_proj[starved, :width]
    up = fused.gate_up_proj[starved, width:]
    every = fused.act_fn(hidden @ gate.T) * (hidden @ up.T)
    for name, x in (("gate_proj", hidden), ("down_proj", every)):
        got = stats[f"model.layers.0.mlp.experts.{starved}.{name}"]
        torch.testing.assert_close(got.hessian, LayerStats.from_inputs(x).hessian,
                                   rtol=1e-4, atol=1e-5)
    routed = [e for e in range(4) if counts[e] > counts[starved]]
    x, _ = _expert_inputs(hidden, index, fused, routed[0])
    assert stats[f"model.layers.0.mlp.experts.{routed[0]}.gate_proj"].nsamples == x.shape[0]


def test_sending_every_token_through_every_expert_leaves_the_block_output_routed():
    model = tiny_moe_model("qwen3_moe")
    module = adapter_for(model).decoder_blocks(model)[0].mlp.experts
    hidden = torch.randn(40, 64)
    index = torch.randint(0, 4, (40, 2))
    index[:, 1] = (index[:, 0] + 1) % 4
    weights = torch.rand(40, 2)
    with torch.no_grad():
        routed = module(hidden, index, weights)
        module.all_tokens = frozenset(range(4))
        every = module(hidden, index, weights)
        module.all_tokens = frozenset()
    torch.testing.assert_close(every, routed, rtol=0, atol=1e-6)


def _settings_kwargs(settings: PruneSettings) -> dict:
    return dict(sparsity=settings.resolved_sparsity, pattern=settings.pattern,
                alpha=settings.alpha, blocksize=settings.blocksize, percdamp=settings.percdamp,
                metric=settings.metric)


@pytest.mark.parametrize("method", ["thanos", "sparsegpt", "wanda"])
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_per_expert_pruning_equals_the_dense_layer_result_on_the_routed_inputs(family, method):
    hidden, index, _, fused = _routed_by_hand(family)
    model = tiny_moe_model(family)
    settings = PruneSettings(method=method, sparsity=0.5)
    prune_model(model, CALIBRATION, settings, progress=False, layer_errors=False)
    width = fused.gate_up_proj.shape[1] // 2
    for expert in (0, 3):
        x, a = _expert_inputs(hidden, index, fused, expert)
        for name, weight, inputs in (
                ("gate_proj", fused.gate_up_proj[expert, :width], x),
                ("down_proj", fused.down_proj[expert], a)):
            want = prune_weight(weight.detach().clone(), LayerStats.from_inputs(inputs),
                                method=method, error=False, **_settings_kwargs(settings))
            got = model.get_submodule(f"model.layers.0.mlp.experts.{expert}.{name}").weight
            assert torch.equal(got == 0, want.weight == 0), (expert, name)
            torch.testing.assert_close(got, want.weight, rtol=1e-3, atol=1e-4)
    router = tiny_moe_model(family).model.layers[0].mlp.gate.weight
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router)


def test_per_expert_gptq_equals_the_dense_layer_result_on_the_routed_inputs():
    hidden, index, _, fused = _routed_by_hand("qwen3_moe")
    model = tiny_moe_model("qwen3_moe")
    settings = QuantizeSettings(scheme="w4g32")
    # Rounding is discontinuous: both sides sum their statistics exactly (float64), so that
    # no last-bit difference in the Hessian flips a code.
    with determinism.deterministic():
        quantize_model(model, CALIBRATION, settings, progress=False, layer_errors=False)
    for expert in (1, 2):
        _, a = _expert_inputs(hidden, index, fused, expert)
        want = quantize_weight(fused.down_proj[expert].detach().clone(),
                               LayerStats.from_inputs(a, deterministic=True), "w4g32",
                               method="gptq",
                               blocksize=settings.blocksize, percdamp=settings.percdamp,
                               scale_dtype=torch.float16, error=False, scales=settings.scales)
        got = model.get_submodule(f"model.layers.0.mlp.experts.{expert}.down_proj").weight
        torch.testing.assert_close(got, want.weight, rtol=1e-3, atol=1e-4)


def _job(model_dir, *steps, fmt="hf", **calibration) -> Job:
    return Job(model=str(model_dir), steps=steps,
               calibration=CalibrationSpec(str(C4_FILE), 8, 32, **calibration),
               evaluation=EvaluationSpec(ppl=(), dense=False),
               output=OutputSpec(format=fmt, samples=False))


def test_a_pruned_and_quantised_moe_reloads_in_transformers_with_the_same_logits(moe_dir,
                                                                                   tmp_path):
    out = tmp_path / "pruned"
    steps = (PruneSettings(method="thanos", sparsity=0.5), QuantizeSettings(scheme="w4g32"))
    outcome = execute(_job(moe_dir, *steps), out, progress=False, announce=False)
    # the model handed back is transformers' own layout again (experts fused)
    assert not isinstance(outcome.model.model.layers[0].mlp.experts, experts.ExpertLinears)
    assert outcome.model.model.layers[0].mlp.experts.gate_up_proj.dim() == 3
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = token_batch(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, outcome.model(ids).logits)
    report = json.loads((out / "snapprune_report.json").read_text())
    assert report["architecture"]["experts"]["count"] == 4
    blocks = report["experts"]["blocks"]
    assert set(blocks) == {"0", "1"} and report["experts"]["fallback_experts"] >= 0
    assert sum(e["tokens"] for e in blocks["0"][0]["per_expert"]) == 8 * 32 * 2
    expert = loaded.model.layers[1].mlp.experts.down_proj[2]
    assert abs((expert == 0).float().mean().item() - 0.5) < 0.01


def test_all_experts_calibration_is_recorded_for_every_expert(moe_dir, tmp_path):
    out = tmp_path / "all"
    execute(_job(moe_dir, PruneSettings(method="wanda", sparsity=0.5), moe="all-experts"),
            out, progress=False, announce=False)
    report = json.loads((out / "snapprune_report.json").read_text())
    assert report["recipe"]["calibration"]["moe"] == "all-experts"
    assert report["experts"]["fallback_experts"] == 2 * 4
    assert {e["statistics"] for b in report["experts"]["blocks"].values()
            for e in b[0]["per_expert"]} == {"all tokens"}


def test_bad_moe_calibration_settings_are_refused_in_one_line():
    with pytest.raises(SnapPruneError, match="MoE calibration"):
        CalibrationSpec(moe="every").check()
    with pytest.raises(SnapPruneError, match="moe-min-tokens"):
        dataclasses.replace(CalibrationSpec(), moe_min_tokens=0).check()


def test_removing_a_block_renumbers_which_blocks_are_dense(tokenizer_dir, tmp_path):
    """Qwen-MoE names its dense blocks by index: after a block is removed they must still be
    the same blocks, or the reloaded model builds experts where there were none."""
    from snapprune.models.settings import DepthSettings

    config = copy.deepcopy(tiny_moe_model("qwen3_moe").config)
    config.num_hidden_layers, config.mlp_only_layers = 4, [2]
    config.intermediate_size = 96
    config.vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "src")
    depth = DepthSettings(blocks=1, score="angular", repair=False)
    outcome = execute(_job(tmp_path / "src", depth), tmp_path / "out", progress=False,
                      announce=False)
    removed = json.loads((tmp_path / "out" / "snapprune_report.json").read_text())[
        "depth"]["removed"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    kept = [i for i in range(4) if i not in removed]
    assert removed[0] < 2, "the test needs a removed block before the dense one"
    assert loaded.config.mlp_only_layers == [kept.index(2)]
    ids = token_batch(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, outcome.model(ids).logits)


LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def _close_in_llama_cpp(model, path) -> None:
    """llama.cpp rounds the activations to 8 bits in its quantised products, which also moves
    tokens near a top-k tie to another expert: a wider bound than a dense model's."""
    from test_export import assert_runs_in_llama_cpp_like

    assert_runs_in_llama_cpp_like(model, path, gap=0.06, vocab=500)


def _gguf_ready_moe(family: str, tokenizer_dir, directory, **change):
    """A tiny MoE of ``family`` as llama.cpp's architecture for it runs it (top-k weights
    renormalised or not as its graph does), weights widened so the logits are not flat."""
    from snapprune.export.gguf import ARCHS

    config = copy.deepcopy(tiny_moe_model(family).config)
    config.vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    if hasattr(config, "norm_topk_prob"):
        config.norm_topk_prob = ARCHS[family].normalised_top_k
    if ARCHS[family].whole_key_norm:
        config.num_key_value_heads = config.num_attention_heads
    for key, value in change.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(3.0)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


@pytest.mark.skipif(not LLAMA_CPP, reason="needs llama-cpp-python (pip install "
                    "'snapprune[llama]', which builds llama.cpp)")
@pytest.mark.parametrize("family", [f for f in MOE_FAMILIES if f in GGUF_FAMILIES])
def test_an_expert_pruned_pruned_quantised_gguf_runs_in_llama_cpp(family, tokenizer_dir,
                                                                   tmp_path):
    """Experts removed, the rest pruned and quantised to q4_0, written as llama.cpp's own
    mixture architecture: llama.cpp's logits follow the model in memory, and its perplexity
    on the same windows is within 1 % of snapprune's evaluation of the same weights."""
    from gguf import GGUFReader

    from snapprune.data import evaluation_ids
    from snapprune.eval.llama import llama_cpp_perplexity
    from snapprune.export.gguf import ARCHS

    source = _gguf_ready_moe(family, tokenizer_dir, tmp_path / "source")
    out = tmp_path / "gguf"
    steps = (ExpertSettings(remove=1), PruneSettings(method="thanos", sparsity=0.5),
             QuantizeSettings(scheme="q4_0"))
    job = dataclasses.replace(_job(source, *steps, fmt="gguf"), evaluation=EvaluationSpec(
        ppl=("wikitext2-test",), seqlen=64, max_windows=8, dense=False))
    outcome = execute(job, out, progress=False, announce=False)
    reader = GGUFReader(str(out / "model.gguf"))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == ARCHS[family].name.lower()
    assert int(reader.fields[f"{arch}.expert_count"].parts[-1][0]) == 3
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.1.ffn_down_exps.weight"].tensor_type.name == "Q4_0"
    assert list(tensors["blk.1.ffn_gate_inp.weight"].shape) == [64, 3]
    _close_in_llama_cpp(outcome.model, out / "model.gguf")
    ours = outcome.evaluated.perplexity["wikitext2-test"].perplexity
    ids = evaluation_ids("wikitext2-test", outcome.tokenizer)
    windows = [ids[i * 64:(i + 1) * 64].tolist() for i in range(8)]
    theirs = llama_cpp_perplexity(out / "model.gguf", windows)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)


@pytest.mark.parametrize(("family", "change", "fragment"), [
    ("qwen3_moe", {"norm_topk_prob": False}, "renormalises"),
    ("olmoe", {"num_key_value_heads": 2}, "as many key/value heads"),
    ("qwen2_moe", {"mlp_only_layers": [1]}, "dense MLP"),
])
def test_a_mixture_llama_cpp_cannot_hold_is_refused_before_any_work(family, change, fragment,
                                                                     tokenizer_dir, tmp_path,
                                                                     capsys):
    from snapprune.cli import main

    source = _gguf_ready_moe(family, tokenizer_dir, tmp_path / "source", **change)
    out = tmp_path / "out"
    capsys.readouterr()  # the source's writing
    code = main([str(a) for a in ("quantize", "--model", source, "--scheme", "q8_0",
                                  "--method", "rtn", "--format", "gguf", "--out", out,
                                  "--quiet", "--no-eval", "--no-samples")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    assert not out.exists()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_a_streamed_moe_equals_the_one_pruned_in_memory(family, tmp_path):
    """Block by block from the checkpoint's shards (Mixtral's stored as
    ``block_sparse_moe.experts.N.w1``, Qwen's as the model names them), each expert on its
    routed tokens: the very tensors of the in-memory run, under the checkpoint's own names."""
    from safetensors.torch import load_file

    from snapprune.models.streaming import stream_prune

    source = tmp_path / "source"
    tiny_moe_model(family).save_pretrained(source, max_shard_size="100KB")
    settings = PruneSettings(method="thanos", sparsity=0.5)
    run = stream_prune(source, tmp_path / "out", lambda _model: CALIBRATION, settings,
                       progress=False)
    assert run.experts and sorted(run.experts) == [0, 1]
    reference = tiny_moe_model(family)
    prune_model(reference, CALIBRATION, settings, progress=False)
    got = {}
    for path in sorted((tmp_path / "out").glob("*.safetensors")):
        got.update(load_file(path))
    stored = set(load_file(next(source.glob("*.safetensors"))))
    assert set(got) >= stored and len(got) == sum(
        len(load_file(p)) for p in source.glob("*.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(loaded(CALIBRATION[:2]).logits,
                                   reference(CALIBRATION[:2]).logits, rtol=0, atol=0)


def test_a_killed_streamed_moe_run_resumes_to_byte_identical_output(moe_dir, tmp_path, capsys,
                                                                     one_thread):
    from test_cli import _run
    from test_streaming import _cli, _cli_args

    from snapprune.models import streaming
    from snapprune.models.streaming import CRASH_ENV, partial_dir

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(moe_dir).save_pretrained(sharded,
                                                                  max_shard_size="300KB")
    AutoTokenizer.from_pretrained(moe_dir).save_pretrained(sharded)
    whole = tmp_path / "whole"
    code, err = _run(capsys, *_cli_args(sharded, whole))
    assert code == 0, err
    out = tmp_path / "resumed"
    killed = _cli(sharded, out, env={CRASH_ENV: "0"})
    assert killed.returncode == -9, killed.stderr
    assert (partial_dir(out) / streaming.STATE_NAME).is_file()
    code, err = _run(capsys, *_cli_args(sharded, out, "--resume"))
    assert code == 0, err
    shards = sorted(p.name for p in whole.glob("*.safetensors"))
    assert shards == sorted(p.name for p in out.glob("*.safetensors"))
    for name in shards:
        assert (whole / name).read_bytes() == (out / name).read_bytes(), name
    report = json.loads((out / "snapprune_report.json").read_text())
    assert sorted(report["experts"]["blocks"]) == ["0", "1"]


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_a_pruned_quantised_moe_as_compressed_tensors_loads_in_transformers(family, moe_dir,
                                                                            tokenizer_dir,
                                                                            tmp_path):
    """Written as the family's checkpoints name it (Mixtral: ``block_sparse_moe.experts.N.w1``,
    what vLLM's loader reads), routers and gates dense and in ``ignore`` (as llm-compressor
    writes them), and transformers loads it back to the same logits."""
    from safetensors import safe_open

    source = moe_dir if family == "qwen2_moe" else _gguf_ready_moe(family, tokenizer_dir,
                                                                    tmp_path / "source")
    out = tmp_path / "ct"
    steps = (ExpertSettings(keep=0.5), QuantizeSettings(scheme="w4g32"))
    outcome = execute(_job(source, *steps, fmt="compressed-tensors"), out, progress=False,
                      announce=False)
    config = json.loads((out / "config.json").read_text())
    count = {"qwen2_moe": "num_experts", "mixtral": "num_local_experts"}[family]
    assert config[count] == 2 and "quantization_config" in config
    ignore = config["quantization_config"]["ignore"]
    with safe_open(out / "model.safetensors", "pt") as file:
        keys = set(file.keys())
    if family == "mixtral":
        assert "model.layers.0.block_sparse_moe.experts.1.w2.weight_packed" in keys
        assert not any(".mlp." in k for k in keys)
        assert "model.layers.1.block_sparse_moe.gate" in ignore
        assert "model.layers.1.block_sparse_moe.gate.weight" in keys
    else:
        assert "model.layers.0.mlp.experts.1.down_proj.weight_packed" in keys
        assert {"model.layers.1.mlp.gate", "model.layers.1.mlp.shared_expert_gate"} <= set(ignore)
    assert not any(k.endswith("gate.weight_packed") for k in keys)  # routers stay dense
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = token_batch(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, outcome.model(ids).logits,
                                   rtol=1e-3, atol=1e-3)


def test_recovery_trains_an_expert_pruned_moe_with_its_structure_kept(moe_dir, tmp_path):
    from snapprune.models.settings import RecoverSettings

    out = tmp_path / "recovered"
    steps = (ExpertSettings(keep=0.5), PruneSettings(method="wanda", sparsity=0.5),
             RecoverSettings(tokens=64, seqlen=16, batch_size=2, data=str(C4_FILE), loss="lm"))
    outcome = execute(_job(moe_dir, *steps), out, progress=False, announce=False)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_experts == 2
    down = loaded.model.layers[0].mlp.experts.down_proj
    assert abs((down == 0).float().mean().item() - 0.5) < 0.01  # the zeros stayed zeros
    ids = token_batch(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, outcome.model(ids).logits)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_shrinking_expert_widths_gives_the_familys_standard_smaller_config(family,
                                                                           tokenizer_dir,
                                                                           tmp_path):
    """Each routed expert loses half its neurons, chosen on its own routed tokens (Thanos,
    structured): the result is the family's config with the smaller expert width, equal to the
    model with those neurons zeroed, reloading with plain from_pretrained."""
    from snapprune.models.settings import ShrinkSettings

    source = _gguf_ready_moe(family, tokenizer_dir, tmp_path / "source")
    out = tmp_path / "shrunk"
    outcome = execute(_job(source, ShrinkSettings("thanos", mlp=0.5, multiple_of=16)), out,
                      progress=False, announce=False)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    key = "moe_intermediate_size" if family == "qwen3_moe" else "intermediate_size"
    before = getattr(tiny_moe_model(family).config, key)
    assert getattr(loaded.config, key) == before // 2
    ids = token_batch(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, outcome.model(ids).logits)
    removed = json.loads((out / "snapprune_report.json").read_text())["width"][
        "removed_units"]["0"]
    assert sorted(removed) == [f"mlp.experts.{e}.down_proj" for e in range(4)]
    assert len({tuple(units) for units in removed.values()}) > 1  # each expert its own


@pytest.mark.skipif(not LLAMA_CPP, reason="needs llama-cpp-python (pip install "
                    "'snapprune[llama]', which builds llama.cpp)")
def test_a_shrunk_quantised_moe_gguf_runs_in_llama_cpp(tokenizer_dir, tmp_path):
    from gguf import GGUFReader

    from snapprune.models.settings import ShrinkSettings

    source = _gguf_ready_moe("mixtral", tokenizer_dir, tmp_path / "source")
    out = tmp_path / "gguf"
    outcome = execute(_job(source, ShrinkSettings("thanos", mlp=0.5),
                           QuantizeSettings(scheme="q8_0"), fmt="gguf"), out, progress=False,
                      announce=False)
    reader = GGUFReader(str(out / "model.gguf"))
    assert int(reader.fields["llama.feed_forward_length"].parts[-1][0]) == 64
    _close_in_llama_cpp(outcome.model, out / "model.gguf")


EXPERTS_CUT = (ExpertSettings(remove=1), PruneSettings(method="thanos", sparsity=0.5))


def _experts_cut_and_reloaded(config, tokenizer_dir, tmp_path):
    """A random model of ``config`` saved with the test tokenizer; one expert removed per
    block and Thanos 50 % on the rest, saved as hf and reloaded by transformers, whose logits
    must be the model in memory's. ``(source, original, reloaded)``."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    source = tmp_path / "source"
    original = AutoModelForCausalLM.from_config(config)
    original.save_pretrained(source)
    tokenizer.save_pretrained(source)
    outcome = execute(_job(source, *EXPERTS_CUT), tmp_path / "out", progress=False,
                      announce=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = token_batch(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, outcome.model(ids).logits)
    return source, original, loaded


@pytest.mark.parametrize("layout", ["glm4_moe", "deepseek_v2_lite"])
def test_whole_layouts_dense_blocks_first_then_experts_prune_and_reload(layout, tokenizer_dir,
                                                                        tmp_path):
    """GLM-4.5's and DeepSeek-V2-Lite's whole layouts (a dense first block, then mixture blocks
    with a shared expert; GLM's sigmoid router carries a score-correction bias, DeepSeek's
    attention is latent): experts removed with their router rows and bias entries, the rest
    pruned per expert, the dense MLP, the shared expert and the attention's projections as
    dense layers; it reloads in transformers with the same logits. GGUF is refused in one line
    (llama.cpp's writers for these are not built here: convert the hf output with its
    converter)."""
    from tiny_models import tiny_deepseek_v2_lite, tiny_glm4_moe

    model = (tiny_glm4_moe if layout == "glm4_moe" else tiny_deepseek_v2_lite)(dense_blocks=1)
    source, _, loaded = _experts_cut_and_reloaded(model.config, tokenizer_dir, tmp_path)
    layers = loaded.model.layers
    assert loaded.config.n_routed_experts == 3
    for block in layers[1:]:
        assert block.mlp.gate.weight.shape[0] == 3
        if layout == "glm4_moe":
            assert block.mlp.gate.e_score_correction_bias.shape == (3,)
        else:  # the latent attention's projections are pruned as any other
            kv = block.self_attn.kv_b_proj.weight
            assert (kv == 0).float().mean() == pytest.approx(0.5, abs=0.01)
        assert block.mlp.experts.gate_up_proj.shape[0] == 3
        shared = block.mlp.shared_experts.down_proj.weight
        assert (shared == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    dense = layers[0].mlp.down_proj.weight
    assert (dense == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(SnapPruneError, match="convert_hf_to_gguf"):
        execute(_job(source, *EXPERTS_CUT, fmt="gguf"), tmp_path / "g", progress=False,
                announce=False)
    assert not (tmp_path / "g").exists()


def test_gpt_oss_prunes_removes_experts_and_reloads_with_the_same_logits(tokenizer_dir,
                                                                         tmp_path, capsys):
    """gpt-oss's biased experts (stored transposed, gate and up interleaved) unfold per expert
    and fold back: experts removed with their router rows and biases, the rest pruned, the
    attention sinks untouched; transformers reloads the same logits. Formats that would need
    per-expert tensors (compressed-tensors, --stream) or llama.cpp's gpt-oss writer are refused
    in one line."""
    from test_cli import _run

    source, original, loaded = _experts_cut_and_reloaded(
        copy.deepcopy(tiny_moe_model("gpt_oss").config), tokenizer_dir, tmp_path)
    for block, before in zip(loaded.model.layers, original.model.layers, strict=True):
        mlp = block.mlp
        assert mlp.router.weight.shape[0] == mlp.router.bias.shape[0] == 3
        assert mlp.experts.gate_up_proj.shape[0] == mlp.experts.down_proj_bias.shape[0] == 3
        assert torch.equal(block.self_attn.sinks, before.self_attn.sinks)
        assert (block.self_attn.q_proj.weight == 0).float().mean() == pytest.approx(0.5,
                                                                                    abs=0.01)
        # each expert's gate and up were pruned as their own layers: half of each column pair
        gate_up = mlp.experts.gate_up_proj
        assert (gate_up[:, :, 0::2] == 0).float().mean() == pytest.approx(0.5, abs=0.02)
    capsys.readouterr()  # the progress bars of the saves above
    for args, fragment in ((("--format", "compressed-tensors", "--quantize", "w4g32"),
                            "keep a block's experts fused"),
                           (("--stream",), "stored another way"),
                           (("--format", "gguf"), "convert_hf_to_gguf")):
        code, err = _run(capsys, "prune", "--model", source, "--method", "wanda",
                         "--sparsity", 0.5, "--calib", C4_FILE, "--nsamples", 4, "--seqlen",
                         16, "--no-eval", "--out", tmp_path / "no", *args)
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "no").exists()
