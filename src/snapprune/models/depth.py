"""Shallower models: whole decoder blocks scored, removed and repaired in closed form.

Scoring runs the full model block by block on the calibration windows: each block's angular
distance (how far it turns the residual stream) and, with ``score="kl"``, the measured KL
divergence of the next-token distributions when that block alone is skipped. The blocks that
change the model least are removed; the result is the family's standard config with fewer
``num_hidden_layers`` (plain ``llama`` in GGUF, plain ``from_pretrained``).

Repair: walking the blocks with two streams — the full model's and the cut model's — the
output projection (``down_proj``) of the kept block just before each removed run is re-fitted
by least squares (``engine.depth.RepairProblem``) so that the stream it leaves reproduces the
full model's stream after the removed run. It applies where the block adds that projection's
output straight into the stream (checked on the calibration data, not assumed); elsewhere, and
for a run that starts at block 0, the report says why nothing was repaired.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine.depth import RepairProblem, angular_distance, kl_from_logits
from ..errors import SnapPruneError
from ..memory import peak_bytes
from .adapters import adapter_for, head_geometry, module_at
from .blockloop import block_output
from .capture import BlockInputs, blocks_on, inputs_for_pass
from .layout import linear_weight, set_linear_weight
from .records import RunRecord
from .settings import DepthSettings

KL_WINDOWS = 8
"""Calibration windows the KL score runs on (each candidate costs a pass through the blocks
after it, so the measured score is a fixed few windows, not the whole set)."""
KL_POSITION_STRIDE = 4
"""Every this-many-th position enters the KL (the output matrix is the costly part)."""


class NoAttention(nn.Module):
    """Stands in for a removed attention sub-layer: adds nothing to the stream (the block is
    ``x + MLP(norm(x))``, llama.cpp's attention-free ``deci`` block). It writes one zero head
    per position to the KV cache, so that the cache still counts the positions it has seen
    (transformers reads the length of a generation from the first block's entry)."""

    def __init__(self, layer_idx: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value")
                      if kwargs.get(k) is not None), None)  # transformers' names over time
        if cache is not None:
            b, t, _ = hidden_states.shape
            one = hidden_states.new_zeros(b, 1, t, self.head_dim)  # an empty one reads as 0
            cache.update(one, one, self.layer_idx)
        return torch.zeros_like(hidden_states), None


ATTENTION_NORM = "input_layernorm"
"""The norm in front of a LLaMA block's attention: it goes with the attention (neither llama.cpp's
deci block nor the Nemotron-NAS layout stores it for a block without attention)."""


def attention_free(block: nn.Module) -> bool:
    """Whether a block's attention sub-layer was removed (``NoAttention``)."""
    return any(isinstance(m, NoAttention) for m in block.children())


def _attention_parent(model: nn.Module) -> str:
    return adapter_for(model).attention.o.rpartition(".")[0]


def remove_attention(model: nn.Module, block: nn.Module) -> nn.Module:
    """Replace the block's attention by ``NoAttention``; returns the removed module."""
    name = _attention_parent(model)
    removed = getattr(block, name)
    setattr(block, name, NoAttention(getattr(removed, "layer_idx", 0),
                                     head_geometry(model.config).head_dim))
    return removed


@dataclass
class BlockScore:
    index: int
    angular: float
    """Mean over tokens of ``arccos(cos(x_in, x_out)) / π``."""
    influence: float
    """ShortGPT's block influence: ``1 − mean cos(x_in, x_out)``."""
    kl: float | None = None
    """Mean KL (nats) of the next-token distributions with this block alone skipped."""
    attention_angular: float | None = None
    """The same angular distance across the block's attention sub-layer alone."""
    attention_kl: float | None = None
    """The KL with the block's attention sub-layer alone skipped."""

    def value(self, score: str) -> float:
        return self.kl if score == "kl" else self.angular

    def attention_value(self, score: str) -> float:
        return self.attention_kl if score == "kl" else self.attention_angular


@dataclass
class Repair:
    """One repaired output projection: the kept block before a removed run."""

    block: int
    removed: tuple[int, ...]
    layer: str
    error_before: float
    """``Σ‖target − stream‖²`` over the calibration tokens, before the repair."""
    error_after: float
    reason: str = ""
    """Why nothing was re-fitted (empty when repaired)."""
    attention: bool = False
    """The block lost its attention sub-layer (its own stream is repaired too)."""


@dataclass
class DepthRun(RunRecord):
    settings: DepthSettings | None = None
    scores: list[BlockScore] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    attention_removed: list[int] = field(default_factory=list)
    """Blocks (numbered as in the full model) whose attention sub-layer was removed."""
    repairs: list[Repair] = field(default_factory=list)
    blocks_before: int = 0
    blocks_after: int = 0
    parameters_before: int = 0
    parameters_after: int = 0


def _layer_count_key(config) -> str:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return key
    raise SnapPruneError(f"{type(config).__name__} does not say how many decoder blocks it "
                         "has (num_hidden_layers); prune-depth cannot write its config")


def check_depth(model: nn.Module, settings: DepthSettings) -> int:
    """Refuse a request the model cannot take, before any work; the block count."""
    adapter = adapter_for(model)
    if adapter.generic:
        raise SnapPruneError(f"{type(model).__name__} has no family adapter; prune-depth needs "
                             "to know its blocks' layers and config (LLaMA, Qwen, Mistral, OPT, "
                             "GPT-2, GPT-NeoX ...)")
    if adapter.moe is not None and (settings.repair or settings.attention):
        raise SnapPruneError("the repair re-fits a block's one MLP output projection, and a "
                             "mixture block has one per expert: prune-depth a mixture with "
                             "--no-repair and whole blocks only")
    _layer_count_key(model.config)
    count = len(adapter.decoder_blocks(model))
    if settings.blocks >= count:
        raise SnapPruneError(f"--blocks {settings.blocks} would remove every one of the "
                             f"model's {count} decoder blocks; remove at most {count - 1}")
    if settings.attention:
        if adapter.family != "llama":
            raise SnapPruneError(f"removing attention sub-layers needs a block that adds "
                                 f"attention and MLP to the stream in turn, as llama.cpp's deci "
                                 f"architecture runs it (the LLaMA family); {adapter.family} is "
                                 "not: use --blocks")
        left = count - settings.blocks
        free = sum(attention_free(b) for b in adapter.decoder_blocks(model))
        if settings.attention >= left - free:
            raise SnapPruneError(f"--attention {settings.attention} would leave none of the "
                                 f"{left} kept blocks with attention"
                                 + (f" ({free} have none already)" if free else "")
                                 + f"; remove at most {max(0, left - free - 1)}")
    return count


def _run(block: nn.Module, inputs: BlockInputs, x: torch.Tensor) -> torch.Tensor:
    return block_output(inputs.run(block, x))


def _logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    adapter = adapter_for(model)
    norm = module_at(model, adapter.final_norm) if adapter.final_norm else None
    if norm is not None:
        hidden = norm(hidden)
    return model.get_output_embeddings()(hidden[:, ::KL_POSITION_STRIDE])


@torch.no_grad()
def score_blocks(model: nn.Module, inputs: BlockInputs, device: torch.device, *,
                 kl: bool = False, attention: bool = False,
                 progress: bool = True) -> list[BlockScore]:
    """Every block's angular distance and influence on all calibration windows (one pass of
    the full model), and with ``kl`` its measured KL on the first ``KL_WINDOWS`` windows; with
    ``attention`` the same measures for each block's attention sub-layer alone (its output is
    what ``o_proj`` adds to the stream)."""
    adapter = adapter_for(model)
    blocks = adapter.decoder_blocks(model)
    stream = [x.to(device) for x in inputs.batches]
    kept_windows, kept = 0, []  # the KL's batches: the streams entering every block
    for x in stream:
        if kl and kept_windows < KL_WINDOWS:
            kept.append([x])
            kept_windows += x.shape[0]
    scores = []
    for index in tqdm(range(len(blocks)), desc="scoring blocks", unit="block",
                      disable=not progress):
        block = blocks[index]
        seen, handle = (_captured(block.get_submodule(adapter.attention.o)) if attention
                        else ({}, None))
        angles, cosines, tokens, attention_angles = 0.0, 0.0, 0, 0.0
        try:
            for b, x in enumerate(stream):
                out = _run(block, inputs, x)
                angle = angular_distance(x, out)
                angles += angle.sum().item()
                cosines += torch.cos(angle * torch.pi).sum().item()
                tokens += angle.numel()
                if attention:
                    added = seen["output"].reshape(x.shape)
                    attention_angles += angular_distance(x, x + added).sum().item()
                stream[b] = out
                if b < len(kept):
                    kept[b].append(out)
        finally:
            if handle is not None:
                handle.remove()
        scores.append(BlockScore(index, angles / tokens, 1.0 - cosines / tokens,
                                 attention_angular=attention_angles / tokens if attention
                                 else None))
    if kl:
        for index in tqdm(range(len(blocks)), desc="measuring KL", unit="block",
                          disable=not progress):
            scores[index].kl = _skipped_kl(model, blocks, inputs, kept, index, index + 1)
            if attention:
                original = remove_attention(model, blocks[index])
                try:
                    scores[index].attention_kl = _skipped_kl(model, blocks, inputs, kept,
                                                             index, index)
                finally:
                    setattr(blocks[index], _attention_parent(model), original)
    return scores


def _skipped_kl(model, blocks, inputs, kept, index: int, first: int) -> float:
    """The mean KL of the full model's next-token distributions from those of the model run
    from the stream entering block ``index`` through blocks ``first``… (``index + 1``: block
    ``index`` skipped; ``index``: run as it now is)."""
    total, positions = 0.0, 0
    for streams in kept:
        x = streams[index]
        for later in range(first, len(blocks)):
            x = _run(blocks[later], inputs, x)
        divergence = kl_from_logits(_logits(model, streams[-1]), _logits(model, x))
        total += divergence.sum().item()
        positions += divergence.numel()
    return total / positions


def choose_blocks(scores: list[BlockScore], count: int, score: str) -> list[int]:
    """The ``count`` blocks with the lowest score (ties: the later block), ascending."""
    order = sorted(scores, key=lambda s: (s.value(score), -s.index))
    return sorted(s.index for s in order[:count])


def choose_attention(scores: list[BlockScore], count: int, score: str,
                     removed: list[int], free: frozenset[int] = frozenset()) -> list[int]:
    """The ``count`` kept blocks whose attention sub-layer scores lowest, ascending, among those
    that still have one (``free``: blocks already without). The first kept block keeps its
    attention: llama.cpp reads every block's head size from the first block's head count, and
    a file whose first block has none does not load."""
    kept = sorted((s for s in scores if s.index not in set(removed)), key=lambda s: s.index)
    candidates = [s for s in kept[1:] if s.index not in free]
    order = sorted(candidates, key=lambda s: (s.attention_value(score), -s.index))
    return sorted(s.index for s in order[:count])


def removed_runs(removed: list[int]) -> list[tuple[int, ...]]:
    """Consecutive removed blocks grouped: ``[2, 3, 7]`` → ``[(2, 3), (7,)]``."""
    runs: list[list[int]] = []
    for index in sorted(removed):
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return [tuple(r) for r in runs]


def _captured(layer: nn.Module):
    """A hook that keeps the layer's last input and output."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, inp, out):
        seen["input"], seen["output"] = inp[0], out
    return seen, layer.register_forward_hook(hook)


def _adds_straight(block: nn.Module, layer: nn.Module, inputs: BlockInputs,
                   x: torch.Tensor) -> bool:
    """Whether the block's output is ``(what it leaves without the layer) + layer output``:
    the layer's weight enters the stream linearly, so least squares on it is exact."""
    seen, handle = _captured(layer)
    try:
        full = _run(block, inputs, x)
        written = seen["output"]
        weight = linear_weight(layer).clone()
        set_linear_weight(layer, torch.zeros_like(weight))
        bias = getattr(layer, "bias", None)
        without = _run(block, inputs, x)
        set_linear_weight(layer, weight)
    finally:
        handle.remove()
    # bias: in both runs (zeroing the weight keeps it); OPT's MLP sees the tokens flattened
    expected = without + (written - (bias if bias is not None else 0)).reshape(full.shape)
    scale = full.abs().max().clamp_min(1e-6)
    return bool(((full - expected).abs().max() / scale) < 1e-4)


@torch.no_grad()
def repair_and_cut(model: nn.Module, inputs: BlockInputs, removed: list[int],
                   settings: DepthSettings, device: torch.device, *,
                   attention: list[int] = (), progress: bool = True) -> list[Repair]:
    """Remove the ``attention`` blocks' attention sub-layers and re-fit (when
    ``settings.repair``) the MLP output projection of each kept block that lost its attention
    or precedes a removed run, then cut the removed blocks out. ``inputs`` holds the
    activations entering block 0."""
    adapter = adapter_for(model)
    blocks = adapter.decoder_blocks(model)
    runs = {r[0] - 1: r for r in removed_runs(removed)}
    changed = sorted({k for k in runs if k >= 0} | set(attention))
    repairs = [Repair(-1, runs[-1], "", math.nan, math.nan, "the run starts at block 0: no "
                      "earlier block writes into the stream")] if -1 in runs else []
    if not settings.repair:
        for index in attention:
            remove_attention(model, blocks[index])
        repairs += [Repair(k, runs.get(k, ()), "", math.nan, math.nan, "repair switched off",
                           attention=k in attention) for k in changed]
        changed = []
    if changed:
        full = [x.to(device) for x in inputs.batches]
        cut = [x.clone() for x in full]
        index = 0
        bar = tqdm(total=len(blocks), desc="repairing", unit="block", disable=not progress)
        while index < len(blocks):
            block = blocks[index]
            if index in removed:  # only a leading run reaches here: the cut stream waits
                full = [_run(block, inputs, x) for x in full]
                index += 1
                bar.update(1)
                continue
            if index not in changed:
                full = [_run(block, inputs, x) for x in full]
                cut = [_run(block, inputs, x) for x in cut]
                index += 1
                bar.update(1)
                continue
            run = runs.get(index, ())
            targets = []
            for x in full:  # the full model: this block as it was, then the removed run
                x = _run(block, inputs, x)
                for later in run:
                    x = _run(blocks[later], inputs, x)
                targets.append(x)
            if index in attention:
                remove_attention(model, block)
            repairs.append(_repair_block(block, adapter.mlp.output, run, index, inputs, cut,
                                         targets, settings.percdamp,
                                         attention=index in attention))
            cut = [_run(block, inputs, x) for x in cut]
            full = targets
            index += 1 + len(run)
            bar.update(1 + len(run))
        bar.close()
    cut_blocks(model, removed)
    return repairs


def _repair_block(block, layer_name: str, run: tuple[int, ...], index: int,
                  inputs: BlockInputs, cut: list[torch.Tensor], targets: list[torch.Tensor],
                  percdamp: float, *, attention: bool = False) -> Repair:
    layer = block.get_submodule(layer_name)
    if not _adds_straight(block, layer, inputs, cut[0]):
        return Repair(index, run, layer_name, math.nan, math.nan,
                      f"{layer_name}'s output does not enter the stream straight (a norm or "
                      "scale after it): least squares on it would not be exact",
                      attention=attention)
    weight = linear_weight(layer)
    problem = RepairProblem(weight.shape[1], weight.shape[0], device=weight.device)
    seen, handle = _captured(layer)
    before = 0.0
    try:
        for x, target in zip(cut, targets, strict=True):
            residual = target - _run(block, inputs, x)
            before += residual.double().pow(2).sum().item()
            problem.add(seen["input"], residual)
    finally:
        handle.remove()
    delta = problem.solve(percdamp)
    set_linear_weight(layer, (weight.double() + delta).to(weight.dtype))
    after = sum((t - _run(block, inputs, x)).double().pow(2).sum().item()
                for x, t in zip(cut, targets, strict=True))
    return Repair(index, run, layer_name, before, after, attention=attention)


def cut_blocks(model: nn.Module, removed: list[int]) -> None:
    """Remove the blocks from the model and its config; renumber what indexes the blocks
    (each attention's ``layer_idx`` for the KV cache, ``config.layer_types``)."""
    adapter = adapter_for(model)
    blocks = adapter.decoder_blocks(model)
    kept = [i for i in range(len(blocks)) if i not in set(removed)]
    new = nn.ModuleList([blocks[i] for i in kept])
    for position, block in enumerate(new):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    parent_path, _, name = adapter.blocks.rpartition(".")
    parent = module_at(model, parent_path) if parent_path else model
    setattr(parent, name, new)
    config = model.config
    setattr(config, _layer_count_key(config), len(kept))
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == len(blocks):
        config.layer_types = [types[i] for i in kept]
    if adapter.moe is not None and hasattr(config, "mlp_only_layers"):
        # Qwen-MoE says which blocks are dense by index (and a step): name the kept ones.
        config.mlp_only_layers = [p for p, block in enumerate(new)
                                  if module_at(block, adapter.moe.experts) is None]
        config.decoder_sparse_step = 1


def depth_model(model: nn.Module, calibration: torch.Tensor | None, settings: DepthSettings,
                *, device: str | torch.device = "cpu", batch_size: int = 8,
                progress: bool = True, block_inputs: BlockInputs | None = None,
                log=None, activations: str = "auto") -> tuple[nn.Module, DepthRun]:
    """Score the blocks, choose ``settings.blocks`` of them, repair, cut; the model (changed
    in place) and the run record."""
    start = time.perf_counter()
    device = torch.device(device)
    count = check_depth(model, settings)
    run = DepthRun(settings=settings, blocks_before=count,
                   parameters_before=sum(p.numel() for p in model.parameters()))
    blocks = adapter_for(model).decoder_blocks(model)
    block_inputs = inputs_for_pass(model, blocks, calibration, block_inputs, device, batch_size,
                                   needs="prune-depth (scoring the blocks)")
    run.activations = "cpu" if device.type == "cpu" else str(device)
    run.activation_bytes = block_inputs.nbytes
    with blocks_on(blocks, device):
        t = time.perf_counter()
        run.scores = score_blocks(model, block_inputs, device, kl=settings.score == "kl",
                                  attention=settings.attention > 0, progress=progress)
        run.calibration_seconds = time.perf_counter() - t
        run.removed = choose_blocks(run.scores, settings.blocks, settings.score)
        free = frozenset(i for i, b in enumerate(blocks) if attention_free(b))
        run.attention_removed = choose_attention(run.scores, settings.attention,
                                                 settings.score, run.removed, free)
        if log is not None:
            log(f"removing blocks {run.removed} and the attention of blocks "
                f"{run.attention_removed} (lowest {settings.score})")
        t = time.perf_counter()
        run.repairs = repair_and_cut(model, block_inputs, run.removed, settings, device,
                                     attention=run.attention_removed, progress=progress)
        run.solver_seconds = time.perf_counter() - t
    run.blocks_after = len(adapter_for(model).decoder_blocks(model))
    run.parameters_after = sum(p.numel() for p in model.parameters())
    run.total_seconds = time.perf_counter() - start
    run.peak_memory_bytes = peak_bytes(device)
    return model, run


def depth_report(run: DepthRun) -> dict:
    """The report's ``depth`` section: every block's scores, what was removed and repaired."""
    def finite(value):
        return value if value is not None and math.isfinite(value) else None

    return {
        "score": run.settings.score,
        "blocks_before": run.blocks_before, "blocks_after": run.blocks_after,
        "removed": run.removed, "attention_removed": run.attention_removed,
        "parameters_before": run.parameters_before, "parameters_after": run.parameters_after,
        "scores": [{"block": s.index, "angular_distance": s.angular,
                    "block_influence": s.influence, "kl": finite(s.kl),
                    "attention_angular_distance": finite(s.attention_angular),
                    "attention_kl": finite(s.attention_kl)} for s in run.scores],
        "repairs": [{"block": r.block if r.block >= 0 else None, "removed_after": list(r.removed),
                     "attention_removed": r.attention,
                     "layer": r.layer or None, "stream_error_before": finite(r.error_before),
                     "stream_error_after": finite(r.error_after),
                     "not_repaired_because": r.reason or None} for r in run.repairs],
    }
