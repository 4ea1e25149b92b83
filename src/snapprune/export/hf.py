"""``hf``: the model as transformers saves it (safetensors), quantised weights de-quantised —
what any transformers user loads, for inspection and further work."""

from __future__ import annotations

from pathlib import Path

from .format import Format


def check_job(job) -> None:
    """Every scheme and every family: the weights are plain floats."""


def check_model(model, job) -> None:
    """Every model transformers can save."""


def write(outcome, directory: Path) -> tuple[list[str], list[str]]:
    before = {p.name for p in directory.iterdir()}
    outcome.model.save_pretrained(directory, safe_serialization=True)
    if outcome.tokenizer is not None:
        outcome.tokenizer.save_pretrained(directory)
    return sorted({p.name for p in directory.iterdir()} - before), []


FORMAT = Format("hf", check_job, check_model, write)
