"""The layer-by-layer loop: capture block inputs, gather statistics, prune, propagate."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine import LayerStats, check_settings, determinism, get_method, prune_weight
from ..errors import SnapPruneError
from .adapters import adapter_for
from .distributed import (
    all_gather_objects,
    all_reduce_stats,
    assign_layers,
    broadcast_layers,
    current_group,
    local_share,
)
from .layout import input_width, linear_weight, set_linear_weight


class MethodChoice:
    """What settings that name a method (``method``, ``metric``) derive from its declaration."""

    method: str
    metric: str | None

    @property
    def resolved_metric(self) -> str:
        return self.metric or get_method(self.method).default_metric

    @property
    def needs_calibration(self) -> bool:
        """Whether any calibration data enters the result (magnitude scores need none)."""
        return get_method(self.method).needs_activations(self.resolved_metric)


@dataclass(frozen=True)
class PruneSettings(MethodChoice):
    """Everything that decides the pruned weights (besides the model and calibration data).
    Immutable: ``dataclasses.replace`` makes a changed copy."""

    method: str = "thanos"
    pattern: str = "unstructured"
    sparsity: float | None = None
    alpha: float = 0.0
    blocksize: int = 128
    percdamp: float = 0.01
    metric: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def check(self):
        """Refuse a bad request before any work; return ``(pattern, target sparsity)``."""
        return check_settings(self.method, self.pattern, self.sparsity, self.alpha,
                              self.blocksize, self.metric)


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    sparsity: float
    error: float
    seconds: float
    role: str = ""
    percdamp: float | None = None
    """Damping the factorisation used: the request, or more if it had to be raised."""


@dataclass
class PruneRun:
    """What ``prune_model`` did: per-layer records and where the time went."""

    settings: PruneSettings
    layers: list[LayerRecord] = field(default_factory=list)
    calibration_seconds: float = 0.0
    solver_seconds: float = 0.0
    total_seconds: float = 0.0
    peak_memory_bytes: int = 0
    activations: str = ""
    """Where the calibration activations lived between blocks ("" when none were needed)."""
    activation_bytes: int = 0
    """Size of this process's calibration activations (one block's inputs)."""
    layer_errors: bool = True
    """Whether each layer's reconstruction error was computed (else NaN; see ``prune_weight``)."""
    deterministic: bool = False
    """Whether the run was in deterministic mode (``engine.determinism``): bit-identical for
    any thread, batch or process count."""
    ranks: list[dict] = field(default_factory=list)
    """Per process under ``torchrun``: its rank, windows, solver and calibration seconds, peak
    memory (empty for one process)."""
    architecture: dict = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def achieved_sparsity(self) -> float:
        """Removed weights (by the masks) over weights, across the pruned layers."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return zeros / total if total else 0.0


class _StopForward(Exception):
    """Raised by the first block's stand-in once it has seen its inputs."""


class _InputCatcher(nn.Module):
    """Stands in for block 0: records hidden states and every other argument, then stops."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.inputs: list[torch.Tensor] = []
        self.calls: dict[int, tuple[tuple, dict]] = {}

    def __getattr__(self, name: str):
        # Models read attributes of their blocks (e.g. ``attention_type``): answer for block 0.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.inputs.append(hidden.detach().cpu())
        self.calls.setdefault(hidden.shape[0], (args[1:], kwargs))
        raise _StopForward


@dataclass
class BlockInputs:
    """Calibration activations entering the current block, in batches, on the CPU, and the
    other arguments the model passes to its blocks (masks, positions, rotary embeddings) for
    each batch size."""

    batches: list[torch.Tensor]
    calls: dict[int, tuple[tuple, dict]]

    def run(self, block: nn.Module, x: torch.Tensor):
        args, kwargs = self.calls[x.shape[0]]
        return block(x, *args, **kwargs)

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.batches)

    def placed(self, home: torch.device, device: torch.device) -> BlockInputs:
        """A copy whose batches live on ``home`` (the caller's tensors are never written).
        CPU-held activations for a CUDA ``device`` are pinned, so that the copies to and from
        the device run without blocking the host."""
        if home.type != "cpu":
            batches = [x.to(home) for x in self.batches]
        elif device.type == "cuda":
            batches = [x.cpu().pin_memory() for x in self.batches]
        else:
            batches = list(self.batches)
        return BlockInputs(batches, self.calls)


ACTIVATION_PLACES = ("auto", "device", "cpu")
AUTO_DEVICE_SHARE = 0.5
"""``auto`` keeps the activations on the device when they take at most this share of its free
memory; the rest is for the block, its Hessians and the solver's working set."""


def activation_home(place: str, device: torch.device, nbytes: int) -> torch.device:
    """Where the calibration activations live between blocks.

    On the device they never cross the bus; on the CPU (pinned, when the device is a GPU) they
    cost two copies per block but no device memory. ``auto`` chooses the device when they fit.
    """
    if place not in ACTIVATION_PLACES:
        raise SnapPruneError(f"unknown activation placement {place!r}; use "
                             f"{', '.join(ACTIVATION_PLACES)}")
    if device.type == "cpu" or place == "cpu":
        return torch.device("cpu")
    if place == "device" or device.type != "cuda":
        return device
    free, _total = torch.cuda.mem_get_info(device)
    return device if nbytes <= AUTO_DEVICE_SHARE * free else torch.device("cpu")


def _select(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    def matches(patterns):
        return any(fnmatch.fnmatch(name, p) or p in name.split(".") or fnmatch.fnmatch(
            name.rsplit(".", 1)[-1], p) for p in patterns)

    return (not include or matches(include)) and not matches(exclude)


def target_layers(model: nn.Module, settings: PruneSettings) -> dict[int, dict[str, nn.Module]]:
    """Per block index, the linear layers to prune (names relative to the model): those the
    family adapter's groups name, narrowed by ``include``/``exclude``."""
    adapter = adapter_for(model)
    blocks = adapter.decoder_blocks(model)
    chosen: dict[int, dict[str, nn.Module]] = {}
    for index, block in enumerate(blocks):
        prefix = f"{adapter.blocks}.{index}."
        modules = dict(block.named_modules())
        chosen[index] = {prefix + n: modules[n] for n in adapter.layer_roles(block)
                         if _select(prefix + n, settings.include, settings.exclude)}
    if not any(chosen.values()):
        raise SnapPruneError(
            "no linear layer matches --include/--exclude; check the names with --verbose"
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
                    f"{width} inputs; choose another M or --exclude that layer"
                )
        if weights:
            check_finite(named)


def check_finite(named: dict[str, nn.Module]) -> None:
    for name, module in named.items():
        if not torch.isfinite(module.weight).all():
            raise SnapPruneError(
                f"weight of {name} contains NaN or Inf; the model is corrupt, reload it"
            )


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    calibration: torch.Tensor,
    device: torch.device,
    batch_size: int = 8,
) -> BlockInputs:
    """Run the model up to block 0 on the calibration windows, ``batch_size`` at a time (under
    ``torchrun``: on this rank's share of them)."""
    calibration = local_share(calibration, current_group())
    outside = list(model.children())
    block_ids = {id(b) for b in blocks}
    original = blocks[0]
    catcher = _InputCatcher(original)
    blocks[0] = catcher
    moved: list[tuple[nn.Module, torch.device]] = []
    try:
        if device.type != "cpu":
            for module in outside:
                _move_except_blocks(module, block_ids, device, moved)
        for start in range(0, calibration.shape[0], batch_size):
            with contextlib.suppress(_StopForward):
                model(calibration[start : start + batch_size].to(device), use_cache=False)
    finally:
        blocks[0] = original
        for module, home in moved:
            module.to(home)
    if not catcher.calls:
        raise SnapPruneError("the model never reached its first decoder block")
    calls = {}
    for size, (args, kwargs) in catcher.calls.items():
        kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        calls[size] = (_to_device(args, device), _to_device(kwargs, device))
    return BlockInputs(catcher.inputs, calls)


_CACHE_KWARGS = ("use_cache", "past_key_value", "past_key_values", "cache", "layer_past")


def _move_except_blocks(module: nn.Module, block_ids: set[int], device, moved: list) -> None:
    if id(module) in block_ids:
        return
    if isinstance(module, nn.ModuleList) and any(id(m) in block_ids for m in module):
        return
    inner = [m for m in module.modules() if id(m) in block_ids]
    if not inner:
        moved.append((module, _home_device(module)))
        module.to(device)
        return
    for child in module.children():
        _move_except_blocks(child, block_ids, device, moved)
    for param in module.parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buf in module.named_buffers(recurse=False):
        module._buffers[name] = buf.to(device)


def gather_layer_stats(
    block: nn.Module,
    named: dict[str, nn.Module],
    inputs: BlockInputs,
    device: torch.device,
    *,
    hessian: bool = True,
) -> dict[str, LayerStats]:
    """Run ``block`` on every input with hooks on its layers; one ``LayerStats`` per layer
    (with the Hessian unless ``hessian=False``).

    Layers fed the very same tensor (q/k/v, gate/up) share one accumulation: their statistics
    are identical, so computing them once saves most of the hooks' cost.
    """
    stats: dict[str, LayerStats] = {}
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # holds inputs alive: ids stay unique

    def hook(name: str):
        def record(_module, inp, _out):
            x = inp[0]
            owner = seen.get(id(x))
            if owner is not None and owner[0] is x:
                stats[name] = stats[owner[1]]
                return
            seen[id(x)] = (x, name)
            if name not in stats:
                stats[name] = LayerStats(x.shape[-1], device=device, hessian=hessian,
                                         deterministic=determinism.enabled())
            stats[name].add(x.detach(), windows=windows[0])
        return record

    windows = [0]  # calibration windows in the batch being run (some layers see them flattened)
    hooks = [module.register_forward_hook(hook(name)) for name, module in named.items()]
    try:
        for x in inputs.batches:
            windows[0] = x.shape[0]
            inputs.run(block, x.to(device, non_blocking=True))
            seen.clear()
    finally:
        for handle in hooks:
            handle.remove()
    for item in stats.values():
        item.finish()
    missing = [name for name in named if name not in stats]
    if missing:
        raise SnapPruneError(f"layers {missing} never ran during calibration; exclude them")
    return stats


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


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
    if isinstance(overrides.get("include"), list) or isinstance(overrides.get("exclude"), list):
        overrides = {k: tuple(v) if k in ("include", "exclude") else v
                     for k, v in overrides.items()}
    settings = dataclasses.replace(settings, **overrides)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SnapPruneError("--device cuda requested but no CUDA device is available; use cpu")
    start = time.perf_counter()
    adapter = adapter_for(model)
    layers = target_layers(model, settings)
    check_model_for_pruning(layers, settings)
    run = PruneRun(settings=settings, architecture=adapter.describe(model),
                   roles=layer_roles(model), layer_errors=layer_errors)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    if not settings.needs_calibration:
        return _prune_weights_only(layers, settings, run, device, start, log)

    def prune_block(_index: int, named: dict[str, nn.Module], stats: dict[str, LayerStats]):
        for name, module in named.items():
            prune_layer(name, module, stats[name], settings, run, log)

    run_blocks(model, layers, prune_block, calibration, run, device=device,
               batch_size=batch_size, progress=progress, block_inputs=block_inputs,
               desc=f"{settings.method} {settings.pattern}", activations=activations,
               split_layers=True)
    run.total_seconds = time.perf_counter() - start
    run.peak_memory_bytes = _peak_memory(device)
    record_ranks(run)
    return run


def record_ranks(run: PruneRun) -> None:
    """Under ``torchrun``: every rank's activations, times and peak memory, on every rank."""
    group = current_group()
    if group.active:
        run.ranks = all_gather_objects({
            "rank": group.rank, "activation_bytes": run.activation_bytes,
            "solver_seconds": run.solver_seconds, "calibration_seconds": run.calibration_seconds,
            "peak_memory_bytes": run.peak_memory_bytes}, group)


BlockStep = Callable[[int, dict[str, nn.Module], dict[str, LayerStats]], None]
"""``(block index, its target layers, their statistics)``: change the block's weights in
place; the loop then propagates the calibration activations through the changed block."""


def run_blocks(
    model: nn.Module,
    layers: dict[int, dict[str, nn.Module]],
    step: BlockStep,
    calibration: torch.Tensor | None,
    run,
    *,
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
    block_inputs: BlockInputs | None = None,
    desc: str = "",
    start: int = 0,
    before: Callable[[int], None] | None = None,
    after: Callable[[int, BlockInputs], None] | None = None,
    activations: str = "auto",
    split_layers: bool = False,
) -> None:
    """The sequential loop: for each block, gather its layers' statistics on the current
    activations, let ``step`` change the block, propagate, move on. Times go to ``run``
    (``calibration_seconds``); each block returns to the device it came from.

    Streaming hooks: ``before(index)`` makes block ``index`` real (reads it from disk),
    ``after(index, inputs)`` sees it done and the activations that enter the next block (writes
    it out, frees it, checkpoints); ``start`` resumes at a block, ``block_inputs`` then holding
    the activations that enter it (on any device; ``after`` sees them on ``activations``'
    place, see ``activation_home``).

    Under ``torchrun`` every rank runs this loop on its share of the windows: the statistics
    are summed over the ranks before ``step``; with ``split_layers`` each rank's ``step`` gets
    only the layers assigned to it (``distributed.assign_layers``), the pruned weights are then
    broadcast and the records (``run.layers``) gathered, so every rank ends each block with the
    same weights and records. Without it every rank runs ``step`` on all layers (the same
    statistics give the same result)."""
    group = current_group()
    blocks = adapter_for(model).decoder_blocks(model)
    t = time.perf_counter()
    if block_inputs is None and calibration is None:
        raise SnapPruneError(f"{run.settings.method} needs calibration data")
    if block_inputs is None:
        block_inputs = capture_block_inputs(model, blocks, calibration, device, batch_size)
    # The Hessian is gathered when the method needs it or layer errors are wanted.
    hessian = (get_method(run.settings.method).needs_hessian(run.settings.resolved_metric)
               or run.layer_errors)
    home = activation_home(activations, device, block_inputs.nbytes)
    inputs = block_inputs.placed(home, device)
    run.activations = home.type if home.type == "cpu" else str(home)
    run.activation_bytes = inputs.nbytes
    run.deterministic = determinism.enabled()
    run.calibration_seconds += time.perf_counter() - t

    for index in tqdm(range(start, len(blocks)), desc=desc, unit="block", disable=not progress,
                      initial=start, total=len(blocks)):
        if before is not None:
            before(index)
        home = _home_device(blocks[index])
        block = blocks[index].to(device)
        named = layers[index]
        t = time.perf_counter()
        stats = gather_layer_stats(block, named, inputs, device, hessian=hessian)
        all_reduce_stats(stats, group)
        run.calibration_seconds += time.perf_counter() - t

        if split_layers and group.active:
            owners = assign_layers(named, group.world, run.settings)
            first = len(run.layers)
            step(index, {n: m for n, m in named.items() if owners[n] == group.rank}, stats)
            broadcast_layers(named, owners, group)
            order = {name: i for i, name in enumerate(named)}
            records = all_gather_objects(run.layers[first:], group)
            run.layers[first:] = sorted((r for part in records for r in part),
                                        key=lambda r: order[r.name])
        else:
            step(index, named, stats)
        del stats

        t = time.perf_counter()
        propagate(block, inputs, device)
        run.calibration_seconds += time.perf_counter() - t
        blocks[index] = block.to(home)
        if after is not None:
            after(index, inputs)


def propagate(block: nn.Module, inputs: BlockInputs, device: torch.device) -> None:
    """Replace each batch of activations by the block's output, where the batch lives.

    Pinned host batches (``BlockInputs.placed``) are ours, so the output is copied back into
    them without blocking; one synchronisation per block then makes them safe to read."""
    for i, x in enumerate(inputs.batches):
        out = _block_output(inputs.run(block, x.to(device, non_blocking=True)))
        if x.is_pinned() and out.device != x.device:
            x.copy_(out, non_blocking=True)
        else:
            inputs.batches[i] = out.to(x.device, x.dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _home_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def prune_layer(name: str, module: nn.Module, stats: LayerStats | None,
                 settings: PruneSettings, run: PruneRun, log) -> None:
    role = run.roles.get(name, "")
    result = prune_weight(
        linear_weight(module), stats, method=settings.method,
        sparsity=settings.sparsity, pattern=settings.pattern, alpha=settings.alpha,
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


def _prune_weights_only(layers, settings, run, device, start, log) -> PruneRun:
    """Magnitude pruning: no forward pass at all (layer errors are unknown: NaN)."""
    for named in layers.values():
        for name, module in named.items():
            home = _home_device(module)
            module.to(device)
            prune_layer(name, module, None, settings, run, log)
            module.to(home)
    run.total_seconds = time.perf_counter() - start
    run.peak_memory_bytes = _peak_memory(device)
    return run
