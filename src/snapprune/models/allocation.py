"""GGUF types chosen to a size target: each tensor's error measured under every candidate
type, then the allocation (``engine.mixes.allocate``) that minimises the summed error within
the budget.

The error of a tensor under a type is its relative output error ``‖(Ŵ−W)X‖² / ‖WX‖²`` on the
calibration statistics (its Hessian), with ``Ŵ`` the weighted rounding on scales searched by
the Hessian diagonal (what GPTQ then improves on, about equally across types), measured on an
evenly spaced sample of rows (a ratio of sums over rows, so a sample estimates it). Layers
are measured on the dense model's activations, in one pass before quantising; the output
matrix (and a tied token embedding, which is the same tensor) on the final norm's outputs.
The budget is the file size less what is not chosen: the metadata and tokenizer (as the source
GGUF file holds them), norms (float32) and tensors kept float16.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine import LayerStats
from ..engine.mixes import CANDIDATES, Choice, Slot, allocate, holds
from ..engine.quantizers import quantize_weight
from ..engine.schemes import parse_scheme
from ..errors import SnapPruneError
from .adapters import head_geometry
from .blockloop import run_blocks
from .layout import linear_weight
from .rope import rope_tensor_bytes
from .settings import QuantizeSettings
from .slots import output_statistics, tensor_slots

SAMPLE_ROWS = 256
"""Rows of each tensor the error is measured on (evenly spaced; all when fewer)."""
MB = 1_000_000


def candidates(slot: Slot) -> list[str]:
    return [t for t in CANDIDATES if holds(t, slot.cols)]


def tensor_bytes(slot: Slot, scheme: str) -> int:
    block = parse_scheme(scheme).block
    return slot.rows * (slot.cols // block.span) * block.block_bytes


def fixed_bytes(model: nn.Module, planned: set[str], metadata: int) -> int:
    """What the file holds besides the chosen tensors: metadata, norms and biases (float32),
    other matrices (float16), and tensors the writer derives from the config (Llama 3.1's
    rope factors)."""
    total = metadata + rope_tensor_bytes(model.config, head_geometry(model.config).head_dim)
    for name, p in model.named_parameters():  # a tied output matrix is listed once
        if name.removesuffix(".weight") not in planned:
            total += p.numel() * (4 if p.dim() == 1 else 2)
    return total


def budget_bytes(model: nn.Module, slots: list[Slot], settings: QuantizeSettings,
                 metadata: int) -> int:
    """The bytes the chosen tensors may take; refuses a target below the smallest file."""
    planned = {s.name for s in slots}
    smallest = {s.name: min(tensor_bytes(s, t) for t in candidates(s)) for s in slots}
    fixed = fixed_bytes(model, planned, metadata)
    if settings.target_size is not None:
        budget = int(settings.target_size * MB) - fixed
        floor_mb = (sum(smallest.values()) + fixed) / MB
        if budget < sum(smallest.values()):
            raise SnapPruneError(
                f"target size {settings.target_size:g} MB is below the smallest GGUF file of "
                f"this model with llama.cpp's types ({floor_mb:.1f} MB); raise --target-size")
        return budget
    weights = sum(s.rows * s.cols for s in slots)
    budget = int(settings.target_bpw * weights / 8)
    if budget < sum(smallest.values()):
        floor = sum(smallest.values()) * 8 / weights
        raise SnapPruneError(f"target {settings.target_bpw:g} bits per weight is below the "
                             f"smallest this model's tensors can take ({floor:.2f}); raise "
                             "--target-bpw")
    return budget


def sample_rows(rows: int) -> torch.Tensor:
    return torch.linspace(0, rows - 1, min(rows, SAMPLE_ROWS)).round().long()


def type_errors(weight: torch.Tensor, stats: LayerStats, types: list[str]) -> dict[str, float]:
    """The relative output error of ``weight`` (sampled rows) under each type."""
    w = weight[sample_rows(weight.shape[0])].to(torch.float32)
    h = stats.hessian.to(w.device, torch.float32)
    base = float(((w @ h) * w).sum()) or 1.0
    out = {}
    for t in types:
        q = quantize_weight(w, stats, t, method="weighted-rtn", error=False).weight
        e = (q.to(torch.float32) - w)
        out[t] = float(((e @ h) * e).sum()) / base
    return out


@torch.no_grad()
def sized_plan(model: nn.Module, layers, settings: QuantizeSettings, run, calibration, *,
               device, batch_size, progress, block_inputs, activations,
               metadata: int = 0) -> tuple[dict[str, Choice], LayerStats | None]:
    """Each tensor's type for the size target, and the output matrix's statistics: one pass
    measuring every candidate's error, then the allocation."""
    slots = tensor_slots(model, layers)
    by_name = {s.name: s for s in slots}
    budget = budget_bytes(model, slots, settings, metadata)
    errors: dict[str, dict[str, float]] = {}

    def measure(_index: int, named: dict[str, nn.Module], stats: dict[str, LayerStats]) -> None:
        for name, module in named.items():
            errors[name] = type_errors(linear_weight(module), stats[name],
                                       candidates(by_name[name]))

    run_blocks(model, layers, measure, calibration, run, device=device, batch_size=batch_size,
               progress=progress, block_inputs=block_inputs, desc="measuring types",
               activations=activations, after=output_statistics(model, run, device))
    output_stats = run.output_stats
    for slot in slots:
        if slot.name in errors:
            continue
        weight = model.get_submodule(slot.name).weight
        if output_stats is None or output_stats.columns != slot.cols:
            raise SnapPruneError(f"no statistics to measure {slot.name} on; write it with a "
                                 "plain scheme")
        errors[slot.name] = type_errors(weight, output_stats, candidates(slot))
    sizes = {s.name: {t: tensor_bytes(s, t) for t in candidates(s)} for s in slots}
    chosen = allocate(errors, sizes, budget)
    plan = {}
    for name, t in chosen.items():
        plan[name] = Choice(t, f"size target: relative output error {errors[name][t]:.3g} "
                               f"in {sizes[name][t]:,} bytes, the best use of the budget")
    return plan, output_stats
