"""``hf``: the model as transformers saves it (safetensors), quantised weights de-quantised —
what any transformers user loads, for inspection and further work."""

from __future__ import annotations

import copy
from pathlib import Path

from ..models.adapters import fused_experts
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
    with fused_experts(model):
        _save(model, dtype, directory)
    if outcome.tokenizer is not None:
        outcome.tokenizer.save_pretrained(directory)
    return sorted({p.name for p in directory.iterdir()} - before), []


def _save(model, dtype, directory: Path) -> None:
    if dtype is None or dtype == model.dtype:
        model.save_pretrained(directory, safe_serialization=True)
    else:
        state = {k: v.to(dtype) if v.is_floating_point() else v
                 for k, v in model.state_dict().items()}
        model.save_pretrained(directory, safe_serialization=True, state_dict=state)
        config = copy.deepcopy(model.config)  # it names the model's dtype: name the file's
        config.dtype = dtype
        config.save_pretrained(directory)


FORMAT = Format("hf", check_job, check_model, write)
