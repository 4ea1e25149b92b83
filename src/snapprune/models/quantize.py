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
from ..engine.quantizers import quantize_weight
from ..engine.schemes import GGUF_BLOCK, Scheme
from ..errors import SnapPruneError
from ..memory import peak_bytes
from .adapters import adapter_for
from .blockloop import record_ranks, run_blocks
from .capture import BATCH_SIZE, BlockInputs, home_device
from .layout import input_width, linear_weight, set_linear_weight
from .records import LayerRecord, RunRecord
from .settings import QuantizeSettings
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

    @property
    def scheme(self) -> Scheme:
        return self.settings.parsed_scheme


def scale_dtype_for(model: nn.Module) -> torch.dtype:
    """How minmax scales are stored: in the model's half dtype (float16 for a float32 model),
    what vLLM's kernels take; llama.cpp's grids are float16 whatever this says."""
    dtype = next(model.parameters()).dtype
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def check_quantizable(layers: dict[int, dict[str, nn.Module]], settings: QuantizeSettings,
                      widths: dict[str, int] | None = None) -> None:
    """Refuse before any work a scheme whose blocks do not fit a layer's inputs (``widths``:
    the inputs a layer will have once units are cut out)."""
    scheme = settings.parsed_scheme
    for named in layers.values():
        for name, module in named.items():
            scheme.check_width((widths or {}).get(name, input_width(module)), name)


def quantize_layer(name: str, module: nn.Module, stats: LayerStats | None,
                   settings: QuantizeSettings, run: QuantizeRun, log, *,
                   mask: torch.Tensor | None = None, upper: torch.Tensor | None = None,
                   keep_columns: torch.Tensor | None = None, role: str = "") -> None:
    """Quantise one layer in place; record it and keep its codes and scales."""
    result = quantize_weight(
        linear_weight(module), stats, settings.parsed_scheme, method=settings.method, mask=mask,
        act_order=settings.act_order, blocksize=settings.blocksize,
        percdamp=settings.percdamp, upper=upper,
        scale_dtype=getattr(torch, run.scale_dtype), keep_columns=keep_columns,
        error=run.layer_errors and stats is not None, scales=settings.scales)
    set_linear_weight(module, result.weight)
    codes = result.codes.to(torch.int8 if result.codes.abs().max() < 128 else torch.int16)
    run.quantized[name] = QuantizedLayer(
        result.scheme, codes.cpu(), result.scales.cpu(),
        None if result.zeros is None else result.zeros.cpu(),
        None if result.supers is None else result.supers.cpu())
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
) -> QuantizeRun:
    """Quantise every decoder-block linear layer of ``model`` in place: GPTQ block by block on
    the calibration activations (each block's layers on the inputs the already quantised
    blocks before it produce), or round-to-nearest without data."""
    device = torch.device(device)
    start = time.perf_counter()
    settings.check()
    layers = target_layers(model, settings.include, settings.exclude)
    check_quantizable(layers, settings)
    roles = layer_roles(model)
    run = QuantizeRun(settings=settings, architecture=adapter_for(model).describe(model),
                      layer_errors=layer_errors,
                      scale_dtype=str(scale_dtype_for(model)).removeprefix("torch."))
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
                   desc=f"{settings.method} {settings.scheme}", activations=activations)
    quantize_embeddings(model, run)
    run.total_seconds = time.perf_counter() - start
    run.peak_memory_bytes = peak_bytes(device)
    record_ranks(run)
    return run


EMBEDDING_SCHEME = "q8_0"
"""llama.cpp's block types come with the token embedding (and an untied output matrix) on
its ``q8_0`` grid, as llama.cpp's own q4_0/q8_0 conversions store them."""


@torch.no_grad()
def quantize_embeddings(model: nn.Module, run: QuantizeRun) -> None:
    """For llama.cpp's schemes: round the token embedding and an untied output matrix to
    ``q8_0`` (round-to-nearest: no Hessian here), in the model and in the run's codes, so
    that the model evaluated is the file written. Widths that are not whole blocks stay."""
    if not run.scheme.gguf:
        return
    named = {module: name for name, module in model.named_modules()}
    embeddings = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not embeddings[0].weight:
        embeddings.append(output)
    for module in embeddings:
        weight = module.weight
        if weight.shape[1] % GGUF_BLOCK:
            continue
        start = time.perf_counter()
        result = quantize_weight(weight.data, None, EMBEDDING_SCHEME, method="rtn")
        weight.data.copy_(result.weight)
        name = named[module]
        run.quantized[name] = QuantizedLayer(result.scheme, result.codes.to(torch.int8),
                                             result.scales, None)
        run.layers.append(LayerRecord(name, tuple(weight.shape), 0.0, float("nan"),
                                      time.perf_counter() - start, "embedding"))


def refuse_under_ranks() -> None:
    from . import collectives

    if collectives.current().active:
        raise SnapPruneError("quantisation runs in one process; prune or shrink under torchrun, "
                             "then quantise the output in one process")
