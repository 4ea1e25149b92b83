"""Perplexity in llama.cpp itself (llama-cpp-python): a GGUF file's own logits on token
windows, each window from a fresh context — the runtime's view of a file snapprune wrote,
comparable window for window with ``eval.perplexity`` on the same token ids."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SnapPruneError


def llama_cpp_perplexity(path: str | Path, windows: list[list[int]], *,
                         threads: int = 2) -> float:
    """``exp`` of the mean next-token negative log-likelihood of every window, from
    llama.cpp's logits."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise SnapPruneError("this needs llama-cpp-python: pip install 'snapprune[llama]' "
                             "(it builds llama.cpp from source)")
    from llama_cpp import Llama

    context = max(len(w) for w in windows)
    llm = Llama(str(path), n_ctx=context, n_batch=min(context, 512), n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)
    nll, count = 0.0, 0
    try:
        for window in windows:
            llm.reset()
            llm.eval(window)
            logits = torch.from_numpy(np.array(llm.scores[: len(window) - 1], dtype=np.float32))
            nll += F.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
            count += len(window) - 1
    finally:
        llm.close()
    return math.exp(nll / count)
