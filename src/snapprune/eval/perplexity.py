"""Perplexity over non-overlapping windows (the SparseGPT/Wanda protocol)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import iter_windows
from ..errors import SnapPruneError


@dataclass
class PerplexityResult:
    source: str
    perplexity: float
    windows: int
    seqlen: int
    tokens: int
    seconds: float


def model_context(model) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def capped_seqlen(model, seqlen: int) -> int:
    """``seqlen`` capped at the model's context length."""
    context = model_context(model)
    return min(seqlen, context) if context else seqlen


def exp_nll(mean_nll: float) -> float:
    """``exp`` of a mean negative log-likelihood, ``inf`` where it overflows (a mean above
    about 709 nats): a model that bad gets an infinite perplexity in its report, not a crash
    after the work that produced it."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


@torch.no_grad()
def perplexity(
    model,
    ids: torch.Tensor,
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str | torch.device = "cpu",
    source: str = "",
    progress: bool = True,
    label: str = "",
) -> PerplexityResult:
    """``exp`` of the mean next-token negative log-likelihood over all predicted tokens of
    every non-overlapping ``seqlen`` window (each window starts with a fresh context)."""
    seqlen = capped_seqlen(model, seqlen)
    windows = list(iter_windows(ids, seqlen, max_windows))
    if not windows:
        raise SnapPruneError(
            f"the evaluation text has {ids.numel()} tokens, less than one window of {seqlen}; "
            "lower seqlen"
        )
    device = torch.device(device)
    start = time.perf_counter()
    nll, count = 0.0, 0
    for window in tqdm(windows, desc=f"{label} perplexity {source}".strip(), unit="win",
                       disable=not progress):
        logits = model(window[None].to(device), use_cache=False).logits[0, :-1].float()
        nll += F.cross_entropy(logits, window[1:].to(device), reduction="sum").item()
        count += window.numel() - 1
    ppl = exp_nll(nll / count)
    if math.isnan(ppl):
        raise SnapPruneError("perplexity is not a number: the model produces NaN logits")
    return PerplexityResult(source, ppl, len(windows), seqlen, count,
                            time.perf_counter() - start)
