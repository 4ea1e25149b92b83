"""The sequential loop over decoder blocks: gather statistics, change the block, propagate.

Every block-wise job (pruning, shrinking, quantising, streaming) is this loop with its own
``step``. Under ``torchrun`` the loop calls the collectives of ``collectives.current()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine import LayerStats, determinism
from ..errors import SnapPruneError
from . import collectives, experts
from .adapters import adapter_for
from .capture import BATCH_SIZE, BlockInputs, activation_home, capture_block_inputs, home_device
from .records import RunRecord

BlockStep = Callable[[int, dict[str, nn.Module], dict[str, LayerStats]], None]
"""``(block index, its layers, their statistics)``: change the block's weights in place; the
loop then propagates the calibration activations through the changed block."""


def gather_layer_stats(
    block: nn.Module,
    named: dict[str, nn.Module],
    inputs: BlockInputs,
    device: torch.device,
    *,
    hessian: bool = True,
    expert_records: list[dict] | None = None,
) -> dict[str, LayerStats]:
    """Run ``block`` on every input with hooks on its layers; one ``LayerStats`` per layer
    (with the Hessian unless ``hessian=False``).

    Layers fed the very same tensor (q/k/v, gate/up) share one accumulation: their statistics
    are identical, so computing them once saves most of the hooks' cost. Experts see their
    routed tokens, under ``experts.current_policy()``; what each saw is appended to
    ``expert_records``.
    """
    stats, records = experts.gather_with_experts(
        block, named, lambda layers: _gather(block, layers, inputs, device, hessian))
    if expert_records is not None:
        expert_records.extend(records)
    missing = [name for name in named if name not in stats]
    if missing:
        raise SnapPruneError(f"layers {missing} never ran during calibration; exclude them")
    return stats


def _gather(block: nn.Module, named: dict[str, nn.Module], inputs: BlockInputs,
            device: torch.device, hessian: bool) -> dict[str, LayerStats]:
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
    return stats


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def propagate(block: nn.Module, inputs: BlockInputs, device: torch.device) -> None:
    """Replace each batch of activations by the block's output, where the batch lives.

    Pinned host batches (``BlockInputs.placed``) are ours, so the output is copied back into
    them without blocking; one synchronisation per block then makes them safe to read."""
    for i, x in enumerate(inputs.batches):
        out = block_output(inputs.run(block, x.to(device, non_blocking=True)))
        if x.is_pinned() and out.device != x.device:
            x.copy_(out, non_blocking=True)
        else:
            inputs.batches[i] = out.to(x.device, x.dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_blocks(
    model: nn.Module,
    layers: dict[int, dict[str, nn.Module]],
    step: BlockStep,
    calibration: torch.Tensor | None,
    run: RunRecord,
    *,
    device: torch.device,
    hessian: bool = True,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    block_inputs: BlockInputs | None = None,
    desc: str = "",
    start: int = 0,
    before: Callable[[int], None] | None = None,
    after: Callable[[int, BlockInputs], None] | None = None,
    activations: str = "auto",
    layer_cost: Callable[[nn.Module], float] | None = None,
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
    are summed over the ranks before ``step``; with ``layer_cost`` each rank's ``step`` gets
    only the layers assigned to it by that cost, the changed weights are then broadcast and
    the records (``run.layers``) gathered, so every rank ends each block with the same weights
    and records. Without it every rank runs ``step`` on all layers (the same statistics give
    the same result)."""
    group = collectives.current()
    blocks = adapter_for(model).decoder_blocks(model)
    t = time.perf_counter()
    if block_inputs is None and calibration is None:
        raise SnapPruneError("this job needs calibration data")
    if block_inputs is None:
        block_inputs = capture_block_inputs(model, blocks, calibration, device, batch_size)
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
        home = home_device(blocks[index])
        block = blocks[index].to(device)
        named = layers[index]
        t = time.perf_counter()
        records: list[dict] = []
        stats = gather_layer_stats(block, named, inputs, device, hessian=hessian,
                                   expert_records=records)
        if records:
            run.experts[index] = records
        group.sum_stats(stats)
        run.calibration_seconds += time.perf_counter() - t

        if layer_cost is not None and group.active:
            owners = group.assign(named, layer_cost)
            first = len(run.layers)
            step(index, {n: m for n, m in named.items() if owners[n] == group.rank}, stats)
            group.broadcast(named, owners)
            order = {name: i for i, name in enumerate(named)}
            records = group.gather(run.layers[first:])
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


def record_ranks(run: RunRecord) -> None:
    """Under ``torchrun``: every rank's activations, times and peak memory, on every rank."""
    group = collectives.current()
    if group.active:
        run.ranks = group.gather({
            "rank": group.rank, "activation_bytes": run.activation_bytes,
            "solver_seconds": run.solver_seconds, "calibration_seconds": run.calibration_seconds,
            "peak_memory_bytes": run.peak_memory_bytes})
