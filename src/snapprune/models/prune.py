"""Pruning a whole model in place, block by block: which layers, the per-layer step, and
``prune_model``, the in-memory entry point."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..engine import LayerStats, PruneResult, get_method, parse_pattern, prune_weight
from ..errors import SnapPruneError
from ..memory import peak_bytes
from . import collectives
from .adapters import adapter_for
from .blockloop import record_ranks, run_blocks
from .capture import BATCH_SIZE, BlockInputs, capture_block_inputs, home_device
from .layout import input_width, linear_weight, set_linear_weight
from .owl import OwlAllocation, owl_allocation
from .quantize import (
    QuantizeRun,
    plan_types,
    quantize_embeddings,
    quantize_layer,
    refuse_under_ranks,
    scale_dtype_for,
)
from .records import LayerRecord, RunRecord
from .settings import PruneSettings, QuantizeSettings
from .slots import output_statistics
from .targets import check_finite, layer_roles, target_layers


@dataclass(kw_only=True)
class PruneRun(RunRecord):
    """What ``prune_model`` did: per-layer records and where the time went, and, when it
    quantised too (joint), what that did."""

    settings: PruneSettings
    roles: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    quantization: QuantizeRun | None = None
    owl: OwlAllocation | None = None
    """The per-block sparsities of ``--allocation owl``."""


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


def start_prune_run(model: nn.Module, settings: PruneSettings, *, layer_errors: bool,
                    weights: bool = True) -> tuple[dict[int, dict[str, nn.Module]], PruneRun]:
    """What every pruning pass (in memory or streamed) sets up first: the layers it prunes,
    refused before any work when they cannot take the pattern, and its record."""
    layers = target_layers(model, settings.include, settings.exclude)
    check_model_for_pruning(layers, settings, weights=weights)
    run = PruneRun(settings=settings, architecture=adapter_for(model).describe(model),
                   roles=layer_roles(model), layer_errors=layer_errors)
    return layers, run


def needs_hessian(settings: PruneSettings, layer_errors: bool,
                  quantize: QuantizeSettings | None = None) -> bool:
    """Whether the pass accumulates the Hessian: the method or its metric reads it, layer
    errors are measured with it, or GPTQ runs in the same pass."""
    return (get_method(settings.method).needs_hessian(settings.resolved_metric) or layer_errors
            or quantize is not None)


def prune_layer(name: str, module: nn.Module, stats: LayerStats | None,
                settings: PruneSettings, run: PruneRun, log,
                sparsity: float | None = None) -> PruneResult:
    """Prune one layer in place, record it, return the result (mask: ``True`` = removed;
    the factor it used). ``sparsity``: its own (OWL's per block), else the settings'."""
    role = run.roles.get(name, "")
    result = prune_weight(
        linear_weight(module), stats, method=settings.method,
        sparsity=settings.resolved_sparsity if sparsity is None else sparsity,
        pattern=settings.pattern, alpha=settings.alpha,
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
    return result


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
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    block_inputs: BlockInputs | None = None,
    activations: str = "auto",
    layer_errors: bool = True,
    quantize: QuantizeSettings | None = None,
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
    ``quantize``: quantise each layer right after pruning it (joint), on the same statistics
    and, when the damping is the same, the same factor; pruned weights stay exactly 0.
    """
    settings = settings or PruneSettings()
    known = {f.name for f in dataclasses.fields(PruneSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SnapPruneError(f"unknown pruning setting(s) {unknown}; use {', '.join(known)}")
    settings = dataclasses.replace(settings, **overrides)
    device = check_device(device)
    start = time.perf_counter()
    layers, run = start_prune_run(model, settings, layer_errors=layer_errors)
    if quantize is not None:
        refuse_under_ranks()
        run.quantization = QuantizeRun(
            settings=quantize, layer_errors=layer_errors,
            scale_dtype=str(scale_dtype_for(model)).removeprefix("torch."),
            plan=plan_types(model, layers, quantize))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if settings.allocation == "owl":
        if collectives.current().active:
            raise SnapPruneError("OWL's dense pass runs in one process; prune with "
                                 "--allocation owl without torchrun")
        if block_inputs is None:
            if calibration is None:
                raise SnapPruneError("OWL needs calibration data for the activations' norms")
            block_inputs = capture_block_inputs(model, adapter_for(model).decoder_blocks(model),
                                                calibration, device, batch_size)
        run.owl = owl_allocation(model, layers, block_inputs, settings, device,
                                 progress=progress)
        if log:
            log("OWL sparsities per block: " + ", ".join(f"{s:.3f}"
                                                         for s in run.owl.sparsities))

    def prune_block(index: int, named: dict[str, nn.Module],
                    stats: dict[str, LayerStats]) -> None:
        own = run.owl.sparsities[index] if run.owl is not None else None
        for name, module in named.items():
            result = prune_layer(name, module, stats.get(name), settings, run, log, own)
            if run.quantization is not None:
                same = result.percdamp is not None and quantize.percdamp == settings.percdamp
                quantize_layer(name, module, stats.get(name), quantize, run.quantization, log,
                               mask=result.mask, upper=result.upper if same else None,
                               role=run.roles.get(name, ""))

    calibrated = settings.needs_calibration or (quantize is not None
                                                and quantize.needs_calibration)
    if not calibrated:
        _weights_only(layers, prune_block, device)
    else:
        run_blocks(model, layers, prune_block, calibration, run, device=device,
                   hessian=needs_hessian(settings, layer_errors, quantize),
                   batch_size=batch_size, progress=progress, block_inputs=block_inputs,
                   desc=f"{settings.method} {settings.pattern}"
                        + (f" + {quantize.scheme}" if quantize else ""),
                   activations=activations, layer_cost=layer_cost(settings),
                   after=None if quantize is None else output_statistics(
                       model, run.quantization, device))
    if run.quantization is not None:
        quantize_embeddings(model, run.quantization)
        run.quantization.total_seconds = run.quantization.solver_seconds
    run.total_seconds = time.perf_counter() - start
    run.peak_memory_bytes = peak_bytes(device)
    record_ranks(run)
    return run


def _weights_only(layers, step, device) -> None:
    """Magnitude pruning (and round-to-nearest): no forward pass at all (layer errors are
    unknown: NaN)."""
    for index, named in layers.items():
        for name, module in named.items():
            home = home_device(module)
            module.to(device)
            step(index, {name: module}, {})
            module.to(home)
