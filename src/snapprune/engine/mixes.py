"""Per-tensor GGUF types: llama.cpp's mixes (``Q4_K_M``, ``Q3_K_M``, …) declared as data, its
fallback for rows that are not whole super-blocks, and the allocation of types to a byte
budget (``--target-size``/``--target-bpw``).

The mixes follow llama.cpp's ``llama_tensor_get_type`` (``src/llama-quant.cpp``) for
non-Falcon models: a base type, then rules by tensor kind and position (``attn_v`` and
``ffn_down`` get more bits in some layers; a model of exactly 8 experts, Mixtral's, keeps
``attn_v`` and ``attn_k`` at ``q8_0`` and ``attn_output`` at ``q5_k``), the output matrix (and
a tied token embedding) ``q6_k`` unless its rows are not whole blocks of the base type (then
``q8_0``), and every choice passed through the fallback (``tensor_type_fallback``): a
super-block type whose rows are not multiples of 256 becomes the block-of-32 type llama.cpp
substitutes.

The allocation is a pure function: given each tensor's error under each candidate type and
the bytes each costs, the types minimising the total error within the budget — a Lagrangian
sweep (each tensor on its lower convex hull of error against bytes) and then the best
remaining upgrades by error saved per byte, so the budget is used, never exceeded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import SnapPruneError
from .schemes import parse_scheme

FALLBACK = {"iq4_xs": "iq4_nl", "q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0",
            "q5_k": "q5_1", "q6_k": "q8_0"}
"""llama.cpp's substitute for a super-block type on rows that are not multiples of 256."""

KINDS = {"attention.q": "attn_q", "attention.k": "attn_k", "attention.v": "attn_v",
         "attention.o": "attn_output", "attention.qkv": "attn_qkv", "mlp.in": "ffn_up",
         "mlp.out": "ffn_down", "expert.in": "ffn_up", "expert.out": "ffn_down"}
"""snapprune's layer roles as llama.cpp's tensor kinds (gate and up share the rules; a block's
experts are one stacked tensor in llama.cpp, so its rules see one per layer, as here)."""
OUTPUT, TOKEN_EMBD = "output", "token_embd"

CANDIDATES = ("q2_k", "q3_k", "q4_0", "iq4_nl", "iq4_xs", "q4_1", "q4_k", "q5_0", "q5_1",
              "q5_k", "q6_k", "q8_0")
"""The types ``--target-size`` chooses among (each where it holds the tensor's rows)."""


@dataclass(frozen=True)
class Slot:
    """A tensor as the rules see it: its kind, its position among the tensors of its kind
    (the layer), how many there are, its row width and the model's query heads per KV head."""

    name: str
    kind: str
    index: int
    count: int
    rows: int
    cols: int
    gqa: int = 1
    tied: bool = False
    """For ``token_embd``: the output matrix is this same tensor."""
    experts: int = 0
    """The model's routed experts (0 for a dense model): llama.cpp's ``n_expert``."""


@dataclass(frozen=True)
class Choice:
    """A tensor's type and the reason, as the report states it."""

    scheme: str
    why: str


def holds(scheme: str, cols: int) -> bool:

    return parse_scheme(scheme).holds(cols)


def fallback(scheme: str, cols: int, why: str) -> Choice:
    """llama.cpp's ``tensor_type_fallback``: a type whose blocks do not divide the rows
    becomes its substitute; one that no block-of-32 type holds is refused."""
    if holds(scheme, cols):
        return Choice(scheme, why)
    if scheme in FALLBACK and holds(FALLBACK[scheme], cols):
        return Choice(FALLBACK[scheme], f"{why}; rows of {cols} are not whole super-blocks of "
                      f"256, so {FALLBACK[scheme]} (llama.cpp's fallback for {scheme})")
    raise SnapPruneError(f"{scheme} cannot hold rows of {cols} inputs (llama.cpp's blocks of 32 "
                         "need a multiple of 32); shrink with multiple_of 32 or 64")


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third
    one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


Condition = Callable[[Slot, bool], bool]


@dataclass(frozen=True)
class Rule:
    """A tensor kind gets ``scheme`` where ``when(slot, informed)`` holds (``informed``: the
    quantiser has calibration statistics, llama.cpp's ``--imatrix``)."""

    kind: str
    scheme: str
    when: Condition
    why: str


def _always(slot: Slot, informed: bool) -> bool:
    return True


def _more_bits(slot: Slot, informed: bool) -> bool:
    return more_bits(slot.index, slot.count)


def _first(fraction: int) -> Condition:
    return lambda slot, informed: slot.index < slot.count // fraction


def _first_layers(k: int) -> Condition:
    return lambda slot, informed: slot.index < k


def _gqa4(slot: Slot, informed: bool) -> bool:
    return slot.gqa >= 4


def _first_eighth_uninformed(slot: Slot, informed: bool) -> bool:
    return not informed and slot.index < slot.count // 8


def _eight_experts(slot: Slot, informed: bool) -> bool:
    return slot.experts == 8


EIGHT_EXPERTS = (
    Rule("attn_v", "q8_0", _eight_experts, "attn_v at q8_0 (llama.cpp's rule for 8 experts)"),
    Rule("attn_k", "q8_0", _eight_experts, "attn_k at q8_0 (llama.cpp's rule for 8 experts)"))
"""llama.cpp's rules for a model of exactly 8 experts (Mixtral's ``n_expert``), ahead of every
mix's own: its attention is a small part of the file, so it gets 8 bits."""
EIGHT_EXPERTS_OUTPUT = Rule("attn_output", "q5_k", _eight_experts,
                            "attn_output at q5_k (llama.cpp's rule for 8 experts)")
"""For the mixes llama.cpp lists (not ``Q5_K_M``/``Q6_K``), and instead of their own rule."""


MORE_BITS = "llama.cpp's use_more_bits layers (first and last eighth, every third between)"


@dataclass(frozen=True)
class Mix:
    """One of llama.cpp's mixes: its base type and rules, in llama.cpp's order of precedence."""

    name: str
    base: str
    rules: tuple[Rule, ...] = ()
    summary: str = ""
    eight_experts_output: bool = True
    """Whether llama.cpp lists the mix for ``attn_output`` at ``q5_k`` in 8-expert models (where
    not, that tensor keeps the base type: the mix's own rule for it does not apply either)."""

    def choose(self, slot: Slot, informed: bool) -> Choice:
        if slot.kind == OUTPUT or (slot.kind == TOKEN_EMBD and slot.tied):
            return fallback(*self._output(slot))
        eight = (*EIGHT_EXPERTS, EIGHT_EXPERTS_OUTPUT if self.eight_experts_output else None)
        if slot.experts == 8 and slot.kind == "attn_output" and not self.eight_experts_output:
            return fallback(self.base, slot.cols, f"{self.name}'s base type")
        for rule in (*(r for r in eight if r is not None), *self.rules):
            if rule.kind == slot.kind and rule.when(slot, informed):
                return fallback(rule.scheme, slot.cols, f"{self.name}: {rule.why}")
        return fallback(self.base, slot.cols, f"{self.name}'s base type")

    def _output(self, slot: Slot) -> tuple[str, int, str]:
        span = parse_scheme(self.base).block.span
        if slot.cols % span:
            return "q8_0", slot.cols, (f"output matrix: rows of {slot.cols} are not whole "
                                       f"blocks of {self.base} ({span}), llama.cpp keeps q8_0")
        if self.base == "q8_0":
            return "q8_0", slot.cols, "output matrix: the base type"
        return "q6_k", slot.cols, "output matrix: llama.cpp's q6_k"


MIXES = {mix.name: mix for mix in (
    Mix("Q2_K", "q2_k", (
        Rule("attn_v", "q4_k", _gqa4, "attn_v at q4_k (4 or more query heads per KV head)"),
        Rule("attn_v", "q3_k", _always, "attn_v at q3_k"),
        Rule("ffn_down", "q3_k", _always, "ffn_down at q3_k"),
        Rule("attn_output", "q3_k", _always, "attn_output at q3_k")),
        "2-bit K-quants, attention values and MLP outputs at 3-4 bits"),
    Mix("Q3_K_M", "q3_k", (
        Rule("attn_v", "q5_k", _first_layers(2), "attn_v of the first 2 layers at q5_k"),
        Rule("attn_v", "q4_k", _always, "attn_v at q4_k"),
        Rule("ffn_down", "q5_k", _first(16), "ffn_down of the first 16th of the layers at q5_k"),
        Rule("ffn_down", "q4_k", _always, "ffn_down at q4_k"),
        Rule("attn_output", "q4_k", _always, "attn_output at q4_k"),
        Rule("attn_qkv", "q4_k", _always, "fused qkv at q4_k")),
        "3-bit K-quants, more bits where llama.cpp puts them"),
    Mix("Q4_K_S", "q4_k", (
        Rule("attn_v", "q5_k", _first_layers(4), "attn_v of the first 4 layers at q5_k"),
        Rule("ffn_down", "q5_k", _first(8), "ffn_down of the first 8th of the layers at q5_k")),
        "4-bit K-quants, small"),
    Mix("Q4_K_M", "q4_k", (
        Rule("attn_v", "q6_k", _more_bits, f"attn_v at q6_k in {MORE_BITS}"),
        Rule("ffn_down", "q6_k", _more_bits, f"ffn_down at q6_k in {MORE_BITS}"),
        Rule("attn_qkv", "q5_k", _always, "fused qkv at q5_k")),
        "4-bit K-quants, attention values and half the MLP outputs at 6 bits"),
    Mix("Q5_K_M", "q5_k", (
        Rule("attn_v", "q6_k", _more_bits, f"attn_v at q6_k in {MORE_BITS}"),
        Rule("ffn_down", "q6_k", _more_bits, f"ffn_down at q6_k in {MORE_BITS}"),
        Rule("attn_qkv", "q6_k", _always, "fused qkv at q6_k")),
        "5-bit K-quants, attention values and half the MLP outputs at 6 bits", False),
    Mix("Q6_K", "q6_k", (), "6-bit K-quants", False),
    Mix("IQ4_XS", "iq4_xs", (
        Rule("attn_v", "q5_k", _gqa4, "attn_v at q5_k (4 or more query heads per KV head)"),
        Rule("ffn_down", "q5_k", _first_eighth_uninformed,
             "ffn_down of the first 8th of the layers at q5_k (no calibration)")),
        "non-linear 4-bit levels in super-blocks, 4.25 bits a weight"),
    Mix("IQ4_NL", "iq4_nl", (
        Rule("attn_v", "q5_k", _gqa4, "attn_v at q5_k (4 or more query heads per KV head)"),
        Rule("ffn_down", "q5_k", _first_eighth_uninformed,
             "ffn_down of the first 8th of the layers at q5_k (no calibration)")),
        "non-linear 4-bit levels in blocks of 32"),
)}
"""llama.cpp's mixes by their names (``llama-quantize``'s ``ftype`` names)."""


def parse_mix(name: str) -> Mix | None:
    """The mix of that name (any case), or ``None`` for a plain scheme."""
    return MIXES.get(str(name).strip().upper())


PLAIN_EMBEDDING_TYPE = "q8_0"
"""The token embedding and an untied output matrix under a plain scheme (snapprune's rule for
llama.cpp's types, near-lossless), unless the quantisation names another (``embedding_type``)."""


def uniform(scheme: str, slot: Slot) -> Choice:
    """A plain scheme: every layer on it (through the fallback); the token embedding and an
    untied output matrix at ``PLAIN_EMBEDDING_TYPE``."""
    if slot.kind in (OUTPUT, TOKEN_EMBD):
        return Choice(PLAIN_EMBEDDING_TYPE, f"embedding and output matrix: "
                      f"{PLAIN_EMBEDDING_TYPE} with plain schemes")
    return fallback(scheme, slot.cols, "the scheme asked for")


# -- the allocation to a budget ---------------------------------------------------------------


def allocate(errors: dict[str, dict[str, float]], sizes: dict[str, dict[str, int]],
             budget: int) -> dict[str, str]:
    """Per tensor, the type (a key of its ``errors``/``sizes``) minimising the summed error
    with the summed bytes within ``budget``. Refuses a budget below the smallest choice."""
    smallest = sum(min(s.values()) for s in sizes.values())
    if budget < smallest:
        raise SnapPruneError(f"the size target ({budget:,} bytes for the quantised tensors) is "
                             f"below the smallest this model can be ({smallest:,}); raise it")
    hulls = {name: _hull(errors[name], sizes[name]) for name in errors}

    def pick(lam: float) -> dict[str, str]:
        return {name: min(hull, key=lambda t: (errors[name][t] + lam * sizes[name][t],
                                               sizes[name][t]))
                for name, hull in hulls.items()}

    def total(choice: dict[str, str]) -> int:
        return sum(sizes[name][t] for name, t in choice.items())

    low, high = 0.0, 1.0
    while total(pick(high)) > budget:
        high *= 4.0
        if high > 1e30:
            break
    for _ in range(100):  # bisection: the smallest multiplier that fits
        middle = (low + high) / 2
        if total(pick(middle)) > budget:
            low = middle
        else:
            high = middle
    choice = pick(high)
    # Spend what is left: the upgrade saving the most error per byte that still fits.
    left = budget - total(choice)
    while True:
        best, best_gain = None, 0.0
        for name, hull in hulls.items():
            current = choice[name]
            for t in hull:
                extra = sizes[name][t] - sizes[name][current]
                saved = errors[name][current] - errors[name][t]
                if 0 < extra <= left and saved > 0 and saved / extra > best_gain:
                    best, best_gain = (name, t, extra), saved / extra
        if best is None:
            return choice
        name, t, extra = best
        choice[name] = t
        left -= extra


def _hull(errors: dict[str, float], sizes: dict[str, int]) -> list[str]:
    """The types not dominated (another as small with less error), by size."""
    kept: list[str] = []
    for t in sorted(errors, key=lambda t: (sizes[t], errors[t])):
        if not kept or errors[t] < errors[kept[-1]]:
            kept.append(t)
    return kept
