"""``gguf``: llama.cpp's model file, written with gguf-py's ``GGUFWriter``.

LLaMA-family models (LLaMA, Mistral, SmolLM and their shrunk versions: explicit head width,
any MLP width that is a multiple of 32). Quantised layers are stored in their scheme's block
type (``q4_0``, ``q5_0``, ``iq4_nl``, ...; ``engine.blocks`` packs them) from the quantiser's
own codes and float16 scales, so what
llama.cpp reads is exactly the GPTQ (or round-to-nearest) result, not a re-quantisation.
With llama.cpp's block types the token embedding and an untied output matrix come quantised
to ``q8_0`` by the quantisation step (``models.quantize.quantize_embeddings``), so the file
holds exactly the model that was evaluated; without quantisation float16; norms float32.

The tokenizer is carried over so llama.cpp runs the file alone: from the source GGUF file
(followed through snapprune's own outputs, whose reports name their source), else built from
the tokenizer's files with gguf-py's vocab classes.
"""

from __future__ import annotations

import itertools
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.schemes import GGUF_SCHEMES
from ..errors import SnapPruneError
from ..models.adapters import adapter_for, head_geometry, module_at
from ..models.block_shapes import BlockWidths, block_widths
from ..models.depth import ATTENTION_NORM, attention_free
from ..models.experts import ExpertLinears
from ..models.layout import linear_weight
from ..models.rope import llama3_rope_factors, rope_kind, rope_theta
from .format import Format


@dataclass(frozen=True)
class Arch:
    """What llama.cpp's architecture for a family does: its name (gguf-py's ``MODEL_ARCH``),
    whether its rope pairs halves of each head as transformers does (``neox``: no row
    reordering), and for a mixture of experts whether its graph renormalises the top-k router
    weights (the model's own ``norm_topk_prob`` must say the same)."""

    name: str
    neox: bool = False
    normalised_top_k: bool | None = None
    whole_key_norm: bool = False
    """Its key norm spans the whole hidden width (OLMoE): as many key/value heads as query
    heads."""


ARCHS = {"llama": Arch("LLAMA"), "mistral": Arch("LLAMA"),
         "mixtral": Arch("LLAMA", normalised_top_k=True),
         "qwen3_moe": Arch("QWEN3MOE", neox=True, normalised_top_k=True),
         "qwen2_moe": Arch("QWEN2MOE", neox=True, normalised_top_k=False),
         "olmoe": Arch("OLMOE", neox=True, normalised_top_k=False, whole_key_norm=True)}
"""``config.model_type`` → the llama.cpp architecture it is written as."""
FAMILIES = tuple(ARCHS)
FILE_NAME = "model.gguf"


def check_job(job) -> None:
    quantize = job.settings("quantize")
    if quantize is not None and not quantize.parsed_scheme.gguf:
        raise SnapPruneError(
            f"GGUF holds llama.cpp's block types ({', '.join(GGUF_SCHEMES)}), not "
            f"{quantize.scheme}: quantise with one of those, or write compressed-tensors for "
            "w* schemes")


def check_model(model, job) -> None:
    config = model.config
    if config.model_type not in FAMILIES:
        raise SnapPruneError(
            f"the GGUF writer covers {', '.join(FAMILIES)}, not "
            f"{config.model_type}; write hf and convert with llama.cpp's convert_hf_to_gguf.py")
    if adapter_for(model).moe is not None:
        _check_mixture(model, job)
    kind = rope_kind(config)
    if kind == "llama3" and ARCHS[config.model_type].name != "LLAMA":
        raise SnapPruneError(f"llama3 rope scaling is written for llama.cpp's llama "
                             f"architecture, not {config.model_type}'s; write hf and convert "
                             "with llama.cpp's convert_hf_to_gguf.py")
    if kind not in ("default", "llama3"):
        raise SnapPruneError(f"rope scaling {kind!r} is not written to GGUF here; write hf and "
                             "convert with llama.cpp's convert_hf_to_gguf.py")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise SnapPruneError(f"{flag} is not in llama.cpp's llama architecture; write hf")
    blocks = adapter_for(model).decoder_blocks(model)
    if blocks and attention_free(blocks[0]):
        raise SnapPruneError("the first block has no attention, and llama.cpp reads every "
                             "block's head size from the first block's head count (the file "
                             "would not load): write --format hf (the Nemotron-NAS layout)")


def _check_mixture(model, job) -> None:
    """What llama.cpp's mixture architectures cannot hold, refused in one line."""
    config, adapter = model.config, adapter_for(model)
    arch = ARCHS[config.model_type]
    name = arch.name.lower()
    normalised = bool(getattr(config, "norm_topk_prob", True))
    if normalised != arch.normalised_top_k:
        raise SnapPruneError(
            f"llama.cpp's {name} {'always' if arch.normalised_top_k else 'never'} renormalises "
            f"the top-k router weights, this model's config (norm_topk_prob={normalised}) "
            "does not say the same; write hf")
    if arch.whole_key_norm and config.num_key_value_heads != config.num_attention_heads:
        raise SnapPruneError(
            f"llama.cpp's {name} normalises keys over the whole hidden width, which needs as "
            f"many key/value heads as query heads ({config.num_key_value_heads} against "
            f"{config.num_attention_heads}); write hf")
    counts = []
    for index, block in enumerate(adapter.decoder_blocks(model)):
        experts = module_at(block, adapter.moe.experts)
        if not isinstance(experts, ExpertLinears):
            raise SnapPruneError(f"block {index} has a dense MLP among mixture blocks, which "
                                 f"llama.cpp's {name} cannot hold; write hf")
        if attention_free(block):
            raise SnapPruneError(f"block {index} has no attention, which llama.cpp's {name} "
                                 "cannot hold; write hf")
        counts.append(len(experts))
    if len(set(counts)) > 1:
        raise SnapPruneError("blocks with different expert counts: llama.cpp holds one expert "
                             "count per model; prune experts with --allocation uniform")
    quantize = job.settings("quantize")
    if quantize is not None and quantize.sized:
        raise SnapPruneError("--target-size chooses a type per tensor, but a GGUF stores each "
                             "block's experts as one tensor of one type: use a mix (q4_k_m) "
                             "or one type for mixtures of experts")


def _permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's LLaMA rope pairs adjacent dimensions, transformers' pairs halves: the rows
    of q (and k) are reordered within each head, as llama.cpp's converter reorders them."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2) \
        .reshape(shape)


def source_gguf(spec: str, depth: int = 0) -> Path | None:
    """The GGUF file a model came from: itself, or the source named in a snapprune output's
    report, followed back."""
    from ..models.loading import resolve_model
    from ..outputs import REPORT_NAME

    if depth > 8:
        return None
    try:
        source = resolve_model(spec)
    except SnapPruneError:
        return None
    if source.gguf_file:
        return Path(source.path) / source.gguf_file
    report = Path(source.path) / REPORT_NAME
    if source.is_local and report.is_file():
        with open(report, encoding="utf-8") as handle:
            return source_gguf(json.load(handle).get("model", ""), depth + 1)
    return None


def _carry_tokenizer(writer, source: Path) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)


def _build_tokenizer(writer, tokenizer) -> str | None:
    """The tokenizer from its own files through gguf-py's vocab classes; returns a note when
    llama.cpp's pre-tokenizer had to be guessed."""
    from gguf import SpecialVocab
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp)
        for kind in (BpeVocab, LlamaHfVocab, SentencePieceVocab):
            try:
                vocab = kind(path)
                break
            except (FileNotFoundError, KeyError, ValueError, TypeError):
                continue
        else:
            raise SnapPruneError("the tokenizer is neither BPE nor SentencePiece as gguf-py "
                                 "reads them; write hf and convert with llama.cpp's "
                                 "convert_hf_to_gguf.py")
        tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        note = None
        if vocab.tokenizer_model == "gpt2":
            pre = _pre_tokenizer(path)
            writer.add_tokenizer_pre(pre)
            if pre == "default":
                note = ("GGUF: the tokenizer's pre-tokenizer is not one snapprune recognises; "
                        "llama.cpp uses its default, which may split text differently")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        SpecialVocab(path, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer,
                                                                              quiet=True)
    return note


def _pre_tokenizer(path: Path) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer: GPT-2's regex is the one known
    here (what transformers builds from GGUF files, and GPT-2's own)."""
    data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return "default"


def _file_type(record) -> str:
    """llama.cpp's name for the file: its mix, ``GUESSED`` for a size target's own mix, the
    type's own otherwise."""
    if record is None:
        return "MOSTLY_F16"
    settings = record.settings
    if settings.sized:
        return "GUESSED"
    if settings.parsed_mix is not None:
        return f"MOSTLY_{settings.parsed_mix.name}"
    return record.scheme.block.file_type


def _block_index(layer: str) -> int | None:
    """``model.layers.7.self_attn.q_proj`` → 7."""
    parts = layer.split(".")
    for a, b in itertools.pairwise(parts):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def write(outcome, directory: Path) -> tuple[list[str], list[str]]:
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, LlamaFileType, get_tensor_name_map

    model, job = outcome.model, outcome.job
    config = model.config
    adapter = adapter_for(model)
    record = outcome.run_of("quantize")
    quantized = record.quantized if record is not None else {}
    family = ARCHS[config.model_type]
    head_dim = head_geometry(config).head_dim
    if adapter.moe is None:
        # Blocks without attention (prune-depth --attention) or of their own widths (shrink
        # --allocation sensitivity) are llama.cpp's deci architecture: per-layer head counts
        # and FFN widths, read from the layers themselves; an attention-free block has 0 heads
        # and no stored norm.
        widths = block_widths(model, head_dim)
    else:
        widths = [BlockWidths(config.num_attention_heads, config.num_key_value_heads,
                              _expert_width(model, adapter))] * config.num_hidden_layers
    free = [w.heads == 0 for w in widths]
    varied = len({(w.heads, w.kv_heads, w.ffn) for w in widths}) > 1
    arch = MODEL_ARCH.DECI if varied else MODEL_ARCH[family.name]
    path = directory / FILE_NAME
    writer = GGUFWriter(path, MODEL_ARCH_NAMES[arch])
    writer.add_type("model")
    writer.add_name(f"{Path(job.model).name} (snapprune)")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    if varied:
        writer.add_feed_forward_length([w.ffn for w in widths])
        writer.add_head_count([w.heads for w in widths])
        writer.add_head_count_kv([w.kv_heads for w in widths])
    else:
        writer.add_feed_forward_length(getattr(config, "intermediate_size", widths[0].ffn)
                                       if adapter.moe is not None else widths[0].ffn)
        writer.add_head_count(widths[0].heads)
        writer.add_head_count_kv(widths[0].kv_heads)
    if adapter.moe is not None:
        _add_mixture(writer, model, adapter, widths[0].ffn)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(LlamaFileType[_file_type(record)])
    writer.add_quantization_version(2)
    source = source_gguf(job.model)
    note = None
    if source is not None:
        _carry_tokenizer(writer, source)
    else:
        note = _build_tokenizer(writer, outcome.tokenizer)

    names = get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    unused = {f"model.layers.{i}.{ATTENTION_NORM}.weight" for i, f in enumerate(free) if f}
    experts: dict[str, list[tuple[int, str, torch.Tensor]]] = {}
    for name, tensor in model.state_dict().items():
        if (tied and name == "lm_head.weight") or name in unused:
            continue
        merged = _merged_expert_name(name, adapter)
        if merged is not None:  # one expert's projection: stacked with its block's others
            experts.setdefault(merged[0], []).append((merged[1], name, tensor))
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise SnapPruneError(f"{name} has no GGUF name in llama.cpp's {family.name.lower()} "
                                 "architecture; write hf")
        layer = name.removesuffix(".weight")
        block = _block_index(layer)
        rows_heads = None
        if not family.neox and block is not None and layer.endswith(("q_proj", "k_proj")):
            own = widths[block]
            rows_heads = own.heads if layer.endswith("q_proj") else own.kv_heads
        if layer in quantized and name.endswith(".weight"):
            data, kind = _packed(quantized[layer], rows_heads)
            writer.add_tensor(target, data, raw_dtype=kind)
            continue
        value = tensor.detach().to(torch.float32)
        if rows_heads is not None:
            value = _permute(value, rows_heads)
        if value.dim() == 1 or (adapter.moe is not None and layer.endswith(
                (adapter.moe.router, *adapter.moe.never_prune))):
            # Norms, and a mixture's router and gates in float32 (as llama.cpp's converter
            # writes them): a rounded router logit can flip a token's top-k choice.
            writer.add_tensor(target, value.numpy())
        else:
            writer.add_tensor(target, value.to(torch.float16).numpy())
    for merged, parts in experts.items():
        _add_experts(writer, merged, sorted(parts, key=lambda part: part[0]), quantized)
    if rope_kind(config) == "llama3":  # llama.cpp divides each pair's frequency by its factor
        writer.add_tensor("rope_freqs.weight", torch.tensor(
            llama3_rope_factors(config, head_dim), dtype=torch.float32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [FILE_NAME], [note] if note else []


def _packed(q, rows_heads: int | None):
    """A quantised layer's bytes in its block type (rows reordered for llama's rope), with the
    ``raw_dtype`` gguf-py needs."""
    from gguf import GGMLQuantizationType

    parts = (q.codes, q.scales, q.zeros, q.supers)
    if rows_heads is not None:
        parts = tuple(None if p is None else _permute(p, rows_heads) for p in parts)
    return q.scheme.block.pack(*parts), GGMLQuantizationType[q.scheme.gguf_type]


def _expert_width(model, adapter) -> int:
    block = adapter.decoder_blocks(model)[0]
    return linear_weight(module_at(block, adapter.moe.experts)[0].down_proj).shape[1]


def _add_mixture(writer, model, adapter, width: int) -> None:
    """The mixture's keys: expert count, experts per token, their width (and the shared
    expert's); llama.cpp reads the top-k renormalisation and gating from the architecture."""
    config = model.config
    block = adapter.decoder_blocks(model)[0]
    writer.add_expert_count(len(module_at(block, adapter.moe.experts)))
    writer.add_expert_used_count(int(getattr(config, adapter.moe.top_k_key)))
    writer.add_expert_feed_forward_length(width)
    if adapter.shared is not None:
        shared = linear_weight(block.get_submodule(adapter.shared.output)).shape[1]
        writer.add_expert_shared_feed_forward_length(shared)


_EXPERT_TENSORS = {"gate_proj": "FFN_GATE_EXP", "up_proj": "FFN_UP_EXP",
                   "down_proj": "FFN_DOWN_EXP"}
"""An expert projection (as ``ExpertLinears`` names it) → llama.cpp's stacked tensor."""


def _merged_expert_name(name: str, adapter) -> tuple[str, int] | None:
    """``model.layers.3.mlp.experts.5.gate_proj.weight`` → (``blk.3.ffn_gate_exps.weight``,
    5): the stacked tensor it goes into, and the expert."""
    from gguf import MODEL_TENSOR, TENSOR_NAMES

    if adapter.moe is None:
        return None
    head = re.escape(adapter.blocks) + r"\.(\d+)\." + re.escape(adapter.moe.experts)
    found = re.fullmatch(head + r"\.(\d+)\.(\w+)\.weight", name)
    if found is None:
        return None
    block, expert, projection = found.groups()
    if projection not in _EXPERT_TENSORS:
        raise SnapPruneError(f"{name} has no GGUF name in llama.cpp; write hf")
    tensor = TENSOR_NAMES[MODEL_TENSOR[_EXPERT_TENSORS[projection]]].format(bid=int(block))
    return f"{tensor}.weight", int(expert)


def _add_experts(writer, target: str, parts, quantized) -> None:
    """A block's experts of one projection as one tensor (experts × rows × columns), in one
    type: the quantiser's codes packed expert by expert, else float16."""
    import numpy as np

    layers = [name.removesuffix(".weight") for _, name, _ in parts]
    if all(layer in quantized for layer in layers):
        types = {quantized[layer].scheme.gguf_type for layer in layers}
        if len(types) > 1:
            raise SnapPruneError(f"{target}: the experts of one block were quantised to "
                                 f"{', '.join(sorted(types))}, but GGUF stores them as one "
                                 "tensor of one type; quantise them alike")
        packed = [_packed(quantized[layer], None) for layer in layers]
        writer.add_tensor(target, np.stack([data for data, _ in packed]),
                          raw_dtype=packed[0][1])
        return
    if any(layer in quantized for layer in layers):
        raise SnapPruneError(f"{target}: some experts of a block are quantised and some are "
                             "not; GGUF stores them as one tensor of one type")
    writer.add_tensor(target, torch.stack([t.detach().to(torch.float16)
                                           for _, _, t in parts]).numpy())


FORMAT = Format("gguf", check_job, check_model, write)
