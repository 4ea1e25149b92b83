"""Blocks of different shapes written for transformers/vLLM: the Nemotron-NAS layout
(``DeciLMForCausalLM``), read back by snapprune and by llama.cpp's own converter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import C4_FILE
from test_cli import _run
from test_depth import _job
from test_export import LLAMA3_ROPE, LLAMA_CPP, assert_runs_in_llama_cpp_like
from tiny_models import token_batch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from snapprune.errors import SnapPruneError
from snapprune.models import decilm
from snapprune.models.loading import load_model
from snapprune.models.settings import DepthSettings, QuantizeSettings, ShrinkSettings
from snapprune.run import execute

WIDTH = 1024  # four steps of the layout's 256
HIDDEN = 128


@pytest.fixture(scope="module")
def nas_dir(tmp_path_factory, tokenizer_dir):
    """A LLaMA whose MLP (1024) the layout's 256-wide steps divide: 4 blocks, 8 heads of 16
    over 2 key/value heads (4 query heads per group: no count equals another), each block's
    MLP twice as strong as the one before (their widths' costs differ), Llama 3.1's rope
    scaling."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=WIDTH,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False,
                         rope_parameters=dict(LLAMA3_ROPE))  # as Nemotron-51B's own
    model = LlamaForCausalLM(config)
    for p in model.parameters():
        p.data.normal_(0, 0.06)
    for i, block in enumerate(model.model.layers):
        block.mlp.down_proj.weight.data *= 2.0 ** i
    out = tmp_path_factory.mktemp("nas_llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _cut(nas_dir, out, *more, fmt="hf"):
    steps = (DepthSettings(attention=1, score="angular"),
             ShrinkSettings("thanos", mlp=0.25, multiple_of=256, allocation="sensitivity"),
             *more)
    return execute(_job(nas_dir, *steps, fmt=fmt), out, progress=False, announce=False)


@pytest.fixture(scope="module")
def nas_output(nas_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("nas") / "cut"
    return _cut(nas_dir, out), out


@pytest.mark.parametrize("hidden", [64, 576, 2048, 4096, 8192])
def test_every_width_of_256_has_a_multiplier_the_runtimes_read_back(hidden):
    for width in range(256, 8 * hidden, 256):
        assert decilm.ffn_width(decilm.ffn_mult(width, hidden), hidden) == width
    # Llama-3.1-Nemotron-51B's own numbers: ffn_mult 5.25 at hidden 8192 is 28672 wide, and
    # a width off the 256 grid rounds up to it
    assert decilm.ffn_width(5.25, 8192) == 28672
    assert decilm.ffn_width(1.0, 576) == 512  # int(384) rounded up


def test_blocks_of_different_shapes_are_written_as_nemotron_nas(nas_output):
    outcome, out = nas_output
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["model_type"] == "nemotron-nas"
    assert "--modeling_decilm.DeciLMForCausalLM" in config["auto_map"]["AutoModelForCausalLM"]
    layers = outcome.model.model.layers
    free = [i for i, b in enumerate(layers) if decilm.attention_free(b)]
    assert len(free) == 1
    blocks = config["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [i in free for i in range(4)]
    assert all(b["attention"]["n_heads_in_group"] == 4 for i, b in enumerate(blocks)
               if i not in free)
    widths = [decilm.ffn_width(b["ffn"]["ffn_mult"], HIDDEN) for b in blocks]
    assert widths == [b.mlp.down_proj.in_features for b in layers] and len(set(widths)) > 1
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    (i,) = free
    assert not any(n.startswith((f"model.layers.{i}.self_attn.",
                                 f"model.layers.{i}.input_layernorm.")) for n in names)
    assert f"model.layers.{i}.mlp.down_proj.weight" in names
    report = json.loads((out / "snapprune_report.json").read_text())
    assert any("Nemotron-NAS" in note for note in report["notes"])


def test_snapprune_reads_the_layout_back_to_the_same_logits(nas_output):
    outcome, out = nas_output
    model, _, _ = load_model(str(out), progress=False)
    ids = token_batch(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, outcome.model(ids).logits)
    assert [b.mlp.down_proj.in_features for b in model.model.layers] == [
        b.mlp.down_proj.in_features for b in outcome.model.model.layers]


def test_a_nemotron_nas_model_goes_on_to_a_gguf_file(nas_output, tmp_path):
    """Cut → the hf layout → quantise to GGUF in a second job (the flow with recovery in
    between): the deci GGUF of the reloaded model runs in llama.cpp like the model."""
    from gguf import GGUFReader

    outcome, out = nas_output
    gguf_out = tmp_path / "gguf"
    quantized = execute(_job(out, QuantizeSettings("q8_0"), fmt="gguf"), gguf_out,
                        progress=False, announce=False)
    reader = GGUFReader(str(gguf_out / "model.gguf"))
    assert reader.fields["general.architecture"].contents() == "deci"
    assert reader.fields["deci.feed_forward_length"].contents() == [
        b.mlp.down_proj.in_features for b in outcome.model.model.layers]
    if LLAMA_CPP:
        assert_runs_in_llama_cpp_like(quantized.model, gguf_out / "model.gguf")


def _llama_cpp_source() -> Path | None:
    """llama.cpp's source tree with ``convert_hf_to_gguf.py``: ``SNAPPRUNE_LLAMA_CPP_SOURCE``,
    else the one ``benchmarks/llama_tools.py`` unpacked."""
    named = os.environ.get("SNAPPRUNE_LLAMA_CPP_SOURCE")
    candidates = [Path(named)] if named else sorted(
        (Path.home() / ".cache" / "snapprune").glob("llama-tools-*/llama_cpp_python-*/vendor/"
                                                   "llama.cpp"))
    found = [c for c in candidates if (c / "convert_hf_to_gguf.py").is_file()]
    return found[-1] if found else None


CONVERT = """
import sys
from pathlib import Path
source = Path(sys.argv[1])
sys.path[:0] = [str(source), str(source / "gguf-py")]
import gguf
from conversion.deci import DeciModel

def set_vocab(self):  # the converter's deci vocabularies are Llama-3's or SentencePiece's;
    from transformers import AutoTokenizer, LlamaConfig  # this test's: a small byte-level BPE
    tokenizer = AutoTokenizer.from_pretrained(self.dir_model, config=LlamaConfig())
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    self.gguf_writer.add_tokenizer_model("gpt2")
    self.gguf_writer.add_tokenizer_pre("default")
    self.gguf_writer.add_token_list([vocab[i] for i in range(len(vocab))])
    self.gguf_writer.add_token_types([gguf.TokenType.NORMAL] * len(vocab))
    gguf.SpecialVocab(self.dir_model, load_merges=True).add_to_gguf(self.gguf_writer)

DeciModel.set_vocab = set_vocab
sys.argv = ["convert_hf_to_gguf.py", sys.argv[2], "--outfile", sys.argv[3], "--outtype", "f32"]
sys.path.insert(0, str(source))
import runpy
runpy.run_path(str(source / "convert_hf_to_gguf.py"), run_name="__main__")
"""


@pytest.mark.skipif(not LLAMA_CPP, reason="needs llama-cpp-python (pip install "
                    "'snapprune[llama]')")
def test_llama_cpps_own_converter_reads_the_layout_to_the_same_logits(nas_output, tmp_path):
    """Not read back by snapprune's code: llama.cpp's ``convert_hf_to_gguf.py`` (its
    Nemotron-NAS reader) turns the directory into a GGUF file that llama.cpp runs like the
    model in memory (float32: the same logits up to llama.cpp's arithmetic)."""
    source = _llama_cpp_source()
    if source is None:
        pytest.skip("needs llama.cpp's source for convert_hf_to_gguf.py (python "
                    "benchmarks/llama_tools.py unpacks it, or set SNAPPRUNE_LLAMA_CPP_SOURCE)")
    outcome, out = nas_output
    converted = tmp_path / "converted.gguf"
    done = subprocess.run([sys.executable, "-c", CONVERT, str(source), str(out), str(converted)],
                          capture_output=True, text=True, env={**os.environ, "NO_LOCAL_GGUF": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert_runs_in_llama_cpp_like(outcome.model, converted, gap=0.002)


@pytest.mark.parametrize("args,fragment", [
    (["--heads", "0.25"], "one query-head count"),
    (["--multiple-of", "32"], "--multiple-of 256"),
    (["--multiple-of", "256", "--format", "compressed-tensors"], "no compressed-tensors form"),
])
def test_shapes_the_layout_cannot_hold_are_refused_in_one_line(nas_dir, tmp_path, capsys, args,
                                                               fragment):
    code, err = _run(capsys, "shrink", "--model", nas_dir, "--mlp", "0.25", "--allocation",
                     "sensitivity", *args, "--calib", C4_FILE, "--nsamples", "2", "--seqlen",
                     "16", "--no-eval", "--out", tmp_path / "no")
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "no").exists()


def test_a_search_for_hf_may_remove_attention_when_the_widths_fit(nas_dir, tmp_path):
    """With MLP widths in steps of 256 the Nemotron-NAS layout holds attention-free blocks,
    so a search for --format hf tries them too; its output reloads to the same logits."""
    from snapprune.models.search_settings import SearchSettings

    settings = SearchSettings(target_params=0.8, points=2, windows=2, multiple_of=256)
    outcome = execute(_job(nas_dir, settings, fmt="hf"), tmp_path / "searched", progress=False,
                      announce=False)
    run = outcome.run_of("search")
    assert any(t.structure.attention for t in run.tried) and not run.notes
    model, _, _ = load_model(str(tmp_path / "searched"), progress=False)
    ids = token_batch(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, outcome.model(ids).logits)


def test_per_block_query_heads_are_refused_at_write_time_too():
    """The layout itself refuses shapes it cannot express (what the step checks forecast)."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    shapes = [decilm.BlockWidths(4, 2, 512), decilm.BlockWidths(2, 2, 512)]
    with pytest.raises(SnapPruneError, match="one query-head count"):
        decilm.layout(model, shapes, torch.float32)
    with pytest.raises(SnapPruneError, match="multiple of 256"):
        decilm.layout(model, [decilm.BlockWidths(4, 2, 384)] * 2, torch.float32)


def test_the_summary_of_a_deci_gguf_points_to_llama_cpp_not_to_reloading_it(nas_dir,
                                                                            tmp_path):
    """A deci GGUF cannot be loaded back (transformers has no deci): the summary's next steps
    run it in llama.cpp and name the hf layout for further work; a Nemotron-NAS directory, which
    snapprune loads, gets the usual ones."""
    from snapprune.summary import summary_lines

    steps = (DepthSettings(attention=1, score="angular"),)
    gguf = execute(_job(nas_dir, *steps, fmt="gguf"), tmp_path / "g", progress=False,
                   announce=False)
    shown = "\n".join(summary_lines(gguf))
    assert "llama-cli -m" in shown and "snapprune eval" not in shown and "--format hf" in shown
    hf = execute(_job(nas_dir, *steps), tmp_path / "h", progress=False, announce=False)
    shown = "\n".join(summary_lines(hf))
    assert "snapprune eval --model" in shown and "llama-cli" not in shown


@pytest.mark.parametrize("args,fragment", [
    (["prune", "--method", "wanda", "--sparsity", "0.5", "--stream"], "Nemotron-NAS checkpoint"),
    (["quantize", "--scheme", "w4g32", "--format", "compressed-tensors"],
     "compressed-tensors' one config"),
    (["shrink", "--method", "thanos", "--mlp", "0.3"], "already differ in width"),
    (["prune-depth", "--attention", "3"], "have none already"),
])
def test_steps_that_need_blocks_of_one_shape_refuse_a_reloaded_one(nas_output, tmp_path, capsys,
                                                                   args, fragment):
    """Read back, a Nemotron-NAS model is pruned and quantised like any other; what needs every
    block alike (streaming's one config, a uniform width cut, attention a block no longer has)
    is refused in one line."""
    _, out = nas_output
    code, err = _run(capsys, args[0], "--model", out, *args[1:], "--calib", C4_FILE,
                     "--nsamples", "2", "--seqlen", "16", "--no-eval", "--out", tmp_path / "no")
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "no").exists()


def test_a_family_whose_blocks_are_not_llamas_is_refused_before_any_work(tokenizer_dir,
                                                                        tmp_path, capsys):
    """Qwen2's attention biases (Qwen3's q/k norms, Gemma's norms) are not in the layout: its
    blocks would load as another model. Refused after loading, before calibration."""
    from tiny_models import tiny_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    source = tmp_path / "qwen2"
    model = tiny_model("qwen2", vocab=len(tokenizer))
    model.config.intermediate_size = 256  # on the layout's grid: the family is the problem
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(model.config).save_pretrained(source)
    tokenizer.save_pretrained(source)
    capsys.readouterr()  # the save's progress bar
    code, err = _run(capsys, "prune-depth", "--model", source, "--attention", "1", "--calib",
                     C4_FILE, "--nsamples", "2", "--seqlen", "16", "--no-eval", "--out",
                     tmp_path / "no")
    assert code == 2 and "LLaMA's own blocks" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists()


def test_a_width_cut_in_the_same_job_must_fit_the_layout_too(nas_dir, tmp_path):
    """Attention removed and a uniform cut off the 256 grid, or a head cut, for --format hf:
    refused before any work, not after both steps ran."""
    for shrink, fragment in ((ShrinkSettings("thanos", mlp=0.25, multiple_of=32),
                              "--multiple-of 256"),
                             (ShrinkSettings("thanos", heads=0.25), "head cut")):
        with pytest.raises(SnapPruneError, match=fragment):
            execute(_job(nas_dir, DepthSettings(attention=1), shrink), tmp_path / "no",
                    progress=False, announce=False)
        assert not (tmp_path / "no").exists()


def test_an_older_configs_rope_type_key_is_read(nas_output, tmp_path):
    """Configs written before ``rope_type`` name the scaling ``type``: the reload keeps it."""
    import shutil

    _, out = nas_output
    copy = tmp_path / "older"
    shutil.copytree(out, copy)
    config = json.loads((copy / "config.json").read_text())
    config["rope_scaling"]["type"] = config["rope_scaling"].pop("rope_type")
    (copy / "config.json").write_text(json.dumps(config))
    model, _, _ = load_model(str(copy), progress=False)
    assert model.model.rotary_emb.rope_type == "llama3"


def test_a_gguf_whose_first_block_has_no_attention_is_refused():
    """llama.cpp reads the head size from the first block's head count."""
    from snapprune.export.gguf import check_model
    from snapprune.models.depth import remove_attention

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4))
    remove_attention(model, model.model.layers[0])
    with pytest.raises(SnapPruneError, match="first block has no attention"):
        check_model(model, None)
