"""Mixture-of-experts blocks, seen as what they are to a solver: one small MLP per expert.

transformers 5 stores a block's experts fused, ``gate_up_proj`` (experts × 2·width × hidden)
and ``down_proj`` (experts × hidden × width), and routes each token to its top-k experts. A
pruning method needs each expert's own statistics: the Hessian of exactly the tokens routed to
it. ``unfold_experts`` replaces a fused experts module by ``ExpertLinears``, the same
computation (transformers' eager loop, expert by expert, in the same order) written with one
``nn.Linear`` per projection and expert, named as the checkpoints on the Hub name them
(``mlp.experts.3.gate_proj``). Every hook-based statistic, every method and every quantiser then
works on experts as on dense layers, each seeing only its routed tokens. ``folded`` gives the
fused layout back for saving.

An expert that saw fewer than ``min_tokens`` routed tokens would be pruned on a rank-deficient
(or empty) Hessian; it gets the statistics of every calibration token sent through it instead
(``all-experts``, as llm-compressor calibrates), stated per expert in the run's record.
``--moe-calibration all-experts`` does that for every expert.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..engine import determinism
from ..errors import SnapPruneError
from . import collectives

CALIBRATIONS = ("routed", "all-experts")
MIN_TOKENS = 16
"""Routed tokens below which an expert's statistics come from every token instead."""

INPUT_PROJECTIONS = ("gate_proj", "up_proj", "w1", "w3")
OUTPUT_PROJECTIONS = ("down_proj", "w2")


@dataclass(frozen=True)
class MoE:
    """Where a family keeps its mixture, relative to a block. ``router``: the module scoring
    experts (never pruned); ``experts``: the experts (fused or a list of per-expert MLPs);
    ``count_key``: the config field with the number of experts; ``never_prune``: other
    gates (Qwen2-MoE's shared-expert gate)."""

    router: str
    experts: str
    count_key: str
    top_k_key: str = "num_experts_per_tok"
    never_prune: tuple[str, ...] = ()
    stored_router: str = ""
    """Where the family's checkpoints keep the router and the experts when not where the
    model does (Mixtral: ``block_sparse_moe.gate``), and the stored names of an expert's
    gate, up and down projections (Mixtral: ``w1``, ``w3``, ``w2``)."""
    stored_experts: str = ""
    stored_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    stored_fused: bool = False
    """The family's checkpoints keep each block's experts fused, as its model does (gpt-oss):
    there are no per-expert tensors to stream or to write under per-expert names."""

    def _renames(self) -> list[tuple[str, str]]:
        """(model's, checkpoint's) name fragments, as regular expressions' pieces."""
        experts = self.stored_experts or self.experts
        pairs = [(rf"\.{re.escape(self.experts)}\.(\d+)\.{model}\.",
                  rf".{experts}.\1.{stored}.")
                 for model, stored in zip(("gate_proj", "up_proj", "down_proj"),
                                          self.stored_projections, strict=True)]
        if self.stored_router:
            pairs.append((rf"\.{re.escape(self.router)}\.", f".{self.stored_router}."))
        return pairs

    def stored_name(self, name: str) -> str:
        """A model-relative tensor name as the family's checkpoints spell it."""
        for model, stored in self._renames():
            name = re.sub(model, stored, name)
        return name

    def model_name(self, stored: str) -> str:
        """A checkpoint's tensor name as the (unfolded) model spells it."""
        experts = re.escape(self.stored_experts or self.experts)
        for model, projection in zip(("gate_proj", "up_proj", "down_proj"),
                                     self.stored_projections, strict=True):
            stored = re.sub(rf"\.{experts}\.(\d+)\.{projection}\.",
                            rf".{self.experts}.\1.{model}.", stored)
        if self.stored_router:
            stored = stored.replace(f".{self.stored_router}.", f".{self.router}.")
        return stored

    def roles(self, block: nn.Module) -> dict[str, str]:
        """Block-relative name → role of every expert projection in ``block`` (none in a dense
        block of a mixed model)."""
        pattern = re.compile(re.escape(self.experts) + r"\.(\d+)\.(\w+)$")
        roles = {}
        for name, module in block.named_modules():
            found = pattern.match(name)
            if found and isinstance(module, nn.Linear):
                if found.group(2) in INPUT_PROJECTIONS:
                    roles[name] = "expert.in"
                elif found.group(2) in OUTPUT_PROJECTIONS:
                    roles[name] = "expert.out"
        return roles


@dataclass(frozen=True)
class CalibrationPolicy:
    """How experts' statistics are gathered: ``routed`` (each expert's own tokens, with
    ``min_tokens`` as the floor below which it falls back to every token) or ``all-experts``
    (every token through every expert, for statistics only: the block's output stays routed)."""

    mode: str = "routed"
    min_tokens: int = MIN_TOKENS

    def check(self) -> CalibrationPolicy:
        if self.mode not in CALIBRATIONS:
            raise SnapPruneError(f"unknown MoE calibration {self.mode!r}; use "
                                 f"{', '.join(CALIBRATIONS)}")
        if self.min_tokens < 1:
            raise SnapPruneError(f"--moe-min-tokens must be at least 1, got {self.min_tokens}")
        return self


_POLICY = [CalibrationPolicy()]


def current_policy() -> CalibrationPolicy:
    return _POLICY[-1]


@contextlib.contextmanager
def calibration(mode: str = "routed", min_tokens: int = MIN_TOKENS) -> Iterator[None]:
    """Gather experts' statistics in the body by ``mode`` (see ``CalibrationPolicy``)."""
    _POLICY.append(CalibrationPolicy(mode, min_tokens).check())
    try:
        yield
    finally:
        _POLICY.pop()


class Expert(nn.Module):
    """One expert: ``down(act(gate(x)) · up(x))``, or where the family gates its own way
    (gpt-oss's clamped SwiGLU), ``down(glu(gate(x), up(x)))`` with the family's own function
    applied to the two interleaved as its fused module keeps them."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn,
                 glu=None) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.act_fn = act_fn
        self.glu = glu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.glu is None:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        pairs = torch.stack((self.gate_proj(x), self.up_proj(x)), dim=-1).flatten(-2)
        return self.down_proj(self.glu(pairs))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta",
                      dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return layer


def _interleaved(fused: nn.Module) -> bool:
    """gpt-oss's layout: ``gate_up_proj`` (experts × hidden × 2·width) with gate and up in
    alternate columns, biases beside each, and its own gating function."""
    return hasattr(fused, "gate_up_proj_bias") and callable(getattr(fused, "_apply_gate", None))


class ExpertLinears(nn.Module):
    """A block's experts as per-expert ``Expert`` modules (children ``"0"``, ``"1"``, …), with
    the fused module's call signature ``(hidden_states, top_k_index, top_k_weights)``.

    While gathering statistics it counts each expert's routed tokens (``tokens``) and sends
    every token through the experts in ``all_tokens`` (their outputs are then read only at
    the routed tokens, so the block's output does not change)."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        gate_up, down = fused.gate_up_proj, fused.down_proj
        self.interleaved = _interleaved(fused)
        if gate_up.dim() != 3 or down.dim() != 3 or (not self.interleaved and (
                getattr(fused, "is_transposed", False)
                or not getattr(fused, "is_concatenated", True)
                or getattr(fused, "has_bias", False))):
            raise SnapPruneError(
                f"{type(fused).__name__} stores its experts in a layout snapprune does not "
                "read (transposed, interleaved or with biases); this family is not supported")
        self.num_experts = gate_up.shape[0]
        for e in range(self.num_experts):
            if self.interleaved:  # stored (in, out): gate and up in alternate columns
                gu, bias = gate_up[e].T, fused.gate_up_proj_bias[e]
                expert = Expert(_linear(gu[0::2], bias[0::2]), _linear(gu[1::2], bias[1::2]),
                                _linear(down[e].T, fused.down_proj_bias[e]), None,
                                glu=fused._apply_gate)
            else:
                width = gate_up.shape[1] // 2
                expert = Expert(_linear(gate_up[e, :width]), _linear(gate_up[e, width:]),
                                _linear(down[e]), fused.act_fn)
            self.add_module(str(e), expert)
        # The fused module is kept, emptied, to be filled again by ``fold``.
        for name in ("gate_up_proj", "down_proj") + (
                ("gate_up_proj_bias", "down_proj_bias") if self.interleaved else ()):
            setattr(fused, name, nn.Parameter(gate_up.new_empty(0), requires_grad=False))
        object.__setattr__(self, "fused", fused)
        self.order = list(range(self.num_experts))
        """The expert at each routing position: the router's row ``p`` scores ``order[p]``
        (the identity, except while ``prune-experts`` measures a removal)."""
        self.tokens = [0] * self.num_experts
        self.all_tokens: frozenset[int] = frozenset()
        self.window: int | None = None
        """Tokens per calibration window while deterministic statistics are gathered."""

    def __getitem__(self, index: int) -> Expert:
        return self._modules[str(index)]

    def __len__(self) -> int:
        return self.num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        # One host sync for all experts (not one per expert): the routed (token, slot) pairs
        # sorted by expert, each expert's in token order, and their counts.
        counts = torch.bincount(flat, minlength=len(self.order)).tolist()
        picks = torch.split(torch.argsort(flat, stable=True), counts)
        for position, e in enumerate(self.order):
            token, slot = picks[position] // k, picks[position] % k
            self.tokens[e] += counts[position]
            if e in self.all_tokens:
                y = self._windowed(e, hidden_states, None)[token]
            elif counts[position]:
                y = self._windowed(e, hidden_states, token)
            else:
                continue
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    def _windowed(self, e: int, hidden: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Expert ``e`` on ``hidden[rows]`` (every row when ``None``). While ``window`` is set
        (deterministic mode, during statistics) it runs one calibration window's rows at a
        time, so its layers' statistics are reduced window by window, as a dense layer's are:
        the same sums for any batch size."""
        if not self.window:
            return self[e](hidden if rows is None else hidden[rows])
        if rows is None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
        starts = torch.arange(self.window, hidden.shape[0], self.window, device=rows.device)
        chunks = torch.tensor_split(rows, torch.searchsorted(rows, starts).tolist())
        # each window's rows as one (1, tokens, hidden) window: its statistics see one window
        return torch.cat([self[e](hidden[chunk][None])[0] for chunk in chunks if chunk.numel()])

    def keep(self, kept: list[int]) -> None:
        """Only the experts ``kept`` remain, in that order, renumbered from 0 (the router's
        rows must be cut to the same list)."""
        experts = [self[e] for e in kept]
        for key in list(self._modules):
            del self._modules[key]
        for position, expert in enumerate(experts):
            self.add_module(str(position), expert)
        self.num_experts = len(experts)
        self.order = list(range(self.num_experts))
        self.tokens = [0] * self.num_experts

    def fold(self) -> nn.Module:
        """The fused module, holding the current weights again."""
        experts = [self[e] for e in range(self.num_experts)]
        fused = {}
        if self.interleaved:
            def alternate(gate, up):
                return torch.stack((gate, up), dim=-1).flatten(-2)

            fused["gate_up_proj"] = torch.stack([alternate(x.gate_proj.weight.T,
                                                           x.up_proj.weight.T) for x in experts])
            fused["gate_up_proj_bias"] = torch.stack([alternate(x.gate_proj.bias, x.up_proj.bias)
                                                      for x in experts])
            fused["down_proj"] = torch.stack([x.down_proj.weight.T for x in experts])
            fused["down_proj_bias"] = torch.stack([x.down_proj.bias for x in experts])
        else:
            fused["gate_up_proj"] = torch.stack([torch.cat([x.gate_proj.weight,
                                                            x.up_proj.weight]) for x in experts])
            fused["down_proj"] = torch.stack([x.down_proj.weight for x in experts])
        for name, value in fused.items():
            setattr(self.fused, name, nn.Parameter(value.detach().contiguous(),
                                                   requires_grad=False))
        self.fused.num_experts = self.num_experts
        return self.fused


def _is_fused(module: nn.Module | None) -> bool:
    return isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) and \
        isinstance(getattr(module, "down_proj", None), torch.Tensor)


def _parent(block: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, leaf = path.rpartition(".")
    return (block.get_submodule(head) if head else block), leaf


def unfold_experts(blocks: nn.ModuleList, moe: MoE) -> None:
    """Replace every fused experts module in ``blocks`` by ``ExpertLinears`` (idempotent;
    blocks whose MLP is dense are left alone)."""
    for block in blocks:
        parent, leaf = _parent_or_none(block, moe.experts)
        if parent is not None and _is_fused(getattr(parent, leaf, None)):
            with torch.no_grad():
                setattr(parent, leaf, ExpertLinears(getattr(parent, leaf)))


def _parent_or_none(block: nn.Module, path: str) -> tuple[nn.Module | None, str]:
    try:
        return _parent(block, path)
    except AttributeError:
        return None, ""


def fold_experts(blocks: nn.ModuleList, moe: MoE) -> None:
    """The fused layout again, with the current weights (what transformers saves)."""
    for block in blocks:
        parent, leaf = _parent_or_none(block, moe.experts)
        module = getattr(parent, leaf, None) if parent is not None else None
        if isinstance(module, ExpertLinears):
            with torch.no_grad():
                setattr(parent, leaf, module.fold())


def in_block(block: nn.Module) -> list[ExpertLinears]:
    return [m for m in block.modules() if isinstance(m, ExpertLinears)]


def _expert_of(name: str) -> tuple[str, int] | None:
    """``(experts module path, expert index)`` of an expert projection's name."""
    found = re.search(r"^(.*)\.(\d+)\.\w+$", name)
    return (found.group(1), int(found.group(2))) if found else None


def gather_with_experts(block: nn.Module, named: dict[str, nn.Module], gather) -> tuple[
        dict, list[dict]]:
    """``gather(layers)`` (the block's statistics pass) under the calibration policy: every
    expert's routed tokens counted, starved experts (fewer than ``min_tokens``) gathered again
    with every token. Returns the statistics and, per experts module, one record per expert:
    ``{"expert", "tokens", "statistics"}`` (``routed`` or ``all tokens``)."""
    modules = in_block(block)
    if not modules:
        return gather(named), []
    if collectives.current().active:
        raise SnapPruneError("a mixture of experts is calibrated in one process (each rank "
                             "would see other routed tokens); run it without torchrun")
    policy = current_policy()
    paths = {id(m): n for n, m in block.named_modules() if isinstance(m, ExpertLinears)}
    hooks = []
    for module in modules:
        module.tokens = [0] * module.num_experts
        module.all_tokens = (frozenset(range(module.num_experts))
                             if policy.mode == "all-experts" else frozenset())
        if determinism.enabled():  # the mixture's input is (windows, tokens, hidden)
            mixture = block.get_submodule(paths[id(module)].rpartition(".")[0])
            hooks.append(mixture.register_forward_pre_hook(
                lambda _m, args, kwargs, module=module: setattr(
                    module, "window", (args[0] if args else kwargs["hidden_states"]).shape[-2]),
                with_kwargs=True))
    try:
        stats = gather(named)
        routed = {id(m): list(m.tokens) for m in modules}
        starved = {id(m): frozenset(e for e, n in enumerate(routed[id(m)])
                                    if n < policy.min_tokens) for m in modules}
        if policy.mode == "routed" and any(starved.values()):
            for module in modules:
                module.all_tokens = starved[id(module)]
            again = {}
            for name, layer in named.items():
                where = _owner(name, block, paths)
                if where is not None and where[1] in starved[where[0]]:
                    again[name] = layer
            if again:
                stats.update(gather(again))
    finally:
        for module in modules:
            module.all_tokens = frozenset()
            module.window = None
        for handle in hooks:
            handle.remove()
    records = []
    for module in modules:
        full = policy.mode == "all-experts"
        records.append({"experts": paths[id(module)], "per_expert": [
            {"expert": e, "tokens": n,
             "statistics": "all tokens" if full or e in starved[id(module)] else "routed"}
            for e, n in enumerate(routed[id(module)])]})
    return stats, records


def _owner(name: str, block: nn.Module, paths: dict[int, str]) -> tuple[int, int] | None:
    """``(id of its ExpertLinears, expert index)`` for a layer named model-relative."""
    found = _expert_of(name)
    if found is None:
        return None
    for key, path in paths.items():
        if found[0].endswith("." + path) or found[0] == path:
            return key, found[1]
    return None


def expert_count(config, moe: MoE) -> int:
    count = getattr(config, moe.count_key, None)
    if not isinstance(count, int) or count < 1:
        raise SnapPruneError(f"{type(config).__name__} does not say how many experts it has "
                             f"({moe.count_key})")
    return count
