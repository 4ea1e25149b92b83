"""Per-tensor GGUF types: llama.cpp's mixes as llama.cpp itself chooses them (its own
``llama_model_quantize`` on the same model's float16 file, tensor by tensor), its fallback for
rows that are not whole super-blocks, the allocation to a size target against a brute-force
search, and the files: every tensor's bytes read back by llama.cpp exactly as chosen, the size
target met, bad requests refused in one line before any work."""

from __future__ import annotations

import ctypes
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import C4_FILE
from test_bad_inputs import _assert_refused, _run
from test_export import LLAMA_CPP, NO_LLAMA_CPP

from snapprune.engine.mixes import MIXES, allocate, fallback, more_bits
from snapprune.jobs import CalibrationSpec, EvaluationSpec, Job, OutputSpec
from snapprune.models.quantize import plan_types
from snapprune.models.settings import QuantizeSettings
from snapprune.models.targets import target_layers
from snapprune.run import execute

QUIET = ("--no-eval", "--no-samples", "--calib", "c4-sample", "--nsamples", 4, "--seqlen", 64)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, tokenizer_dir):
    """A random LLaMA whose widths are whole super-blocks (256 / 512), 8 layers (so llama.cpp's
    layer rules pick distinct layers), 4 query heads per KV head, an untied output matrix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=64, max_position_embeddings=256, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "emb" not in name:
                param.mul_(3.0)
    out = tmp_path_factory.mktemp("wide_llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_use_more_bits_is_llama_cpps():
    # llama.cpp: i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2, integer division
    assert [i for i in range(8) if more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(30) if more_bits(i, 30)] == \
        [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_the_fallback_is_llama_cpps():
    expected = {"iq4_xs": "iq4_nl", "q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0",
                "q5_k": "q5_1", "q6_k": "q8_0"}
    for name, substitute in expected.items():
        assert fallback(name, 576, "x").scheme == substitute
        assert fallback(name, 512, "x").scheme == name
        assert "576" in fallback(name, 576, "x").why
    assert fallback("q4_0", 576, "x").scheme == "q4_0"


def _f16_gguf(model_dir: Path, tmp: Path) -> Path:
    out = tmp / "f16"
    execute(Job(model=str(model_dir), steps=(), evaluation=EvaluationSpec(ppl=(), dense=False),
                output=OutputSpec(format="gguf", samples=False)), out, progress=False,
            announce=False)
    return out / "model.gguf"


def _llama_cpp_types(source: Path, mix: str, tmp: Path) -> dict[str, str]:
    import llama_cpp
    from gguf import GGUFReader

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.nthread = 1
    target = tmp / f"{mix}.gguf"
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                          ctypes.byref(params)) == 0
    return {t.name: t.tensor_type.name.lower() for t in GGUFReader(str(target)).tensors
            if len(t.shape) > 1}


def _our_types(model_dir: Path, mix: str) -> dict[str, str]:
    from gguf import MODEL_ARCH, get_tensor_name_map
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    settings = QuantizeSettings(mix, method="rtn")  # llama.cpp without an imatrix
    plan = plan_types(model, target_layers(model), settings)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    return {names.get_name(f"{n}.weight", try_suffixes=(".weight",)): c.scheme
            for n, c in plan.items()}


@pytest.mark.skipif(not LLAMA_CPP, reason=NO_LLAMA_CPP)
@pytest.mark.parametrize("which", ["wide", "tiny"])
def test_every_mix_gives_each_tensor_llama_cpps_own_type(which, wide_dir, tiny_dir,
                                                         tmp_path):
    """llama.cpp quantising the same float16 file is the reference: the same type for every
    tensor, on whole super-blocks (``wide``) and on rows that fall back (``tiny``: 64 wide)."""
    model_dir = wide_dir if which == "wide" else tiny_dir
    source = _f16_gguf(model_dir, tmp_path)
    seen = set()
    for mix in MIXES:
        theirs = _llama_cpp_types(source, mix, tmp_path)
        ours = _our_types(model_dir, mix)
        assert ours == theirs, mix
        seen |= set(ours.values())
    if which == "wide":  # the rules were exercised, not only the base types
        assert {"q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "iq4_xs", "iq4_nl"} <= seen
    else:
        assert not seen & {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs"}


@pytest.fixture(scope="module")
def eight_experts_dir(tmp_path_factory, tokenizer_dir):
    """A random Mixtral of exactly 8 experts (llama.cpp's rules single that count out) whose
    widths are whole super-blocks, 8 layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=256,
                           num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=64, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=256, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("mixtral8")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _our_expert_types(model_dir: Path, mix: str) -> dict[str, str]:
    """Our plan by llama.cpp's tensor name; a block's experts are one stacked tensor there,
    so each block's experts must share one type."""
    import re

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    plan = plan_types(model, target_layers(model), QuantizeSettings(mix, method="rtn"))
    kinds = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps",
             "down_proj": "ffn_down_exps"}
    ours: dict[str, set[str]] = {}
    for name, choice in plan.items():
        if name in ("lm_head", "model.embed_tokens"):
            key = "output.weight" if name == "lm_head" else "token_embd.weight"
        else:
            block, module = re.match(r"model\.layers\.(\d+)\..*\.(\w+)$", name).groups()
            key = f"blk.{block}.{kinds[module]}.weight"
        ours.setdefault(key, set()).add(choice.scheme)
    assert all(len(types) == 1 for types in ours.values())
    return {key: types.pop() for key, types in ours.items()}


@pytest.mark.skipif(not LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_every_mix_of_an_eight_expert_model_is_llama_cpps(eight_experts_dir, tmp_path):
    """llama.cpp gives an 8-expert model (Mixtral) ``attn_v``/``attn_k`` at ``q8_0`` and, in
    most mixes, ``attn_output`` at ``q5_k``: the same types, tensor by tensor, as its own
    ``llama_model_quantize`` on the same float16 file (the router is never quantised)."""
    source = _f16_gguf(eight_experts_dir, tmp_path)
    for mix in MIXES:
        theirs = {name: kind for name, kind in _llama_cpp_types(source, mix, tmp_path).items()
                  if "ffn_gate_inp" not in name}
        ours = _our_expert_types(eight_experts_dir, mix)
        assert ours == theirs, mix
        assert ours["blk.0.attn_v.weight"] == ours["blk.5.attn_k.weight"] == "q8_0", mix


def _optimum(errors, sizes, budget):
    """The exact least total error within the budget (dynamic programming over bytes)."""
    best = [0.0] * (budget + 1)  # best[b]: the least error of the tensors so far in b bytes
    for name in errors:
        new = [float("inf")] * (budget + 1)
        for b in range(budget + 1):
            for t, size in sizes[name].items():
                if size <= b and best[b - size] + errors[name][t] < new[b]:
                    new[b] = best[b - size] + errors[name][t]
        best = new
    return best[budget]


def test_a_types_error_is_its_definition_on_the_sampled_rows(monkeypatch):
    """``type_errors``: ``‖(Ŵ−W)X‖² / ‖WX‖²`` (float64 here) on evenly spaced rows, ``Ŵ`` each
    block (super-block) rounded on its grid searched by the Hessian diagonal, fitted alone."""
    from problems import make_problem

    from snapprune.engine.schemes import parse_scheme
    from snapprune.models import allocation

    monkeypatch.setattr(allocation, "SAMPLE_ROWS", 7)
    problem = make_problem(20, 512, tokens=1024, seed=8)
    rows = torch.tensor([0, 3, 6, 10, 13, 16, 19])  # 7 of 20, evenly spaced
    assert torch.equal(allocation.sample_rows(20), rows)
    h = problem.stats.hessian.double()
    w = problem.weight[rows]
    types = ["q4_0", "iq4_nl", "q5_1", "q8_0", "q2_k", "q3_k", "iq4_xs", "q5_k"]
    errors = allocation.type_errors(problem.weight, problem.stats, types)
    v = torch.diagonal(problem.stats.hessian).float()
    for t in types:
        scheme = parse_scheme(t)
        span, group = scheme.fit_width(512), scheme.group_width(512)
        params = [p for s in range(0, 512, span)
                  for p in scheme.fit_groups(w[:, s:s + span], importance=v[s:s + span])]
        q = torch.cat([scheme.values(scheme.codes(w[:, g * group:(g + 1) * group], p), p)
                       for g, p in enumerate(params)], 1).double()
        e = q - w.double()
        expected = float(((e @ h) * e).sum() / ((w.double() @ h) * w.double()).sum())
        assert errors[t] == pytest.approx(expected, rel=1e-4)
    assert errors["q8_0"] < errors["q5_1"] < errors["q4_0"] < errors["q2_k"]


@pytest.mark.parametrize("seed", range(12))
def test_the_allocation_fits_the_budget_and_is_near_the_exact_optimum(seed):
    """Many tensors, as in a model: the Lagrangian sweep and the greedy fill come within 2 %
    of the exact optimum, and never pass the budget."""
    rng = random.Random(seed)
    types = ["a", "b", "c", "d", "e"]
    errors, sizes = {}, {}
    for i in range(40):
        rows = rng.randint(1, 6)
        bits = sorted(rng.sample(range(2, 10), len(types)))
        sizes[f"t{i}"] = {t: rows * b for t, b in zip(types, bits, strict=True)}
        base = rng.uniform(0.1, 10) * rows
        errors[f"t{i}"] = {t: base * 2.0 ** (-b) * rng.uniform(0.7, 1.3)
                           for t, b in zip(types, bits, strict=True)}
    smallest = sum(min(s.values()) for s in sizes.values())
    largest = sum(max(s.values()) for s in sizes.values())
    budget = rng.randint(smallest, largest)
    chosen = allocate(errors, sizes, budget)
    size = sum(sizes[n][t] for n, t in chosen.items())
    error = sum(errors[n][t] for n, t in chosen.items())
    assert size <= budget
    assert error <= _optimum(errors, sizes, budget) * 1.02 + 1e-12
    everything = allocate(errors, sizes, largest)
    assert sum(errors[n][t] for n, t in everything.items()) == \
        pytest.approx(sum(min(e.values()) for e in errors.values()))


def test_a_budget_below_the_smallest_choice_is_refused():
    from snapprune import SnapPruneError

    with pytest.raises(SnapPruneError, match="below the smallest"):
        allocate({"a": {"x": 1.0, "y": 0.5}}, {"a": {"x": 10, "y": 20}}, 9)


def _quantized(model_dir: Path, out: Path, settings: QuantizeSettings):
    job = Job(model=str(model_dir), steps=(settings,),
              calibration=CalibrationSpec(str(C4_FILE), 4, 64),
              evaluation=EvaluationSpec(ppl=(), dense=False),
              output=OutputSpec(format="gguf", samples=False))
    return execute(job, out, progress=False, announce=False)


@pytest.mark.skipif(not LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_a_mix_file_holds_exactly_the_chosen_values_of_each_tensors_type(wide_dir, tmp_path):
    """``Q3_K_M`` on the wide model (q3_k, q4_k, q5_k, q6_k in one file): llama.cpp decodes
    every tensor's bytes into exactly the weights in memory; the report says each type and
    why."""
    from gguf import GGMLQuantizationType
    from test_gguf_types import _expected, _file_tensors, _ggml, _llama_cpp_values

    outcome = _quantized(wide_dir, tmp_path / "q3km", QuantizeSettings("Q3_K_M"))
    path = tmp_path / "q3km" / "model.gguf"
    tensors, ggml = _file_tensors(path), _ggml()
    quantized = outcome.run_of("quantize").quantized
    kinds = set()
    for target, (layer, weight) in _expected(outcome).items():
        q = quantized[layer]
        tensor = tensors[target]
        assert tensor.tensor_type == GGMLQuantizationType[q.scheme.gguf_type], target
        name = q.scheme.name.replace("_k", "_K")
        theirs = _llama_cpp_values(ggml, name, tensor.data, weight.numel())
        assert torch.equal(theirs.reshape(weight.shape), weight), layer
        kinds.add(q.scheme.name)
    assert kinds == {"q3_k", "q4_k", "q5_k"}
    report = json.loads((tmp_path / "q3km" / "snapprune_report.json").read_text())
    layers = report["quantization"]["layers"]
    assert all(entry["type"] and entry["why"] for entry in layers)
    assert any("attn_v of the first 2 layers" in entry["why"] for entry in layers)
    assert report["quantization"]["types"]["q6_k"] == 1  # the output matrix


def test_a_size_target_fills_the_file_without_passing_it(wide_dir, tmp_path, monkeypatch):
    from snapprune.models import allocation

    monkeypatch.setattr(allocation, "SAMPLE_ROWS", 32)  # the errors on fewer rows: 8x faster
    # weighted rounding on the chosen types (GPTQ's part is tested elsewhere): the file's size
    # and the choice are the allocation's, whatever rounds the weights, at half the time
    outcome = _quantized(wide_dir, tmp_path / "sized", QuantizeSettings(
        "q4_0", target_size=2.0, method="weighted-rtn"))
    size = (tmp_path / "sized" / "model.gguf").stat().st_size
    assert 1.95e6 < size <= 2.0e6
    run = outcome.run_of("quantize")
    types = {q.scheme.name for q in run.quantized.values()}
    assert len(types) > 1  # a mix of its own, not one type
    assert all(q.why.startswith("size target") for q in run.quantized.values())
    # a larger budget buys a lower total error
    bigger = _quantized(wide_dir, tmp_path / "bigger", QuantizeSettings(
        "q4_0", target_size=2.6, method="weighted-rtn"))
    assert (tmp_path / "bigger" / "model.gguf").stat().st_size <= 2.6e6

    def mean(o):
        errors = [r.error for r in o.run_of("quantize").layers if r.error == r.error]
        return sum(errors) / len(errors)

    assert mean(bigger) < mean(outcome)


@pytest.mark.parametrize("argv,fragments", [
    (("--target-size", 0.2), ("target size 0.2 MB is below the smallest",)),
    (("--target-bpw", 1.5), ("below the smallest",)),
    (("--scheme", "Q4_K_M", "--format", "compressed-tensors"), ("only GGUF holds",)),
    (("--target-size", 2, "--format", "compressed-tensors"), ("only GGUF holds",)),
    (("--scheme", "w4g128", "--target-size", 2), ("size target chooses among",)),
    (("--target-size", 2, "--method", "rtn"), ("calibration",)),
    (("--target-size", 2, "--target-bpw", 4), ("one size target",)),
    (("--embedding-type", "iq4_nl", "--scheme", "w4g128"), ("a llama.cpp type for GGUF",)),
    (("--embedding-type", "w4g128"), ("a llama.cpp type for GGUF",)),
    (("--embedding-type", "q4_0", "--target-size", 2), ("chooses the embedding's type",)),
])
def test_bad_size_and_mix_requests_are_refused_in_one_line(wide_dir, tmp_path, capsys, argv,
                                                           fragments):
    out = tmp_path / "out"
    code, err = _run(capsys, "quantize", "--model", wide_dir, "--out", out, *QUIET, *argv)
    _assert_refused(code, err, *fragments, out=out)


def test_a_type_that_cannot_hold_the_rows_is_refused(tiny_dir, tmp_path, capsys):
    """llama.cpp's blocks need multiples of 32: a 48-wide layer has no type at all."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    layers = target_layers(model)
    name = next(iter(layers[0]))
    from snapprune import SnapPruneError

    with pytest.raises(SnapPruneError, match="blocks of 32 need a multiple of 32"):
        plan_types(model, layers, QuantizeSettings("Q4_K_M"), widths={name: 48})


def test_slots_see_gqa_and_kinds(wide_dir):
    from transformers import AutoModelForCausalLM

    from snapprune.models.slots import tensor_slots

    model = AutoModelForCausalLM.from_pretrained(wide_dir)
    slots = {s.name: s for s in tensor_slots(model, target_layers(model))}
    v = slots["model.layers.3.self_attn.v_proj"]
    assert (v.kind, v.index, v.count, v.gqa, v.cols) == ("attn_v", 3, 8, 4, 256)
    assert slots["model.layers.0.mlp.down_proj"].kind == "ffn_down"
    assert slots["lm_head"].kind == "output"
    embedding = slots["model.embed_tokens"]
    assert (embedding.kind, embedding.tied, embedding.cols) == ("token_embd", False, 256)


def test_a_size_target_counts_the_rope_factors_the_file_holds(tokenizer_dir, tmp_path):
    """A Llama 3.x model's GGUF holds ``rope_freqs`` besides its parameters: the bytes a size
    target leaves for the chosen tensors are net of them, exactly as many as written."""
    from gguf import GGUFReader
    from test_export import LLAMA3_ROPE
    from tiny_models import tiny_model
    from transformers import AutoTokenizer

    from snapprune.models.allocation import fixed_bytes

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model("llama", vocab=len(tokenizer))
    plain = fixed_bytes(model, set(), 0)
    model.config.rope_parameters = dict(LLAMA3_ROPE)
    model.save_pretrained(tmp_path / "llama3")
    tokenizer.save_pretrained(tmp_path / "llama3")
    _quantized(tmp_path / "llama3", tmp_path / "gguf", QuantizeSettings("q8_0", method="rtn"))
    reader = GGUFReader(tmp_path / "gguf" / "model.gguf")
    written = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert written.n_bytes == fixed_bytes(model, set(), 0) - plain > 0


def test_an_embedding_type_overrides_only_the_embedding_and_output_matrix(wide_dir):
    """``--embedding-type`` is llama-quantize's ``--token-embedding-type`` and
    ``--output-tensor-type``: those two tensors change, every other keeps its mix's type."""
    mixed = _our_types(wide_dir, "Q4_K_M")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(wide_dir)
    settings = QuantizeSettings("Q4_K_M", method="rtn", embedding_type="iq4_nl")
    plan = plan_types(model, target_layers(model), settings)
    chosen = {n: c.scheme for n, c in plan.items()}
    embedding = {n for n in chosen if n in ("model.embed_tokens", "lm_head")}
    assert embedding == {"model.embed_tokens", "lm_head"}  # untied: both
    assert all(chosen[n] == "iq4_nl" for n in embedding)
    assert sorted(c for n, c in chosen.items() if n not in embedding) == sorted(
        t for n, t in mixed.items() if n not in ("token_embd.weight", "output.weight"))


def test_the_fused_quantize_takes_an_embedding_type_from_the_command_line(tiny_dir, tmp_path,
                                                                         capsys):
    from gguf import GGUFReader

    out = tmp_path / "shrunk"
    code, err = _run(capsys, "shrink", "--model", tiny_dir, "--mlp", "0.25", "--quantize",
                     "q4_0", "--embedding-type", "q4_0", "--format", "gguf", "--out", out,
                     *QUIET)
    assert code == 0, err
    types = {t.name: t.tensor_type.name.lower()
             for t in GGUFReader(str(out / "model.gguf")).tensors}
    assert types["token_embd.weight"] == types["output.weight"] == "q4_0"
    assert types["blk.0.ffn_down.weight"] == "q4_0"
