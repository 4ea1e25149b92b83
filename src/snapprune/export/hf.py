"""``hf``: the model as transformers saves it (safetensors), quantised weights de-quantised —
what any transformers user loads, for inspection and further work. A model whose blocks differ
in shape (attention removed, per-block widths) has no standard config: it is written in the
Nemotron-NAS layout (``DeciLMForCausalLM``, ``models/decilm.py``), which vLLM and llama.cpp's
converter read and snapprune loads back."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..models import decilm
from ..models.adapters import adapter_for, fused_experts, head_geometry
from ..models.block_shapes import block_widths
from .format import Format


def check_job(job) -> None:
    """Every scheme and every family: the weights are plain floats."""


def check_model(model, job) -> None:
    """Every model transformers can save."""


def write(outcome, directory: Path) -> tuple[list[str], list[str]]:
    """The weights in ``outcome.save_dtype`` (the source checkpoint's unless ``--dtype``
    said otherwise: a float16 GGUF source gives float16 safetensors, not float32); the
    model in memory keeps its own dtype."""
    before = {p.name for p in directory.iterdir()}
    model, dtype = outcome.model, outcome.save_dtype
    notes = []
    widths = differing_blocks(model)
    if widths is not None:
        _save_decilm(model, dtype, directory, widths)
        notes.append("blocks of different shapes: written in the Nemotron-NAS layout "
                     "(DeciLMForCausalLM), which vLLM, llama.cpp's convert_hf_to_gguf.py and "
                     "snapprune read; transformers loads it with trust_remote_code=True")
    else:
        with fused_experts(model):
            _save(model, dtype, directory)
    if outcome.tokenizer is not None:
        outcome.tokenizer.save_pretrained(directory)
    return sorted({p.name for p in directory.iterdir()} - before), notes


def differing_blocks(model) -> list | None:
    """Each block's shape where the blocks differ (no standard config holds them), else
    ``None``."""
    adapter = adapter_for(model)
    if adapter.family != "llama" or adapter.moe is not None:  # the only family cut per block
        return None
    config = model.config
    widths = block_widths(model, head_geometry(config).head_dim)
    return widths if len(set(widths)) > 1 else None


def _save_decilm(model, dtype, directory: Path, widths) -> None:
    dtype = dtype or model.dtype
    decilm.check_model(model)
    config = decilm.layout(model, widths, dtype)  # refuses what the layout cannot hold
    state = _converted(model, decilm.stored_state(model), dtype)
    model.save_pretrained(directory, safe_serialization=True, state_dict=state)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _converted(model, state: dict, dtype) -> dict:
    """``state`` in ``dtype``, without the copies of tied weights: converted one by one, a tied
    output matrix is a tensor of its own that ``save_pretrained`` no longer recognises as the
    embedding's (SmolLM2's float16 file was 56 MB larger for it); loading ties it again."""
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        tied = set(model.get_expanded_tied_weights_keys(all_submodels=True)
                   if hasattr(model, "get_expanded_tied_weights_keys") else ())
    return {k: v.to(dtype) if v.is_floating_point() else v
            for k, v in state.items() if k not in tied}


def _save(model, dtype, directory: Path) -> None:
    if dtype is None or dtype == model.dtype:
        model.save_pretrained(directory, safe_serialization=True)
    else:
        state = _converted(model, model.state_dict(), dtype)
        model.save_pretrained(directory, safe_serialization=True, state_dict=state)
        config = copy.deepcopy(model.config)  # it names the model's dtype: name the file's
        config.dtype = dtype
        config.save_pretrained(directory)


FORMAT = Format("hf", check_job, check_model, write)
