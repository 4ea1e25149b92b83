"""Several processes (``torchrun``): data-parallel calibration and layers solved in parallel.

Every rank holds a share of the calibration windows and their activations. Per block, each rank
accumulates statistics on its share and one ``all_reduce(SUM)`` per distinct layer input makes
them the statistics of all windows (they are sums, so the split does not matter); the block's
layers are then assigned to ranks by estimated solver cost, each rank prunes its own, and the
pruned weights are broadcast from their owners, so that every rank propagates its windows
through the same pruned block. The block loop calls these through ``collectives.Collectives``;
one process is its ``Local`` case.

Launch with ``torchrun --nproc_per_node N -m snapprune prune ...``: NCCL on CUDA devices (each
rank on its ``LOCAL_RANK`` GPU), gloo on CPUs. Collectives time out after
``SNAPPRUNE_COLLECTIVE_TIMEOUT`` seconds (default 1,800): a rank that died leaves the others
with a one-line error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..engine import LayerStats
from ..errors import SnapPruneError
from . import collectives
from .collectives import Collectives

TIMEOUT_ENV = "SNAPPRUNE_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 1800


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def collective_timeout() -> datetime.timedelta:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = float(text)
    except ValueError:
        raise SnapPruneError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    if seconds <= 0:
        raise SnapPruneError(f"{TIMEOUT_ENV} must be positive, got {text}")
    return datetime.timedelta(seconds=seconds)


def local_share(ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s calibration windows: a contiguous share, as even as the count allows."""
    if world == 1:
        return ids
    if ids.shape[0] < world:
        raise SnapPruneError(f"{ids.shape[0]} calibration windows cannot be shared by "
                             f"{world} processes; use nsamples >= {world}")
    return torch.tensor_split(ids, world)[rank]


def assign_layers(costs: dict[str, float], world: int) -> dict[str, int]:
    """Greedy longest-first: each layer, costliest first, to the least-loaded rank (ties to
    the lower rank, then by name, so every rank computes the same assignment)."""
    load = [0.0] * world
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


class TorchCollectives(Collectives):
    """The collectives over ``torch.distributed``'s default process group."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def share(self, ids: torch.Tensor) -> torch.Tensor:
        return local_share(ids, self.rank, self.world)

    def sum_stats(self, stats: dict[str, LayerStats]) -> None:
        """Sum every distinct ``LayerStats`` (shared ones once) over the ranks, in place."""
        seen: set[int] = set()
        for name in sorted(stats):
            item = stats[name]
            if id(item) in seen:
                continue
            seen.add(id(item))
            for tensor in item.sums():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            count = torch.tensor([item.nsamples], dtype=torch.float64, device=item.device)
            dist.all_reduce(count, op=dist.ReduceOp.SUM)
            item.nsamples = int(count.item())

    def assign(self, named: dict[str, nn.Module],
               cost: Callable[[nn.Module], float]) -> dict[str, int]:
        return assign_layers({name: cost(module) for name, module in named.items()},
                             self.world)

    def broadcast(self, named: dict[str, nn.Module], owners: dict[str, int]) -> None:
        for name in sorted(named):
            weight = named[name].weight
            if weight.is_contiguous():
                dist.broadcast(weight.data, src=owners[name])
            else:
                buffer = weight.data.contiguous()
                dist.broadcast(buffer, src=owners[name])
                weight.data.copy_(buffer)

    def gather(self, value) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def same_everywhere(self, value: int) -> bool:
        bounds = torch.tensor([value, -value], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            bounds = bounds.cuda()
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        return int(bounds[0]) == -int(bounds[1])

    def leave(self) -> None:
        leave_group()


def init_from_environment(device: str) -> Collectives:
    """Join the process group ``torchrun`` describes in the environment (a no-op otherwise),
    with an explicit collective timeout, and install its collectives for the block loop."""
    if not launched_by_torchrun():
        return collectives.current()
    if not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise SnapPruneError("this torch build has no torch.distributed; run one process")
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=collective_timeout())
    group = TorchCollectives()
    collectives.install(group)
    return group


def leave_group() -> None:
    """Destroy the process group (if any) and go back to one process."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    collectives.install(collectives.Local())


def rank_device(device: str) -> str:
    """``cuda`` means this rank's own GPU under torchrun."""
    if str(device) == "cuda" and launched_by_torchrun():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device
