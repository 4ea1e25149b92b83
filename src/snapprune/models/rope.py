"""The rotary position embedding's settings, read from a config of any transformers version
(5 keeps them in ``rope_parameters``, 4.x in ``rope_scaling`` with ``rope_theta`` beside it),
and Llama 3.1's frequency factors as llama.cpp stores them."""

from __future__ import annotations

import math


def rope_parameters(config) -> dict:
    """The rope's settings as the config holds them (``{}`` for the default rope)."""
    for holder in (getattr(config, "rope_parameters", None), getattr(config, "rope_scaling", None)):
        if isinstance(holder, dict):
            return holder
    return {}


def rope_kind(config) -> str:
    params = rope_parameters(config)
    return params.get("rope_type", params.get("type")) or "default"


def rope_theta(config) -> float:
    """The rotary base."""
    for holder in (getattr(config, "rope_parameters", None), getattr(config, "rope_scaling", None)):
        if isinstance(holder, dict) and "rope_theta" in holder:
            return float(holder["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def named_scaling(params: dict) -> dict:
    """Rope settings without the base, their kind under ``rope_type`` (older configs call it
    ``type``; none named: ``default``)."""
    params = {k: v for k, v in params.items() if k != "rope_theta"}
    legacy = params.pop("type", "default")
    params.setdefault("rope_type", legacy)
    return params


def rope_scaling(config) -> dict | None:
    """The scaling as a 4.x-style ``rope_scaling`` (``rope_type`` named, no base), ``None``
    for the default rope: what layouts written for other runtimes carry."""
    params = named_scaling(rope_parameters(config))
    return params if params["rope_type"] != "default" else None


def llama3_rope_factors(config, head_dim: int) -> list[float]:
    """Llama 3.1's frequency scaling as llama.cpp applies it (``rope_freqs``: each pair's
    wavelength multiplied by its factor): unchanged above the high-frequency wavelength,
    ``factor`` below the low-frequency one, and between them the smooth interpolation of
    Meta's definition."""
    params = rope_parameters(config)
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    context = float(params["original_max_position_embeddings"])
    base = rope_theta(config)
    out = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * base ** (i / head_dim)
        if wavelength < context / high:
            out.append(1.0)
        elif wavelength > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def rope_tensor_bytes(config, head_dim: int) -> int:
    """The bytes of the rope tensor a GGUF file holds besides the model's parameters:
    Llama 3.1's factors, one float32 per pair of dimensions; none for other ropes."""
    return 4 * (head_dim // 2) if rope_kind(config) == "llama3" else 0
