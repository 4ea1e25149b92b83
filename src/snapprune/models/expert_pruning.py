"""Whole experts removed from a mixture of experts: scored on calibration text, counted per
block to a global budget, cut out with their router rows.

One pass of the dense model, block by block, measures for each block's experts:

- ``tokens``: how many calibration tokens the router sent to each (its frequency);
- ``reap``: REAP's saliency (Lasby et al. 2025): the mean, over the expert's routed tokens, of
  its router weight times the norm of its output, ``mean_t g_e(x_t)·‖E_e(x_t)‖``;
- ``error`` (with ``score="error"``): the measured cost of removing that expert alone.

A cost is measured, never modelled: the block's mixture is run again on every token with the
removed experts gone from the router (exactly what the cut model does, their logits at −∞;
without top-k renormalisation every token's weights change, not only the re-routed tokens'),
and the change of each token's output is taken relative to the block's
output at that token, ``Σ_t ‖y'_t − y_t‖² / ‖out_t‖²`` over all tokens, divided by their
number. Each block's curve — the cost of removing its ``k`` lowest-ranked experts — feeds the
``sensitivity`` allocation, an exact dynamic programme (``engine.widths.allocate_counts``) for
the least summed cost at the total the budget names. ``uniform`` removes the same count from
every block (as llm-compressor's REAP does).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine.widths import CostCurve, allocate_counts
from ..errors import SnapPruneError
from ..memory import peak_bytes
from .adapters import Adapter, adapter_for, module_at
from .blockloop import block_output
from .capture import BlockInputs, blocks_on, inputs_for_pass
from .experts import ExpertLinears, expert_count
from .records import RunRecord
from .settings import ExpertSettings

CURVE_POINTS = 12
"""Removal counts measured per block beyond 0 when a block may lose more experts than this
(all counts otherwise); the curve is linear between them."""


@dataclass
class BlockExperts:
    """One mixture block's measurements and what was removed from it."""

    index: int
    tokens: list[int]
    reap: list[float]
    errors: list[float] | None
    ranking: list[int]
    """Experts from least to most useful by the run's score."""
    curve: CostCurve
    removed: list[int] = field(default_factory=list)
    merged_into: dict[int, int] = field(default_factory=dict)


@dataclass(kw_only=True)
class ExpertRun(RunRecord):
    settings: ExpertSettings
    blocks: list[BlockExperts] = field(default_factory=list)
    experts_before: int = 0
    experts_after: int = 0
    top_k: int = 0
    parameters_before: int = 0
    parameters_after: int = 0

    @property
    def counts(self) -> list[int]:
        """Experts kept per mixture block."""
        return [len(b.tokens) - len(b.removed) for b in self.blocks]

    @property
    def uniform(self) -> bool:
        return len(set(self.counts)) <= 1


def _moe_blocks(model: nn.Module, adapter: Adapter) -> list[int]:
    blocks = adapter.decoder_blocks(model)
    return [i for i, block in enumerate(blocks)
            if isinstance(module_at(block, adapter.moe.experts), ExpertLinears)]


def plan_counts(model: nn.Module, settings: ExpertSettings) -> tuple[int, int, int]:
    """``(experts per block, router top-k, experts removed in all)``, refused in one line
    when the budget leaves a block fewer experts than the router picks per token."""
    adapter = adapter_for(model)
    if adapter.moe is None:
        raise SnapPruneError(f"{type(model).__name__} is not a mixture of experts; "
                             "prune-experts removes experts (use prune, shrink or prune-depth)")
    groups = getattr(model.config, "n_group", None) or 1
    if groups > 1:
        raise SnapPruneError(f"this router picks experts group by group (n_group = {groups}), "
                             "and removing experts would unbalance its groups: prune-experts "
                             "handles routers of one group; prune or quantise the experts "
                             "instead")
    experts = expert_count(model.config, adapter.moe)
    top_k = int(getattr(model.config, adapter.moe.top_k_key))
    blocks = len(_moe_blocks(model, adapter))
    per_block = settings.removed_per_block(experts)
    total = round(per_block * blocks)
    if settings.allocation == "uniform":
        total = round(per_block) * blocks
    if total < 1:
        raise SnapPruneError(f"the budget removes no expert of {experts} per block; keep less "
                             "or remove at least 1")
    if experts - math.ceil(total / blocks) < top_k:
        raise SnapPruneError(
            f"removing {total / blocks:g} of {experts} experts per block leaves fewer than the "
            f"{top_k} the router picks per token; keep at least {top_k} "
            f"(--keep {top_k / experts:.3g} or more)")
    return experts, top_k, total


@contextlib.contextmanager
def without(block: nn.Module, adapter: Adapter, removed: list[int]) -> Iterator[None]:
    """The block with ``removed`` experts gone for the body: the router scores only the others
    (its rows cut, as ``cut_experts`` cuts them) and the experts route by the same list."""
    router = block.get_submodule(adapter.moe.router)
    experts: ExpertLinears = block.get_submodule(adapter.moe.experts)
    kept = [e for e in range(experts.num_experts) if e not in set(removed)]
    saved = {n: t for n, t in [*router.named_parameters(recurse=False),
                               *router.named_buffers(recurse=False)]}
    counts = {a: getattr(router, a) for a in ("num_experts", "n_routed_experts")
              if isinstance(getattr(router, a, None), int)}
    _keep_router_rows(router, kept, experts.num_experts)
    experts.order = kept
    try:
        yield
    finally:
        for name, tensor in {**saved, **counts}.items():
            setattr(router, name, tensor)
        experts.order = list(range(experts.num_experts))


@dataclass
class _Batch:
    moe_input: torch.Tensor
    moe_output: torch.Tensor
    """The mixture's output with every expert, by the same call as each removal's."""
    routes: torch.Tensor
    weight: torch.Tensor
    """Per token, ``1/‖out_t‖²``: its change is measured relative to the block's output."""


def _mixture_path(adapter: Adapter) -> str:
    return adapter.moe.experts.rpartition(".")[0]


def _mixture_call(mixture: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The mixture's output for ``tokens`` (tokens × hidden), as one sequence."""
    out = mixture(tokens[None])
    return (out[0] if isinstance(out, tuple) else out)[0]


def _cost(block: nn.Module, adapter: Adapter, batches: list[_Batch], removed: list[int],
          tokens: int) -> float:
    """The measured cost of removing ``removed`` from ``block`` (see the module's text)."""
    if not removed:
        return 0.0
    mixture = block.get_submodule(_mixture_path(adapter))
    total = 0.0
    with without(block, adapter, removed):
        for batch in batches:
            # Every token, not only those routed to a removed expert: without top-k
            # renormalisation (Qwen2-MoE, OLMoE) a removal changes every token's softmax.
            changed = _mixture_call(mixture, batch.moe_input)
            delta = (changed.float() - batch.moe_output.float()).pow(2).sum(-1)
            total += float((delta * batch.weight).sum())
    return total / tokens


def _curve_counts(limit: int, wanted: int | None) -> list[int]:
    if wanted is not None:
        return [0, wanted] if wanted else [0]
    if limit <= CURVE_POINTS:
        return list(range(limit + 1))
    return sorted({round(limit * i / CURVE_POINTS) for i in range(CURVE_POINTS + 1)})


@torch.no_grad()
def score_experts(model: nn.Module, block_inputs: BlockInputs, settings: ExpertSettings,
                  device: torch.device, *, top_k: int, uniform_count: int | None,
                  progress: bool = True) -> list[BlockExperts]:
    """Every mixture block's measurements on the dense model (see the module's text);
    ``uniform_count``: the one count the uniform allocation needs measured (else a curve)."""
    adapter = adapter_for(model)
    blocks = adapter.decoder_blocks(model)
    inputs = BlockInputs(list(block_inputs.batches), block_inputs.calls)
    out: list[BlockExperts] = []
    seen: dict[str, tuple] = {}  # what the hooks saw in the batch just run
    for index in tqdm(range(len(blocks)), desc="score experts", unit="block",
                      disable=not progress):
        block = blocks[index]
        with blocks_on([block], device):  # one block on the device at a time
            scored = _score_block(block, index, adapter, inputs, settings, device, seen,
                                  top_k=top_k, uniform_count=uniform_count)
        if scored is not None:
            out.append(scored)
    return out


def _score_block(block: nn.Module, index: int, adapter: Adapter, inputs: BlockInputs,
                 settings: ExpertSettings, device: torch.device, seen: dict, *, top_k: int,
                 uniform_count: int | None) -> BlockExperts | None:
    """One block's measurements (``None`` for a dense block); ``inputs`` move on past it."""
    experts = module_at(block, adapter.moe.experts)
    if not isinstance(experts, ExpertLinears):
        inputs.batches = [block_output(inputs.run(block, x.to(device)))
                          for x in inputs.batches]
        return None
    n = experts.num_experts
    mixture = block.get_submodule(_mixture_path(adapter))
    hooks = [mixture.register_forward_hook(
                 lambda _m, args, _output: seen.__setitem__("mixture", args)),
             experts.register_forward_pre_hook(
                 lambda _m, args: seen.__setitem__("routes", args))]
    batches: list[_Batch] = []
    tokens = [0] * n
    reap = [0.0] * n
    try:
        outputs = []
        for x in inputs.batches:
            result = block_output(inputs.run(block, x.to(device)))
            outputs.append(result)
            moe_in = seen["mixture"][0]
            hidden, routes, gates = seen["routes"]
            for e in range(n):
                token, slot = torch.where(routes == e)
                tokens[e] += token.numel()
                if token.numel():
                    norms = experts[e](hidden[token]).float().norm(dim=-1)
                    reap[e] += float((gates[token, slot].float() * norms).sum())
            scale = result.reshape(-1, result.shape[-1]).float().pow(2).sum(-1)
            moe_in = moe_in.reshape(-1, moe_in.shape[-1])
            # The reference is the same call _cost makes, with every expert: a change is
            # then the removal's, never a different batch shape's rounding.
            batches.append(_Batch(moe_in, _mixture_call(mixture, moe_in), routes,
                                  1.0 / scale.clamp_min(torch.finfo(torch.float32).tiny)))
    finally:
        for handle in hooks:
            handle.remove()
    count = sum(b.routes.shape[0] for b in batches)
    reap = [r / t if t else 0.0 for r, t in zip(reap, tokens, strict=True)]
    errors = ([_cost(block, adapter, batches, [e], count) for e in range(n)]
              if settings.score == "error" else None)
    key = {"reap": reap, "frequency": tokens, "error": errors}[settings.score]
    ranking = sorted(range(n), key=lambda e: (key[e], e))
    counts = _curve_counts(n - top_k, uniform_count)
    costs = [_cost(block, adapter, batches, ranking[:k], count) for k in counts]
    inputs.batches = outputs
    return BlockExperts(index, tokens, reap, errors, ranking,
                        CostCurve(tuple(counts), tuple(costs)))


def _merge(experts: ExpertLinears, removed: list[int], kept: list[int], tokens: list[int],
           ) -> dict[int, int]:
    """Each removed expert averaged into the kept one whose weights are most similar (cosine
    of the concatenated projections), weighted by routed tokens; ``{removed: kept}``."""
    def flat(e: int) -> torch.Tensor:
        return torch.cat([p.detach().float().reshape(-1) for p in experts[e].parameters()])

    kept_vectors = torch.stack([flat(e) for e in kept])
    kept_vectors = kept_vectors / kept_vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    into = {}
    for r in removed:
        vector = flat(r)
        into[r] = kept[int((kept_vectors @ (vector / vector.norm().clamp_min(1e-12))).argmax())]
    for target in set(into.values()):
        group = [target] + [r for r, t in into.items() if t == target]
        weights = torch.tensor([float(max(tokens[e], 1)) for e in group])
        weights = weights / weights.sum()
        for name, param in experts[target].named_parameters():
            merged = sum(w * experts[e].get_parameter(name).detach().float()
                         for w, e in zip(weights, group, strict=True))
            param.data.copy_(merged.to(param.dtype))
    return into


def _keep_router_rows(router: nn.Module, kept: list[int], count: int) -> None:
    """The router scores only the ``kept`` experts: every tensor of its with a row per expert
    (the weight; a sigmoid router's score-correction bias) keeps those rows."""
    for name, tensor in [*router.named_parameters(recurse=False),
                         *router.named_buffers(recurse=False)]:
        if tensor.dim() >= 1 and tensor.shape[0] == count:
            rows = tensor.data[kept].clone()
            setattr(router, name, nn.Parameter(rows, requires_grad=tensor.requires_grad)
                    if isinstance(tensor, nn.Parameter) else rows)
    for attribute in ("num_experts", "n_routed_experts"):
        if isinstance(getattr(router, attribute, None), int):
            setattr(router, attribute, len(kept))


def cut_experts(model: nn.Module, removed: dict[int, list[int]], *, merge: bool = False,
                tokens: dict[int, list[int]] | None = None) -> dict[int, dict[int, int]]:
    """Remove experts (``{block: [expert, ...]}``) and their router rows; the config names the
    new count when every mixture block keeps the same number. Returns the merges made."""
    adapter = adapter_for(model)
    blocks = adapter.decoder_blocks(model)
    merges = {}
    counts = set()
    for index in _moe_blocks(model, adapter):
        block = blocks[index]
        experts: ExpertLinears = block.get_submodule(adapter.moe.experts)
        gone = set(removed.get(index, []))
        kept = [e for e in range(experts.num_experts) if e not in gone]
        if merge and gone:
            merges[index] = _merge(experts, sorted(gone), kept, (tokens or {})[index])
        _keep_router_rows(block.get_submodule(adapter.moe.router), kept,
                          experts.num_experts)
        experts.keep(kept)
        counts.add(len(kept))
    setattr(model.config, adapter.moe.count_key, max(counts))
    if isinstance(getattr(model, "num_experts", None), int):
        # transformers' *ForCausalLM keeps its own copy for the router's auxiliary loss
        model.num_experts = max(counts)
    return merges


def prune_experts(model: nn.Module, calibration: torch.Tensor | None,
                  settings: ExpertSettings, *, device: str | torch.device = "cpu",
                  batch_size: int = 8, progress: bool = True,
                  block_inputs: BlockInputs | None = None, log=None,
                  activations: str = "auto") -> tuple[nn.Module, ExpertRun]:
    """Score, allocate, cut (in place); the model and the run record."""
    start = time.perf_counter()
    device = torch.device(device)
    experts, top_k, total = plan_counts(model, settings)
    adapter = adapter_for(model)
    moe_blocks = _moe_blocks(model, adapter)
    run = ExpertRun(settings=settings, top_k=top_k, experts_before=experts * len(moe_blocks),
                    parameters_before=sum(p.numel() for p in model.parameters()))
    blocks = adapter.decoder_blocks(model)
    block_inputs = inputs_for_pass(model, blocks, calibration, block_inputs, device, batch_size,
                                   needs="scoring the experts")
    run.activations = "cpu" if device.type == "cpu" else str(device)
    run.activation_bytes = block_inputs.nbytes
    uniform = total // len(moe_blocks) if settings.allocation == "uniform" else None
    t = time.perf_counter()
    run.blocks = score_experts(model, block_inputs, settings, device, top_k=top_k,
                               uniform_count=uniform, progress=progress)
    run.calibration_seconds = time.perf_counter() - t
    counts = ([uniform] * len(run.blocks) if uniform is not None
              else allocate_counts([b.curve for b in run.blocks], total))
    for block, count in zip(run.blocks, counts, strict=True):
        block.removed = sorted(block.ranking[:count])
    merges = cut_experts(model, {b.index: b.removed for b in run.blocks},
                         merge=settings.merge,
                         tokens={b.index: b.tokens for b in run.blocks})
    for block in run.blocks:
        block.merged_into = merges.get(block.index, {})
    if log is not None:
        log("experts removed per block: " + ", ".join(
            f"{b.index}: {len(b.removed)}" for b in run.blocks))
    run.experts_after = sum(run.counts)
    run.parameters_after = sum(p.numel() for p in model.parameters())
    run.total_seconds = time.perf_counter() - start
    run.peak_memory_bytes = peak_bytes(device)
    return model, run


def experts_report(run: ExpertRun) -> dict:
    """The report's ``experts_removed`` section: every block's measurements and cut."""
    return {
        "score": run.settings.score, "allocation": run.settings.allocation,
        "merge": run.settings.merge, "top_k": run.top_k,
        "experts_before": run.experts_before, "experts_after": run.experts_after,
        "kept_per_block": run.counts, "uniform": run.uniform,
        "parameters_before": run.parameters_before, "parameters_after": run.parameters_after,
        "blocks": [{"block": b.index, "removed": b.removed,
                    "merged_into": {str(k): v for k, v in b.merged_into.items()},
                    "tokens": b.tokens, "reap": b.reap, "errors": b.errors,
                    "ranking": b.ranking,
                    "cost_curve": {"removed": list(b.curve.counts),
                                   "cost": list(b.curve.costs)}} for b in run.blocks],
    }
