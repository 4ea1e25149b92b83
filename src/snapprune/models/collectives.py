"""What the block loop needs from the other processes of a run, as one small interface.

One process is ``Local``: every collective is the identity. Under ``torchrun``,
``distributed.init_from_environment`` installs the ``torch.distributed`` implementation
(``distributed.TorchCollectives``) and the loop calls the same methods; the loop itself never
imports ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..engine import LayerStats


class Collectives:
    """This process's place among the ranks, and the collectives the block loop calls.
    The base class is one process alone (``world == 1``): no communication at all."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's calibration windows."""
        return ids

    def sum_stats(self, stats: dict[str, LayerStats]) -> None:
        """Make every rank's statistics the sum over all ranks, in place."""

    def assign(self, named: dict[str, nn.Module],
               cost: Callable[[nn.Module], float]) -> dict[str, int]:
        """Which rank prunes each layer."""
        return dict.fromkeys(named, 0)

    def broadcast(self, named: dict[str, nn.Module], owners: dict[str, int]) -> None:
        """Every rank receives each layer's weight from its owner."""

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order."""
        return [value]

    def barrier(self) -> None:
        """Wait until every rank is here."""

    def same_everywhere(self, value: int) -> bool:
        """Whether every rank holds the same integer."""
        return True

    def leave(self) -> None:
        """Leave the group: after this no collective is called (the main rank may evaluate
        and save for as long as it needs without holding the others in a collective)."""


class Local(Collectives):
    """One process."""


_current: Collectives = Local()


def current() -> Collectives:
    return _current


def install(collectives: Collectives) -> None:
    """Make ``collectives`` the group every later block loop uses (``Local()`` to reset)."""
    global _current
    _current = collectives
