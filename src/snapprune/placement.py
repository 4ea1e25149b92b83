"""Where a whole model runs for evaluation and sampling: on the device when it fits there,
else dispatched over device and CPU; a failed move is undone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import SnapPruneError
from .models.capture import home_device

DEVICE_SHARE = 0.9
"""A model moves to the device whole when its bytes take at most this share of the free
device memory; otherwise it is dispatched over device and CPU."""


def model_bytes(model: torch.nn.Module) -> int:
    params = {id(p): p for p in model.parameters()}.values()
    buffers = {id(b): b for b in model.buffers()}.values()
    return sum(t.numel() * t.element_size() for t in (*params, *buffers))


def fits_whole(nbytes: int, free: int) -> bool:
    return nbytes <= DEVICE_SHARE * free


@contextlib.contextmanager
def placed(model: torch.nn.Module, device: str | torch.device) -> Iterator[None]:
    """``model`` on ``device`` inside the block, back where it was after it.

    A model too large for the device's free memory is dispatched instead (accelerate: layers
    on the device while they fit, the rest on the CPU, moved in as they run). A move that
    fails part way puts every part back where it was before the error is raised."""
    home = home_device(model)
    device = torch.device(device)
    if device == home or (device.type == home.type == "cpu"):
        yield
        return
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if not fits_whole(model_bytes(model), free):
            with _dispatched(model, device, free):
                yield
            return
    try:
        model.to(device)
    except BaseException as exc:
        model.to(home)
        if isinstance(exc, torch.OutOfMemoryError):
            raise SnapPruneError(f"the model does not fit on {device}; it is back on {home}: "
                                 "free device memory or use another device") from None
        raise
    try:
        yield
    finally:
        model.to(home)


@contextlib.contextmanager
def _dispatched(model: torch.nn.Module, device: torch.device, free: int) -> Iterator[None]:
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_module

    from .memory import available_bytes

    home = home_device(model)
    index = device.index if device.index is not None else torch.cuda.current_device()
    device_map = infer_auto_device_map(
        model, max_memory={index: int(DEVICE_SHARE * free), "cpu": available_bytes()},
        no_split_module_classes=getattr(model, "_no_split_modules", None) or [])
    dispatch_model(model, device_map=device_map, main_device=str(device))
    try:
        yield
    finally:
        remove_hook_from_module(model, recurse=True)
        model.to(home)
