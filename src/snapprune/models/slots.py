"""The tensors a GGUF type is chosen for, as llama.cpp's rules see them (kind, layer, width),
and the output matrix's input statistics, which its scales are searched on."""

from __future__ import annotations

import torch
from torch import nn

from ..engine import LayerStats
from ..engine.mixes import KINDS, OUTPUT, TOKEN_EMBD, Slot
from .adapters import adapter_for
from .capture import home_device
from .experts import expert_count
from .layout import input_width, linear_weight
from .targets import layer_roles


def embedding_names(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """The token embedding and the output matrix by model-relative name, with their kind
    (``token_embd``; ``output``, only when not tied to the embedding)."""
    named = {module: name for name, module in model.named_modules()}
    embedding = model.get_input_embeddings()
    out = {named[embedding]: (embedding, TOKEN_EMBD)}
    output = model.get_output_embeddings()
    if output is not None and output.weight is not embedding.weight:
        out[named[output]] = (output, OUTPUT)
    return out


def tensor_slots(model: nn.Module, layers: dict[int, dict[str, nn.Module]],
                 widths: dict[str, int] | None = None) -> list[Slot]:
    """Every tensor a GGUF type is chosen for, as llama.cpp's rules see it (``widths``: the
    inputs a layer will have once units are cut out)."""
    config = model.config
    heads = getattr(config, "num_attention_heads", 1) or 1
    gqa = heads // (getattr(config, "num_key_value_heads", None) or heads)
    roles = layer_roles(model)
    adapter = adapter_for(model)
    count = len(adapter.decoder_blocks(model))
    experts = expert_count(config, adapter.moe) if adapter.moe is not None else 0
    slots = []
    for index, named in layers.items():
        for name, module in named.items():
            rows = linear_weight(module).shape[0]
            cols = (widths or {}).get(name, input_width(module))
            slots.append(Slot(name, KINDS.get(roles.get(name, ""), "other"), index, count,
                              rows, cols, gqa, experts=experts))
    embeddings = embedding_names(model)
    tied = OUTPUT not in {kind for _, kind in embeddings.values()}
    for name, (module, kind) in embeddings.items():
        rows, cols = module.weight.shape
        slots.append(Slot(name, kind, 0, 1, rows, cols, gqa, tied=kind == TOKEN_EMBD and tied))
    return slots


def output_statistics(model: nn.Module, run, device: torch.device):
    """A ``run_blocks`` hook that, after the last block, gathers the output matrix's input
    statistics (the final norm of the last block's outputs) into ``run.output_stats``, so the
    embedding's scales are searched like every layer's (``quantize_embeddings``)."""
    adapter = adapter_for(model)
    last = len(adapter.decoder_blocks(model)) - 1
    norm = _module(model, adapter.final_norm)

    def after(index: int, inputs) -> None:
        if index != last or not run.settings.parsed_scheme.gguf:
            return
        stats = LayerStats(model.config.hidden_size, device=device)
        home = home_device(norm) if norm is not None else device
        if norm is not None:
            norm.to(device)
        for x in inputs.batches:
            x = x.to(device)
            stats.add(norm(x) if norm is not None else x)
        if norm is not None:
            norm.to(home)
        run.output_stats = stats

    return after


def _module(model: nn.Module, path: str | None) -> nn.Module | None:
    if not path:
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
