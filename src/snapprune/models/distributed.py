"""Several processes (``torchrun``): data-parallel calibration and layers solved in parallel.

Every rank holds a share of the calibration windows and their activations. Per block, each rank
accumulates statistics on its share and one ``all_reduce(SUM)`` per distinct layer input makes
them the statistics of all windows (they are sums, so the split does not matter); the block's
layers are then assigned to ranks by estimated solver cost, each rank prunes its own, and the
pruned weights are broadcast from their owners, so that every rank propagates its windows
through the same pruned block. One process is the world-size-1 case of the same path.

Launch with ``torchrun --nproc_per_node N -m snapprune prune ...``: NCCL when ``--device cuda``
(each rank on its ``LOCAL_RANK`` GPU), gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..engine import LayerStats, get_method, parse_pattern
from ..errors import SnapPruneError
from .layout import input_width, linear_weight

if TYPE_CHECKING:  # the pipeline imports this module
    from .pipeline import PruneSettings


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks (``world == 1``: no collectives at all)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_group() -> Group:
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: str) -> Group:
    """Join the process group ``torchrun`` describes in the environment (a no-op otherwise) and
    return this rank's place; with CUDA, pick the rank's local GPU."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return current_group()
    if not dist.is_available():
        raise SnapPruneError("this torch build has no torch.distributed; run one process")
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return current_group()


def rank_device(device: str) -> str:
    """``cuda`` means this rank's own GPU under torchrun."""
    if str(device) == "cuda" and launched_by_torchrun():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def local_share(ids: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's calibration windows: a contiguous share, as even as the count allows."""
    if not group.active:
        return ids
    if ids.shape[0] < group.world:
        raise SnapPruneError(f"{ids.shape[0]} calibration windows cannot be shared by "
                             f"{group.world} processes; use --nsamples ≥ {group.world}")
    return torch.tensor_split(ids, group.world)[group.rank]


def all_reduce_stats(stats: dict[str, LayerStats], group: Group) -> None:
    """Sum every distinct ``LayerStats`` (shared ones once) over the ranks, in place."""
    if not group.active:
        return
    seen: set[int] = set()
    for name in sorted(stats):
        item = stats[name]
        if id(item) in seen:
            continue
        seen.add(id(item))
        sums = [item._sq] + ([item._xxt] if item._xxt is not None else [])
        for tensor in sums:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        count = torch.tensor([item.nsamples], dtype=torch.float64, device=item.device)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        item.nsamples = int(count.item())


def solver_cost(module: nn.Module, settings: PruneSettings) -> float:
    """Relative time to prune a layer with ``settings``: the method's estimate
    (``Method.layer_cost``)."""
    cols = input_width(module)
    rows = linear_weight(module).numel() // cols
    return get_method(settings.method).layer_cost(
        rows, cols, parse_pattern(settings.pattern), settings.blocksize,
        settings.resolved_metric)


def assign_layers(named: dict[str, nn.Module], world: int,
                  settings: PruneSettings) -> dict[str, int]:
    """Greedy longest-first: each layer, costliest first, to the least-loaded rank (ties to
    the lower rank, then by name, so every rank computes the same assignment)."""
    costs = {name: solver_cost(module, settings) for name, module in named.items()}
    load = [0.0] * world
    owners = {}
    for name in sorted(named, key=lambda n: (-costs[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


def broadcast_layers(named: dict[str, nn.Module], owners: dict[str, int], group: Group) -> None:
    """Every rank receives each layer's pruned weight from its owner."""
    if not group.active:
        return
    for name in sorted(named):
        weight = named[name].weight
        if weight.is_contiguous():
            dist.broadcast(weight.data, src=owners[name])
        else:
            buffer = weight.data.contiguous()
            dist.broadcast(buffer, src=owners[name])
            weight.data.copy_(buffer)


def all_gather_objects(value, group: Group) -> list:
    if not group.active:
        return [value]
    out = [None] * group.world
    dist.all_gather_object(out, value)
    return out
