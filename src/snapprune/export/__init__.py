"""Output formats: one module per format, each written with its format's own library, and
each declaring once what it can hold.

- ``hf``: safetensors (``save_pretrained``), quantised weights de-quantised, for inspection
  and any transformers user;
- ``gguf``: llama.cpp's file (gguf-py's ``GGUFWriter``), its block types holding GPTQ's codes
  as chosen (no re-quantisation), tokenizer carried over;
- ``compressed-tensors``: the format llm-compressor writes and vLLM serves
  (``pack-quantized`` int4/int8 with group scales, the quantisation config in config.json).

``check_job`` refuses, before anything is loaded, a format that cannot hold the job's
settings; ``check_model`` refuses what needs the model (its family, its widths).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import SnapPruneError
from ..models.quantize import QuantizeRun


@dataclass(frozen=True)
class Format:
    name: str
    summary: str
    extra: str | None
    """The package it needs beyond snapprune's own dependencies (checked up front)."""
    check_job: Callable
    """``(job) -> None``: refuse what the format cannot hold, before any loading."""
    check_model: Callable
    """``(model, job) -> None``: refuse what needs the model (family, widths)."""
    write: Callable
    """``(outcome, directory) -> list[str]``: write the model into ``directory`` (a temporary
    directory renamed into place afterwards); return the files it wrote."""


def _registry() -> dict[str, Format]:
    from . import compressed, gguf, hf

    return {f.name: f for f in (hf.FORMAT, gguf.FORMAT, compressed.FORMAT)}


FORMAT_NAMES = ("hf", "gguf", "compressed-tensors")


def get_format(name: str) -> Format:
    formats = _registry()
    if name not in formats:
        raise SnapPruneError(f"unknown output format {name!r}; choose one of "
                             f"{', '.join(formats)}")
    return formats[name]


def require(package: str, extra: str) -> None:
    """A one-line refusal when an optional package is missing."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise SnapPruneError(f"this needs the {package} package: pip install "
                             f"'snapprune[{extra}]'")


def quantization_of(runs) -> QuantizeRun | None:
    """The record of a job's quantisation, alone or joint with its prune or shrink step."""
    for run in runs:
        if isinstance(run, QuantizeRun):
            return run
        if getattr(run, "quantization", None) is not None:
            return run.quantization
    return None
