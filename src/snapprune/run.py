"""One run path: ``execute(job, out)`` does everything a command does — check, load,
estimate, evaluate the model before, apply the job's steps, evaluate after, sample, report and
save — for ``prune``, ``shrink``, ``quantize``, ``recover``, ``eval``, every ``sweep`` cell,
recipes and the Python API. What each step does is its kind's (``steps``); this module only
calls the protocol's hooks in order.

A ``Workbench`` holds one loaded model and what several jobs on it can share (tokenised
calibration sets, the first block's inputs, tokenised evaluation text). The device contract:
the model stays where it was loaded (CPU); block-wise steps move one block at a time to the
device and back; evaluation and sampling move the model to the device for their duration only,
or, when it does not fit there, dispatch it across device and CPU (``placed``).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .engine import determinism
from .errors import SnapPruneError
from .generate import DEFAULT_PROMPTS
from .jobs import Job, recipe_text
from .models import collectives, experts
from .outputs import (
    RECIPE_NAME,
    REPORT_NAME,
    check_output_dir,
    output_lock,
    save_directory,
    stale_partials,
    write_json_atomic,
)
from .steps import (
    Step,
    StepContext,
    after_label,
    before_label,
    needs_calibration,
    resolve_job,
    stages,
    step_for,
    step_named,
)
from .workbench import Evaluated, Workbench


@dataclass
class StepResult:
    """One step's record: its kind, its settings, what it did, and whether it ran inside the
    pass of the step before it (joint)."""

    step: Step
    settings: object
    run: object
    fused: bool = False


@dataclass
class Outcome:
    """What ``execute`` did: the job as run (every default named), the model after it, what
    each step did, the evaluations before and after, and the report that was written."""

    job: Job
    model: torch.nn.Module | None
    tokenizer: object
    results: list[StepResult] = field(default_factory=list)
    dense: Evaluated | None = None
    evaluated: Evaluated | None = None
    generations: list[dict] | None = None
    report: dict = field(default_factory=dict)
    saved: Path | None = None
    notes: list[str] = field(default_factory=list)
    estimate: object = None
    seconds: dict[str, float] = field(default_factory=dict)
    save_dtype: torch.dtype | None = None
    """The floating-point type of the saved weights (``hf`` format): ``--dtype`` when given,
    else the source checkpoint's (``models.loading.stored_dtype``); ``None``: the model's."""

    @property
    def runs(self) -> list:
        """The records of the job's passes (a fused step's record is inside its pass's)."""
        return [r.run for r in self.results if not r.fused]

    @property
    def run(self):
        return self.runs[0] if self.runs else None

    def run_of(self, kind: str):
        """The record of the job's ``kind`` step (fused or not), or ``None``."""
        return next((r.run for r in self.results if r.step.name == kind), None)

    @property
    def primary(self):
        """The record the report's layers and timing come from: the first pass that keeps
        per-layer records, else the first."""
        passes = [r for r in self.results if not r.fused]
        chosen = next((r for r in passes if r.step.records_layers), None) or (
            passes[0] if passes else None)
        return None if chosen is None else chosen.run

    def add(self, step: Step, settings, run, fused_settings=None) -> None:
        self.results.append(StepResult(step, settings, run))
        for kind, record in step.fused_runs(run):
            self.results.append(StepResult(step_named(kind), fused_settings, record,
                                           fused=True))


def wants_stream(job: Job, resume: bool, out: str | Path | None = None) -> bool:
    """A single step of a kind that streams does when ``stream`` asks, when ``resume`` finds
    a stopped streamed run for ``out``, or by itself when a local safetensors model would not
    fit in memory."""
    single = len(job.steps) == 1 and step_for(job.steps[0]).streams
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
    is loaded. ``resume``/``restart``: continue or discard a stopped run's saved progress.
    ``announce``: measure and say how long the job will take (``estimate``) before it starts.
    Bad input is refused with a ``SnapPruneError`` before anything is loaded or written.
    """
    log = log or (lambda _message: None)
    started = time.perf_counter()
    if resume and restart:
        raise SnapPruneError("resume continues a stopped run and restart discards it; choose "
                             "one")
    job, notes = resolve_job(job)
    if json_path is not None:
        check_json_path(json_path)
    if out is None:
        return _execute(job, None, bench=bench, overwrite=overwrite, json_path=json_path,
                        resume=resume, restart=restart, progress=progress, verbose=verbose,
                        log=log, argv=argv, announce=announce, notes=notes, started=started)
    check_apart(job.model, Path(out).expanduser().resolve())
    out = check_output_dir(out, overwrite)

    # Under torchrun the ranks are one run: the main rank holds the lock for all of them.
    main_rank = collectives.current().is_main
    with output_lock(out) if main_rank else contextlib.nullcontext():
        for stale in stale_partials(out) if main_rank else ():
            log(f"note: removing {stale.name}, the temporary output of an earlier run that was "
                "killed while saving")
            shutil.rmtree(stale, ignore_errors=True)
        return _execute(job, out, bench=bench, overwrite=overwrite, json_path=json_path,
                        resume=resume, restart=restart, progress=progress, verbose=verbose,
                        log=log, argv=argv, announce=announce, notes=notes, started=started)


def check_json_path(json_path: str | Path) -> None:
    """``--json PATH`` refused up front when it cannot be written (not after all the work)."""
    path = Path(json_path).expanduser().resolve()
    if path.is_dir():
        raise SnapPruneError(f"--json {json_path} is a directory; give a file path, e.g. "
                             f"{Path(json_path) / 'report.json'}")
    if not path.parent.is_dir():
        raise SnapPruneError(f"the directory of {json_path} does not exist; create it first")


def check_apart(model: str, out: Path) -> None:
    """``--out`` never equal to, inside, or holding a local ``--model``: replacing the output
    must never touch the input."""
    source = Path(model).expanduser()
    if not source.exists():
        return
    source = source.resolve()
    inside = source.is_dir() and source in out.parents
    if out == source or inside or out in source.parents:
        raise SnapPruneError(f"--out {out} and the model {source} overlap (the same, one inside "
                             "the other); write the output to a directory of its own")


def _execute(job: Job, out: Path | None, *, bench, overwrite, json_path, resume, restart,
             progress, verbose, log, argv, announce, notes, started) -> Outcome:
    """``execute`` after its checks (and, with an output, under its lock)."""
    owns_model = bench is None
    streamed = bench is None and wants_stream(job, resume, out)
    if streamed:
        from .streamed import execute_streamed

        return execute_streamed(job, out, notes=notes, json_path=json_path, resume=resume,
                                restart=restart, progress=progress, verbose=verbose, log=log,
                                argv=argv, started=started, outcome=Outcome(job, None, None,
                                                                            notes=notes))
    group = collectives.current()
    main = group.is_main
    if group.active:
        for settings in job.steps:
            refusal = step_for(settings).single_process
            if refusal:
                raise SnapPruneError(refusal)
    from .models.distributed import rank_device

    device = rank_device(job.execution.device)
    for note in notes:
        if main:
            log(note)
    with determinism.deterministic(job.execution.deterministic), \
            experts.calibration(job.calibration.moe, job.calibration.moe_min_tokens):
        outcome = Outcome(job, None, None, notes=notes)
        seconds = outcome.seconds
        if bench is None:
            from .models.loading import DTYPES, load_model, stored_dtype

            t = time.perf_counter()
            model, tokenizer, source = load_model(job.model, dtype=job.dtype,
                                                  revision=job.revision,
                                                  progress=progress and main,
                                                  device=device)
            outcome.save_dtype = (DTYPES[job.dtype] if job.dtype in DTYPES
                                  else stored_dtype(model, source))
            seconds["model_loading_seconds"] = time.perf_counter() - t
            bench = Workbench(model, tokenizer, device=device,
                              progress=progress and main, log=log if main else None)
        _check_model(job, bench)
        context = StepContext(job, bench, None if out is None else Path(out), resume=resume,
                              restart=restart, log=log, verbose=verbose,
                              progress=progress and main, execute=execute)
        for settings in job.steps:
            step_for(settings).begin(settings, context)
        if job.steps and main and announce:
            from .estimate import estimate_job

            outcome.estimate = estimate_job(bench, job)
            log(outcome.estimate.describe())
        if main and job.steps and job.evaluation.dense:
            t = time.perf_counter()
            outcome.dense = bench.evaluate(job.evaluation, label=before_label(job))
            seconds["dense_evaluation_seconds"] = time.perf_counter() - t
        before = bench.samples() if main and job.steps and job.output.samples else None
        for step, settings, fused in stages(job):
            outcome.add(step, settings, step.apply(settings, context, fused), fused)
        if group.active:  # nothing below calls a collective: the others may go
            group.leave()
        if not main:
            outcome.model, outcome.tokenizer = bench.model, bench.tokenizer
            return outcome
        for result in outcome.results:
            log(result.step.log_line(result.run, fused=result.fused))
        t = time.perf_counter()
        outcome.evaluated = bench.evaluate(job.evaluation, label=after_label(job))
        seconds["evaluation_seconds"] = time.perf_counter() - t
        if before is not None:
            after = bench.samples()
            outcome.generations = [
                {"prompt": p, before_label(job): d, after_label(job): a}
                for p, d, a in zip(DEFAULT_PROMPTS, before, after, strict=True)]
        outcome.model, outcome.tokenizer = bench.model, bench.tokenizer
        seconds["total_seconds"] = time.perf_counter() - started
        calibration_ids = (bench.calibration_ids(job.calibration)[0]
                           if needs_calibration(job) else None)
        finish = _report_writer(outcome, argv, calibration_ids)
        if out is None:
            finish(None)
        else:
            outcome.saved = _save(outcome, Path(out), overwrite=overwrite, finish=finish)
            for settings in job.steps:
                step_for(settings).finished(settings, context)
        if json_path is not None:
            write_json_atomic(json_path, outcome.report)
    if owns_model:  # a mixture's experts fused again, as transformers laid them out
        from .models.adapters import fold_model

        fold_model(outcome.model)
    return outcome


def _check_model(job: Job, bench: Workbench) -> None:
    """Refusals that need the model, each step's and the format's, before any work; text
    that cannot serve as calibration is refused before the estimate."""
    from .export import get_format

    bench.note_uncovered()
    for settings in job.steps:
        step_for(settings).check_model(settings, job, bench.model)
    get_format(job.output.format).check_model(bench.model, job)
    if needs_calibration(job):
        bench.calibration_ids(job.calibration)


def _report_writer(outcome: Outcome, argv, calibration_ids) -> Callable[[Path | None], None]:
    """``finish(directory)``: build the report once, whole (the files written and where the
    output will be), and write it with the recipe into ``directory`` (``None``: nothing
    saved)."""
    from .report import build_report

    def finish(directory: Path | None, files: dict | None = None,
               saved_to: Path | None = None) -> None:
        outcome.report = build_report(outcome, argv=argv, calibration_ids=calibration_ids,
                                      files=files, saved_to=saved_to)
        if directory is not None:
            write_json_atomic(directory / REPORT_NAME, outcome.report)
            (directory / RECIPE_NAME).write_text(recipe_text(outcome.job), encoding="utf-8")

    return finish


def _save(outcome: Outcome, out: Path, *, overwrite: bool, finish) -> Path:
    """The model in the job's format, its tokenizer, the steps' files, then the report and
    recipe, into a temporary directory renamed into place."""
    from .export import get_format

    def fill(tmp: Path) -> None:
        files, notes = get_format(outcome.job.output.format).write(outcome, tmp)
        outcome.notes.extend(notes)
        for result in outcome.results:
            files += result.step.files(result.run, tmp)
        finish(tmp, {name: (tmp / name).stat().st_size for name in files}, out)

    return save_directory(out, fill, overwrite=overwrite)
