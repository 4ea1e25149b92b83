"""The JSON report of a run: what was asked, what was achieved, where the time went."""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict

from .eval.perplexity import PerplexityResult
from .models.pipeline import PruneRun
from .models.width import ShrinkRun, width_report


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"snapprune": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0],
            "platform": platform.platform()}


def prune_report(
    run: PruneRun | ShrinkRun,
    *,
    model: str,
    calibration: dict,
    device: str,
    perplexities: dict[str, PerplexityResult] | None = None,
    dense_perplexities: dict[str, PerplexityResult] | None = None,
    extra_seconds: dict[str, float] | None = None,
    zeroshot: dict | None = None,
) -> dict:
    settings = asdict(run.settings)
    settings.pop("pattern", None)
    shrink = isinstance(run, ShrinkRun)
    return {
        "model": model,
        "architecture": run.architecture,
        "method": settings.pop("method"),
        "pattern": run.settings.pattern,
        "target_sparsity": None if shrink else _target(run),
        "achieved_sparsity": run.achieved_sparsity,
        "settings": settings,
        **({"width": width_report(run)} if shrink else {}),
        "calibration": calibration,
        "device": device,
        "activations": run.activations or None,
        "activation_bytes": run.activation_bytes or None,
        "deterministic": run.deterministic,
        "layers": [asdict(r) for r in run.layers],
        "timing": {
            "calibration_forward_seconds": run.calibration_seconds,
            "solver_seconds": run.solver_seconds,
            "pruning_seconds": run.total_seconds,
            **(extra_seconds or {}),
        },
        "peak_memory_bytes": run.peak_memory_bytes,
        **({"ranks": run.ranks} if getattr(run, "ranks", None) else {}),
        "perplexity": {k: asdict(v) for k, v in (perplexities or {}).items()},
        "dense_perplexity": {k: asdict(v) for k, v in (dense_perplexities or {}).items()},
        **({"zeroshot": zeroshot} if zeroshot else {}),
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _target(run: PruneRun) -> float:
    return run.settings.check()[1]
