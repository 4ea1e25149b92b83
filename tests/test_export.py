"""The formats, proven by the runtimes that serve them: GGUF in transformers' GGUF loader and
in llama.cpp (llama-cpp-python), compressed-tensors in transformers."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import C4_FILE
from test_cli import _run
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from snapprune.jobs import CalibrationSpec, EvaluationSpec, Job, OutputSpec
from snapprune.models.settings import PruneSettings, QuantizeSettings, ShrinkSettings
from snapprune.run import execute

LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
NO_LLAMA_CPP = "needs llama-cpp-python (pip install 'snapprune[llama]', builds llama.cpp)"


def _job(tiny_dir, *steps, fmt="gguf") -> Job:
    return Job(model=str(tiny_dir), steps=steps,
               calibration=CalibrationSpec(str(C4_FILE), 4, 64),
               evaluation=EvaluationSpec(ppl=(), dense=False),
               output=OutputSpec(format=fmt, samples=False))


def _weights(model) -> dict:
    return {k: v.detach().float() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def joint_gguf(tiny_dir, tmp_path_factory):
    """Thanos 2:4 + GPTQ q4_0 in one pass, written as GGUF."""
    out = tmp_path_factory.mktemp("gguf") / "joint"
    outcome = execute(_job(tiny_dir, PruneSettings("thanos", "2:4"), QuantizeSettings("q4_0")),
                      out, progress=False, announce=False)
    return outcome, out


def test_gguf_loads_in_transformers_with_the_quantisers_exact_values(joint_gguf, tiny_dir):
    outcome, out = joint_gguf
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")
    ours, theirs = _weights(outcome.model), _weights(loaded)
    layers = outcome.run.quantization.quantized
    assert sorted(n for n in layers if ".layers." not in n) == ["lm_head", "model.embed_tokens"]
    assert len(layers) == 3 * 7 + 2
    for name in layers:
        key = f"{name}.weight"
        assert torch.equal(theirs[key], ours[key]), key  # GPTQ's grid values, bit for bit
        if ".layers." in name:
            zeros = (theirs[key] == 0).reshape(theirs[key].shape[0], -1, 4).sum(2)
            assert (zeros >= 2).all(), key  # 2:4 survives quantisation and the file
    # The embedding (tied: the output matrix too) is on q8_0's grid in memory and in the file
    # alike: its block scales searched on the final norm's statistics, so its values are not
    # gguf-py's formula rounding (llama.cpp's reference quantiser) but as close to the dense
    # weights: at most one q8_0 step of the block away, and no worse than the formula overall.
    embedding = ours["model.embed_tokens.weight"]
    assert torch.equal(theirs["model.embed_tokens.weight"], embedding)
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir).model.embed_tokens.weight.detach()
    reference = torch.from_numpy(_q8_0_roundtrip(dense))
    step = dense.abs().reshape(dense.shape[0], -1, 32).amax(2, keepdim=True) / 127
    gap = (embedding - dense).abs().reshape(dense.shape[0], -1, 32)
    assert (gap <= 1.01 * step).all()
    assert (embedding - dense).norm() <= 1.05 * (reference - dense).norm()
    report = json.loads((out / "snapprune_report.json").read_text())
    assert report["quantization"]["scheme"] == "q4_0"
    assert report["files"]["model.gguf"] == (out / "model.gguf").stat().st_size


def _q8_0_roundtrip(weight: torch.Tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    kind = GGMLQuantizationType.Q8_0
    return dequantize(quantize(weight.numpy(), kind), kind).reshape(weight.shape)


def assert_runs_in_llama_cpp_like(model, path, *, gap: float = 0.03, vocab: int = 512) -> None:
    """llama.cpp's logits for 48 random tokens against the model in memory: within ``gap`` of
    the mean logit on average, the same argmax for 90 % of them. llama.cpp multiplies quantised
    weights by activations rounded to 8 bits: close, not equal."""
    from llama_cpp import Llama

    ids = torch.randint(0, vocab, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    llm = Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    assert (theirs - ours).abs().mean() < gap * ours.abs().mean()
    assert (theirs.argmax(1) == ours.argmax(1)).float().mean() > 0.9


@pytest.mark.skipif(not LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_gguf_runs_in_llama_cpp_like_the_model_in_memory(joint_gguf):
    outcome, out = joint_gguf
    assert_runs_in_llama_cpp_like(outcome.model, out / "model.gguf")


def test_a_shrunk_quantised_gguf_has_the_cut_out_shapes(tiny_dir, tmp_path):
    out = tmp_path / "shrunk"
    outcome = execute(_job(tiny_dir, ShrinkSettings("thanos", mlp=0.25, heads=0.5,
                                                   multiple_of=32), QuantizeSettings("q8_0")),
                      out, progress=False, announce=False)
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf")
    assert loaded.config.intermediate_size == 96 and loaded.config.num_attention_heads == 2
    assert loaded.config.head_dim == 16  # explicit: hidden 64 ≠ 2 heads × 16
    ours, theirs = _weights(outcome.model), _weights(loaded)
    for name in outcome.run.quantization.quantized:
        assert torch.equal(theirs[f"{name}.weight"], ours[f"{name}.weight"]), name
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, outcome.model(ids).logits,
                                   rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("scheme", ["w4g32", "w8", "w3g32"])
def test_compressed_tensors_loads_in_transformers_with_the_same_logits(tiny_dir, tmp_path,
                                                                       scheme):
    out = tmp_path / scheme
    outcome = execute(_job(tiny_dir, QuantizeSettings(scheme), fmt="compressed-tensors"), out,
                      progress=False, announce=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == \
        "compressed-tensors"
    weights = config["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == int(scheme[1]) and weights["symmetric"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, ours = loaded(ids).logits, outcome.model(ids).logits
    # The format stores float16 scales and de-quantises in float16: equal to its round-off.
    torch.testing.assert_close(theirs, ours, rtol=2e-3, atol=2e-3)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.mlp.down_proj.weight_packed" in keys
    assert "model.layers.0.mlp.down_proj.weight" not in keys


@pytest.mark.parametrize("args,fragment", [
    (["quantize", "--scheme", "w5"], "not supported"),
    (["quantize", "--scheme", "w4g100"], "power of two"),
    (["quantize", "--scheme", "w4g128", "--format", "gguf"], "GGUF holds llama.cpp's"),
    (["quantize", "--scheme", "w3g32-asym", "--format", "gguf"], "GGUF holds llama.cpp's"),
    (["quantize", "--scheme", "q4_0", "--format", "compressed-tensors"], "holds w* schemes"),
    (["quantize", "--scheme", "w4g32-asym", "--format", "compressed-tensors"],
     "cannot unpack"),
    (["prune", "--method", "wanda", "--format", "compressed-tensors"], "add a quantisation"),
    (["prune", "--method", "wanda", "--quantize", "q4_1"], "no exact zero"),
    (["prune", "--method", "wanda", "--act-order"], "add --quantize"),
    (["quantize", "--scheme", "w4g32", "--method", "rtn", "--act-order"], "act_order"),
])
def test_bad_quantisation_requests_are_refused_before_loading(args, fragment, tmp_path,
                                                              capsys, monkeypatch):
    import snapprune.models.loading as loading

    def never(*_a, **_k):
        raise AssertionError("loaded")

    monkeypatch.setattr(loading, "load_model", never)
    out = tmp_path / "out"
    code, err = _run(capsys, *args[:1], "--model", "m/x", *args[1:], "--out", out, "--quiet")
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("family,args,fragment", [
    ("gpt2", ["quantize", "--scheme", "q4_0", "--format", "gguf"], "writer covers llama, mistral"),
    ("llama", ["quantize", "--scheme", "q4_0", "--include", "o_proj", "--format", "gguf"],
     None),
    ("phi3", ["quantize", "--scheme", "q8_0"], None),
    ("llama", ["quantize", "--scheme", "w4g128", "--format", "compressed-tensors"],
     "need whole groups"),
])
def test_refusals_that_need_the_model(family, args, fragment, tmp_path, capsys, tokenizer):
    model = tiny_model(family, vocab=len(tokenizer))
    source = tmp_path / "src"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    capsys.readouterr()
    out = tmp_path / "out"
    code, err = _run(capsys, args[0], "--model", source, *args[1:], "--calib", C4_FILE,
                     "--nsamples", 2, "--seqlen", 32, "--no-eval", "--no-samples", "--out",
                     out, "--quiet")
    if fragment is None:
        assert code == 0, err
    else:
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_widths_that_are_not_whole_blocks_are_refused(tokenizer, tmp_path, capsys):
    """A shrink whose MLP width is not a multiple of 32 cannot be q4_0 (llama.cpp would keep
    that layer unquantised, larger and slower): refused before any work."""
    source = tmp_path / "src"
    tiny_model("llama", vocab=len(tokenizer)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    capsys.readouterr()
    code, err = _run(capsys, "shrink", "--model", source, "--mlp", 0.3, "--multiple-of", 8,
                     "--quantize", "q4_0", "--calib", C4_FILE, "--nsamples", 2, "--seqlen", 32,
                     "--no-eval", "--out", tmp_path / "out", "--quiet")
    assert code == 2 and "blocks of 32" in err and "multiple" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_optional_package_is_one_line(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec

    def find(name, *args):
        return None if name == "compressed_tensors" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find)
    code, err = _run(capsys, "quantize", "--model", "m/x", "--scheme", "w4g32", "--format",
                     "compressed-tensors", "--out", tmp_path / "o")
    assert code == 2 and "pip install 'snapprune[deploy]'" in err


def test_the_tokenizer_comes_from_the_source_gguf(joint_gguf, tiny_dir):
    from gguf import GGUFReader

    from snapprune.export.gguf import source_gguf

    _, out = joint_gguf
    assert source_gguf(str(tiny_dir)) is None  # a plain directory: built from its files
    reader = GGUFReader(str(out / "model.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    vocab = AutoTokenizer.from_pretrained(tiny_dir).convert_ids_to_tokens(list(range(10)))
    assert tokens[:10] == vocab
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert reader.fields["llama.attention.key_length"].contents() == 16
    from snapprune.models.rope import rope_theta

    config = AutoModelForCausalLM.from_pretrained(tiny_dir).config
    assert reader.fields["llama.rope.freq_base"].contents() == rope_theta(config)
    assert reader.fields["llama.attention.layer_norm_rms_epsilon"].contents() == \
        pytest.approx(config.rms_norm_eps)


def test_help_lists_the_schemes_and_formats(capsys):
    from snapprune.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for word in ("q4_0", "q4_1", "q8_0", "w4g128", "hf (safetensors)", "gguf (llama.cpp)",
                 "compressed-tensors (vLLM)"):
        assert word in text, word


def test_the_gguf_header_carries_the_configs_rope_base_and_eps(tokenizer, tmp_path):
    """transformers 5 keeps the rotary base in ``rope_parameters``: a writer reading only
    ``rope_theta`` would give llama.cpp its default (10,000) and shift every position."""
    from gguf import GGUFReader

    model = tiny_model("llama", vocab=len(tokenizer))
    model.config.rope_parameters = {"rope_theta": 50000.0, "rope_type": "default"}
    model.config.rms_norm_eps = 1e-5
    source = tmp_path / "src"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "out"
    execute(Job(model=str(source), steps=(QuantizeSettings("q8_0", method="rtn"),),
                evaluation=EvaluationSpec(ppl=(), dense=False),
                output=OutputSpec(format="gguf", samples=False)), out, progress=False)
    reader = GGUFReader(str(out / "model.gguf"))
    assert reader.fields["llama.rope.freq_base"].contents() == 50000.0
    assert reader.fields["llama.attention.layer_norm_rms_epsilon"].contents() == \
        pytest.approx(1e-5)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
"""Llama 3.1's rope scaling, its original context shrunk so a tiny head's pairs span all
three regimes (unchanged, interpolated, scaled by the factor)."""


def test_llama3_rope_factors_are_transformers_own_frequencies():
    """llama.cpp's ``rope_freqs`` divide each pair's frequency: they must be transformers'
    default frequencies over its llama3 ones, pair by pair."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from snapprune.models.rope import llama3_rope_factors

    config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=LLAMA3_ROPE)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = 128
    plain = 1.0 / (LLAMA3_ROPE["rope_theta"] ** (torch.arange(0, head_dim, 2).double()
                                                  / head_dim))
    factors = torch.tensor(llama3_rope_factors(config, head_dim), dtype=torch.float64)
    torch.testing.assert_close(factors, plain / scaled.double(), rtol=1e-5, atol=0)
    assert factors.min() == 1.0 and factors.max() == 8.0
    assert ((factors > 1) & (factors < 8)).any()  # the interpolated band is exercised


@pytest.mark.skipif(not LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_a_llama3_rope_model_runs_in_llama_cpp_like_the_model_in_memory(tokenizer_dir,
                                                                         tmp_path):
    """Llama 3.x models scale their rope (``rope_type: llama3``): the GGUF file carries the
    factors (``rope_freqs``) and llama.cpp's logits follow the model in memory."""
    from llama_cpp import Llama
    from tiny_models import tiny_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model("llama", vocab=len(tokenizer))
    model.config.rope_parameters = dict(LLAMA3_ROPE)
    source = tmp_path / "llama3"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    outcome = execute(_job(source, QuantizeSettings("q8_0")), tmp_path / "gguf",
                      progress=False, announce=False)
    assert outcome.model.model.rotary_emb.rope_type == "llama3"
    path = tmp_path / "gguf" / "model.gguf"
    assert_runs_in_llama_cpp_like(outcome.model, path)
    # and it is the scaling that makes them agree: the same weights with plain rope are
    # farther from llama.cpp's logits than the scaled model is (by a wide margin)
    plain = copy.deepcopy(outcome.model)
    plain.config.rope_parameters = {"rope_type": "default",
                                    "rope_theta": LLAMA3_ROPE["rope_theta"]}
    plain.model.rotary_emb = type(plain.model.rotary_emb)(plain.config)
    ids = torch.randint(0, len(tokenizer), (48,), generator=torch.Generator().manual_seed(0))
    llm = Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids.tolist())
        theirs = torch.tensor(np.array(llm.scores[:48]))
    finally:
        llm.close()
    with torch.no_grad():
        scaled = (theirs - outcome.model(ids[None]).logits[0]).abs().mean()
        unscaled = (theirs - plain(ids[None]).logits[0]).abs().mean()
    assert scaled < 0.5 * unscaled, (scaled, unscaled)
