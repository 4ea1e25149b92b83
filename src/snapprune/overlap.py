"""Whether training text overlaps evaluated text: a recovery that trains on the windows it is
measured on would report a perplexity it did not earn."""

from __future__ import annotations

import torch


def shingles(ids: torch.Tensor, width: int = 32) -> set[tuple[int, ...]]:
    """Every run of ``width`` consecutive tokens of a 1-D stream."""
    values = ids.tolist()
    return {tuple(values[i : i + width]) for i in range(len(values) - width + 1)}


def shared_windows(train: torch.Tensor, evaluated: list[torch.Tensor], width: int = 32) -> int:
    """How many training windows share a run of ``width`` tokens with the evaluated text."""
    seen: set[tuple[int, ...]] = set()
    for ids in evaluated:
        seen |= shingles(ids, width)
    count = 0
    for window in train:
        values = window.tolist()
        if any(tuple(values[i : i + width]) in seen for i in range(len(values) - width + 1)):
            count += 1
    return count
