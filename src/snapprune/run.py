"""One run path: ``execute(job, out)`` does everything a command does — check, load,
estimate, evaluate the model before, apply the job's steps, evaluate after, sample, report and
save — for ``prune``, ``shrink``, ``eval``, every ``sweep`` cell, recipes and the Python API.

A ``Workbench`` holds one loaded model and what several jobs on it can share (tokenised
calibration sets, the first block's inputs, tokenised evaluation text). The device contract:
the model stays where it was loaded (CPU); block-wise steps move one block at a time to the
device and back; evaluation and sampling move the model to the device for their duration only,
or, when it does not fit there, dispatch it across device and CPU (``placed``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .engine import determinism
from .errors import SnapPruneError
from .eval.perplexity import capped_seqlen
from .generate import DEFAULT_PROMPTS
from .jobs import Job, recipe_text
from .models import collectives
from .models.prune import PruneRun
from .models.quantize import QuantizeRun
from .models.settings import PruneSettings, QuantizeSettings, RecoverSettings, ShrinkSettings
from .models.shrink import ShrinkRun
from .outputs import REPORT_NAME, check_output_dir, save_directory, write_json_atomic
from .recovery import RecoveryStep
from .workbench import Evaluated, Workbench


@dataclass
class Outcome:
    """What ``execute`` did: the job as run (every default named), the model after it, what
    each step did, the evaluations before and after, and the report that was written."""

    job: Job
    model: torch.nn.Module | None
    tokenizer: object
    runs: list = field(default_factory=list)
    dense: Evaluated | None = None
    evaluated: Evaluated | None = None
    generations: list[dict] | None = None
    report: dict = field(default_factory=dict)
    saved: Path | None = None
    notes: list[str] = field(default_factory=list)
    estimate: object = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def run(self):
        return self.runs[0] if self.runs else None


def wants_stream(job: Job, resume: bool, out: str | Path | None = None) -> bool:
    """A single prune step streams when ``stream`` asks, when ``resume`` finds a stopped
    streamed run for ``out``, or by itself when a local safetensors model would not fit in
    memory."""
    single = len(job.steps) == 1 and isinstance(job.steps[0], PruneSettings)
    if job.execution.stream:
        return True
    if job.execution.stream is False or not single:
        return False
    from .models.loading import resolve_model
    from .models.streaming import partial_dir, should_stream

    if resume and out is not None and partial_dir(Path(out).expanduser().resolve()).is_dir():
        return True
    source = resolve_model(job.model)
    return source.is_local and source.gguf_file is None and should_stream(source.path)


def execute(
    job: Job,
    out: str | Path | None = None,
    *,
    bench: Workbench | None = None,
    overwrite: bool = False,
    json_path: str | Path | None = None,
    resume: bool = False,
    restart: bool = False,
    progress: bool = True,
    verbose: bool = False,
    log: Callable[[str], None] | None = None,
    argv: list[str] | None = None,
    announce: bool = True,
) -> Outcome:
    """Run ``job`` and write its outputs: the model (in the job's format), its report and its
    recipe into ``out`` (``None``: nothing saved), the report also to ``json_path``.

    ``bench``: a workbench holding the loaded model (sweeps, notebooks); else the job's model
    is loaded. ``resume``/``restart``: continue or discard a streamed run's saved progress.
    ``announce``: measure and say how long the job will take (``estimate``) before it starts.
    Bad input is refused with a ``SnapPruneError`` before anything is loaded or written.
    """
    from .report import build_report

    log = log or (lambda _message: None)
    started = time.perf_counter()
    job.validate()
    job, notes = job.resolved()
    job.validate()
    streamed = bench is None and wants_stream(job, resume, out)
    if out is not None:
        out = (Path(out).expanduser().resolve() if streamed and resume
               else check_output_dir(out, overwrite))
    if json_path is not None and not Path(json_path).expanduser().resolve().parent.is_dir():
        raise SnapPruneError(f"the directory of {json_path} does not exist; create it first")
    if streamed:
        return _execute_streamed(job, out, notes=notes, json_path=json_path, resume=resume,
                                 restart=restart, progress=progress, verbose=verbose, log=log,
                                 argv=argv, started=started)
    group = collectives.current()
    main = group.is_main
    if group.active and any(isinstance(s, QuantizeSettings) for s in job.steps):
        raise SnapPruneError("quantisation runs in one process; prune or shrink under "
                             "torchrun, then quantise the output in one process")
    device = _rank_device(job.execution.device)
    for note in notes:
        if main:
            log(note)
    with determinism.deterministic(job.execution.deterministic):
        outcome = Outcome(job, None, None, notes=notes)
        seconds = outcome.seconds
        if bench is None:
            from .models.loading import load_model

            t = time.perf_counter()
            model, tokenizer, _ = load_model(job.model, dtype=job.dtype,
                                             revision=job.revision,
                                             progress=progress and main)
            seconds["model_loading_seconds"] = time.perf_counter() - t
            bench = Workbench(model, tokenizer, device=device,
                              progress=progress and main, log=log if main else None)
        bench.check(job)
        if job.needs_calibration:  # text that cannot serve is refused before any estimate
            bench.calibration_ids(job.calibration)
        if job.steps and main and announce:
            from .estimate import estimate_job

            outcome.estimate = estimate_job(bench, job)
            log(outcome.estimate.describe())
        if main and job.steps and job.evaluation.dense:
            t = time.perf_counter()
            outcome.dense = bench.evaluate(job.evaluation, label=before_label(job))
            seconds["dense_evaluation_seconds"] = time.perf_counter() - t
        before = bench.samples() if main and job.steps and job.output.samples else None
        recovery = RecoveryStep(job, bench, out, resume=resume, restart=restart, log=log)
        for step, quantize in stages(job.steps):
            if isinstance(step, RecoverSettings):
                outcome.runs.append(recovery.run(step, progress=progress and main))
            else:
                recovery.keep_teacher()
                outcome.runs.append(bench.apply(step, job, verbose=verbose,
                                                quantize=quantize))
        if group.active:  # nothing below calls a collective: the others may go
            group.leave()
        if not main:
            outcome.model, outcome.tokenizer = bench.model, bench.tokenizer
            return outcome
        for run in outcome.runs:
            _log_run(run, log)
        t = time.perf_counter()
        outcome.evaluated = bench.evaluate(job.evaluation, label=after_label(job))
        seconds["evaluation_seconds"] = time.perf_counter() - t
        if before is not None:
            after = bench.samples()
            outcome.generations = [{"prompt": p, "dense": d, "pruned": a}
                                   for p, d, a in zip(DEFAULT_PROMPTS, before, after,
                                                      strict=True)]
        outcome.model, outcome.tokenizer = bench.model, bench.tokenizer
        seconds["total_seconds"] = time.perf_counter() - started
        calibration_ids = (bench.calibration_ids(job.calibration)[0]
                           if job.needs_calibration else None)
        outcome.report = build_report(outcome, argv=argv, calibration_ids=calibration_ids)
        if out is not None:
            outcome.saved = _save(outcome, Path(out), overwrite=overwrite)
            outcome.report["saved_to"] = str(outcome.saved)
            recovery.finished()
        if json_path is not None:
            write_json_atomic(json_path, outcome.report)
    return outcome


def stages(steps) -> list[tuple]:
    """The passes a job's steps run in: a prune or shrink step followed by quantisation is one
    pass (joint: the same statistics, each layer quantised right after it is pruned);
    ``(step, quantisation fused into it or None)``."""
    out, index = [], 0
    while index < len(steps):
        step = steps[index]
        following = steps[index + 1] if index + 1 < len(steps) else None
        if isinstance(step, (PruneSettings, ShrinkSettings)) \
                and isinstance(following, QuantizeSettings):
            out.append((step, following))
            index += 2
        else:
            out.append((step, None))
            index += 1
    return out


AFTER = {PruneSettings: "pruned", ShrinkSettings: "shrunk", QuantizeSettings: "quantised",
         RecoverSettings: "recovered"}


def after_label(job: Job) -> str:
    """How the model after the job's steps is called (``pruned``, ``shrunk``, ...)."""
    return AFTER.get(type(job.steps[-1]), "after") if job.steps else ""


def before_label(job: Job) -> str:
    """How the model before them is called: ``dense`` when the job prunes or shrinks it."""
    return "dense" if any(isinstance(s, (PruneSettings, ShrinkSettings)) for s in job.steps) \
        else "before"


def _rank_device(device: str) -> str:
    """``cuda`` means this rank's own GPU under ``torchrun``."""
    if not collectives.current().active:
        return device
    from .models.distributed import rank_device

    return rank_device(device)


def _log_run(run, log) -> None:
    if isinstance(run, ShrinkRun):
        plan = run.plan
        log(f"shrank MLP {plan.mlp_old} -> {plan.mlp_new} neurons, heads {plan.heads_old} -> "
            f"{plan.heads_new}: {run.parameters_before:,} -> {run.parameters_after:,} "
            f"parameters in {run.total_seconds:.1f}s (solver {run.solver_seconds:.1f}s)")
    elif isinstance(run, PruneRun):
        log(f"pruned {len(run.layers)} layers to sparsity {run.achieved_sparsity:.4f} in "
            f"{run.total_seconds:.1f}s (solver {run.solver_seconds:.1f}s)")
    elif isinstance(run, QuantizeRun):
        log(f"quantised {len(run.layers)} layers ({run.settings.method} {run.settings.scheme}) "
            f"in {run.total_seconds:.1f}s")
    quantization = getattr(run, "quantization", None)
    if quantization is not None:
        log(f"quantised {len(quantization.layers)} layers ({quantization.settings.method} "
            f"{quantization.settings.scheme}) in the same pass")


def _save(outcome: Outcome, out: Path, *, overwrite: bool) -> Path:
    """The model in the job's format, its tokenizer, report and recipe, atomically."""
    from .export import get_format

    def fill(tmp: Path) -> None:
        files = get_format(outcome.job.output.format).write(outcome, tmp)
        from .recovery import RecoverRun, plot_curves

        for run in outcome.runs:
            if isinstance(run, RecoverRun) and plot_curves(run, tmp / "recovery.png"):
                files.append("recovery.png")
        outcome.report["files"] = {name: (tmp / name).stat().st_size for name in files}
        outcome.report["notes"] = list(outcome.notes)
        write_json_atomic(tmp / REPORT_NAME, outcome.report)
        (tmp / RECIPE_NAME).write_text(recipe_text(outcome.job), encoding="utf-8")

    return save_directory(out, fill, overwrite=overwrite)


RECIPE_NAME = "snapprune_recipe.yaml"


def _execute_streamed(job: Job, out: Path | None, *, notes, json_path, resume, restart,
                      progress, verbose, log, argv, started) -> Outcome:
    """A prune too large for memory: read, prune and write one block at a time."""
    from transformers import AutoTokenizer

    from .data import calibration_windows
    from .models.loading import resolve_model
    from .models.streaming import discard_partial, partial_dir, stream_prune
    from .report import build_report

    settings = job.steps[0] if job.steps else None
    if not isinstance(settings, PruneSettings) or len(job.steps) != 1:
        raise SnapPruneError("streaming runs one prune step; shrink and the other steps need "
                             "the model in memory")
    if out is None:
        raise SnapPruneError("a streamed run writes the model block by block: give it an "
                             "output directory (--out DIR)")
    if job.evaluation.ppl or job.evaluation.zeroshot:
        raise SnapPruneError("a streamed model is never whole in memory, so it is not evaluated "
                             "here: drop --eval/--zeroshot and run snapprune eval on the "
                             "output")
    if job.calibration.source == "self":
        raise SnapPruneError("calibration source self generates text with the whole model; a "
                             "streamed run needs a text source (a local file, c4-sample, c4)")
    if job.output.format != "hf":
        raise SnapPruneError("a streamed run writes safetensors (format hf); convert the "
                             "output afterwards")
    source = resolve_model(job.model)
    if source.gguf_file:
        raise SnapPruneError("streaming reads safetensors; convert the GGUF file first (load it "
                             "with transformers and save_pretrained, or prune it in memory "
                             "with --no-stream)")
    path = source.path
    if not source.is_local:
        from huggingface_hub import snapshot_download

        from .hub import require_hub

        require_hub(f"model {job.model!r}", "pass a local directory")
        path = snapshot_download(job.model, revision=job.revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    group = collectives.current()
    for note in notes:
        if group.is_main:
            log(note)
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = job.calibration
    outcome = Outcome(job, None, tokenizer, notes=notes)
    made: dict[str, torch.Tensor] = {}

    def calibration(model):
        ids = calibration_windows(spec.source, tokenizer, nsamples=spec.nsamples,
                                  seqlen=capped_seqlen(model, spec.seqlen), seed=spec.seed)
        made["ids"] = ids
        return ids

    def finish(directory: Path, run) -> None:
        outcome.runs = [run]
        outcome.seconds["total_seconds"] = time.perf_counter() - started
        outcome.report = build_report(outcome, argv=argv, calibration_ids=made.get("ids"))
        outcome.report["streamed"] = True
        write_json_atomic(directory / REPORT_NAME, outcome.report)
        (directory / RECIPE_NAME).write_text(recipe_text(job), encoding="utf-8")

    fingerprint = replace(job, execution=replace(job.execution, stream=True)).to_dict()
    try:
        with determinism.deterministic(job.execution.deterministic):
            run = stream_prune(path, out, calibration, settings,
                               device=_rank_device(job.execution.device),
                               batch_size=job.execution.batch_size,
                               activations=job.execution.activations,
                               layer_errors=job.execution.layer_errors, progress=progress,
                               log=log if verbose else None, resume=resume, restart=restart,
                               finish=finish, fingerprint=fingerprint)
    except SnapPruneError:
        discard_partial(out)
        raise
    except KeyboardInterrupt:
        log(f"finished blocks are kept in {partial_dir(out)}: run the same command with "
            "--resume to continue")
        raise
    finally:
        if group.active:
            group.leave()
    outcome.runs = [run]
    if group.is_main:
        outcome.saved = out
        _log_run(run, log)
        if json_path is not None:
            write_json_atomic(json_path, outcome.report)
    return outcome

