"""The calibration activations: what enters the first decoder block, and where they live."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SnapPruneError
from . import collectives


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
    """Calibration activations entering the current block, in batches, and the other
    arguments the model passes to its blocks (masks, positions, rotary embeddings) for each
    batch size."""

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


BATCH_SIZE = 8
"""Calibration windows per forward pass unless asked otherwise: speed and memory only (the
summation order moves the last bits, unless deterministic)."""
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


def to_device(value, device):
    """Tensors anywhere inside tuples, lists and dicts, moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def home_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


_CACHE_KWARGS = ("use_cache", "past_key_value", "past_key_values", "cache", "layer_past")


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    calibration: torch.Tensor,
    device: torch.device,
    batch_size: int = BATCH_SIZE,
    *,
    share: bool = True,
) -> BlockInputs:
    """Run the model up to block 0 on the calibration windows, ``batch_size`` at a time (under
    ``torchrun``, unless ``share`` is false: on this rank's share of them). Only the parts
    outside the blocks move to ``device``, and back afterwards."""
    if share:
        calibration = collectives.current().share(calibration)
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
        calls[size] = (to_device(args, device), to_device(kwargs, device))
    return BlockInputs(catcher.inputs, calls)


def inputs_for_pass(model: nn.Module, blocks: nn.ModuleList, calibration: torch.Tensor | None,
                    block_inputs: BlockInputs | None, device: torch.device, batch_size: int,
                    *, needs: str) -> BlockInputs:
    """The first block's inputs for a pass over the whole model: those given, else captured
    from ``calibration``; without either, refused in one line saying what ``needs`` them."""
    if block_inputs is not None:
        return block_inputs
    if calibration is None:
        raise SnapPruneError(f"{needs} needs calibration data")
    return capture_block_inputs(model, blocks, calibration, device, batch_size)


@contextlib.contextmanager
def blocks_on(blocks: nn.ModuleList, device: torch.device):
    """Every block on ``device`` for the body, each back where it was after (also blocks the
    body removes from the model)."""
    blocks = list(blocks)
    homes = [home_device(b) for b in blocks]
    for block in blocks:
        block.to(device)
    try:
        yield
    finally:
        for block, home in zip(blocks, homes, strict=True):
            block.to(home)


def _move_except_blocks(module: nn.Module, block_ids: set[int], device, moved: list) -> None:
    if id(module) in block_ids:
        return
    if isinstance(module, nn.ModuleList) and any(id(m) in block_ids for m in module):
        return
    inner = [m for m in module.modules() if id(m) in block_ids]
    if not inner:
        moved.append((module, home_device(module)))
        module.to(device)
        return
    for child in module.children():
        _move_except_blocks(child, block_ids, device, moved)
    for param in module.parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buf in module.named_buffers(recurse=False):
        module._buffers[name] = buf.to(device)
