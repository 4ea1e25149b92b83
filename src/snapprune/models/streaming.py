"""Models larger than memory: prune block by block straight from safetensors shards.

The model is built without weights (meta device; buffers such as rotary frequencies are real),
the parts outside the decoder blocks are read, and then each block in turn is read from the
shards, pruned, run on the calibration activations, written to its own output shard and freed.
Peak memory is the non-block parameters, one block (two while it is written) and the
activations, whatever the depth.

The output goes to a hidden temporary directory beside the output and is renamed into place
only when complete. After every block a checkpoint is written there: the state as JSON (the
next block, the records so far, and the run's fingerprint) and the activations entering the
next block as safetensors — nothing that loading could execute. A killed or interrupted run
continues with ``resume`` and produces byte-identical shards, and only when its fingerprint
(the whole job and a hash of its calibration token ids) matches; a new run over saved progress
is refused unless it asks to ``restart``.
"""

from __future__ import annotations

import hashlib
import json
import math
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
from ..memory import available_bytes, peak_bytes, peak_resident_bytes, release_freed_memory
from ..memory import resident_bytes as resident_now
from ..outputs import json_text, mark_output, move_into_place, write_atomic
from . import collectives, decilm
from .adapters import adapter_for
from .blockloop import record_ranks, run_blocks
from .capture import BATCH_SIZE, BlockInputs, capture_block_inputs
from .checkpoint_files import empty_model
from .prune import PruneRun, layer_cost, needs_hessian, prune_layer, start_prune_run
from .records import LayerRecord
from .settings import PruneSettings
from .targets import check_finite

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
STATE_NAME = "snapprune_resume.json"
ACTIVATIONS_NAME = "snapprune_resume.safetensors"
RESUME_FILES = "snapprune_resume*"
"""Every file of a checkpoint (state and activations, every rank's)."""
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                "chat_template.json")
"""What a streamed output takes from its source besides the weights: configuration and
tokenizer files, nothing else (no ``pytorch_model.bin``, no other weights, no code)."""
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


def should_stream(directory: str | Path, activation_bytes: int = 0) -> bool:
    """Stream when the weights (plus the activations, plus a fifth for working copies) would
    not fit in the memory available now."""
    if decilm.read_config(directory) is not None:  # blocks of different shapes: in memory
        return False
    try:
        size = Checkpoint.open(directory).total_bytes
    except SnapPruneError:
        return False
    return size * 1.2 + activation_bytes > available_bytes()


def _materialise(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name, tensor in tensors.items():
        set_module_tensor_to_device(model, name, "cpu", value=tensor)


def _names(adapter) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """(model name → checkpoint name, checkpoint name → model name): the same but for a
    mixture of experts whose family's checkpoints spell experts their own way (Mixtral's
    ``block_sparse_moe.experts.3.w1``)."""
    if adapter.moe is None:
        return (lambda name: name), (lambda name: name)
    return adapter.moe.stored_name, adapter.moe.model_name


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
    """The temporary output beside ``out``: fixed, so that ``resume`` finds it."""
    return out.parent / f".{out.name}.partial-stream"


def saved_progress(out: str | Path) -> int | None:
    """The block a stopped streamed run into ``out`` would resume at, or ``None``."""
    tmp = partial_dir(Path(out).expanduser().resolve())
    states = sorted(tmp.glob(STATE_NAME.replace(".json", "*.json")))
    if not states:
        return None
    try:
        return int(json.loads(states[0].read_text())["next_block"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def ids_digest(ids: torch.Tensor) -> str:
    """SHA-256 of token ids (int64, row-major): what a run's calibration data was."""
    data = ids.to(torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def _rank_name(name: str, group: collectives.Collectives) -> str:
    if not group.active:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.rank{group.rank}.{suffix}"


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(saved) | set(now))
    out = []
    for key in keys:
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


@torch.no_grad()
def stream_prune(
    source: str | Path,
    out: str | Path,
    calibration: Callable[[nn.Module], torch.Tensor],
    settings: PruneSettings,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    resume: bool = False,
    restart: bool = False,
    finish: Callable[[Path, PruneRun], None] | None = None,
    activations: str = "auto",
    layer_errors: bool = True,
    fingerprint: dict | None = None,
) -> PruneRun:
    """Prune the safetensors model in ``source`` into ``out`` one block at a time.

    ``calibration(model)`` makes the calibration ids (the model holds its embeddings and config,
    not its blocks); ``finish(directory, run)`` adds files (tokenizer, report) to the temporary
    output before it is renamed into place. ``fingerprint``: everything that decides the
    result (the caller's whole job); the calibration ids' hash, the source, the settings and
    the process count are added. ``out`` itself must already be checked by the caller
    (``outputs.check_output_dir``).
    """
    start_time = time.perf_counter()
    if settings.allocation != "uniform":
        raise SnapPruneError("OWL's per-block sparsities need a pass of the whole dense model "
                             "before pruning, which a streamed run does not hold: load the "
                             "model in memory (no --stream) or use --allocation uniform")
    if not settings.needs_calibration:
        raise SnapPruneError("streaming is for calibrated methods; magnitude pruning reads each "
                             "layer once: load the model and prune it in memory (no streaming)")
    device = torch.device(device)
    source, out = Path(source), Path(out).expanduser().resolve()
    checkpoint = Checkpoint.open(source)
    first = next(n for n in checkpoint.weight_map if ".weight" in n)
    dtype = checkpoint.read([first])[first].dtype
    from transformers import AutoConfig

    model = empty_model(AutoConfig.from_pretrained(source), dtype)
    adapter = adapter_for(model)
    blocks = adapter.decoder_blocks(model)
    plan = StreamPlan(checkpoint, adapter.blocks, len(blocks))
    stored, unstored = _names(adapter)
    missing = [n for n in (f"{adapter.blocks}.0.{k}" for k in blocks[0].state_dict())
               if stored(n) not in checkpoint.weight_map] if adapter.moe is not None else []
    if missing:
        raise SnapPruneError(
            f"{source} does not store {stored(missing[0])}: its experts are stored another "
            "way (fused?); streaming reads one tensor per expert, as transformers' "
            "save_pretrained writes them")
    layers, run = start_prune_run(model, settings, layer_errors=layer_errors, weights=False)
    others = checkpoint.read(plan.other_names())
    _materialise(model, others)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()

    tmp = partial_dir(out)
    group = collectives.current()  # under torchrun: rank 0 writes the model, every rank state
    state_path = tmp / _rank_name(STATE_NAME, group)

    def activations_file(next_block: int) -> str:
        return _rank_name(ACTIVATIONS_NAME.replace(".safetensors",
                                                   f".block{next_block}.safetensors"), group)

    ids = calibration(model)
    fingerprint = {**(fingerprint or {}), "source": str(source.resolve()),
                   "settings": asdict(settings), "world": group.world,
                   "calibration_ids": ids_digest(ids)}
    fingerprint = json.loads(json_text(fingerprint))  # as it reads back from the file
    begin, inputs = 0, None
    if resume:
        if not state_path.is_file():
            raise SnapPruneError(f"nothing to resume: {tmp} holds no checkpoint; run without "
                                 "resume")
        try:
            state = json.loads(state_path.read_text())
            if not isinstance(state, dict) or not isinstance(state.get("next_block"), int):
                raise ValueError("no next block")
        except (OSError, ValueError, UnicodeDecodeError):
            raise SnapPruneError(f"the checkpoint in {tmp} is damaged ({STATE_NAME} cannot be "
                                 "read); --restart to discard it and start over") from None
        differ = _differences(state.get("fingerprint", {}), fingerprint)
        if differ:
            raise SnapPruneError(
                f"{tmp} was made from another model or other settings ({', '.join(differ[:4])} "
                "differ); run the same command as before, or restart to start over")
        begin = int(state["next_block"])
        if not group.same_everywhere(begin):
            raise SnapPruneError(f"the ranks' checkpoints in {tmp} stop at different blocks "
                                 "(a rank was killed while writing); restart to start over")
        from safetensors.torch import load_file

        saved = load_file(tmp / state["activations"])
        run.layers = [LayerRecord(**{**r, "shape": tuple(r["shape"]),
                                     "error": math.nan if r["error"] is None else r["error"]})
                      for r in state["layers"]]
        run.experts = {int(k): v for k, v in state.get("experts", {}).items()}
        run.calibration_seconds = state["calibration_seconds"]
        run.solver_seconds = state["solver_seconds"]
        # The blocks' other arguments (masks, rotary embeddings) come from a fresh capture,
        # which runs only the embeddings; the activations are the checkpoint's.
        fresh = capture_block_inputs(model, blocks, ids, device, batch_size)
        inputs = BlockInputs([saved[f"batch.{i}"] for i in range(len(saved))], fresh.calls)
        if log:
            log(f"resuming at block {begin} of {len(blocks)} from {tmp}")
    else:
        stopped = saved_progress(out)
        if stopped is not None and not restart:
            raise SnapPruneError(
                f"{tmp} holds a streamed run stopped before block {stopped}: resume to "
                "continue it, or restart to discard it and start over")
        if group.is_main:
            if tmp.exists():  # snapprune's own hidden directory: nothing resumable in it now
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            mark_output(tmp)
            _write_shard(tmp / _shard_name(0, plan.shards), others)
        group.barrier()  # the directory exists before any rank writes to it
    del others

    crash_after = os.environ.get(CRASH_ENV)

    def load(index: int) -> None:
        _materialise(model, {unstored(n): t
                             for n, t in checkpoint.read(plan.block_names(index)).items()})
        check_finite(layers[index])

    def save(index: int, done: BlockInputs) -> None:
        block = blocks[index]
        head = f"{adapter.blocks}.{index}."
        if group.is_main:
            _write_shard(tmp / _shard_name(index + 1, plan.shards),
                         {stored(head + k): v for k, v in block.state_dict().items()
                          if stored(head + k) in checkpoint.weight_map})
        blocks[index] = block.to("meta")
        # The activations in a file of their own block, then the state that names it: a kill
        # between the two leaves the previous state and its own activations.
        name = activations_file(index + 1)
        _write_shard(tmp / name, {f"batch.{i}": x.cpu() for i, x in enumerate(done.batches)})
        write_atomic(state_path, lambda path: path.write_text(json_text({
            "fingerprint": fingerprint, "next_block": index + 1, "activations": name,
            "layers": [asdict(r) for r in run.layers],
            "experts": {str(k): v for k, v in run.experts.items()},
            "calibration_seconds": run.calibration_seconds,
            "solver_seconds": run.solver_seconds})))
        (tmp / activations_file(index)).unlink(missing_ok=True)
        group.barrier()  # all ranks' checkpoints advance together
        release_freed_memory()
        if log:
            log(f"block {index} written; resident memory {resident_now() / 2**30:.2f} GiB, "
                f"peak so far {peak_resident_bytes() / 2**30:.2f} GiB")
        if crash_after is not None and int(crash_after) == index:
            os.kill(os.getpid(), signal.SIGKILL)

    def step(_index: int, named: dict[str, nn.Module], stats) -> None:
        for name, module in named.items():
            prune_layer(name, module, stats[name], settings, run, log)

    if begin < len(blocks):
        run_blocks(model, layers, step, ids, run, device=device,
                   hessian=needs_hessian(settings, layer_errors),
                   batch_size=batch_size, progress=progress, block_inputs=inputs,
                   desc=f"{settings.method} (stream)", start=begin, before=load, after=save,
                   activations=activations, layer_cost=layer_cost(settings))
    run.total_seconds = time.perf_counter() - start_time
    run.peak_memory_bytes = peak_bytes(device)
    record_ranks(run)
    if not group.is_main:
        return run
    total = sum((tmp / f).stat().st_size for f in set(plan.weight_map().values()))
    (tmp / INDEX_NAME).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": plan.weight_map()}, indent=2) + "\n")
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    for stale in tmp.glob(RESUME_FILES):
        stale.unlink()
    if finish is not None:
        finish(tmp, run)
    move_into_place(tmp, out)
    return run


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    state = {n: t.detach().contiguous() for n, t in tensors.items()}
    write_atomic(path, lambda part: save_file(state, str(part), metadata={"format": "pt"}))


def discard_partial(out: str | Path) -> None:
    """Remove a temporary output that holds no resumable progress (bad input found before the
    first block finished). Saved progress is never removed here."""
    tmp = partial_dir(Path(out).expanduser().resolve())
    if tmp.is_dir() and saved_progress(out) is None:
        shutil.rmtree(tmp, ignore_errors=True)
