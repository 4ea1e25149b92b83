"""Weight layouts: ``nn.Linear`` stores ``rows × cols`` (out × in), GPT-2's ``Conv1D`` its
transpose.

The engine always works on ``W`` with ``y = W x``. These helpers hide the difference.
"""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT-J's ancestors): weight is ``in × out``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``rows × cols`` (out × in), whatever its storage layout."""
    w = module.weight.data
    return w.T if is_conv1d(module) else w


def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``out × in`` weight back into the module in its own layout and dtype."""
    target = module.weight.data
    target.copy_(weight.T if is_conv1d(module) else weight)


def input_width(module: nn.Module) -> int:
    return linear_weight(module).shape[1]
