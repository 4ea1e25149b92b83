"""OWL's per-block sparsities measured on the dense model (``prune --allocation owl``).

One pass of the dense model over the calibration windows, block by block: each block's pruned
layers' input norms, their weights' outlier ratio (``engine.owl``), the stream propagated
through the unchanged block. The pruning pass that follows prunes every layer of block ``i``
to ``sparsities[i]``; the blocks' sparsities average the target (a block's parameter count
is the same in every block of these models, so the model's sparsity is the target too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine.owl import outlier_ratio, outlier_scores, owl_sparsities
from .adapters import adapter_for
from .blockloop import gather_layer_stats, propagate
from .capture import BlockInputs
from .layout import linear_weight
from .settings import PruneSettings


@dataclass
class OwlAllocation:
    """Each block's outlier ratio and the sparsity it gets, for the run and its report."""

    ratios: list[float] = field(default_factory=list)
    sparsities: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self, settings: PruneSettings) -> dict:
        return {"allocation": "owl", "lambda": settings.owl_lambda,
                "threshold": settings.owl_threshold, "outlier_ratios": self.ratios,
                "sparsities": self.sparsities, "seconds": self.seconds}


@torch.no_grad()
def owl_allocation(model: nn.Module, layers: dict[int, dict[str, nn.Module]],
                   inputs: BlockInputs, settings: PruneSettings, device: torch.device, *,
                   progress: bool = True) -> OwlAllocation:
    """The dense pass and the sparsities; ``inputs`` (the first block's) are left as they
    were."""
    start = time.perf_counter()
    blocks = adapter_for(model).decoder_blocks(model)
    stream = BlockInputs(list(inputs.batches), inputs.calls)  # batches replaced, not written
    found = OwlAllocation()
    for index in tqdm(range(len(blocks)), desc="OWL outlier ratios", unit="block",
                      disable=not progress):
        block = blocks[index]
        home = next(block.parameters()).device
        block.to(device)
        named = layers.get(index, {})
        stats = gather_layer_stats(block, named, stream, device, hessian=False)
        scores = [outlier_scores(linear_weight(module), stats[name].sq_norms)
                  for name, module in named.items()]
        found.ratios.append(outlier_ratio(scores, settings.owl_threshold) if scores else 0.0)
        propagate(block, stream, device)
        block.to(home)
    found.sparsities = owl_sparsities(found.ratios, settings.resolved_sparsity,
                                      settings.owl_lambda)
    found.seconds = time.perf_counter() - start
    return found
