"""Per-block widths from measured sensitivity (``shrink --allocation sensitivity``).

One pass of the dense model over the calibration windows gathers, block by block, the
statistics of the layers that consume the removable units (``down_proj`` for neurons,
``o_proj`` for heads). At a few removal counts per block the method's structured solve (the
one ``shrink`` then runs) is applied to a copy of the layer, and the cost of that cut is the
mean over tokens of ``‖(Ŵ−W) a_t‖² / ‖x_t‖²``, ``a_t`` the layer's input and ``x_t`` the stream
leaving the block: each token's perturbation relative to its own stream. Every later block and
the output head read a token through its own RMS norm, so that ratio is what they see; and a
few tokens with massive activations (whose stream norm is hundreds of times the others') do
not swamp the mean, as they would a ratio of means. The counts with the least summed cost for
the same total removal as the uniform plan (``engine.widths.allocate_counts``) become each
block's width.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine import LayerStats, prune_weight
from ..engine.units import lowest_units
from ..engine.widths import CostCurve, allocate_counts
from ..errors import SnapPruneError
from .adapters import adapter_for
from .blockloop import block_output, gather_layer_stats
from .capture import BlockInputs
from .layout import linear_weight
from .settings import ShrinkSettings

POINTS = 13
"""Removal counts measured per block (evenly spaced from 0 to the block's limit)."""
MOST_REMOVED = 0.9
"""No block loses more than this share of its neurons (and each keeps a head per group)."""
SPREAD = 2.5
"""A block may lose up to this many times the uniform share (within ``MOST_REMOVED``)."""


@dataclass
class Sensitivity:
    """What the allocation measured and chose, for the report and its plot."""

    mlp: list[CostCurve] = field(default_factory=list)
    heads: list[CostCurve] = field(default_factory=list)
    mlp_unit: int = 1
    """Neurons per MLP unit (``multiple_of``)."""
    mlp_counts: list[int] = field(default_factory=list)
    """Units removed per block (``mlp_unit`` neurons each)."""
    head_counts: list[int] = field(default_factory=list)
    """Query heads removed per key/value group, per block."""
    seconds: float = 0.0

    def describe(self) -> dict:
        def curves(items: list[CostCurve]) -> list[dict]:
            return [{"counts": list(c.counts),
                     "costs": [v if math.isfinite(v) else None for v in c.costs]}
                    for c in items]

        return {"cost": "mean over tokens of the cut layer's output error / the squared "
                        "norm of that token's stream leaving the block",
                "mlp_unit": self.mlp_unit, "mlp_units_removed": self.mlp_counts,
                "heads_removed_per_group": self.head_counts,
                "mlp_curves": curves(self.mlp), "head_curves": curves(self.heads),
                "seconds": self.seconds}


def check_sensitivity(model: nn.Module, settings: ShrinkSettings, mlp_old: int) -> None:
    """Refusals before any work: the family and a width the units divide."""
    adapter = adapter_for(model)
    if adapter.family != "llama":
        raise SnapPruneError(f"per-block widths are written as llama.cpp's deci architecture, "
                             f"which runs LLaMA-family blocks; {adapter.family} is not: use "
                             "--allocation uniform")
    if settings.mlp and mlp_old % settings.multiple_of:
        raise SnapPruneError(f"the MLP width {mlp_old} is not a multiple of --multiple-of "
                             f"{settings.multiple_of}; per-block widths need one that divides "
                             "it")


def _limit(units: int, share: float) -> int:
    """The most units one block may lose: ``SPREAD`` × the uniform share, within
    ``MOST_REMOVED`` and leaving at least one."""
    return max(1, min(units - 1, math.floor(min(MOST_REMOVED, SPREAD * share) * units)))


def _counts(limit: int) -> tuple[int, ...]:
    return tuple(sorted({round(i * limit / (POINTS - 1)) for i in range(POINTS)}))


def _cost_curve(weight: torch.Tensor, stats: LayerStats, settings: ShrinkSettings,
                counts: tuple[int, ...], unit_size: int, per_unit: int, groups: int,
                relative: torch.Tensor) -> CostCurve:
    """The cost at each count: ``per_unit`` units of ``unit_size`` columns per count, in each
    of ``groups`` groups, removed by the method's structured solve; ``relative`` is
    ``1/N Σ_t a_t a_tᵀ / ‖x_t‖²``, so the cost of a change ``Δ`` is ``tr(Δ G Δᵀ)``."""
    w = weight.to(torch.float32)
    g = relative.to(w.device, torch.float32)
    costs = [0.0]
    columns = w.shape[1]
    for count in counts[1:]:
        removed = count * per_unit
        result = prune_weight(
            w, stats, method=settings.method, pattern="structured",
            sparsity=removed * unit_size * groups / columns, metric=settings.metric,
            percdamp=settings.percdamp, error=False,
            choose_columns=lambda s, r=removed: lowest_units(s, unit_size, r, groups))
        delta = result.weight.to(torch.float32) - w
        costs.append(float(((delta @ g) * delta).sum()))
    return CostCurve(counts, tuple(costs))


def _relative_inputs(block: nn.Module, named: dict[str, nn.Module], stream: BlockInputs,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """Run the block on every batch, each layer's inputs weighted by ``1/‖x_t‖²`` of the
    stream leaving the block: ``1/N Σ_t a_t a_tᵀ / ‖x_t‖²`` per layer. The stream is replaced
    by the block's output (propagated)."""
    seen: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(
        lambda _m, inp, _o, n=name: seen.update({n: inp[0].detach()}))
        for name, module in named.items()]
    tokens = 0
    try:
        for b, x in enumerate(stream.batches):
            out = block_output(stream.run(block, x.to(device))).to(torch.float32)
            weights = 1.0 / out.pow(2).sum(-1).reshape(-1).clamp_min(1e-30)
            for name, a in seen.items():
                a = a.reshape(-1, a.shape[-1]).to(torch.float32)
                term = (a * weights[:, None]).T @ a
                sums[name] = sums[name] + term if name in sums else term
            tokens += weights.numel()
            stream.batches[b] = out.to(x.device, x.dtype)
            seen.clear()
    finally:
        for handle in hooks:
            handle.remove()
    return {name: total / max(1, tokens) for name, total in sums.items()}


@torch.no_grad()
def measure_and_allocate(model: nn.Module, inputs: BlockInputs, plan, settings: ShrinkSettings,
                         device: torch.device, *, progress: bool = True) -> Sensitivity:
    """The dense pass measuring every block's cost curves, then the allocation with the
    uniform ``plan``'s total. ``inputs`` (the first block's) are left as they were."""
    start = time.perf_counter()
    adapter = adapter_for(model)
    blocks = adapter.decoder_blocks(model)
    stream = BlockInputs(list(inputs.batches), inputs.calls)  # batches replaced, never written
    mlp_units = plan.mlp_old // settings.multiple_of
    mlp_total = plan.mlp_removed // settings.multiple_of * len(blocks)
    per_group = plan.heads_old // plan.groups
    heads_total = plan.heads_removed_per_group * len(blocks)
    mlp_counts = _counts(_limit(mlp_units, plan.mlp_removed / plan.mlp_old)) if mlp_total else ()
    head_counts = tuple(range(per_group)) if heads_total else ()
    found = Sensitivity(mlp_unit=settings.multiple_of)
    for index in tqdm(range(len(blocks)), desc="measuring widths", unit="block",
                      disable=not progress):
        block = blocks[index]
        home = next(block.parameters()).device
        block.to(device)
        modules = dict(block.named_modules())
        named = {}
        if mlp_total:
            named[adapter.mlp.output] = modules[adapter.mlp.output]
        if heads_total:
            named[adapter.attention.o] = modules[adapter.attention.o]
        stats = gather_layer_stats(block, named, stream, device)
        relative = _relative_inputs(block, named, stream, device)
        if mlp_total:
            name = adapter.mlp.output
            found.mlp.append(_cost_curve(linear_weight(named[name]), stats[name], settings,
                                         mlp_counts, 1, settings.multiple_of, 1,
                                         relative[name]))
        if heads_total:
            name = adapter.attention.o
            found.heads.append(_cost_curve(linear_weight(named[name]), stats[name], settings,
                                           head_counts, plan.head_dim, 1, plan.groups,
                                           relative[name]))
        block.to(home)
    if mlp_total:
        found.mlp_counts = allocate_counts(found.mlp, mlp_total)
    if heads_total:
        found.head_counts = allocate_counts(found.heads, heads_total)
    found.seconds = time.perf_counter() - start
    return found
