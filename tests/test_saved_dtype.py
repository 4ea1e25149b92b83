"""The saved weights keep the source checkpoint's floating-point type unless ``--dtype`` says
otherwise: a float16 or block-quantised GGUF source gives float16 safetensors, not float32 (a
98 MB SmolLM2 file became 538 MB)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import C4_FILE
from safetensors import safe_open
from test_cli import _run
from transformers import AutoModelForCausalLM

from snapprune.jobs import EvaluationSpec, Job, OutputSpec
from snapprune.models.loading import load_model, resolve_model, stored_dtype
from snapprune.models.settings import QuantizeSettings
from snapprune.run import execute

PRUNE = ["prune", "--method", "wanda", "--calib", C4_FILE, "--nsamples", "2", "--seqlen", "16",
         "--no-eval", "--no-samples"]


def _prune(capsys, *args) -> tuple[int, str]:
    """The command's exit code and everything it printed (the summary goes to stdout)."""
    from snapprune.cli import main

    code = main([str(a) for a in (*PRUNE, *args)])
    printed = capsys.readouterr()
    return code, printed.err + printed.out


def _dtypes(directory) -> set[torch.dtype]:
    with safe_open(directory / "model.safetensors", "pt") as handle:
        return {handle.get_tensor(k).dtype for k in handle.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def gguf_source(tiny_dir, tmp_path_factory):
    """The tiny LLaMA as a q8_0 GGUF file: a block-quantised source, as SmolLM2's is."""
    out = tmp_path_factory.mktemp("source") / "q8"
    execute(Job(model=str(tiny_dir), steps=(QuantizeSettings("q8_0", method="rtn"),),
                evaluation=EvaluationSpec(ppl=(), dense=False),
                output=OutputSpec(format="gguf", samples=False)), out, progress=False,
            announce=False)
    return out / "model.gguf"


def test_a_quantised_gguf_source_is_saved_in_float16(gguf_source, tmp_path, capsys):
    model, _, source = load_model(str(gguf_source), progress=False)
    assert model.dtype == torch.float32 and stored_dtype(model, source) == torch.float16
    out = tmp_path / "pruned"
    code, err = _prune(capsys, "--model", gguf_source, "--out", out)
    assert code == 0, err
    assert _dtypes(out) == {torch.float16}
    assert "weights in float16 (the source's" in err
    report = json.loads((out / "snapprune_report.json").read_text())
    assert report["saved_dtype"] == "float16" and report["dtype"] == "float32"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.float16
    assert loaded.config.num_hidden_layers == model.config.num_hidden_layers


def test_dtype_float32_keeps_full_precision(gguf_source, tmp_path, capsys):
    out = tmp_path / "full"
    code, err = _prune(capsys, "--model", gguf_source, "--dtype", "float32", "--out", out)
    assert code == 0, err
    assert _dtypes(out) == {torch.float32} and "weights in float32 (--dtype)" in err


def test_a_safetensors_source_keeps_its_own_dtype(tiny_dir, tmp_path, capsys):
    half = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).save_pretrained(half)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (half / name).write_bytes((tiny_dir / name).read_bytes())
    model, _, source = load_model(str(half), progress=False)
    assert source == resolve_model(str(half))
    assert stored_dtype(model, source) == torch.bfloat16 and model.dtype == torch.float32
    on_gpu, _, _ = load_model(str(half), progress=False, device="cuda")  # not moved: loaded
    assert on_gpu.dtype == torch.bfloat16  # half precision stays for an accelerator
    out = tmp_path / "pruned"
    code, err = _prune(capsys, "--model", half, "--out", out)
    assert code == 0, err
    assert _dtypes(out) == {torch.bfloat16}
    report = json.loads((out / "snapprune_report.json").read_text())
    assert report["dtype"] == "float32" and report["saved_dtype"] == "bfloat16"


def test_recovery_of_a_half_precision_model_trains_float32_weights(tiny_dir, tmp_path, capsys):
    """AdamW's small updates vanish in float16: the student trains on float32 weights and the
    output is written in the source's float16 again."""
    half = tmp_path / "f16"
    AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float16).save_pretrained(half)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (half / name).write_bytes((tiny_dir / name).read_bytes())
    out = tmp_path / "recovered"
    code, err = _run(capsys, "recover", "--model", half, "--teacher", tiny_dir, "--tokens", 256,
                     "--seqlen", 16, "--batch-size", 2, "--data", C4_FILE, "--no-eval",
                     "--no-samples", "--quiet", "--out", out)
    assert code == 0, err
    assert _dtypes(out) == {torch.float16}
    report = json.loads((out / "snapprune_report.json").read_text())
    losses = [p["loss"] for p in report["recovery"]["loss_curve"]]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    before = AutoModelForCausalLM.from_pretrained(half).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    moved = [k for k in after if "layers" in k and not torch.equal(after[k], before[k])]
    assert moved  # float32 training moved the weights by more than float16's resolution



def test_a_tied_output_matrix_is_saved_once_in_the_sources_dtype(tokenizer_dir, tmp_path,
                                                                 capsys):
    """Converted to the source's float16 tensor by tensor, a tied output matrix became a copy
    of its own (SmolLM2's file was 56 MB larger for it): it is saved once, and tied again on
    loading."""
    from tiny_models import tiny_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model("llama", vocab=len(tokenizer))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    source = tmp_path / "tied16"
    model.half().save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "pruned"
    code, err = _prune(capsys, "--model", source, "--out", out)
    assert code == 0, err
    with safe_open(out / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
        stored = sum(handle.get_tensor(k).numel() for k in names)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert stored == sum(p.numel() for p in loaded.parameters())  # each parameter once
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert _dtypes(out) == {torch.float16}
