"""Physically smaller models: remove whole MLP neurons and attention heads, then cut them out.

Per block, the layer that consumes the units (``down_proj``/``fc2`` for neurons, ``o_proj`` for
heads) loses the units' input columns through the method's structured path with whole units
chosen (Thanos: one exact shared least-squares solve over the remaining columns), and the rows
that produce them (``gate_proj``/``up_proj``/``fc1``, ``q_proj`` and, without grouped-query
attention, ``k_proj``/``v_proj``) are zeroed. Activations propagate through the zeroed block,
exactly as through the cut one. At the end every block loses the same number of units, so the
result is a standard config (smaller ``intermediate_size``, fewer ``num_attention_heads``) that
plain ``transformers`` loads.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine import LayerStats, prune_weight
from ..engine.units import lowest_units
from ..errors import SnapPruneError
from ..memory import peak_bytes
from .adapters import Adapter, adapter_for, head_geometry
from .block_shapes import BlockWidths, block_widths, resize_blocks
from .blockloop import run_blocks
from .capture import BATCH_SIZE, capture_block_inputs
from .checkpoint_files import empty_model
from .depth import attention_free, remove_attention
from .layout import is_conv1d, linear_weight, set_linear_weight
from .loading import with_weights
from .quantize import (
    QuantizeRun,
    plan_types,
    quantize_embeddings,
    quantize_layer,
    refuse_under_ranks,
    scale_dtype_for,
)
from .records import LayerRecord, RunRecord
from .settings import QuantizeSettings, ShrinkSettings
from .slots import output_statistics
from .targets import layer_roles, target_layers
from .width_sensitivity import Sensitivity, check_sensitivity, measure_and_allocate


@dataclass(frozen=True)
class WidthPlan:
    """Old and new widths, fixed before any weight changes."""

    mlp_old: int
    mlp_new: int
    heads_old: int
    heads_new: int
    kv_old: int
    kv_new: int
    head_dim: int
    groups: int
    """Head groups that lose the same count (key/value groups under GQA, else 1)."""
    mlp_blocks: tuple[int, ...] = ()
    """Each block's own MLP width (``--allocation sensitivity``); empty: ``mlp_new`` in all."""
    heads_blocks: tuple[int, ...] = ()
    """Each block's own query-head count; empty: ``heads_new`` in all."""

    @property
    def mlp_removed(self) -> int:
        """Neurons each block loses under the uniform plan (the total's share per block)."""
        return self.mlp_old - self.mlp_new

    @property
    def heads_removed_per_group(self) -> int:
        return (self.heads_old - self.heads_new) // self.groups

    @property
    def uniform(self) -> bool:
        """Every block the same widths: a standard config."""
        return len(set(self.mlp_blocks)) <= 1 and len(set(self.heads_blocks)) <= 1

    def mlp_at(self, block: int) -> int:
        return self.mlp_blocks[block] if self.mlp_blocks else self.mlp_new

    def heads_at(self, block: int) -> int:
        return self.heads_blocks[block] if self.heads_blocks else self.heads_new

    def kv_at(self, block: int) -> int:
        """Key/value heads: kept under GQA, else one per query head."""
        return self.kv_old if self.kv_new == self.kv_old else self.heads_at(block)

    def describe(self) -> dict:
        out = {"mlp": {"old": self.mlp_old, "new": self.mlp_new},
               "heads": {"old": self.heads_old, "new": self.heads_new,
                         "kv_old": self.kv_old, "kv_new": self.kv_new,
                         "head_dim": self.head_dim}}
        if self.mlp_blocks:
            out["mlp"]["per_block"] = list(self.mlp_blocks)
        if self.heads_blocks:
            out["heads"]["per_block"] = list(self.heads_blocks)
        return out


def mlp_width(config, adapter: Adapter) -> int:
    value = getattr(config, adapter.mlp_width_key, None)
    if value is None and adapter.family == "gpt2":  # n_inner None means 4 × n_embd
        value = 4 * config.n_embd
    if not isinstance(value, int):
        raise SnapPruneError(f"{type(config).__name__} has no {adapter.mlp_width_key}")
    return value


def _refuse_differing_blocks(model: nn.Module, adapter: Adapter) -> None:
    """A model whose blocks already differ in width (a Nemotron-NAS checkpoint, a per-block
    cut): the plan cuts every block from one width. Blocks that only lack attention are fine."""
    if adapter.family != "llama" or adapter.moe is not None:
        return
    shapes = block_widths(model, head_geometry(model.config).head_dim)
    if (len({s.ffn for s in shapes}) > 1
            or len({(s.heads, s.kv_heads) for s in shapes if s.heads}) > 1):
        raise SnapPruneError("this model's blocks already differ in width (a Nemotron-NAS "
                             "checkpoint or an earlier per-block cut), and shrink cuts blocks "
                             "of one width: cut the dense model once with the widths you want "
                             "(--allocation sensitivity), or prune or quantise this one")


def plan_width(model: nn.Module, settings: ShrinkSettings) -> WidthPlan:
    """New widths, rounded to ``multiple_of`` (neurons) and whole heads per group, or a
    one-line refusal naming the problem and the fix."""
    settings.check()
    adapter = adapter_for(model)
    config = model.config
    _refuse_differing_blocks(model, adapter)
    if adapter.mlp_width_key is None or adapter.attention is None:
        raise SnapPruneError(
            f"the {adapter.family} family has no width adapter (MLP neurons and heads it could "
            "cut out); shrink supports the LLaMA family (LLaMA, Mistral, Qwen2, ...), OPT, "
            "GPT-2 and GPT-NeoX")
    mlp_old = mlp_width(config, adapter)
    mlp_new = mlp_old
    if settings.mlp:
        step = settings.multiple_of
        mlp_new = max(step, round(mlp_old * (1 - settings.mlp) / step) * step)
        if mlp_new >= mlp_old:
            raise SnapPruneError(
                f"mlp {settings.mlp} of {mlp_old} neurons rounds to no removal at "
                f"multiple_of {step}; raise mlp or lower multiple_of")
    geometry = head_geometry(config)
    heads_new, kv_new, groups = geometry.heads, geometry.kv_heads, 1
    if settings.heads:
        if adapter.head_dim_key is None:
            raise SnapPruneError(
                f"{type(config).__name__} derives the head width from the hidden size, so "
                "removing heads would need custom model code; remove MLP neurons only for this "
                "family")
        grouped = geometry.kv_heads < geometry.heads
        groups = geometry.kv_heads if grouped else 1
        size = geometry.heads // groups
        removed = round(settings.heads * size)
        if removed == 0:
            raise SnapPruneError(
                f"heads {settings.heads} removes no head: {size} query heads per group; "
                f"use at least {1 / size:.3g}")
        if removed >= size:
            raise SnapPruneError(
                f"heads {settings.heads} would leave a key/value group empty ({removed} of "
                f"its {size} query heads removed); lower heads")
        heads_new = geometry.heads - removed * groups
        kv_new = geometry.kv_heads if grouped else heads_new
    if settings.allocation == "sensitivity":
        check_sensitivity(model, settings, mlp_old)
    return WidthPlan(mlp_old, mlp_new, geometry.heads, heads_new, geometry.kv_heads, kv_new,
                     geometry.head_dim, groups)


def allocated(plan: WidthPlan, found: Sensitivity, blocks: int) -> WidthPlan:
    """``plan`` with each block's own widths from the sensitivity allocation."""
    mlp = tuple(plan.mlp_old - k * found.mlp_unit for k in found.mlp_counts)
    heads = tuple(plan.heads_old - k * plan.groups for k in found.head_counts)
    if len(mlp) not in (0, blocks) or len(heads) not in (0, blocks):
        raise SnapPruneError("the allocation does not cover every block; please report this")
    return dataclasses.replace(plan, mlp_blocks=mlp, heads_blocks=heads)


@dataclass(kw_only=True)
class ShrinkRun(RunRecord):
    """What ``shrink_model`` did: the new widths, per-layer records (every cut layer's
    reconstruction error is measured), sizes and times."""

    settings: ShrinkSettings
    plan: WidthPlan
    removed: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    parameters_before: int = 0
    parameters_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    quantization: QuantizeRun | None = None
    sensitivity: Sensitivity | None = None
    """What ``--allocation sensitivity`` measured and chose."""


def _sizes(model: nn.Module) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _zero_outputs(module: nn.Module, rows: torch.Tensor) -> None:
    """Zero output units ``rows`` of a layer (weight rows in ``out × in`` terms, bias)."""
    w = linear_weight(module).clone()
    w[rows] = 0.0
    set_linear_weight(module, w)
    if getattr(module, "bias", None) is not None:
        module.bias.data[rows] = 0.0


@torch.no_grad()
def shrink_model(
    model: nn.Module,
    calibration: torch.Tensor | None,
    settings: ShrinkSettings,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    log=None,
    block_inputs=None,
    activations: str = "auto",
    quantize: QuantizeSettings | None = None,
) -> tuple[nn.Module, ShrinkRun]:
    """Remove ``settings.mlp`` of every block's MLP neurons and ``settings.heads`` of its query
    heads; return a new, smaller model (standard config, same dtype, on the CPU) and the run.
    ``model`` itself ends with the removed units zeroed in place (the reference the smaller
    model equals). ``quantize``: quantise every layer of each block right after its units are
    removed, on the cut-out shapes (the layers that lose input columns on their Hessian
    restricted to the columns that remain)."""
    start = time.perf_counter()
    device = torch.device(device)
    plan = plan_width(model, settings)
    adapter = adapter_for(model)
    blocks = adapter.decoder_blocks(model)
    params, nbytes = _sizes(model)
    run = ShrinkRun(settings=settings, plan=plan, parameters_before=params,
                    bytes_before=nbytes, architecture=adapter.describe(model))
    if settings.allocation == "sensitivity":
        if block_inputs is None:
            if calibration is None:
                raise SnapPruneError("the sensitivity allocation needs calibration data")
            block_inputs = capture_block_inputs(model, blocks, calibration, device, batch_size)
        run.sensitivity = measure_and_allocate(model, block_inputs, plan, settings, device,
                                               progress=progress)
        run.plan = plan = allocated(plan, run.sensitivity, len(blocks))
        if log:
            log(f"per-block MLP widths {list(plan.mlp_blocks)}, heads {list(plan.heads_blocks)}")
    attn_out = adapter.attention.o
    layers: dict[int, dict[str, nn.Module]] = {}
    widths: dict[str, int] = {}  # each consumer's input width once cut out
    producers_of: dict[str, tuple[str, ...]] = {}  # an MLP consumer → its producers (relative)
    for index, block in enumerate(blocks):
        modules = dict(block.named_modules())
        named = {}
        if plan.mlp_at(index) < plan.mlp_old:
            for producers, consumer in adapter.mlp_groups(block):
                name = f"{adapter.blocks}.{index}.{consumer}"
                named[name] = modules[consumer]
                widths[name] = plan.mlp_at(index)
                producers_of[name] = producers
        if plan.heads_at(index) < plan.heads_old and not attention_free(block):
            name = f"{adapter.blocks}.{index}.{attn_out}"
            named[name] = modules[attn_out]
            widths[name] = plan.heads_at(index) * plan.head_dim
        layers[index] = named
    consumers = set(widths)
    if quantize is not None:
        refuse_under_ranks()
        layers = target_layers(model, quantize.include, quantize.exclude)
        missing = consumers - {n for named in layers.values() for n in named}
        if missing:
            raise SnapPruneError(f"the layers that lose units must be quantised too; "
                                 f"{sorted(missing)[0]} is excluded")
        run.quantization = QuantizeRun(
            settings=quantize, layer_errors=True,
            scale_dtype=str(scale_dtype_for(model)).removeprefix("torch."),
            plan=plan_types(model, layers, quantize, widths=widths))
    roles = layer_roles(model)

    def step(index: int, named: dict[str, nn.Module], stats: dict[str, LayerStats]) -> None:
        modules = dict(blocks[index].named_modules())
        removed: dict[str, list[int]] = {}
        kept: dict[str, torch.Tensor] = {}
        for name, module in named.items():
            if name not in consumers:
                continue
            is_mlp = name in producers_of
            if is_mlp:
                count = plan.mlp_old - plan.mlp_at(index)
                chooser = lambda s, k=count: lowest_units(s, 1, k)  # noqa: E731
                fraction = count / plan.mlp_old
            else:
                count = (plan.heads_old - plan.heads_at(index)) // plan.groups
                chooser = lambda s, k=count: lowest_units(  # noqa: E731
                    s, plan.head_dim, k, plan.groups)
                fraction = 1 - plan.heads_at(index) / plan.heads_old
            result = prune_weight(
                linear_weight(module), stats.get(name), method=settings.method,
                pattern="structured", sparsity=fraction, metric=settings.metric,
                percdamp=settings.percdamp, choose_columns=chooser)
            set_linear_weight(module, result.weight)
            columns = result.mask.any(0)
            kept[name] = (~columns).nonzero().squeeze(1)
            if is_mlp:
                units = columns.nonzero().squeeze(1)
                for producer in producers_of[name]:
                    _zero_outputs(modules[producer], units)
                removed[_units_key(name, adapter, index)] = units.tolist()
            else:
                heads = columns.reshape(plan.heads_old, plan.head_dim).any(1)
                removed["heads"] = heads.nonzero().squeeze(1).tolist()
                _zero_outputs(modules[adapter.attention.q], columns)
                if plan.kv_new < plan.kv_old:  # no GQA: each removed head takes its k, v
                    _zero_outputs(modules[adapter.attention.k], columns)
                    _zero_outputs(modules[adapter.attention.v], columns)
            record = LayerRecord(name, tuple(result.weight.shape), result.sparsity,
                                 result.error, result.seconds, roles.get(name, ""),
                                 result.percdamp)
            run.layers.append(record)
            run.solver_seconds += result.seconds
            if log:
                log(f"{name:48s} removed {len(removed.get('mlp', removed.get('heads', [])))} "
                    f"units  error {record.error:.4g}  {record.seconds:.2f}s")
        run.removed[index] = removed
        if run.quantization is not None:
            for name, module in named.items():
                quantize_layer(name, module, stats.get(name), quantize, run.quantization, log,
                               keep_columns=kept.get(name), role=roles.get(name, ""))

    calibrated = settings.needs_calibration or (quantize is not None
                                                and quantize.needs_calibration)
    if calibrated:
        run_blocks(model, layers, step, calibration, run, device=device,
                   batch_size=batch_size, progress=progress, block_inputs=block_inputs,
                   desc=f"shrink {settings.method}"
                        + (f" + {quantize.scheme}" if quantize else ""),
                   activations=activations,
                   after=None if quantize is None else output_statistics(
                       model, run.quantization, device))
    else:
        for index, named in layers.items():
            step(index, named, {})
    smaller = cut_out(model, adapter, plan, run.removed,
                      run.quantization.quantized if run.quantization else None)
    if run.quantization is not None:
        quantize_embeddings(smaller, run.quantization)
    run.parameters_after, run.bytes_after = _sizes(smaller)
    run.total_seconds = time.perf_counter() - start
    run.peak_memory_bytes = peak_bytes(device)
    return smaller, run


def _keep(tensor: torch.Tensor, dim: int, keep: torch.Tensor) -> torch.Tensor:
    return tensor.index_select(dim, keep.to(tensor.device)).contiguous()


def _slice_layer(state: dict, prefix: str, module: nn.Module, keep: torch.Tensor,
                 outputs: bool) -> None:
    """Keep output units (rows of ``out × in``) or input columns of one layer in ``state``."""
    conv = is_conv1d(module)
    dim = (1 if conv else 0) if outputs else (0 if conv else 1)
    state[f"{prefix}.weight"] = _keep(state[f"{prefix}.weight"], dim, keep)
    if outputs and f"{prefix}.bias" in state:
        state[f"{prefix}.bias"] = _keep(state[f"{prefix}.bias"], 0, keep)


def cut_out(model: nn.Module, adapter: Adapter, plan: WidthPlan,
            removed: dict[int, dict[str, list[int]]],
            quantized: dict | None = None) -> nn.Module:
    """A new model from the smaller standard config holding copies of ``model``'s remaining
    weights (nothing shared: later changes to either model leave the other alone).
    ``quantized`` (layer name → ``QuantizedLayer``): the codes of layers that lose output
    units lose the same rows (those that lose input columns were quantised cut out)."""
    config = copy.deepcopy(model.config)
    blocks = adapter.decoder_blocks(model)
    every = range(len(blocks))
    widest = max(plan.mlp_at(i) for i in every)  # the uniform width, or the widest block's
    most = max(every, key=plan.heads_at)
    if widest < plan.mlp_old:
        setattr(config, adapter.mlp_width_key, widest)
    if plan.heads_at(most) < plan.heads_old:
        config.num_attention_heads = plan.heads_at(most)
        setattr(config, adapter.head_dim_key, plan.head_dim)
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = plan.kv_at(most)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for index, block in enumerate(blocks):
        modules = dict(block.named_modules())
        prefix = f"{adapter.blocks}.{index}"
        cut = removed.get(index, {})
        for producers, consumer in adapter.mlp_groups(block):
            key = _units_key(f"{prefix}.{consumer}", adapter, index)
            if key not in cut:
                continue
            keep = _complement(cut[key], plan.mlp_old)
            for name in producers:
                _slice_layer(state, f"{prefix}.{name}", modules[name], keep, outputs=True)
                _slice_codes(quantized, f"{prefix}.{name}", keep)
            _slice_layer(state, f"{prefix}.{consumer}", modules[consumer], keep, outputs=False)
        if "heads" in removed.get(index, {}):
            heads = _complement(removed[index]["heads"], plan.heads_old)
            keep = (heads[:, None] * plan.head_dim + torch.arange(plan.head_dim)).reshape(-1)
            att = adapter.attention
            producers = [att.q] + ([att.k, att.v] if plan.kv_new < plan.kv_old else [])
            for name in producers:
                _slice_layer(state, f"{prefix}.{name}", modules[name], keep, outputs=True)
                _slice_codes(quantized, f"{prefix}.{name}", keep)
            _slice_layer(state, f"{prefix}.{att.o}", modules[att.o], keep, outputs=False)
    smaller = empty_model(config, model.dtype)
    adapter_for(smaller)  # a mixture's experts unfolded, as the state names them
    new_blocks = adapter.decoder_blocks(smaller)
    for index, block in enumerate(blocks):  # blocks that lost their attention (prune-depth)
        if attention_free(block):
            remove_attention(smaller, new_blocks[index])
    if not plan.uniform:
        resize_blocks(smaller, [BlockWidths(plan.heads_at(i), plan.kv_at(i), plan.mlp_at(i))
                                for i in every], plan.head_dim)
    missing, unexpected = with_weights(smaller, state, strict=False)
    tied = set(getattr(smaller, "_tied_weights_keys", None) or ())
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise SnapPruneError(f"the cut-out model does not match its config (missing {missing}, "
                             f"unexpected {unexpected}); please report this")
    return smaller.eval()


def _units_key(consumer: str, adapter: Adapter, index: int) -> str:
    """Where a block's removed MLP units are recorded: ``mlp`` for its one MLP, the expert's
    down projection (block-relative) for each expert of a mixture."""
    if adapter.moe is None:
        return "mlp"
    return consumer.removeprefix(f"{adapter.blocks}.{index}.")


def _slice_codes(quantized: dict | None, name: str, keep: torch.Tensor) -> None:
    if quantized is not None and name in quantized:
        quantized[name] = quantized[name].keep_rows(keep)


def _complement(removed: list[int], total: int) -> torch.Tensor:
    mask = torch.ones(total, dtype=torch.bool)
    mask[removed] = False
    return mask.nonzero().squeeze(1)


def width_report(run: ShrinkRun) -> dict:
    """The width section of the JSON report: old and new widths, parameters and bytes."""
    extra = {"sensitivity": run.sensitivity.describe()} if run.sensitivity else {}
    return {**run.plan.describe(), **extra,
            "parameters": {"before": run.parameters_before, "after": run.parameters_after,
                           "removed_fraction": 1 - run.parameters_after
                           / max(1, run.parameters_before)},
            "bytes": {"before": run.bytes_before, "after": run.bytes_after},
            "removed_units": {str(k): v for k, v in run.removed.items()},
            "settings": dataclasses.asdict(run.settings)}
