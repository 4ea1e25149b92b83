"""Pruning a whole model in place, block by block: which layers, the per-layer step, and
``prune_model``, the in-memory entry point."""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..engine import LayerStats, get_method, parse_pattern, prune_weight
from ..errors import SnapPruneError
from ..memory import peak_bytes
from .adapters import adapter_for
from .blockloop import record_ranks, run_blocks
from .capture import BlockInputs, home_device
from .layout import input_width, linear_weight, set_linear_weight
from .records import LayerRecord, RunRecord
from .settings import PruneSettings


@dataclass(kw_only=True)
class PruneRun(RunRecord):
    """What ``prune_model`` did: per-layer records and where the time went."""

    settings: PruneSettings
    roles: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)


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


def check_model_for_pruning(layers: dict[int, dict[str, nn.Module]], settings: PruneSettings,
                            *, weights: bool = True) -> None:
    """Refuse before any work: settings, pattern widths, and (``weights``: when the weights are
    in memory, not on the meta device of a streamed model) finite weights."""
    pattern, _ = settings.check()
    for named in layers.values():
        for name, module in named.items():
            width = input_width(module)
            if pattern.kind == "nm" and width % pattern.m:
                raise SnapPruneError(
                    f"{pattern} needs every layer width divisible by {pattern.m}, but {name} has "
                    f"{width} inputs; choose another M or exclude that layer"
                )
        if weights:
            check_finite(named)


def check_finite(named: dict[str, nn.Module]) -> None:
    for name, module in named.items():
        if not torch.isfinite(module.weight).all():
            raise SnapPruneError(
                f"weight of {name} contains NaN or Inf; the model is corrupt, reload it"
            )


def layer_cost(settings: PruneSettings) -> Callable[[nn.Module], float]:
    """Relative time to prune a layer with ``settings`` (the method's ``layer_cost``), which
    shares a block's layers out over ranks."""
    method = get_method(settings.method)
    pattern = parse_pattern(settings.pattern)

    def cost(module: nn.Module) -> float:
        cols = input_width(module)
        rows = linear_weight(module).numel() // cols
        return method.layer_cost(rows, cols, pattern, settings.blocksize,
                                 settings.resolved_metric)

    return cost


def prune_layer(name: str, module: nn.Module, stats: LayerStats | None,
                settings: PruneSettings, run: PruneRun, log) -> torch.Tensor:
    """Prune one layer in place, record it, return its mask (``True`` = removed)."""
    role = run.roles.get(name, "")
    _, sparsity = settings.check()
    result = prune_weight(
        linear_weight(module), stats, method=settings.method,
        sparsity=sparsity, pattern=settings.pattern, alpha=settings.alpha,
        blocksize=settings.blocksize, percdamp=settings.percdamp, metric=settings.metric,
        error=run.layer_errors,
    )
    set_linear_weight(module, result.weight)
    record = LayerRecord(name, tuple(result.weight.shape), result.sparsity,
                         result.error, result.seconds, role, result.percdamp)
    run.layers.append(record)
    run.solver_seconds += result.seconds
    if log:
        log(f"{name:48s} {record.shape[0]}x{record.shape[1]}  sparsity "
            f"{record.sparsity:.3f}  error {record.error:.4g}  {record.seconds:.2f}s")
    return result.mask


def check_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SnapPruneError("device cuda requested but no CUDA device is available; use cpu")
    return device


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calibration: torch.Tensor | None,
    settings: PruneSettings | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    block_inputs: BlockInputs | None = None,
    activations: str = "auto",
    layer_errors: bool = True,
    **overrides,
) -> PruneRun:
    """Prune every selected linear layer of ``model`` in place, block by block.

    ``calibration``: ``nsamples × seqlen`` token ids (``None`` for magnitude pruning, which
    needs no data). Only the block being pruned is moved to ``device``; the activations, in the
    model's dtype, ``batch_size`` windows per forward pass (batching changes speed, not results),
    live where ``activations`` says (``auto``: on the device when they fit in half its free
    memory, else on the CPU, pinned). ``layer_errors=False`` skips the per-layer reconstruction
    errors (NaN in the records), which on a CPU can cost more than pruning. ``block_inputs``:
    the first block's inputs captured earlier from the same calibration ids
    (``capture_block_inputs``), which sweeps reuse; they are not modified.
    Keyword overrides replace fields of ``PruneSettings`` (``method=``, ``sparsity=``, ...) in
    a copy; ``settings`` itself is never changed. Every module ends where it started.
    """
    settings = settings or PruneSettings()
    known = {f.name for f in dataclasses.fields(PruneSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SnapPruneError(f"unknown pruning setting(s) {unknown}; use {', '.join(known)}")
    settings = dataclasses.replace(settings, **overrides)
    device = check_device(device)
    start = time.perf_counter()
    adapter = adapter_for(model)
    layers = target_layers(model, settings.include, settings.exclude)
    check_model_for_pruning(layers, settings)
    run = PruneRun(settings=settings, architecture=adapter.describe(model),
                   roles=layer_roles(model), layer_errors=layer_errors)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    if not settings.needs_calibration:
        _prune_weights_only(layers, settings, run, device, log)
    else:
        def prune_block(_index: int, named: dict[str, nn.Module],
                        stats: dict[str, LayerStats]) -> None:
            for name, module in named.items():
                prune_layer(name, module, stats[name], settings, run, log)

        method = get_method(settings.method)
        run_blocks(model, layers, prune_block, calibration, run, device=device,
                   hessian=method.needs_hessian(settings.resolved_metric) or layer_errors,
                   batch_size=batch_size, progress=progress, block_inputs=block_inputs,
                   desc=f"{settings.method} {settings.pattern}", activations=activations,
                   layer_cost=layer_cost(settings))
    run.total_seconds = time.perf_counter() - start
    run.peak_memory_bytes = peak_bytes(device)
    record_ranks(run)
    return run


def _prune_weights_only(layers, settings, run, device, log) -> None:
    """Magnitude pruning: no forward pass at all (layer errors are unknown: NaN)."""
    for named in layers.values():
        for name, module in named.items():
            home = home_device(module)
            module.to(device)
            prune_layer(name, module, None, settings, run, log)
            module.to(home)
