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

from ..errors import SnapPruneError
from . import compressed, gguf, hf
from .format import Format

FORMATS: dict[str, Format] = {f.name: f for f in (hf.FORMAT, gguf.FORMAT, compressed.FORMAT)}
"""Every output format, by the name ``--format`` takes."""
FORMAT_NAMES = tuple(FORMATS)


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise SnapPruneError(f"unknown output format {name!r}; choose one of "
                             f"{', '.join(FORMATS)}")
    return FORMATS[name]
