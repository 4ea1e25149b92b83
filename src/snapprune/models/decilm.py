"""Nemotron-NAS checkpoints (``DeciLMForCausalLM``, ``model_type: nemotron-nas``): the
transformers-side layout of a LLaMA-family model whose blocks differ — attention sub-layers
removed, MLP widths and key/value heads of each block's own — as NVIDIA's
Llama-3.1-Nemotron-51B/49B/253B ship it and vLLM, llama.cpp's ``convert_hf_to_gguf.py`` and
transformers (with the checkpoint family's remote code) read it.

The layout's facts, declared here once:

- ``block_configs``: per block, ``attention`` (``no_op``: removed; else ``n_heads_in_group`` =
  query heads per key/value head) and ``ffn`` (``ffn_mult``; ``no_op``: removed).
- One query-head count for the whole model (``num_attention_heads``): blocks differ in their
  key/value heads only.
- Each MLP width is *derived*: ``int(2 · ffn_mult · hidden / 3)`` rounded up to a multiple of
  256, so only multiples of 256 can be written.
- Tensor names are LLaMA's; a block without attention stores neither the attention's
  projections nor its norm.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import SnapPruneError
from .adapters import adapter_for, head_geometry
from .block_shapes import BlockWidths, resize_blocks
from .checkpoint_files import empty_model
from .depth import ATTENTION_NORM, attention_free, remove_attention
from .rope import named_scaling, rope_scaling, rope_theta

ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
WIDTH_MULTIPLE = 256
"""Every MLP width the layout can express is a multiple of this (see ``ffn_width``)."""
REMOTE_CODE = "nvidia/Llama-3_1-Nemotron-51B-Instruct"
"""Where transformers finds the family's modeling code (``trust_remote_code=True``)."""
FORMATS = ("gguf", "hf")
"""The output formats that hold blocks of different shapes: llama.cpp's ``deci`` GGUF, and
``hf`` as this layout (compressed-tensors has no such form)."""


def ffn_width(ffn_mult: float, hidden: int) -> int:
    """The MLP width a block of multiplier ``ffn_mult`` has, as every runtime of the layout
    derives it."""
    width = int(2 * ffn_mult * hidden / 3)
    return width if width % WIDTH_MULTIPLE == 0 else width + WIDTH_MULTIPLE - width % WIDTH_MULTIPLE


def ffn_mult(width: int, hidden: int) -> float:
    """The shortest decimal multiplier whose derived width is ``width`` (a multiple of 256)."""
    exact = 1.5 * width / hidden
    for digits in range(2, 13):
        candidate = round(exact, digits)
        if ffn_width(candidate, hidden) == width:
            return candidate
    raise SnapPruneError(f"no ffn_mult gives an MLP width of {width} at hidden size {hidden}; "
                         "please report this")


def is_decilm(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE or ARCHITECTURE in (
        config.get("architectures") or ())


def check_requested(fmt: str | None, *, heads_vary: bool = False, heads_cut: bool = False,
                    multiple_of: int | None = None) -> None:
    """Refuse, before any work, a job whose blocks will differ in shape and whose output format
    cannot hold that: ``heads_vary`` (per-block query heads: GGUF only), ``heads_cut`` (fewer
    heads than fill the hidden size, from which the layout derives the head size) and
    ``multiple_of`` (the MLP width step the job cuts to; ``hf`` needs a multiple of 256)."""
    if fmt in (None, "gguf"):
        return
    if fmt not in FORMATS:
        raise SnapPruneError(f"blocks of different shapes have no {fmt} form: write --format "
                             "gguf (llama.cpp's deci) or --format hf (the Nemotron-NAS "
                             "DeciLM layout)")
    if heads_vary:
        raise SnapPruneError("per-block query-head counts fit only GGUF (the Nemotron-NAS "
                             "layout has one query-head count): write --format gguf, or cut "
                             "heads with --allocation uniform")
    if heads_cut:
        raise SnapPruneError("a head cut leaves heads that no longer fill the hidden size, and "
                             "the Nemotron-NAS layout derives its head size from it: write "
                             "--format gguf, or cut MLP neurons only")
    if multiple_of is not None and multiple_of % WIDTH_MULTIPLE:
        raise SnapPruneError(f"the Nemotron-NAS layout (--format hf for blocks of different "
                             f"shapes) holds MLP widths in multiples of {WIDTH_MULTIPLE}: give "
                             f"--multiple-of {WIDTH_MULTIPLE}, or write --format gguf")


def _refuse_other_blocks(config) -> None:
    """LLaMA's own blocks only: Qwen's biases and q/k norms, Gemma's norms and embedding scale,
    Mistral's sliding window are not in the layout (their blocks would load as another model)."""
    plain = config.model_type == "llama" or (config.model_type == "mistral"
                                             and not getattr(config, "sliding_window", None))
    if not plain:
        raise SnapPruneError(f"the Nemotron-NAS layout holds LLaMA's own blocks; "
                             f"{config.model_type}'s differ: write --format gguf")


def check_model(model, multiple_of: int | None = None) -> None:
    """What the dense model must be for the layout: the LLaMA family, no biases, its MLP
    width a multiple of 256 (every kept width is, then, when the cuts step by 256)."""
    config = model.config
    _refuse_other_blocks(config)
    if adapter_for(model).moe is not None:
        raise SnapPruneError("the Nemotron-NAS layout holds dense blocks; a mixture of experts "
                             "is not one: write --format gguf")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise SnapPruneError("the Nemotron-NAS layout has no biases; this model has: write "
                             "--format gguf")
    head_dim = head_geometry(config).head_dim
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise SnapPruneError(f"{config.num_attention_heads} heads of {head_dim} do not fill the "
                             f"hidden size {config.hidden_size}, which the Nemotron-NAS layout "
                             "derives head sizes from: write --format gguf")
    width = config.intermediate_size
    if multiple_of is not None and width % WIDTH_MULTIPLE:
        raise SnapPruneError(f"the MLP width {width} is not a multiple of {WIDTH_MULTIPLE}, "
                             "which the Nemotron-NAS layout needs: write --format gguf")


def layout(model, widths: list[BlockWidths], dtype: torch.dtype) -> dict:
    """The ``config.json`` of ``model`` (blocks of the shapes ``widths``) in this layout; one
    line naming the problem where a block cannot be expressed."""
    config = model.config
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = head_geometry(config).head_dim
    _refuse_other_blocks(config)
    query = {w.heads for w in widths if w.heads}
    if len(query) > 1:
        raise SnapPruneError(f"blocks with {sorted(query)} query heads: the Nemotron-NAS layout "
                             "has one query-head count; write --format gguf")
    heads = query.pop() if query else heads
    if head_dim * heads != hidden:
        raise SnapPruneError(f"{heads} heads of {head_dim} do not fill the hidden size "
                             f"{hidden}, which the Nemotron-NAS layout derives head sizes from; "
                             "write --format gguf")
    blocks = []
    for index, shape in enumerate(widths):
        if shape.ffn <= 0 or shape.ffn % WIDTH_MULTIPLE:
            raise SnapPruneError(f"block {index}'s MLP width {shape.ffn} is not a multiple of "
                                 f"{WIDTH_MULTIPLE}, which the Nemotron-NAS layout needs: cut "
                                 f"with --multiple-of {WIDTH_MULTIPLE}, or write --format gguf")
        free = shape.heads == 0
        blocks.append({
            "attention": {"no_op": free, "replace_with_linear": False, "sparsify": None,
                          "n_heads_in_group": None if free else heads // shape.kv_heads,
                          "window_length": None, "num_sink_tokens": None,
                          "use_prefill_window_in_sink_attention": False,
                          "unshifted_sink": False},
            "ffn": {"no_op": False, "replace_with_linear": False, "sparsify": None,
                    "ffn_mult": ffn_mult(shape.ffn, hidden)},
        })
    out = config.to_dict()
    for key in ("intermediate_size", "num_key_value_heads", "head_dim", "layer_types",
                "attention_bias", "mlp_bias", "pretraining_tp", "transformers_version",
                "auto_map", "quantization_config"):
        out.pop(key, None)
    out.pop("rope_parameters", None)  # transformers 5's form; the layout has 4.x's
    name = str(dtype).removeprefix("torch.")
    out.update({
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": f"{REMOTE_CODE}--configuration_decilm.DeciLMConfig",
                     "AutoModelForCausalLM": f"{REMOTE_CODE}--modeling_decilm.DeciLMForCausalLM"},
        "num_attention_heads": heads, "num_hidden_layers": len(widths),
        "rope_theta": rope_theta(config), "rope_scaling": rope_scaling(config),
        "block_configs": blocks,
        "dtype": name, "torch_dtype": name,
    })
    return out


def stored_state(model) -> dict[str, torch.Tensor]:
    """The tensors the layout stores: a block without attention has no attention norm (the
    model in memory keeps one, unused)."""
    adapter = adapter_for(model)
    dropped = {f"{adapter.blocks}.{i}.{ATTENTION_NORM}."
               for i, block in enumerate(adapter.decoder_blocks(model)) if attention_free(block)}
    return {k: v for k, v in model.state_dict().items()
            if not any(k.startswith(prefix) for prefix in dropped)}


def read_config(directory: Path) -> dict | None:
    """``directory``'s config when it is this layout, else ``None``."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and is_decilm(config) else None


def block_shapes(config: dict) -> list[BlockWidths]:
    """Each block's heads and MLP width, as the layout's runtimes derive them."""
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    out = []
    for index, block in enumerate(config["block_configs"]):
        attention, ffn = block.get("attention", {}), block.get("ffn", {})
        unsupported = [k for k, part in (("attention", attention), ("ffn", ffn))
                       if part.get("replace_with_linear") or part.get("sparsify")
                       or part.get("window_length") or part.get("num_sink_tokens")]
        if ffn.get("no_op") or ffn.get("ffn_mult") is None:
            unsupported.append("ffn no_op")
        if unsupported:
            raise SnapPruneError(f"block {index} of this Nemotron-NAS model uses "
                                 f"{', '.join(unsupported)}, which snapprune does not load; "
                                 "load it in vLLM or transformers (trust_remote_code)")
        group = attention.get("n_heads_in_group")
        free = attention.get("no_op") or group is None
        out.append(BlockWidths(0 if free else heads, 0 if free else heads // group,
                               ffn_width(ffn["ffn_mult"], hidden)))
    return out


def load(directory: Path, config: dict, dtype: torch.dtype | None) -> torch.nn.Module:
    """The model a Nemotron-NAS checkpoint describes, as snapprune holds such a model in
    memory (a LLaMA model with ``NoAttention`` blocks and per-block layer shapes)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    shapes = block_shapes(config)
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    kv = max((s.kv_heads for s in shapes if s.kv_heads), default=heads)
    scaling = named_scaling(config.get("rope_scaling") or {})
    theta = config.get("rope_theta", 10000.0)
    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
            "max_position_embeddings", "rms_norm_eps", "hidden_act", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache")
    llama = LlamaConfig(**{k: config[k] for k in keep if k in config},
                        num_key_value_heads=kv,
                        intermediate_size=max(s.ffn for s in shapes),
                        rope_parameters={**scaling, "rope_theta": theta},
                        head_dim=hidden // heads)
    if not isinstance(getattr(llama, "rope_parameters", None), dict):  # transformers 4.x
        llama.rope_theta = theta
        llama.rope_scaling = scaling if scaling["rope_type"] != "default" else None
    llama.architectures = ["LlamaForCausalLM"]  # what the model in memory is
    stored = config.get("dtype") or config.get("torch_dtype")
    if dtype is None and isinstance(stored, str):
        dtype = getattr(torch, stored, None)
    model = empty_model(llama, dtype)
    blocks = adapter_for(model).decoder_blocks(model)
    for block, shape in zip(blocks, shapes, strict=True):
        if not shape.heads:
            remove_attention(model, block)
    resize_blocks(model, shapes, hidden // heads)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(path))
    adapter = adapter_for(model)
    for index, block in enumerate(blocks):  # the unstored norm of a block without attention
        if attention_free(block):
            norm = block.get_submodule(ATTENTION_NORM)
            state[f"{adapter.blocks}.{index}.{ATTENTION_NORM}.weight"] = torch.ones(
                norm.weight.shape, dtype=norm.weight.dtype)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if llama.tie_word_embeddings:
        model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if unexpected or empty:
        raise SnapPruneError(f"{directory} does not match its Nemotron-NAS config (no weights "
                             f"for {empty[:3]}, unexpected {unexpected[:3]}); re-export it")
    return model.eval()
