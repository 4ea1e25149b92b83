"""What each model family is: where its decoder blocks sit, and what is inside a block.

One adapter per family names the block's layer groups (attention q/k/v/o with its head
geometry, MLP in/out), so that the pipeline prunes exactly the layers a rule covers, width
pruning knows which rows feed which columns, and every other block parameter is either covered
by a rule (norms, the groups' biases) or reported. A generic fallback finds the decoder's
``ModuleList`` for architectures without an adapter; it is marked as such in the report.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from ..errors import SnapPruneError
from .experts import ExpertLinears, MoE, expert_count, fold_experts, unfold_experts
from .layout import is_prunable


def module_at(root: nn.Module, path: str) -> nn.Module | None:
    module: object = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and their per-family variants: scale (and shift) vectors, never
    pruned."""
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


@dataclass(frozen=True)
class HeadGeometry:
    heads: int
    kv_heads: int
    head_dim: int


def head_geometry(config) -> HeadGeometry:
    """Query heads, key/value heads (grouped-query attention) and head width from a config."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not heads:
        raise SnapPruneError(f"{type(config).__name__} does not say how many attention heads")
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return HeadGeometry(int(heads), int(kv), int(head_dim))


@dataclass(frozen=True)
class Attention:
    """Attention projections, relative to a block. ``qkv`` names a fused q/k/v projection
    (GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``); otherwise ``q``, ``k``, ``v``.
    ``latent``: the input projections of multi-head latent attention (DeepSeek's q and kv
    down- and up-projections), each present or not by the config (``q_lora_rank``)."""

    o: str
    q: str = ""
    k: str = ""
    v: str = ""
    qkv: str = ""
    latent: tuple[str, ...] = ()

    def roles(self) -> dict[str, str]:
        inputs = {self.qkv: "attention.qkv"} if self.qkv else {
            self.q: "attention.q", self.k: "attention.k", self.v: "attention.v"}
        latent = dict.fromkeys(self.latent, "attention.latent")
        return {**{n: r for n, r in inputs.items() if n}, **latent, self.o: "attention.o"}

    def required(self) -> list[str]:
        """The projections every block of the family has (``latent`` ones may be absent)."""
        return [n for n in self.roles() if n not in self.latent]


@dataclass(frozen=True)
class MLP:
    """MLP projections, relative to a block: ``inputs`` produce the hidden neurons (gate/up,
    fc1), ``output`` consumes them (down, fc2)."""

    inputs: tuple[str, ...]
    output: str

    def roles(self) -> dict[str, str]:
        return {**{name: "mlp.in" for name in self.inputs}, self.output: "mlp.out"}


@dataclass(frozen=True)
class Adapter:
    """A family: dotted paths relative to the ``*ForCausalLM`` model, and the block's groups."""

    family: str
    model_types: tuple[str, ...]
    blocks: str
    embeddings: tuple[str, ...]
    final_norm: str | None
    attention: Attention | None = None
    mlp: MLP | None = None
    never_prune: tuple[str, ...] = field(default=())
    """Block-relative names of linear layers that must keep every weight (routers, gates)."""
    mlp_width_key: str | None = None
    """Config field of the MLP's hidden width (``intermediate_size``, ``ffn_dim``, ``n_inner``):
    set for families whose MLP neurons can be cut out (``snapprune shrink --mlp``)."""
    head_dim_key: str | None = None
    """Config field fixing the head width apart from the hidden size: only then can whole
    heads be cut out and the config stay standard (``snapprune shrink --heads``)."""
    moe: MoE | None = None
    """A mixture of experts: its router (never pruned) and experts (pruned one by one, each on
    its routed tokens); ``mlp`` then names the dense blocks' MLP, and a shared expert's
    projections are declared in ``shared``."""
    shared: MLP | None = None

    @property
    def generic(self) -> bool:
        return self.attention is None and self.mlp is None

    def decoder_blocks(self, model: nn.Module) -> nn.ModuleList:
        blocks = module_at(model, self.blocks)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise SnapPruneError(
                f"{type(model).__name__} has no decoder blocks at {self.blocks}; "
                "this architecture is not supported"
            )
        return blocks

    def layer_roles(self, block: nn.Module) -> dict[str, str]:
        """Block-relative name → role of every layer to prune, in the block's module order."""
        if self.generic:
            named = {n: "linear" for n, m in block.named_modules() if is_prunable(m)}
        else:
            declared = {**(self.attention.roles() if self.attention else {}),
                        **(self.mlp.roles() if self.mlp else {}),
                        **(self.shared.roles() if self.shared else {}),
                        **(self.moe.roles(block) if self.moe else {})}
            named = {n: declared[n] for n, _ in block.named_modules() if n in declared}
        return {n: r for n, r in named.items() if n not in self.kept_whole}

    def mlp_groups(self, block: nn.Module) -> list[tuple[tuple[str, ...], str]]:
        """``(producers, consumer)`` of each MLP whose hidden neurons ``shrink`` cuts, block-
        relative: the block's MLP, or in a mixture each routed expert (its gate and up
        projections, its down projection; the shared expert keeps its width)."""
        if self.moe is not None:
            experts = module_at(block, self.moe.experts)
            if experts is None:
                raise SnapPruneError("a dense block among mixture blocks: shrink cuts experts' "
                                     "widths in mixtures whose every block has experts")
            path = self.moe.experts
            return [((f"{path}.{e}.gate_proj", f"{path}.{e}.up_proj"), f"{path}.{e}.down_proj")
                    for e in range(len(experts))]
        return [(self.mlp.inputs, self.mlp.output)]

    @property
    def kept_whole(self) -> tuple[str, ...]:
        """Block-relative modules that keep every weight: the declared ones and the MoE's
        router and gates."""
        return self.never_prune + ((self.moe.router, *self.moe.never_prune) if self.moe else ())

    def coverage(self, block: nn.Module) -> tuple[dict[str, str], list[str]]:
        """Every parameter of ``block`` with the rule that covers it, and those none covers.

        Rules: a layer's role (its weight is pruned, its bias follows it), ``norm`` (never
        pruned), ``never pruned`` (the adapter's list), and for the generic adapter
        ``left alone (generic adapter)`` for anything that is not a linear layer.
        """
        roles = self.layer_roles(block)
        rules: dict[str, str] = {}
        uncovered: list[str] = []
        for module_name, module in block.named_modules():
            for pname, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{pname}" if module_name else pname
                if module_name in roles:
                    rules[full] = f"{roles[module_name]} {pname}"
                elif module_name in self.kept_whole:
                    rules[full] = "never pruned"
                elif is_norm(module):
                    rules[full] = "norm"
                elif self.generic and not is_prunable(module):
                    rules[full] = "left alone (generic adapter)"
                else:
                    uncovered.append(full)
        return rules, uncovered

    def matches(self, model: nn.Module) -> bool:
        """The family's paths and groups exist in this model (block 0 stands for all)."""
        blocks = module_at(model, self.blocks)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            return False
        names = {n for n, _ in blocks[0].named_modules()}
        attention = self.attention.required() if self.attention else []
        mlp = self.mlp.roles() if self.mlp else {}
        has_mlp = all(name in names for name in mlp) or (
            self.moe is not None and self.moe.experts in names)
        return all(name in names for name in attention) and has_mlp

    def describe(self, model: nn.Module) -> dict:
        """Where things are and what each rule covers, for the report."""
        blocks = self.decoder_blocks(model)
        _, uncovered = self.coverage(blocks[0])
        out = {
            "family": self.family,
            "generic_adapter": self.generic,
            "blocks": f"{self.blocks} ({len(blocks)})",
            "embeddings": [p for p in self.embeddings if module_at(model, p) is not None],
            "final_norm": self.final_norm if self.final_norm and module_at(model, self.final_norm)
            else None,
            "groups": self.layer_roles(blocks[0]),
            "uncovered_parameters": uncovered,
        }
        if self.moe is not None:
            out["experts"] = {"router": self.moe.router, "experts": self.moe.experts,
                              "count": expert_count(model.config, self.moe),
                              "top_k": getattr(model.config, self.moe.top_k_key, None)}
        if self.attention is not None:
            geometry = head_geometry(model.config)
            out["heads"] = {"heads": geometry.heads, "kv_heads": geometry.kv_heads,
                            "head_dim": geometry.head_dim}
        return out


_LLAMA_ATTENTION = Attention(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                             o="self_attn.o_proj")
_GATED_MLP = MLP(inputs=("mlp.gate_proj", "mlp.up_proj"), output="mlp.down_proj")

ADAPTERS = (
    Adapter(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2",
         "smollm3"),
        "model.layers",
        ("model.embed_tokens", "model.rotary_emb"),
        "model.norm",
        attention=_LLAMA_ATTENTION,
        mlp=_GATED_MLP,
        mlp_width_key="intermediate_size",
        head_dim_key="head_dim",
    ),
    Adapter(
        "qwen3_moe", ("qwen3_moe",), "model.layers",
        ("model.embed_tokens", "model.rotary_emb"), "model.norm",
        attention=_LLAMA_ATTENTION, mlp=_GATED_MLP,
        moe=MoE(router="mlp.gate", experts="mlp.experts", count_key="num_experts"),
        mlp_width_key="moe_intermediate_size", head_dim_key="head_dim",
    ),
    Adapter(
        "olmoe", ("olmoe",), "model.layers",
        ("model.embed_tokens", "model.rotary_emb"), "model.norm",
        attention=_LLAMA_ATTENTION,
        moe=MoE(router="mlp.gate", experts="mlp.experts", count_key="num_experts"),
        mlp_width_key="intermediate_size",
    ),
    Adapter(
        "qwen2_moe", ("qwen2_moe",), "model.layers", ("model.embed_tokens", "model.rotary_emb"),
        "model.norm", attention=_LLAMA_ATTENTION, mlp=_GATED_MLP,
        shared=MLP(inputs=("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                   output="mlp.shared_expert.down_proj"),
        moe=MoE(router="mlp.gate", experts="mlp.experts", count_key="num_experts",
                never_prune=("mlp.shared_expert_gate",)),
        mlp_width_key="moe_intermediate_size",
    ),
    Adapter(  # GLM-4.5/4.6: dense first blocks, routed experts and one shared expert
        "glm4_moe", ("glm4_moe",), "model.layers", ("model.embed_tokens", "model.rotary_emb"),
        "model.norm", attention=_LLAMA_ATTENTION, mlp=_GATED_MLP,
        shared=MLP(inputs=("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
                   output="mlp.shared_experts.down_proj"),
        moe=MoE(router="mlp.gate", experts="mlp.experts", count_key="n_routed_experts"),
        mlp_width_key="moe_intermediate_size", head_dim_key="head_dim",
    ),
    Adapter(  # DeepSeek-V2/V3 (and Kimi-K2, Moonlight): latent attention, dense first blocks
        "deepseek", ("deepseek_v2", "deepseek_v3"), "model.layers",
        ("model.embed_tokens", "model.rotary_emb"), "model.norm",
        attention=Attention(o="self_attn.o_proj", latent=(
            "self_attn.q_proj", "self_attn.q_a_proj", "self_attn.q_b_proj",
            "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj")),
        mlp=_GATED_MLP,
        shared=MLP(inputs=("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
                   output="mlp.shared_experts.down_proj"),
        moe=MoE(router="mlp.gate", experts="mlp.experts", count_key="n_routed_experts"),
        mlp_width_key="moe_intermediate_size",
    ),
    Adapter(  # gpt-oss: biased attention with a sink logit per head, biased experts gated by
        # its clamped SwiGLU (stored transposed and interleaved, unfolded per expert)
        "gpt_oss", ("gpt_oss",), "model.layers", ("model.embed_tokens", "model.rotary_emb"),
        "model.norm", attention=_LLAMA_ATTENTION,
        never_prune=("self_attn",),  # its parameters of its own: the sinks
        moe=MoE(router="mlp.router", experts="mlp.experts", count_key="num_local_experts",
                stored_fused=True),
        mlp_width_key="intermediate_size",
    ),
    Adapter(
        "mixtral", ("mixtral",), "model.layers", ("model.embed_tokens", "model.rotary_emb"),
        "model.norm", attention=_LLAMA_ATTENTION,
        moe=MoE(router="mlp.gate", experts="mlp.experts", count_key="num_local_experts",
                stored_router="block_sparse_moe.gate", stored_experts="block_sparse_moe.experts",
                stored_projections=("w1", "w3", "w2")),
        mlp_width_key="intermediate_size", head_dim_key="head_dim",
    ),
    Adapter(
        "phi3",
        ("phi3",),
        "model.layers",
        ("model.embed_tokens", "model.rotary_emb"),
        "model.norm",
        attention=Attention(qkv="self_attn.qkv_proj", o="self_attn.o_proj"),
        mlp=MLP(inputs=("mlp.gate_up_proj",), output="mlp.down_proj"),
    ),
    Adapter(
        "opt",
        ("opt",),
        "model.decoder.layers",
        ("model.decoder.embed_tokens", "model.decoder.embed_positions",
         "model.decoder.project_in"),
        "model.decoder.final_layer_norm",
        attention=Attention(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                            o="self_attn.out_proj"),
        mlp=MLP(inputs=("fc1",), output="fc2"),
        mlp_width_key="ffn_dim",
    ),
    Adapter(
        "gpt2", ("gpt2",), "transformer.h", ("transformer.wte", "transformer.wpe"),
        "transformer.ln_f",
        attention=Attention(qkv="attn.c_attn", o="attn.c_proj"),
        mlp=MLP(inputs=("mlp.c_fc",), output="mlp.c_proj"),
        mlp_width_key="n_inner",
    ),
    Adapter(
        "gpt_neox", ("gpt_neox",), "gpt_neox.layers",
        ("gpt_neox.embed_in", "gpt_neox.rotary_emb"), "gpt_neox.final_layer_norm",
        attention=Attention(qkv="attention.query_key_value", o="attention.dense"),
        mlp=MLP(inputs=("mlp.dense_h_to_4h",), output="mlp.dense_4h_to_h"),
        mlp_width_key="intermediate_size",
    ),
)

MOE_FAMILIES = tuple(t for a in ADAPTERS if a.moe is not None for t in a.model_types)
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def refuse_mixture_of_experts(model: nn.Module, blocks: nn.ModuleList) -> None:
    """A mixture of experts needs per-expert statistics and its router kept whole, which only
    a family adapter knows how to do: without one it is refused, never pruned partly or
    silently skipped."""
    config = getattr(model, "config", None)
    experts = next((getattr(config, k) for k in _EXPERT_COUNT_KEYS
                    if isinstance(getattr(config, k, None), int) and getattr(config, k) > 1),
                   None)
    fused = [n for n, p in blocks[0].named_parameters() if p.dim() >= 3]
    if experts is None and not fused:
        return
    if model_type_of(model) in MOE_FAMILIES:  # an adapter exists, this layout is not its
        raise SnapPruneError(PER_MODULE_CODE.format(name=type(model).__name__))
    what = f"{experts} experts" if experts else "fused expert weights"
    detail = f" ({', '.join(fused[:2])}{', …' if len(fused) > 2 else ''})" if fused else ""
    raise SnapPruneError(
        f"{type(model).__name__} is a mixture-of-experts model ({what}{detail}) of a family "
        f"snapprune has no adapter for; supported mixtures: {', '.join(MOE_FAMILIES)}"
    )


PER_MODULE_CODE = (
    "{name} keeps one module per expert (transformers < 5, or remote code); snapprune's "
    "mixture adapters read transformers 5's fused experts, where each expert's routed tokens "
    "and its fallback are known: upgrade transformers (pip install 'transformers>=5')")


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def refuse_expert_modules(model: nn.Module, adapter: Adapter) -> None:
    """A family's mixture in another layout than the fused one the adapter unfolds (per-expert
    modules: transformers 4, remote code) is refused, never half handled (its experts' hooks
    would see routed tokens, but no starved-expert fallback, counts or expert removal)."""
    mixture = adapter.moe.experts.rpartition(".")[0]
    for block in adapter.decoder_blocks(model):
        experts = module_at(block, adapter.moe.experts)
        # transformers 4's Mixtral keeps its mixture elsewhere (no ``mlp`` at all); a dense
        # block of a mixed model (Qwen's mlp_only_layers) has an MLP there and no experts
        missing = bool(mixture) and module_at(block, mixture) is None
        if missing or (experts is not None and not isinstance(experts, ExpertLinears)):
            raise SnapPruneError(PER_MODULE_CODE.format(name=type(model).__name__))


@contextlib.contextmanager
def fused_experts(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its experts fused again in the body (transformers' own layout, which
    ``save_pretrained`` writes as the Hub's per-expert checkpoint keys), unfolded after."""
    adapter = adapter_for(model)
    if adapter.moe is None:
        yield model
        return
    blocks = adapter.decoder_blocks(model)
    fold_experts(blocks, adapter.moe)
    try:
        yield model
    finally:
        unfold_experts(blocks, adapter.moe)


def fold_model(model: nn.Module) -> nn.Module:
    """transformers' own fused experts again, for good (what ``execute`` hands back: a model
    any transformers code can use; snapprune unfolds it again when it works on it)."""
    adapter = adapter_for(model)
    if adapter.moe is not None:
        fold_experts(adapter.decoder_blocks(model), adapter.moe)
    return model


def _generic_adapter(model: nn.Module) -> Adapter:
    """The longest ``ModuleList`` whose every element holds a linear layer: the decoder."""
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
            any(is_prunable(m) for m in block.modules()) for block in module
        ) and (best is None or len(module) > best[0]):
            best = (len(module), name)
    if best is None:
        raise SnapPruneError(
            f"cannot find decoder blocks in {type(model).__name__}: no list of layers holding "
            "linear layers; this architecture is not supported"
        )
    embeddings = tuple(n for n, m in model.named_modules() if isinstance(m, nn.Embedding))
    return Adapter("generic", (), best[1], embeddings, None)


_FOUND: weakref.WeakKeyDictionary[nn.Module, Adapter] = weakref.WeakKeyDictionary()
"""The adapter found for each live model: a model's family never changes, so the scan runs
once per model however often a run asks."""


def adapter_for(model: nn.Module) -> Adapter:
    """The family adapter for ``model`` by ``config.model_type`` when its groups are all
    there; else the generic fallback. A mixture of experts of a family with an adapter has its
    fused experts unfolded into per-expert linear layers (``experts.unfold_experts``); one
    without an adapter is refused."""
    found = _FOUND.get(model)
    if found is not None:
        if found.moe is not None:
            unfold_experts(found.decoder_blocks(model), found.moe)
        return found
    model_type = model_type_of(model)
    adapter = next((a for a in ADAPTERS if model_type in a.model_types and a.matches(model)),
                   None) or _generic_adapter(model)
    if adapter.moe is not None:
        expert_count(model.config, adapter.moe)
        unfold_experts(adapter.decoder_blocks(model), adapter.moe)
        refuse_expert_modules(model, adapter)
    else:
        refuse_mixture_of_experts(model, adapter.decoder_blocks(model))
    _FOUND[model] = adapter
    return adapter
