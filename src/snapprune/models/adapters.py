"""Where each model family keeps its decoder blocks, embeddings and final norm.

One small adapter per family; a generic fallback finds the decoder's ``ModuleList`` for
architectures nobody has written an adapter for yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import SnapPruneError
from ..layout import is_prunable


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module: object = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


@dataclass(frozen=True)
class Adapter:
    """Dotted paths, relative to the ``*ForCausalLM`` model, of the parts the pipeline needs."""

    family: str
    model_types: tuple[str, ...]
    blocks: str
    embeddings: tuple[str, ...]
    final_norm: str | None

    def decoder_blocks(self, model: nn.Module) -> nn.ModuleList:
        blocks = _get(model, self.blocks)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise SnapPruneError(
                f"{type(model).__name__} has no decoder blocks at {self.blocks}; "
                "this architecture is not supported"
            )
        return blocks

    def describe(self, model: nn.Module) -> dict:
        """Where things are, for the report: proves the adapter matches the model."""
        return {
            "family": self.family,
            "blocks": f"{self.blocks} ({len(self.decoder_blocks(model))})",
            "embeddings": [p for p in self.embeddings if _get(model, p) is not None],
            "final_norm": self.final_norm if self.final_norm and _get(model, self.final_norm)
            else None,
        }


ADAPTERS = (
    Adapter(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "granite", "olmo",
         "olmo2", "smollm3"),
        "model.layers",
        ("model.embed_tokens", "model.rotary_emb"),
        "model.norm",
    ),
    Adapter(
        "opt",
        ("opt",),
        "model.decoder.layers",
        ("model.decoder.embed_tokens", "model.decoder.embed_positions",
         "model.decoder.project_in"),
        "model.decoder.final_layer_norm",
    ),
    Adapter("gpt2", ("gpt2",), "transformer.h", ("transformer.wte", "transformer.wpe"),
            "transformer.ln_f"),
    Adapter("gpt_neox", ("gpt_neox",), "gpt_neox.layers",
            ("gpt_neox.embed_in", "gpt_neox.rotary_emb"), "gpt_neox.final_layer_norm"),
)


def _generic_adapter(model: nn.Module) -> Adapter:
    """The longest ``ModuleList`` whose every element holds a linear layer: the decoder."""
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
            any(is_prunable(m) for m in block.modules()) for block in module
        ) and (best is None or len(module) > best[0]):
            best = (len(module), name)
    if best is None:
        raise SnapPruneError(
            f"cannot find decoder blocks in {type(model).__name__}: no list of layers holding "
            "linear layers; this architecture is not supported"
        )
    embeddings = tuple(n for n, m in model.named_modules() if isinstance(m, nn.Embedding))
    return Adapter("generic", (), best[1], embeddings, None)


def adapter_for(model: nn.Module) -> Adapter:
    """The family adapter for ``model``, by ``config.model_type``; else the generic fallback."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types and _get(model, adapter.blocks) is not None:
            return adapter
    return _generic_adapter(model)
