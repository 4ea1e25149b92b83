"""Progress bars: ours (one per phase) and the libraries', all following ``--quiet``.

The libraries' own switches are used where they exist: transformers' and huggingface_hub's
``disable_progress_bar(s)``, datasets' ``disable_progress_bars``, lm-eval's ``disable_tqdm``
(``eval.zeroshot``). One bar has no switch: transformers' GGUF de-quantisation loop, whose
module-level ``tqdm`` is replaced by a disabled one for the duration of a quiet load.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator


def bars_wanted(progress: bool | None = None) -> bool:
    """``None``: bars when standard error is a terminal (a log file gets no bar lines)."""
    if progress is None:
        return sys.stderr.isatty()
    return progress


@contextlib.contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """The libraries' progress bars on or off inside the block, restored after it."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    hub_was_off = hub_utils.are_progress_bars_disabled()
    hf_was_on = hf_logging.is_progress_bar_enabled()
    hub_utils.disable_progress_bars()
    hf_logging.disable_progress_bar()
    datasets = sys.modules["datasets"].utils if "datasets" in sys.modules else None
    datasets_was_on = datasets is not None and not datasets.are_progress_bars_disabled()
    if datasets_was_on:
        datasets.disable_progress_bars()
    gguf = _gguf_converter()
    original = getattr(gguf, "tqdm", None)
    if original is not None:
        gguf.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf.tqdm = original
        if datasets_was_on:
            datasets.enable_progress_bars()
        if hf_was_on:
            hf_logging.enable_progress_bar()
        if not hub_was_off:
            hub_utils.enable_progress_bars()


def _gguf_converter():
    with contextlib.suppress(ImportError):
        from transformers import modeling_gguf_pytorch_utils

        return modeling_gguf_pytorch_utils
    return None


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
