"""What a saved checkpoint holds, read and checked before any weight is loaded.

``transformers`` fills a missing tensor with random values and reports a truncated file or a
bad config value with a traceback; here each is refused in one line that names the fix. Only
headers are read (safetensors headers, a PyTorch checkpoint mapped onto the meta device), and the
model the config describes is built on the meta device to compare names and shapes.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SnapPruneError

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
RESAVE = "re-download the model, or save it again with save_pretrained"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4"}


@dataclass(frozen=True)
class TensorHeader:
    """One checkpoint tensor as its file's header describes it (no data read)."""

    shape: tuple[int, ...]
    floating: bool
    dtype: str
    file: str


def one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception's message as one short line (library messages span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(n) for n in shape) or "a scalar"


def read_config(directory: str | Path):
    """``config.json`` as ``transformers`` reads it, or a one-line refusal naming the bad
    value (``transformers`` raises a multi-line validation error, or a traceback)."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SnapPruneError(f"{path} is not valid JSON ({one_line(exc)}); {RESAVE}") from None
    if not isinstance(raw, dict):
        raise SnapPruneError(f"{path} holds a JSON {type(raw).__name__}, not an object of "
                             f"settings; {RESAVE}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoConfig.from_pretrained(str(directory))
    except Exception as exc:  # validation errors, unknown model types, wrong value types
        raise SnapPruneError(f"{path} has a value transformers cannot use ({one_line(exc)}); "
                             f"fix that value, or {RESAVE}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _safetensors_headers(file: Path) -> dict[str, TensorHeader]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            out = {}
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle has no __iter__)
                part = handle.get_slice(name)
                dtype = str(part.get_dtype())
                out[name] = TensorHeader(tuple(part.get_shape()), dtype in _FLOAT_DTYPES, dtype,
                                         file.name)
            return out
    except Exception as exc:  # SafetensorError (truncated, bad header), OSError
        raise SnapPruneError(f"{file} is not a readable safetensors file ({one_line(exc)}): it "
                             f"is truncated or corrupt; {RESAVE}") from None


def _bin_headers(file: Path) -> dict[str, TensorHeader]:
    try:  # mapped onto the meta device: shapes and dtypes, no data read
        try:
            state = torch.load(str(file), map_location="meta", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be mapped: read it
            state = torch.load(str(file), map_location="meta", weights_only=True)
    except Exception as exc:
        raise SnapPruneError(f"{file} is not a readable PyTorch checkpoint ({one_line(exc)}): "
                             f"it is truncated or corrupt; {RESAVE}") from None
    if not isinstance(state, dict):
        raise SnapPruneError(f"{file} holds a {type(state).__name__}, not a state dict; {RESAVE}")
    return {name: TensorHeader(tuple(t.shape), t.is_floating_point(), str(t.dtype), file.name)
            for name, t in state.items() if isinstance(t, torch.Tensor)}


def _index_headers(index: Path, read) -> dict[str, TensorHeader]:
    """The tensors an index maps, each checked against its shard's own header."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SnapPruneError(f"{index} is not valid JSON ({one_line(exc)}); {RESAVE}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SnapPruneError(f"{index} has no weight_map (tensor name → shard file); {RESAVE}")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or Path(file).name != file:
            raise SnapPruneError(f"{index} maps {name} to {file!r}, not a shard file name in "
                                 f"{index.parent}; {RESAVE}")
    headers: dict[str, TensorHeader] = {}
    for file in sorted(set(weight_map.values())):
        shard = index.parent / file
        if not shard.is_file():
            raise SnapPruneError(f"{index} names the shard {file}, which is missing from "
                                 f"{index.parent}; download the missing shard, or {RESAVE}")
        held = read(shard)
        for name in (n for n, f in weight_map.items() if f == file):
            if name not in held:
                raise SnapPruneError(f"{index} says {name} is in {file}, which does not hold "
                                     f"it; {RESAVE}")
            headers[name] = held[name]
    return headers


def checkpoint_layouts(directory: str | Path) -> list[dict[str, TensorHeader]]:
    """Each weight layout in ``directory`` (a single file, an index of shards), read from the
    headers only; both are checked when both are there (``transformers`` reads the single file
    first, streaming the index)."""
    directory = Path(directory)
    layouts = []
    if (directory / SAFETENSORS_INDEX).is_file():
        layouts.append(_index_headers(directory / SAFETENSORS_INDEX, _safetensors_headers))
    if (directory / SAFETENSORS_NAME).is_file():
        layouts.append(_safetensors_headers(directory / SAFETENSORS_NAME))
    if not layouts and (directory / BIN_NAME).is_file():
        layouts.append(_bin_headers(directory / BIN_NAME))
    if not layouts and (directory / BIN_INDEX).is_file():
        layouts.append(_index_headers(directory / BIN_INDEX, _bin_headers))
    if not layouts:
        raise SnapPruneError(f"{directory} holds no weights ({SAFETENSORS_NAME}, "
                             f"{SAFETENSORS_INDEX} or {BIN_NAME}); {RESAVE}")
    for layout in layouts:
        if not layout:
            raise SnapPruneError(f"{directory}'s weight files hold no tensors; {RESAVE}")
    return layouts


def _renamer(model):
    """``key -> (model key, converter or None)`` as ``transformers`` renames checkpoint keys on
    load (legacy names, fused experts, the base-model prefix)."""
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # older transformers: names as saved, the prefix added or removed
        def plain(key: str):
            if key in meta:
                return key, None
            if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in meta:
                return key[len(prefix) + 1:], None
            return (f"{prefix}.{key}" if f"{prefix}.{key}" in meta else key), None
        return plain

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}

    def rename(key: str):
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if target not in meta and key in meta:
            target, pattern = rename_source_key(key, [], [], prefix, meta)
        return target, (by_pattern.get(pattern) if pattern is not None else None)
    return rename


def _ignored(model, attribute: str) -> re.Pattern | None:
    patterns = set(getattr(model, attribute, None) or ())
    if attribute == "_keys_to_ignore_on_load_unexpected":  # as transformers drops them too
        patterns |= {r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"}
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def _compare(model, tensors: dict[str, TensorHeader], directory: Path) -> None:
    """Refuse tensors the model needs but the checkpoint lacks, and tensors of another shape."""
    meta = model.state_dict()
    rename = _renamer(model)
    covered: set[str] = set()
    wrong: list[str] = []
    fused: dict[str, tuple[list[str], int]] = {}
    unexpected: list[str] = []
    for key, header in sorted(tensors.items()):
        target, converter = rename(key)
        if target not in meta:
            unexpected.append(key)
            continue
        if converter is None:
            covered.add(target)
            expected = tuple(meta[target].shape)
            if header.shape != expected:
                wrong.append(f"{key} is {_shape(header.shape)} in {header.file} but "
                             f"{type(model).__name__} needs {_shape(expected)}")
            elif meta[target].is_floating_point() and not header.floating:
                wrong.append(f"{key} holds {header.dtype} values in {header.file} where "
                             f"{type(model).__name__} needs floating-point weights")
            continue
        first = converter.target_patterns[0]
        targets = [target.replace(first, t) for t in converter.target_patterns]
        names, count = fused.get(target, (targets, 0))
        fused[target] = (names, count + math.prod(header.shape))
    for target, (names, count) in fused.items():
        present = [n for n in names if n in meta]
        covered.update(present)
        expected = sum(meta[n].numel() for n in present)
        if count != expected:  # a missing expert, or experts of another width
            wrong.append(f"the tensors fused into {target} hold {count:,} values but "
                         f"{type(model).__name__} needs {expected:,}")
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise SnapPruneError(f"{directory}: {wrong[0]}{more}; the weights and config.json "
                             "describe different models: use the config.json saved with these "
                             f"weights, or {RESAVE}")
    tied = (model.get_expanded_tied_weights_keys(all_submodels=True)
            if hasattr(model, "get_expanded_tied_weights_keys") else {})
    for target, source in tied.items():
        if target in covered or source in covered:
            covered.update((target, source))
    skip = _ignored(model, "_keys_to_ignore_on_load_missing")
    missing = [n for n, _ in model.named_parameters(remove_duplicate=False)
               if n not in covered and not (skip and skip.search(n))]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SnapPruneError(
            f"{directory} lacks {len(missing)} tensor{'s' if len(missing) > 1 else ''} that "
            f"{type(model).__name__} (config.json) needs: {', '.join(missing[:3])}{more}; loading "
            f"would fill {'them' if len(missing) > 1 else 'it'} with random values: {RESAVE}")
    skip = _ignored(model, "_keys_to_ignore_on_load_unexpected")
    unexpected = [k for k in unexpected if not (skip and skip.search(k))]
    shapes = {re.sub(r"\.\d+\.", ".#.", n) for n in covered}
    deeper = [k for k in unexpected if re.sub(r"\.\d+\.", ".#.", k) in shapes]
    if deeper:  # layers (or experts) config.json does not count: they would be dropped
        raise SnapPruneError(
            f"{directory} holds {len(deeper)} tensor{'s' if len(deeper) > 1 else ''} of layers "
            f"config.json does not describe (e.g. {deeper[0]}); loading would drop them: use "
            f"the config.json saved with these weights, or {RESAVE}")
    if unexpected:
        warnings.warn(f"{directory}: {len(unexpected)} checkpoint tensors are not used by "
                      f"{type(model).__name__} and are ignored (e.g. {unexpected[0]})",
                      stacklevel=2)


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_SIZE_KEYS = ("hidden_size", "n_embd", "intermediate_size", "ffn_dim", "n_inner", "vocab_size",
              "num_attention_heads", "n_head", "num_key_value_heads", "head_dim",
              "num_local_experts", "num_experts", "moe_intermediate_size",
              "max_position_embeddings", "n_positions", "rotary_dim")


def _check_sizes(config, layouts: list[dict[str, TensorHeader]], where: Path) -> None:
    """Refuse a config that describes far more than the checkpoint holds before the model is
    built: a corrupted ``num_hidden_layers`` of 10**9 would otherwise build for hours. A
    model has no more layers than tensors and no dimension larger than its value count."""
    tensors = min(len(layout) for layout in layouts)
    values = min(sum(math.prod(h.shape) for h in layout.values()) for layout in layouts)
    for keys, limit, what in ((_LAYER_KEYS, tensors, "tensors"), (_SIZE_KEYS, values, "values")):
        for key in keys:
            value = getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > limit:
                raise SnapPruneError(
                    f"{where / 'config.json'} says {key} = {value:,}, more than the {limit:,} "
                    f"{what} its weights hold; use the config.json saved with these weights, "
                    f"or {RESAVE}")


def _stamp(directory: Path) -> tuple:
    """What the check depends on: every file's name, size and modification time."""
    try:
        return tuple(sorted((p.name, s.st_size, s.st_mtime_ns)
                            for p in directory.iterdir() if p.is_file() for s in [p.stat()]))
    except OSError as exc:
        raise SnapPruneError(f"cannot list {directory} ({exc.strerror or exc}); check its "
                             "permissions") from None


def _check_against(config, path: Path) -> None:
    layouts = checkpoint_layouts(path)
    _check_sizes(config, layouts, path)
    if getattr(config, "quantization_config", None) is not None:
        return  # a quantised checkpoint: its quantiser maps its tensors, not the config
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = empty_model(config)
    except Exception as exc:  # a value of the right type that builds nothing (heads = 0, ...)
        raise SnapPruneError(f"{path / 'config.json'} describes no causal LM transformers can "
                             f"build ({one_line(exc)}); fix config.json, or {RESAVE}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    for tensors in layouts:
        _compare(model, tensors, path)


@functools.lru_cache(maxsize=8)
def _checked(directory: str, stamp: tuple):
    """The config of a checked directory; cached, so that each path of a run checks it once."""
    config = read_config(directory)
    _check_against(config, Path(directory))
    return config


def check_checkpoint(directory: str | Path, config=None):
    """Check a saved model before any weight is loaded, and return its config.

    Reads ``config.json`` (or takes ``config``), the safetensors headers or index (or a
    PyTorch checkpoint mapped onto the meta device) and builds the model on the meta device;
    refuses in one line a truncated or unreadable file, a bad index, a config that describes
    another model, tensors the model needs but the checkpoint lacks (which ``transformers``
    would fill with random values), and tensors of another shape. Cheap (milliseconds for a
    small model) and cached per directory state, so every loading path can call it."""
    directory = Path(directory).expanduser().resolve()
    if config is None:
        return copy.deepcopy(_checked(str(directory), _stamp(directory)))
    _check_against(config, directory)
    return config



def empty_model(config, dtype: torch.dtype | None = None):
    """The model ``config`` describes, built without weights (parameters on the meta device,
    buffers such as rotary frequencies real): no random initialisation to pay for."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
