"""Every llama.cpp block type snapprune writes, proven by the runtimes: the bytes in the file,
decoded by llama.cpp's own dequantiser (``dequantize_row_*`` in the ggml library that
llama-cpp-python ships) and by transformers' GGUF loader, are exactly the values GPTQ chose on
the searched scales; the model runs in llama.cpp like the model in memory."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import C4_FILE
from test_export import LLAMA_CPP, NO_LLAMA_CPP, assert_runs_in_llama_cpp_like
from transformers import AutoModelForCausalLM

from snapprune.engine.blocks import BLOCK_TYPES
from snapprune.export.gguf import _permute
from snapprune.jobs import CalibrationSpec, EvaluationSpec, Job, OutputSpec
from snapprune.models.settings import QuantizeSettings
from snapprune.run import execute

TYPES = ("q5_0", "q5_1", "iq4_nl", "q4_0")


@pytest.fixture(scope="module", params=TYPES)
def written(request, tiny_dir, tmp_path_factory):
    """The tiny model quantised by GPTQ (searched scales) and written as GGUF."""
    out = tmp_path_factory.mktemp("types") / request.param
    job = Job(model=str(tiny_dir), steps=(QuantizeSettings(request.param),),
              calibration=CalibrationSpec(str(C4_FILE), 4, 64),
              evaluation=EvaluationSpec(ppl=(), dense=False),
              output=OutputSpec(format="gguf", samples=False))
    outcome = execute(job, out, progress=False, announce=False)
    assert outcome.run_of("quantize").settings.scales == "search"
    return request.param, outcome, out / "model.gguf"


def _ggml():
    import llama_cpp

    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    return ctypes.CDLL(str(path))


def _llama_cpp_values(ggml, name: str, data: np.ndarray, count: int) -> torch.Tensor:
    """llama.cpp's own dequantisation of raw block bytes."""
    function = getattr(ggml, f"dequantize_row_{name}")
    function.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    blob = np.ascontiguousarray(data, dtype=np.uint8)
    out = np.empty(count, dtype=np.float32)
    function(blob.ctypes.data, out.ctypes.data, count)
    return torch.from_numpy(out)


def _file_tensors(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(str(path)).tensors}


def _expected(outcome) -> dict[str, tuple[str, torch.Tensor]]:
    """GGUF tensor name -> (layer, the weight in memory as the file orders its rows)."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    config = outcome.model.config
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = outcome.model.state_dict()
    out = {}
    for layer in outcome.run_of("quantize").quantized:
        if ".layers." not in layer:
            continue
        weight = state[f"{layer}.weight"].float()
        heads = {"q_proj": config.num_attention_heads,
                 "k_proj": config.num_key_value_heads}.get(layer.rsplit(".", 1)[1])
        if heads is not None:
            weight = _permute(weight, heads)
        out[names.get_name(f"{layer}.weight", try_suffixes=(".weight",))] = \
            (layer, weight)
    return out


@pytest.mark.skipif(not LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_llama_cpp_reads_back_exactly_the_values_gptq_chose(written):
    from gguf import GGMLQuantizationType

    name, outcome, path = written
    ggml = _ggml()
    tensors = _file_tensors(path)
    expected = _expected(outcome)
    assert len(expected) == 7 * outcome.model.config.num_hidden_layers
    for target, (layer, weight) in expected.items():
        tensor = tensors[target]
        assert tensor.tensor_type == GGMLQuantizationType[BLOCK_TYPES[name].gguf_type], target
        theirs = _llama_cpp_values(ggml, name, tensor.data, weight.numel())
        assert torch.equal(theirs.reshape(weight.shape), weight), layer


def test_transformers_loads_exactly_the_values_gptq_chose(written, tiny_dir):
    _, outcome, path = written
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    ours, theirs = outcome.model.state_dict(), loaded.state_dict()
    for layer in outcome.run_of("quantize").quantized:
        key = f"{layer}.weight"
        assert torch.equal(theirs[key].float(), ours[key].float()), key


@pytest.mark.skipif(not LLAMA_CPP, reason=NO_LLAMA_CPP)
def test_the_file_runs_in_llama_cpp_like_the_model_in_memory(written):
    _, outcome, path = written
    assert_runs_in_llama_cpp_like(outcome.model, path)
