"""Models larger than memory: prune block by block straight from safetensors shards.

The model is built without weights (meta device; buffers such as rotary frequencies are real),
the parts outside the decoder blocks are read, and then each block in turn is read from the
shards, pruned, run on the calibration activations, written to its own output shard and freed.
Peak memory is the non-block parameters, one block (two while it is written) and the
activations, whatever the depth.

The output goes to a hidden temporary directory beside ``--out`` and is renamed into place only
when complete. After every block a checkpoint (the next block's index, the activations entering
it, the records so far) is written there, so a killed or interrupted run continues with
``--resume`` and produces byte-identical shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import SnapPruneError
from .adapters import adapter_for
from .distributed import current_group
from .pipeline import (
    BlockInputs,
    LayerRecord,
    PruneRun,
    PruneSettings,
    _peak_memory,
    capture_block_inputs,
    check_finite,
    check_model_for_pruning,
    layer_roles,
    prune_layer,
    record_ranks,
    run_blocks,
    target_layers,
)
from .save import move_into_place

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
STATE_NAME = "snapprune_resume.pt"
CRASH_ENV = "SNAPPRUNE_CRASH_AFTER_BLOCK"
"""Test hook: kill the process (SIGKILL, like ``kill -9``) right after this block's checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """A directory of safetensors weights: which file holds each tensor."""

    directory: Path
    weight_map: dict[str, str]

    @classmethod
    def open(cls, directory: str | Path) -> Checkpoint:
        directory = Path(directory)
        index = directory / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / SINGLE_NAME).is_file():
            from safetensors import safe_open

            with safe_open(directory / SINGLE_NAME, framework="pt") as handle:
                weight_map = {name: SINGLE_NAME for name in handle.keys()}  # noqa: SIM118
        else:
            raise SnapPruneError(
                f"{directory} holds no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}); "
                "streaming reads safetensors only: load and save_pretrained the model first")
        return cls(directory, weight_map)

    @property
    def total_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in set(self.weight_map.values()))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for file, wanted in by_file.items():
            with safe_open(self.directory / file, framework="pt") as handle:
                for name in wanted:
                    tensors[name] = handle.get_tensor(name)
        return tensors


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def should_stream(directory: str | Path, activation_bytes: int = 0) -> bool:
    """Stream when the weights (plus the activations, plus a fifth for working copies) would
    not fit in the memory available now."""
    try:
        size = Checkpoint.open(directory).total_bytes
    except SnapPruneError:
        return False
    return size * 1.2 + activation_bytes > available_memory_bytes()


def _skeleton(directory: Path, dtype: torch.dtype | None):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _materialise(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name, tensor in tensors.items():
        set_module_tensor_to_device(model, name, "cpu", value=tensor)


def _shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


@dataclass
class StreamPlan:
    """Where every tensor goes: one output shard per block, one for everything else."""

    source: Checkpoint
    prefix: str
    blocks: int

    def block_names(self, index: int) -> list[str]:
        head = f"{self.prefix}.{index}."
        return [n for n in self.source.weight_map if n.startswith(head)]

    def other_names(self) -> list[str]:
        head = f"{self.prefix}."
        return [n for n in self.source.weight_map if not n.startswith(head)]

    @property
    def shards(self) -> int:
        return self.blocks + 1

    def weight_map(self) -> dict[str, str]:
        out = {n: _shard_name(0, self.shards) for n in self.other_names()}
        for index in range(self.blocks):
            out.update({n: _shard_name(index + 1, self.shards) for n in self.block_names(index)})
        return out


def partial_dir(out: Path) -> Path:
    """The temporary output beside ``out``: fixed, so that ``--resume`` finds it."""
    return out.parent / f".{out.name}.partial-stream"


@torch.no_grad()
def stream_prune(
    source: str | Path,
    out: str | Path,
    calibration: Callable[[nn.Module], torch.Tensor],
    settings: PruneSettings,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    finish: Callable[[Path, PruneRun], None] | None = None,
    activations: str = "auto",
    layer_errors: bool = True,
) -> PruneRun:
    """Prune the safetensors model in ``source`` into ``out`` one block at a time.

    ``calibration(model)`` makes the calibration ids (the model holds its embeddings and config,
    not its blocks); ``finish(directory, run)`` adds files (config, tokenizer, report) to the
    temporary output before it is renamed into place.
    """
    start_time = time.perf_counter()
    if not settings.needs_calibration:
        raise SnapPruneError("streaming is for calibrated methods; magnitude pruning reads each "
                             "layer once: load the model and prune it in memory (--no-stream)")
    device = torch.device(device)
    source, out = Path(source), Path(out).expanduser().resolve()
    checkpoint = Checkpoint.open(source)
    first = next(n for n in checkpoint.weight_map if ".weight" in n)
    dtype = checkpoint.read([first])[first].dtype
    model = _skeleton(source, dtype)
    adapter = adapter_for(model)
    blocks = adapter.decoder_blocks(model)
    plan = StreamPlan(checkpoint, adapter.blocks, len(blocks))
    layers = target_layers(model, settings)
    check_model_for_pruning(layers, settings, weights=False)
    others = checkpoint.read(plan.other_names())
    _materialise(model, others)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()

    tmp = partial_dir(out)
    group = current_group()  # under torchrun: rank 0 writes the model, every rank its state
    state_path = tmp / (STATE_NAME if not group.active
                        else STATE_NAME.replace(".pt", f".rank{group.rank}.pt"))
    run = PruneRun(settings=settings, architecture=adapter.describe(model),
                   roles=layer_roles(model), layer_errors=layer_errors)
    fingerprint = {"source": str(source.resolve()), "settings": asdict(settings),
                   "world": group.world}
    start, inputs = 0, None
    if resume:
        if not state_path.is_file():
            raise SnapPruneError(f"nothing to resume: {tmp} holds no checkpoint; run without "
                                 "--resume")
        state = torch.load(state_path, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise SnapPruneError(f"{tmp} was made from another model or other settings; run "
                                 "without --resume to start over")
        start = state["next_block"]
        if group.active:  # every rank must resume at the same block
            bounds = torch.tensor([start, -start], device=device)
            torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MAX)
            if int(bounds[0]) != -int(bounds[1]):
                raise SnapPruneError(f"the ranks' checkpoints in {tmp} stop at different "
                                     "blocks (a rank was killed while writing); run without "
                                     "--resume to start over")
        run.layers = [LayerRecord(**r) for r in state["layers"]]
        run.calibration_seconds = state["calibration_seconds"]
        run.solver_seconds = state["solver_seconds"]
        inputs = BlockInputs(state["batches"], {})
        if log:
            log(f"resuming at block {start} of {len(blocks)} from {tmp}")
    else:
        if out.exists() and not overwrite:
            raise SnapPruneError(f"output directory {out} already exists; pass --overwrite or "
                                 "choose another --out")
        if group.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _write_shard(tmp / _shard_name(0, plan.shards), others)
        if group.active:
            torch.distributed.barrier()  # the directory exists before any rank writes to it
    del others

    ids = calibration(model)
    if inputs is not None:
        # The blocks' other arguments (masks, rotary embeddings) come from a fresh capture,
        # which runs only the embeddings; the activations are the checkpoint's.
        fresh = capture_block_inputs(model, blocks, ids, device, batch_size)
        inputs = BlockInputs(inputs.batches, fresh.calls)

    crash_after = os.environ.get(CRASH_ENV)

    def load(index: int) -> None:
        _materialise(model, checkpoint.read(plan.block_names(index)))
        check_finite(layers[index])

    def save(index: int, done: BlockInputs) -> None:
        block = blocks[index]
        head = f"{adapter.blocks}.{index}."
        if group.is_main:
            _write_shard(tmp / _shard_name(index + 1, plan.shards),
                         {head + k: v for k, v in block.state_dict().items()
                          if head + k in checkpoint.weight_map})
        blocks[index] = block.to("meta")
        _atomic(state_path, lambda path: torch.save({
            "fingerprint": fingerprint, "next_block": index + 1,
            "batches": [x.cpu() for x in done.batches],
            "layers": [asdict(r) for r in run.layers],
            "calibration_seconds": run.calibration_seconds,
            "solver_seconds": run.solver_seconds}, path))
        if group.active:  # all ranks' checkpoints advance together
            torch.distributed.barrier()
        release_freed_memory()
        if log:
            log(f"block {index} written; resident memory {resident_bytes() / 2**30:.2f} GiB, "
                f"peak so far {resident_bytes('VmHWM') / 2**30:.2f} GiB")
        if crash_after is not None and int(crash_after) == index:
            os.kill(os.getpid(), signal.SIGKILL)

    def step(_index: int, named: dict[str, nn.Module], stats) -> None:
        for name, module in named.items():
            prune_layer(name, module, stats[name], settings, run, log)

    if start < len(blocks):
        run_blocks(model, layers, step, ids, run, device=device, batch_size=batch_size,
                   progress=progress, block_inputs=inputs, desc=f"{settings.method} (stream)",
                   start=start, before=load, after=save, activations=activations,
                   split_layers=True)
    run.total_seconds = time.perf_counter() - start_time
    run.peak_memory_bytes = _peak_memory(device)
    record_ranks(run)
    if not group.is_main:
        return run
    total = sum((tmp / f).stat().st_size for f in set(plan.weight_map().values()))
    (tmp / INDEX_NAME).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": plan.weight_map()}, indent=2) + "\n")
    for extra in source.iterdir():  # config, tokenizer, generation config
        if extra.is_file() and not extra.name.endswith(".safetensors") \
                and extra.name != INDEX_NAME:
            shutil.copy2(extra, tmp / extra.name)
    for state in tmp.glob(STATE_NAME.replace(".pt", "*.pt")):
        state.unlink()
    if finish is not None:
        finish(tmp, run)
    move_into_place(tmp, out)
    return run


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc ``malloc_trim``) after a block:
    tensors of a few MB come from the heap, and without this a long run's resident memory
    creeps up with fragmentation instead of staying flat. A no-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory now (``VmHWM``: its peak), 0 where /proc is missing."""
    with contextlib.suppress(OSError), open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    state = {n: t.detach().contiguous() for n, t in tensors.items()}
    _atomic(path, lambda part: save_file(state, str(part), metadata={"format": "pt"}))


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    part = path.with_name(path.name + ".part")
    write(part)
    os.replace(part, path)


def discard_partial(out: str | Path) -> None:
    """Remove a temporary output that cannot be resumed (bad input found mid-run)."""
    with contextlib.suppress(OSError):
        shutil.rmtree(partial_dir(Path(out).expanduser().resolve()))


