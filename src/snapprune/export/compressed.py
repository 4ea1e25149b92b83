"""``compressed-tensors``: the format llm-compressor writes and vLLM serves, written with the
compressed-tensors package: ``pack-quantized`` integer weights (8 codes of 4 bits, or 4 of 8
bits, to an int32) with their group scales, the quantisation config in ``config.json``.
transformers loads it through its compressed-tensors support; vLLM serves 4- and 8-bit
weights (W4A16, W8A16). Symmetric schemes only: the library packs asymmetric zero points but
cannot unpack them, so transformers could not load such a file back (llm-compressor issue
1704).

A mixture is written as its family's checkpoints name it (Mixtral's experts as
``block_sparse_moe.experts.N.w1``/``w3``/``w2``, the names vLLM's loaders read), one packed
tensor per expert and projection; its routers (and Qwen2-MoE's shared-expert gate) stay dense
and are listed in ``ignore``, as llm-compressor writes them.

Groups are the quantiser's, in natural column order (activation order with static groups
needs no ``g_idx``); the codes are compressed-tensors' own quantisation of the grid values
with the quantiser's scales, which returns the quantiser's codes exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import SnapPruneError
from .format import Format, require

FORMAT_NAME = "pack-quantized"


def check_job(job) -> None:
    require("compressed_tensors", "deploy")
    step = job.settings("quantize")
    if step is None:
        raise SnapPruneError("compressed-tensors stores quantised weights: add a quantisation "
                             "(e.g. --quantize w4g128), or write hf")
    scheme = step.parsed_scheme
    if True:
        if scheme.gguf:
            raise SnapPruneError(
                f"compressed-tensors holds w* schemes (w4g128, w8, ...), not llama.cpp's "
                f"{scheme.name}: quantise with a w* scheme or write gguf")
        if not scheme.symmetric:
            raise SnapPruneError(
                f"{scheme.name}: compressed-tensors packs asymmetric zero points that its "
                "decompressor cannot unpack (llm-compressor issue 1704), so transformers "
                "cannot load the file back; use a symmetric scheme, or write hf")


def check_model(model, job) -> None:
    """Whole groups in every quantised layer (the library refuses a partial last group, and
    vLLM's kernels need whole groups), at the widths the layers will have."""
    from ..models.adapters import adapter_for
    from ..models.layout import input_width
    from ..models.shrink import plan_width
    from ..models.targets import target_layers
    from .hf import differing_blocks

    if differing_blocks(model) is not None:
        raise SnapPruneError("this model's blocks differ in shape (a Nemotron-NAS checkpoint or "
                             "a per-block cut), which compressed-tensors' one config cannot "
                             "describe: write --format hf (the Nemotron-NAS layout) or gguf")
    moe = adapter_for(model).moe
    if moe is not None and moe.stored_fused:
        raise SnapPruneError(f"compressed-tensors writes each expert under its own name, and "
                             f"{model.config.model_type}'s checkpoints keep a block's experts "
                             "fused (as its runtimes read them): write hf")
    quantize = job.settings("quantize")
    group = quantize.parsed_scheme.group_size
    if group is None:
        return
    widths = {input_width(m) for named in target_layers(model, quantize.include,
                                                        quantize.exclude).values()
              for m in named.values()}
    shrink = job.settings("shrink")
    if shrink is not None:
        plan = plan_width(model, shrink)
        widths |= {plan.mlp_new, plan.heads_new * plan.head_dim}
    bad = sorted(w for w in widths if w % group)
    if bad:
        fits = [g for g in (128, 64, 32) if all(w % g == 0 for w in widths)]
        raise SnapPruneError(
            f"{quantize.scheme}: compressed-tensors (and vLLM's kernels) need whole groups, but "
            f"layers have {bad[0]} inputs, not a multiple of {group}; "
            + (f"use g{fits[0]}" if fits else "write hf") + " (or shrink with --multiple-of "
            f"{group})")


def _args(scheme):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
        strategy="group" if scheme.group_size else "channel", group_size=scheme.group_size)


def write(outcome, directory: Path) -> list[str]:
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from ..models.adapters import adapter_for

    model = outcome.model
    record = outcome.run_of("quantize")
    stored = _stored_names(adapter_for(model))
    scheme = record.scheme
    qscheme = QuantizationScheme(targets=["Linear"], weights=_args(scheme))
    dtype = next(model.parameters()).dtype
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for name, layer in record.quantized.items():
        weight = state.pop(f"{name}.weight").to(torch.float32)
        scale_dtype = getattr(torch, record.scale_dtype)
        entries = {"weight": weight, "weight_scale": layer.scales.to(scale_dtype)}
        packed = PackedQuantizationCompressor.compress(entries, qscheme)
        state.update({f"{name}.{key}": value for key, value in packed.items()})
    state = {stored(k): v for k, v in state.items()}
    dense = [n for n in linear if n not in record.quantized] + _routers(model)
    config = QuantizationConfig(
        config_groups={"group_0": qscheme}, format=FORMAT_NAME,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=list(dict.fromkeys(stored(n + ".")[:-1] for n in dense)))
    written = []
    shards = split_torch_state_dict_into_shards(state, max_shard_size="5GB")
    for file, names in shards.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(directory / file), metadata={"format": "pt"})
        written.append(file)
    if shards.is_sharded:
        index = {"metadata": shards.metadata, "weight_map": shards.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        written.append("model.safetensors.index.json")
    config_data = model.config.to_dict()
    config_data["torch_dtype"] = str(dtype).removeprefix("torch.")
    import compressed_tensors

    config_data["quantization_config"] = {
        "version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
        **config.model_dump(exclude=["quant_method"])}
    (directory / "config.json").write_text(json.dumps(config_data, indent=2, default=str),
                                          encoding="utf-8")
    written.append("config.json")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
        written.append("generation_config.json")
    if outcome.tokenizer is not None:
        outcome.tokenizer.save_pretrained(directory)
    return written, []


def _stored_names(adapter):
    """Tensor names as the family's checkpoints spell them (identity for a dense model)."""
    return adapter.moe.stored_name if adapter.moe is not None else (lambda name: name)


def _routers(model) -> list[str]:
    """Every block's router and gates (modules that must stay dense), model-relative."""
    from ..models.adapters import adapter_for, module_at

    adapter = adapter_for(model)
    if adapter.moe is None:
        return []
    blocks = adapter.decoder_blocks(model)
    return [f"{adapter.blocks}.{i}.{path}" for i, block in enumerate(blocks)
            for path in (adapter.moe.router, *adapter.moe.never_prune)
            if module_at(block, path) is not None]


FORMAT = Format("compressed-tensors", check_job, check_model, write)
