"""Quantising a whole model's decoder layers, block by block, alone or joint with pruning
and shrinking (the same statistics, the same factor, the pruned structure kept).

The model keeps the grid's values (float weights, for evaluation in any runtime); the integer
codes and group scales of every quantised layer go into ``QuantizeRun.quantized`` — what the
GGUF and compressed-tensors writers store.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine import LayerStats
from ..engine.mixes import OUTPUT, TOKEN_EMBD, Choice, Slot, fallback, uniform
from ..engine.quantizers import quantize_weight
from ..engine.schemes import GGUF_BLOCK, Scheme, parse_scheme
from ..errors import SnapPruneError
from ..memory import peak_bytes
from .adapters import adapter_for
from .allocation import sized_plan
from .blockloop import record_ranks, run_blocks
from .capture import BATCH_SIZE, BlockInputs, home_device
from .layout import linear_weight, set_linear_weight
from .records import LayerRecord, RunRecord
from .settings import QuantizeSettings
from .slots import embedding_names, output_statistics, tensor_slots
from .targets import layer_roles, target_layers


@dataclass
class QuantizedLayer:
    """What a format stores for one quantised layer (``rows × cols`` as ``y = W x``)."""

    scheme: Scheme
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    supers: torch.Tensor | None = None
    """K-quants: the super-blocks' float16 factors (``QuantResult.supers``)."""
    why: str = ""
    """Why this layer has this type (a mix's rule, a fallback, the size allocation)."""

    def keep_rows(self, rows: torch.Tensor) -> QuantizedLayer:
        """The layer with only ``rows`` (output units) left, as cutting units out leaves it."""
        return QuantizedLayer(self.scheme, self.codes[rows], self.scales[rows],
                              None if self.zeros is None else self.zeros[rows],
                              None if self.supers is None else self.supers[rows], self.why)


@dataclass(kw_only=True)
class QuantizeRun(RunRecord):
    """What quantisation did: per-layer records (error against the weights it was given),
    and the codes and scales of every layer, by the model-relative layer name."""

    settings: QuantizeSettings
    scale_dtype: str = "float16"
    quantized: dict[str, QuantizedLayer] = field(default_factory=dict, repr=False)
    plan: dict[str, Choice] = field(default_factory=dict)
    """Each tensor's type and why (``plan_types``; a size target's allocation)."""
    output_stats: LayerStats | None = field(default=None, repr=False)
    """The output matrix's input statistics (the final norm's outputs), when calibrated."""

    @property
    def scheme(self) -> Scheme:
        return self.settings.parsed_scheme


def scale_dtype_for(model: nn.Module) -> torch.dtype:
    """How minmax scales are stored: in the model's half dtype (float16 for a float32 model),
    what vLLM's kernels take; llama.cpp's grids are float16 whatever this says."""
    dtype = next(model.parameters()).dtype
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def plan_types(model: nn.Module, layers: dict[int, dict[str, nn.Module]],
               settings: QuantizeSettings, widths: dict[str, int] | None = None,
               ) -> dict[str, Choice]:
    """Each tensor's type and why: the scheme (through llama.cpp's fallback), or a mix's
    rules; refuses before any work a type that cannot hold a layer's rows."""
    scheme = settings.parsed_scheme
    mix = settings.parsed_mix
    plan = {}
    for slot in tensor_slots(model, layers, widths):
        embedding = slot.kind in (OUTPUT, TOKEN_EMBD)
        if not scheme.gguf:
            if not embedding:
                scheme.check_width(slot.cols, slot.name)
                plan[slot.name] = Choice(scheme.name, "the scheme asked for")
            continue
        if embedding and slot.cols % GGUF_BLOCK:
            continue  # stays float16, as llama.cpp keeps it
        if embedding and settings.embedding_type is not None:
            plan[slot.name] = fallback(parse_scheme(settings.embedding_type).name, slot.cols,
                                       "embedding and output matrix: --embedding-type")
            continue
        plan[slot.name] = (mix.choose(slot, settings.needs_calibration) if mix is not None
                           else uniform(scheme.name, slot))
    return plan


def check_quantizable(model: nn.Module, layers: dict[int, dict[str, nn.Module]],
                      settings: QuantizeSettings, widths: dict[str, int] | None = None) -> None:
    """Refuse before any work a scheme whose blocks do not fit a layer's inputs."""
    plan_types(model, layers, settings, widths)


def quantize_layer(name: str, module: nn.Module, stats: LayerStats | None,
                   settings: QuantizeSettings, run: QuantizeRun, log, *,
                   mask: torch.Tensor | None = None, upper: torch.Tensor | None = None,
                   keep_columns: torch.Tensor | None = None, role: str = "") -> None:
    """Quantise one layer in place on the type the run's plan gives it (the settings' scheme
    where it has none); record it and keep its codes and scales."""
    choice = run.plan.get(name)
    scheme = settings.parsed_scheme if choice is None else parse_scheme(choice.scheme)
    result = quantize_weight(
        linear_weight(module), stats, scheme, method=settings.method, mask=mask,
        act_order=settings.act_order, blocksize=settings.blocksize,
        percdamp=settings.percdamp, upper=upper,
        scale_dtype=getattr(torch, run.scale_dtype), keep_columns=keep_columns,
        error=run.layer_errors and stats is not None, scales=settings.scales)
    set_linear_weight(module, result.weight)
    codes = result.codes.to(torch.int8 if result.codes.abs().max() < 128 else torch.int16)
    run.quantized[name] = QuantizedLayer(
        result.scheme, codes.cpu(), result.scales.cpu(),
        None if result.zeros is None else result.zeros.cpu(),
        None if result.supers is None else result.supers.cpu(),
        "" if choice is None else choice.why)
    shape = tuple(result.weight.shape)
    run.layers.append(LayerRecord(name, shape, 0.0, result.error, result.seconds, role,
                                  result.percdamp))
    run.solver_seconds += result.seconds
    if log:
        log(f"{name:48s} {shape[0]}x{shape[1]}  {result.scheme.name}  error "
            f"{result.error:.4g}  {result.seconds:.2f}s")


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calibration: torch.Tensor | None,
    settings: QuantizeSettings,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    block_inputs: BlockInputs | None = None,
    activations: str = "auto",
    layer_errors: bool = True,
    metadata: int = 0,
) -> QuantizeRun:
    """Quantise every decoder-block linear layer of ``model`` in place: GPTQ block by block on
    the calibration activations (each block's layers on the inputs the already quantised
    blocks before it produce), or round-to-nearest without data. Each tensor's type is the
    run's plan (``plan_types``; with a size target, measured and allocated first, ``metadata``
    being the GGUF file's bytes besides its tensors)."""
    device = torch.device(device)
    start = time.perf_counter()
    settings.check()
    layers = target_layers(model, settings.include, settings.exclude)
    roles = layer_roles(model)
    run = QuantizeRun(settings=settings, architecture=adapter_for(model).describe(model),
                      layer_errors=layer_errors,
                      scale_dtype=str(scale_dtype_for(model)).removeprefix("torch."),
                      plan=plan_types(model, layers, settings))
    if settings.sized:
        run.plan, run.output_stats = sized_plan(
            model, layers, settings, run, calibration, device=device, batch_size=batch_size,
            progress=progress, block_inputs=block_inputs, activations=activations,
            metadata=metadata)
    if not settings.needs_calibration:
        for named in layers.values():
            for name, module in named.items():
                home = home_device(module)
                module.to(device)
                quantize_layer(name, module, None, settings, run, log, role=roles.get(name, ""))
                module.to(home)
    else:
        def step(_index: int, named: dict[str, nn.Module], stats: dict[str, LayerStats]) -> None:
            for name, module in named.items():
                quantize_layer(name, module, stats[name], settings, run, log,
                               role=roles.get(name, ""))

        run_blocks(model, layers, step, calibration, run, device=device, batch_size=batch_size,
                   progress=progress, block_inputs=block_inputs,
                   desc=f"{settings.method} {settings.scheme}", activations=activations,
                   after=output_statistics(model, run, device))
    quantize_embeddings(model, run)
    run.total_seconds = time.perf_counter() - start
    run.peak_memory_bytes = peak_bytes(device)
    record_ranks(run)
    return run


@torch.no_grad()
def quantize_embeddings(model: nn.Module, run: QuantizeRun) -> None:
    """For llama.cpp's schemes: the token embedding and an untied output matrix on the type
    the plan gives them (``q8_0`` with a plain scheme), in the model and in the run's codes,
    so that the model evaluated is the file written. With the output matrix's statistics
    (``output_stats``) the scales are searched by its Hessian diagonal (weighted rounding;
    a tied embedding is the output matrix too), else rounded on the formula's. Widths that
    are not whole blocks stay float16."""
    if not run.scheme.gguf:
        return
    for name, (module, _kind) in embedding_names(model).items():
        choice = run.plan.get(name) or uniform(run.scheme.name, Slot(name, _kind, 0, 1,
                                                                    *module.weight.shape))
        weight = module.weight
        if weight.shape[1] % GGUF_BLOCK:
            continue
        start = time.perf_counter()
        stats = run.output_stats
        if stats is not None and stats.columns == weight.shape[1]:
            result = quantize_weight(weight.data, stats, choice.scheme, method="weighted-rtn",
                                     error=run.layer_errors)
        else:
            result = quantize_weight(weight.data, None, choice.scheme, method="rtn")
        weight.data.copy_(result.weight)
        codes = result.codes.to(torch.int8 if result.codes.abs().max() < 128 else torch.int16)
        run.quantized[name] = QuantizedLayer(result.scheme, codes, result.scales, result.zeros,
                                             result.supers, choice.why)
        run.layers.append(LayerRecord(name, tuple(weight.shape), 0.0, result.error,
                                      time.perf_counter() - start, "embedding"))


def refuse_under_ranks() -> None:
    from . import collectives

    if collectives.current().active:
        raise SnapPruneError("quantisation runs in one process; prune or shrink under torchrun, "
                             "then quantise the output in one process")
