"""What a structure costs, and the structures a budget search tries.

A *structure* is the dense model with whole decoder blocks removed, attention sub-layers
removed from some kept blocks, and every kept block's MLP at a smaller width. Its cost is
counted in three currencies from the dense model's own modules (no formula per family):

- parameters;
- GGUF bytes under a plain llama.cpp type (the decoder's matrices at that type, the token
  embedding and an untied output matrix at ``q8_0`` as snapprune writes them with a plain
  type, vectors in float32, plus the file's metadata);
- bytes read per generated token, what bounds decode speed on a memory-bound machine: every
  matrix and vector of the blocks and the output matrix (with a tied embedding, the whole
  embedding), not the untied token embedding (one row per token).

The cost of a structure is linear in the kept blocks, the kept attention sub-layers and the
MLP width (a width that is a multiple of the type's block), so the grid below is exact
arithmetic. ``grid`` spreads the budget over depth and attention: for each number of blocks
removed (from none to what depth alone needs), each number of attention sub-layers (from none
to what the rest needs), the MLP width fills what remains of the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..engine.mixes import PLAIN_EMBEDDING_TYPE, fallback
from ..engine.schemes import parse_scheme
from ..errors import SnapPruneError
from .adapters import adapter_for, module_at
from .depth import ATTENTION_NORM
from .layout import input_width, is_prunable, linear_weight

VECTOR_BYTES = 4
"""Norms and biases: float32 in the GGUF file."""


@dataclass(frozen=True)
class Cost:
    """A model part's parameters, GGUF bytes and bytes read per generated token."""

    params: int = 0
    bytes: int = 0
    read: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.bytes + other.bytes,
                    self.read + other.read)

    def __mul__(self, k: int) -> Cost:
        return Cost(self.params * k, self.bytes * k, self.read * k)

    __rmul__ = __mul__

    def __sub__(self, other: Cost) -> Cost:
        return self + other * -1


@dataclass(frozen=True)
class Structure:
    """Blocks removed, attention sub-layers removed (of the kept blocks), MLP width kept, and
    query heads removed per key/value group in every block that keeps its attention."""

    blocks: int
    attention: int
    width: int
    heads: int = 0


@dataclass(frozen=True)
class Geometry:
    """The dense model's costs by part (every block alike), as ``cost`` combines them."""

    blocks: int
    fixed: Cost
    """Embeddings, output matrix, final norm, metadata."""
    attention: Cost
    """One block's attention sub-layer."""
    other: Cost
    """One block's remaining vectors (norms) and the MLP output projection's bias."""
    unit: Cost
    """One MLP neuron: its rows of the input projections, its column of the output one."""
    units: int
    step: int
    """MLP widths are multiples of this (``multiple_of``, and the type's block)."""
    head: Cost = Cost()
    """One query head: its rows of the query projection, its columns of the output one."""
    groups: int = 1
    """Key/value heads: a head cut removes ``heads`` query heads from each."""
    per_group: int = 1
    """Query heads per key/value head (a cut keeps at least one)."""

    def cost(self, structure: Structure) -> Cost:
        kept = self.blocks - structure.blocks
        attended = kept - structure.attention
        return (self.fixed + kept * (self.other + self.unit * structure.width + self.attention)
                - self.attention * structure.attention
                - self.head * (structure.heads * self.groups * attended))

    @property
    def dense(self) -> Cost:
        return self.cost(Structure(0, 0, self.units))


@dataclass(frozen=True)
class Budget:
    """A limit in one currency (``params``, ``bytes`` or ``read``)."""

    currency: str
    limit: int

    def fits(self, cost: Cost) -> bool:
        return getattr(cost, self.currency) <= self.limit


def _rate(scheme: str | None, cols: int) -> float:
    """Bytes per weight of a matrix with rows of ``cols`` under ``scheme`` (float16 without)."""
    if scheme is None:
        return 2.0
    block = parse_scheme(scheme).block
    if cols % block.span:
        raise SnapPruneError(f"{scheme} cannot hold rows of {cols} inputs (blocks of "
                             f"{block.span}); choose a type whose blocks divide the widths")
    return block.block_bytes / block.span


def _matrix(module: nn.Module, scheme: str | None) -> Cost:
    weight = linear_weight(module)
    rows, cols = weight.shape[0], input_width(module)
    size = round(rows * cols * _rate(scheme, cols))
    bias = getattr(module, "bias", None)
    extra = bias.numel() if bias is not None else 0
    return Cost(rows * cols + extra, size + extra * VECTOR_BYTES, size + extra * VECTOR_BYTES)


def _vectors(module: nn.Module, exclude: set[int]) -> Cost:
    count = sum(p.numel() for p in module.parameters() if id(p) not in exclude)
    return Cost(count, count * VECTOR_BYTES, count * VECTOR_BYTES)


def geometry(model: nn.Module, scheme: str | None = None, *, multiple_of: int = 32,
             metadata: int = 0, embedding: str = PLAIN_EMBEDDING_TYPE) -> Geometry:
    """The dense model's costs by part (``scheme``: a plain llama.cpp type, ``None``:
    float16), measured on its first block; ``metadata``: the GGUF header's bytes;
    ``embedding``: the type of the token embedding and output matrix under ``scheme``."""
    adapter = adapter_for(model)
    if adapter.attention is None or adapter.mlp is None or adapter.moe is not None:
        raise SnapPruneError(f"the {adapter.family} family has no depth and width adapter; "
                             "the structure search supports the LLaMA family")
    blocks = adapter.decoder_blocks(model)
    if len({sum(p.numel() for p in b.parameters()) for b in blocks}) > 1:
        raise SnapPruneError("the blocks differ in shape (a model already cut per block); the "
                             "structure search starts from a model whose blocks are alike")
    block = blocks[0]
    attention_path = adapter.attention.o.rpartition(".")[0]
    attention = module_at(block, attention_path)
    producers, consumer = adapter.mlp_groups(block)[0]
    from .shrink import mlp_width

    units = mlp_width(model.config, adapter)
    matrices = {name: module_at(block, name) for name in (*producers, consumer)}
    attention_layers = [m for m in attention.modules() if is_prunable(m)]
    attention_cost = sum((_matrix(m, scheme) for m in attention_layers), Cost())
    attention_cost += _vectors(attention, {id(p) for m in attention_layers
                                           for p in m.parameters()})
    mlp_cost = sum((_matrix(m, scheme) for m in matrices.values()), Cost())
    consumer_bias = getattr(matrices[consumer], "bias", None)
    bias = consumer_bias.numel() if consumer_bias is not None else 0
    unit_total = mlp_cost - Cost(bias, bias * VECTOR_BYTES, bias * VECTOR_BYTES)
    if any(v % units for v in (unit_total.params, unit_total.bytes)):
        raise SnapPruneError("the MLP's cost is not a whole number per neuron; the structure "
                             "search cannot count this family")
    unit = Cost(unit_total.params // units, unit_total.bytes // units, unit_total.read // units)
    counted = {id(q) for q in attention.parameters()} | {
        id(q) for m in matrices.values() for q in m.parameters()}
    rest = sum(p.numel() for p in block.parameters() if id(p) not in counted) + bias
    other = Cost(rest, rest * VECTOR_BYTES, rest * VECTOR_BYTES)
    # The attention's norm goes with it in the file (llama.cpp's attention-free deci block
    # has none), though the transformers model keeps the (unused) parameters.
    norm = getattr(block, ATTENTION_NORM, None)
    norm_bytes = norm.weight.numel() * VECTOR_BYTES if norm is not None else 0
    attention_cost += Cost(0, norm_bytes, norm_bytes)
    other -= Cost(0, norm_bytes, norm_bytes)
    fixed = _fixed(model, {id(p) for b in blocks for p in b.parameters()},
                   embedding if scheme is not None else None, metadata)
    span = parse_scheme(scheme).block.span if scheme is not None else 1
    head, groups, per_group = _query_head(model, block, adapter, scheme)
    return Geometry(len(blocks), fixed, attention_cost, other, unit, units,
                    math.lcm(multiple_of, span), head, groups, per_group)


def _query_head(model: nn.Module, block: nn.Module, adapter, scheme: str | None
                ) -> tuple[Cost, int, int]:
    """One query head's cost (its rows of ``q`` with their bias, its columns of ``o``), the
    key/value groups and the query heads per group; no head cut (``Cost()``) for a family
    whose heads ``shrink`` cannot cut out."""
    from .adapters import head_geometry

    if not adapter.attention.q or adapter.head_dim_key is None:
        return Cost(), 1, 1
    shape = head_geometry(model.config)
    if scheme is not None and shape.head_dim % parse_scheme(scheme).block.span:
        return Cost(), 1, 1  # a cut output projection would leave partial blocks
    q, o = module_at(block, adapter.attention.q), module_at(block, adapter.attention.o)
    rows = _matrix(q, scheme)
    if any(v % shape.heads for v in (rows.params, rows.bytes)):
        return Cost(), 1, 1
    per_head = Cost(rows.params // shape.heads, rows.bytes // shape.heads,
                    rows.read // shape.heads)
    out_rows = linear_weight(o).shape[0]
    columns = out_rows * shape.head_dim
    size = round(columns * _rate(scheme, input_width(o)))
    per_head += Cost(columns, size, size)
    return per_head, shape.kv_heads, shape.heads // shape.kv_heads


def _fixed(model: nn.Module, in_blocks: set[int], embedding_type: str | None, metadata: int
           ) -> Cost:
    """Everything outside the blocks: embeddings and output matrix (at ``embedding_type``, through
    llama.cpp's fallback; float16 for ``None``), vectors; the bytes read per token leave out
    an untied token embedding."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    output_weight = output.weight if output is not None else embedding
    tied = output_weight is embedding
    total = Cost(0, metadata, 0)
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in in_blocks or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() == 2:
            kind = (fallback(embedding_type, p.shape[1], "").scheme if embedding_type
                    else None)
            rate = _rate(kind, p.shape[1])
            size = round(p.numel() * rate)
            read = 0 if (p is embedding and not tied) else size
            total += Cost(p.numel(), size, read)
        else:
            total += Cost(p.numel(), p.numel() * VECTOR_BYTES, p.numel() * VECTOR_BYTES)
    return total


def widest(geometry: Geometry, blocks: int, attention: int, budget: Budget,
           narrowest: int, heads: int = 0) -> int | None:
    """The widest MLP (a multiple of the step, at most the dense width, at least
    ``narrowest``) with which the structure fits the budget; ``None`` when none does."""
    def fits(width: int) -> bool:
        return budget.fits(geometry.cost(Structure(blocks, attention, width, heads)))

    if fits(geometry.units):
        return geometry.units
    step = geometry.step
    width = geometry.units // step * step
    if width == geometry.units:
        width -= step
    while width >= narrowest and not fits(width):
        width -= step
    return width if width >= narrowest else None


def _least(count: int, fits) -> int | None:
    """The smallest ``k`` in ``0..count`` with ``fits(k)`` (monotone), else ``None``."""
    for k in range(count + 1):
        if fits(k):
            return k
    return None


def _spread(top: int, points: int) -> list[int]:
    return sorted({round(top * i / max(1, points - 1)) for i in range(points)})


def grid(geometry: Geometry, budget: Budget, *, points: int = 3, attention: bool = True,
         narrowest: int, heads: bool = False, heads_with_attention: bool = True
         ) -> list[Structure]:
    """The structures the search tries, each using the budget: removed blocks from none to
    what depth alone needs, for each removed attention sub-layers from none to what the rest
    needs (``attention=False``: none), with ``heads`` each of those also with 1 … all but one
    query head removed per key/value group (``heads_with_attention=False``: only where no
    attention sub-layer goes), the MLP as wide as the remaining budget allows (at least
    ``narrowest``). Refuses a budget no structure of the grid reaches."""
    full = geometry.units
    blocks_needed = _least(geometry.blocks - 1, lambda d: budget.fits(
        geometry.cost(Structure(d, 0, full))))
    depth_top = blocks_needed if blocks_needed is not None else geometry.blocks - 1
    out: list[Structure] = []
    for d in _spread(depth_top, points):
        kept = geometry.blocks - d
        attention_top = 0
        if attention:
            # at least one block keeps its attention (prune-depth's rule)
            needed = _least(kept - 1, lambda a, d=d: budget.fits(geometry.cost(
                Structure(d, a, full))))
            attention_top = needed if needed is not None else kept - 1
        for a in _spread(attention_top, points):
            cuts = range(geometry.per_group) if heads and geometry.head.params else [0]
            for h in cuts:
                if h and a and not heads_with_attention:
                    continue
                width = widest(geometry, d, a, budget, narrowest, h)
                if width is not None and Structure(d, a, width, h) not in out:
                    out.append(Structure(d, a, width, h))
    if not out:
        raise SnapPruneError(
            f"no structure reaches the target ({budget.currency} ≤ {budget.limit:,}): removing "
            f"blocks, attention and MLP neurons down to {narrowest} per block is not enough; "
            "raise the target")
    return out
