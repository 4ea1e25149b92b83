"""Which layers a step changes: those the family adapter's groups name, narrowed by
include/exclude patterns."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from ..errors import SnapPruneError
from .adapters import adapter_for


def _select(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    def matches(patterns):
        return any(fnmatch.fnmatch(name, p) or p in name.split(".") or fnmatch.fnmatch(
            name.rsplit(".", 1)[-1], p) for p in patterns)

    return (not include or matches(include)) and not matches(exclude)


def target_layers(model: nn.Module, include: tuple[str, ...] = (),
                  exclude: tuple[str, ...] = ()) -> dict[int, dict[str, nn.Module]]:
    """Per block index, the linear layers to change (names relative to the model): those the
    family adapter's groups name, narrowed by ``include``/``exclude``."""
    adapter = adapter_for(model)
    blocks = adapter.decoder_blocks(model)
    chosen: dict[int, dict[str, nn.Module]] = {}
    for index, block in enumerate(blocks):
        prefix = f"{adapter.blocks}.{index}."
        modules = dict(block.named_modules())
        chosen[index] = {prefix + n: modules[n] for n in adapter.layer_roles(block)
                         if _select(prefix + n, include, exclude)}
    if not any(chosen.values()):
        raise SnapPruneError(
            "no linear layer matches include/exclude; the layers are listed in verbose output"
        )
    return chosen


def layer_roles(model: nn.Module) -> dict[str, str]:
    """Model-relative layer name → its group role (``attention.q``, ``mlp.out``, …)."""
    adapter = adapter_for(model)
    return {f"{adapter.blocks}.{i}.{n}": role
            for i, block in enumerate(adapter.decoder_blocks(model))
            for n, role in adapter.layer_roles(block).items()}


def check_finite(named: dict[str, nn.Module]) -> None:
    for name, module in named.items():
        if not torch.isfinite(module.weight).all():
            raise SnapPruneError(
                f"weight of {name} contains NaN or Inf; the model is corrupt, reload it"
            )
