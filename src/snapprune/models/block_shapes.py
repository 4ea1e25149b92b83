"""Each decoder block's own shape — heads, key/value heads, MLP width — read from its layers, and
an empty model's blocks given such shapes: what per-block widths (``shrink --allocation
sensitivity``), removed attention and the Nemotron-NAS reader share."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .adapters import adapter_for
from .depth import attention_free
from .layout import linear_weight


@dataclass(frozen=True)
class BlockWidths:
    """One decoder block's shape: its query and key/value heads (0 without attention) and its
    MLP width."""

    heads: int
    kv_heads: int
    ffn: int


def block_widths(model, head_dim: int) -> list[BlockWidths]:
    """Each decoder block's query and key/value heads (0 without attention) and MLP width, as
    its layers hold them."""
    adapter = adapter_for(model)
    out = []
    for block in adapter.decoder_blocks(model):
        ffn = linear_weight(block.get_submodule(adapter.mlp.output)).shape[1]
        if attention_free(block):
            out.append(BlockWidths(0, 0, ffn))
            continue
        rows = [linear_weight(block.get_submodule(n)).shape[0] // head_dim
                for n in (adapter.attention.q, adapter.attention.k)]
        out.append(BlockWidths(rows[0], rows[1], ffn))
    return out


def _meta_linear(old: nn.Module, inputs: int, outputs: int) -> nn.Linear:
    return nn.Linear(inputs, outputs, bias=getattr(old, "bias", None) is not None,
                     device="meta", dtype=linear_weight(old).dtype)


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, new)


def resize_blocks(model: nn.Module, widths: list[BlockWidths], head_dim: int) -> None:
    """Give each block of an empty model (built with the widest block's config) its own MLP
    width and head count: layers of those shapes (on the meta device, to be assigned) and the
    attention's query heads per key/value head. Attention-free blocks keep ``NoAttention``."""
    adapter = adapter_for(model)
    for block, shape in zip(adapter.decoder_blocks(model), widths, strict=True):
        modules = dict(block.named_modules())
        for producers, consumer in adapter.mlp_groups(block):
            for name in producers:
                old = modules[name]
                _replace(block, name, _meta_linear(old, linear_weight(old).shape[1], shape.ffn))
            old = modules[consumer]
            _replace(block, consumer, _meta_linear(old, shape.ffn, linear_weight(old).shape[0]))
        att = adapter.attention
        if attention_free(block):
            continue
        for name, rows in ((att.q, shape.heads), (att.k, shape.kv_heads), (att.v, shape.kv_heads)):
            old = modules[name]
            _replace(block, name, _meta_linear(old, linear_weight(old).shape[1], rows * head_dim))
        old = modules[att.o]
        _replace(block, att.o, _meta_linear(old, shape.heads * head_dim,
                                            linear_weight(old).shape[0]))
        attention = block.get_submodule(att.o.rpartition(".")[0])
        if hasattr(attention, "num_key_value_groups"):
            attention.num_key_value_groups = shape.heads // shape.kv_heads


